/* circuitfind's circuit explorer (circuitfind/reports/explorer.py writes the page).
 * Every string from the data (node names, settings, prompts) reaches the DOM through textContent or
 * as an SVG text node, never as markup. */
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("explorer-data").textContent);
  var S = DATA.settings;
  var EDGES = DATA.edges;
  var SY = 120; // pixels per layout row; a column's width follows the window's shape (scaleX)
  var COLOR = {
    pos: "#2166ac", neg: "#b2182b", zero: "#9a9a9a",
    both: "#4d4d4d", onlyA: "#e66101", onlyB: "#1b9e77", mixed: "#c9a400"
  };
  var CLASS_TEXT = { both: "in both A and B", onlyA: "only in A", onlyB: "only in B", mixed: "mixed (collapsed)" };
  var NODE = {};
  DATA.nodes.forEach(function (n) { NODE[n.id] = n; });
  var COLLAPSED = {};
  DATA.collapsed.forEach(function (n) { COLLAPSED[n.id] = n; });

  // per setting: edge index -> position in its arrays; the nodes its circuit touches
  S.forEach(function (s) {
    s.at = new Map();
    s.edges.forEach(function (e, j) { s.at.set(e, j); });
    s.circuit = new Set();
    s.nodes = new Set();
    s.edges.forEach(function (e, j) {
      if (!s.inCircuit[j]) return;
      s.circuit.add(e);
      endpoints(e).forEach(function (n) { s.nodes.add(n); });
    });
    s.healthy = s.flags.length === 0;
  });

  function endpoints(e) {
    var out = [EDGES[e][0], EDGES[e][1]];
    var r = NODE[EDGES[e][1]];
    if (r && r.feeds) r.feeds.forEach(function (h) { out.push(h); });
    return out;
  }

  function el(tag, text, cls) {
    var x = document.createElement(tag);
    if (text !== undefined && text !== null) x.textContent = String(text);
    if (cls) x.className = cls;
    return x;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined || !isFinite(x)) return "n/a";
    return Number(x).toPrecision(digits || 3);
  }
  function option(select, value, text) {
    var o = el("option", text);
    o.value = String(value);
    select.appendChild(o);
  }

  // ---- the page's elements -----------------------------------------------------------------
  var app = document.getElementById("app");
  app.textContent = "";
  var header = el("header");
  header.appendChild(el("h1", DATA.title));
  var g = DATA.graph;
  header.appendChild(el("div", S.length + " setting" + (S.length === 1 ? "" : "s") + "; model graph: " +
    g.nLayers + " layers, " + g.nHeads + " heads (" + g.nKvHeads + " key/value heads), " + g.nEdges +
    " edges. Input at the bottom, logits at the top; a head's q/k/v inputs sit just below it. Drawn with Cytoscape.js " +
    DATA.cytoscapeVersion + ".", "sub"));
  app.appendChild(header);

  var controls = el("div"); controls.id = "controls";
  function labelled(text, input) {
    var l = el("label", text + " ");
    l.appendChild(input);
    controls.appendChild(l);
    return l;
  }
  var modeSel = el("select"); modeSel.id = "mode";
  [["circuit", "circuit as found"], ["topk", "top-k by |score|"], ["compare", "compare A and B"],
   ["consensus", "consensus of healthy settings"]].forEach(function (m) { option(modeSel, m[0], m[1]); });
  labelled("View", modeSel);
  var aSel = el("select"); aSel.id = "setting-a";
  var bSel = el("select"); bSel.id = "setting-b";
  S.forEach(function (s, i) {
    var mark = s.healthy ? "" : "  [flagged]";
    option(aSel, i, s.label + mark);
    option(bSel, i, s.label + mark);
  });
  labelled("Setting A", aSel);
  var bLabel = labelled("B", bSel);
  var size = el("input"); size.id = "size"; size.type = "range"; size.min = "1"; size.step = "1";
  var sizeLabel = labelled("Edges kept", size);
  var sizeValue = el("b"); sizeValue.id = "size-value";
  sizeLabel.appendChild(sizeValue);
  var collapse = el("input"); collapse.id = "collapse"; collapse.type = "checkbox";
  labelled("Heads as layers", collapse);
  var search = el("input"); search.id = "search"; search.type = "search"; search.placeholder = "node, e.g. a3.2";
  labelled("Find", search);
  var searchResult = el("span", "", "muted"); searchResult.id = "search-result";
  controls.appendChild(searchResult);
  var svgBtn = el("button", "Export SVG"); svgBtn.id = "export-svg";
  var pngBtn = el("button", "Export PNG"); pngBtn.id = "export-png";
  controls.appendChild(svgBtn);
  controls.appendChild(pngBtn);
  app.appendChild(controls);

  var healthBox = el("div"); healthBox.id = "health"; healthBox.hidden = true;
  app.appendChild(healthBox);
  var status = el("div"); status.id = "status";
  var countEl = el("b"); countEl.id = "edge-count";
  var faithEl = el("b"); faithEl.id = "faithfulness";
  var faithNote = el("span", "", ""); faithNote.id = "faith-note";
  status.appendChild(countEl);
  status.appendChild(document.createTextNode(" edges shown. Faithfulness: "));
  status.appendChild(faithEl);
  status.appendChild(document.createTextNode(" "));
  status.appendChild(faithNote);
  app.appendChild(status);

  var main = el("div"); main.id = "main";
  var cyBox = el("div"); cyBox.id = "cy";
  var side = el("div"); side.id = "side";
  main.appendChild(cyBox);
  main.appendChild(side);
  app.appendChild(main);
  side.appendChild(el("h2", "Details (hover or click)"));
  var details = el("div", "Hover over a node or an edge; click to keep it here."); details.id = "details";
  side.appendChild(details);
  side.appendChild(el("h2", "Legend"));
  var legend = el("div"); legend.id = "legend";
  side.appendChild(legend);
  var listsHead = el("h2", "Edges by class");
  var lists = el("div"); lists.id = "lists";
  side.appendChild(listsHead);
  side.appendChild(lists);
  side.appendChild(el("h2", "Setting"));
  var info = el("div"); info.id = "setting-info";
  side.appendChild(info);

  // ---- state -------------------------------------------------------------------------------
  var firstHealthy = S.findIndex(function (s) { return s.healthy; });
  var state = { mode: "circuit", a: Math.max(firstHealthy, 0), b: 0, k: 1, collapsed: false };
  state.collapsed = S[state.a].nEdges > 400; // a large circuit opens with heads merged into layers
  state.b = S.length > 1 ? (state.a + 1) % S.length : state.a;
  state.k = Math.max(1, S[state.a].ranked ? Math.min(S[state.a].nEdges || 1, S[state.a].ranked) : 1);

  // Node sizes, label sizes and edge widths keep about one size on screen as the view zooms out (a
  // 30-layer model fits the window at a zoom of about 0.2), bounded by the spacing of the layout.
  var curSX = 90;
  function inv() { return 1 / Math.max(cy ? cy.zoom() : 1, 0.02); }
  function dims(kind) {
    var small = kind === "q" || kind === "k" || kind === "v";
    var wide = kind === "input" || kind === "logits" || kind === "layer";
    var w = small ? 7 : (wide ? 56 : 36), h = small ? 7 : 16, f = small ? 7 : 12;
    var capW = small ? 0.15 * curSX : (wide ? 0.9 * curSX : 0.8 * curSX), capH = small ? 0.15 * SY : 0.6 * SY;
    var z = Math.min(Math.max(inv(), 1), capW / w, capH / h);
    return { w: w * z, h: h * z, font: f * z };
  }
  function edgeFactor() { return Math.min(Math.max(inv(), 1), 0.06 * SY); }
  var cy = null;
  cy = cytoscape({
    container: cyBox,
    elements: [],
    layout: { name: "preset" },
    minZoom: 0.02,
    maxZoom: 4,
    style: [
      { selector: "node", style: {
        "label": "data(label)", "text-valign": "center", "text-halign": "center",
        "font-size": function (n) { return dims(n.data("kind")).font; },
        "width": function (n) { return dims(n.data("kind")).w; },
        "height": function (n) { return dims(n.data("kind")).h; },
        "shape": "round-rectangle", "background-color": "#e8eef7",
        "border-width": 1, "border-color": "#6b7a90", "color": "#111", "min-zoomed-font-size": 6 } },
      { selector: "node[kind = 'mlp']", style: { "background-color": "#f3e9d2", "border-color": "#a08050" } },
      { selector: "node[kind = 'input'], node[kind = 'logits']", style: { "background-color": "#e0e0e0", "font-weight": "bold" } },
      { selector: "node[kind = 'layer']", style: { "background-color": "#dfe7f3" } },
      { selector: "node[kind = 'q'], node[kind = 'k'], node[kind = 'v']", style: {
        "shape": "ellipse", "text-valign": "bottom", "background-color": "#ffffff", "color": "#555",
        "min-zoomed-font-size": 9 } },
      { selector: "node.hit", style: { "border-width": 3, "border-color": "#ff00aa" } },
      { selector: "edge", style: {
        "width": function (e) { return e.data("width") * edgeFactor(); },
        "line-color": "data(color)", "target-arrow-color": "data(color)",
        "target-arrow-shape": "triangle", "arrow-scale": 0.6, "curve-style": "straight", "opacity": 0.75 } },
      { selector: "edge[cls = 'mixed']", style: { "line-style": "dashed" } },
      { selector: "edge.structural", style: {
        "line-color": "#b0b0b0", "target-arrow-shape": "none", "opacity": 0.8, "line-style": "dotted" } },
      { selector: "edge.hit", style: { "opacity": 1, "underlay-color": "#ff00aa", "underlay-opacity": 0.35, "underlay-padding": 3 } }
    ]
  });
  var restyling = false;
  cy.on("zoom", function () {
    if (restyling) return;
    restyling = true;
    requestAnimationFrame(function () { restyling = false; cy.style().update(); });
  });

  // ---- what is shown -----------------------------------------------------------------------
  function scoreOf(s, e) {
    var j = s.at.get(e);
    return j === undefined || !s.score ? null : s.score[j];
  }
  function circuitEdges(s) {
    var out = [];
    s.edges.forEach(function (e, j) { if (s.inCircuit[j]) out.push({ e: e, score: s.score ? s.score[j] : null }); });
    return out;
  }
  function healthyCount() { return S.filter(function (s) { return s.healthy; }).length; }

  function shownEdges() {
    var A = S[state.a], B = S[state.b];
    if (state.mode === "topk" && A.ranked) {
      var k = Math.min(state.k, A.ranked);
      return A.edges.slice(0, k).map(function (e, j) { return { e: e, score: A.score[j] }; });
    }
    if (state.mode === "compare") {
      var out = [];
      circuitEdges(A).forEach(function (x) { x.cls = B.circuit.has(x.e) ? "both" : "onlyA"; out.push(x); });
      circuitEdges(B).forEach(function (x) { if (!A.circuit.has(x.e)) { x.cls = "onlyB"; out.push(x); } });
      return out;
    }
    if (state.mode === "consensus") {
      var healthy = S.filter(function (s) { return s.healthy; });
      var count = new Map();
      healthy.forEach(function (s) { s.circuit.forEach(function (e) { count.set(e, (count.get(e) || 0) + 1); }); });
      var res = [];
      count.forEach(function (c, e) { res.push({ e: e, score: null, fraction: c / healthy.length }); });
      return res;
    }
    return circuitEdges(A);
  }

  function consensusColor(f) { // light yellow (few settings) to dark blue (all)
    var a = [237, 248, 177], b = [8, 29, 88];
    var c = a.map(function (v, i) { return Math.round(v + (b[i] - v) * f); });
    return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
  }
  function edgeColor(x) {
    if (x.cls) return COLOR[x.cls];
    if (x.fraction !== undefined) return consensusColor(x.fraction);
    if (x.score === null || x.score === 0) return COLOR.zero;
    return x.score > 0 ? COLOR.pos : COLOR.neg;
  }

  function collapsedId(name) {
    var n = NODE[name];
    if (!n || (n.kind !== "head" && n.kind !== "q" && n.kind !== "k" && n.kind !== "v")) return name;
    return "a" + n.layer + ".*";
  }

  function scaleX() { // pixels per column: the drawing takes about the window's shape (at least 90 per column)
    var pts = state.collapsed ? DATA.collapsed : DATA.nodes;
    var xs = pts.map(function (n) { return n.x; }), ys = pts.map(function (n) { return n.y; });
    var cols = Math.max(1, Math.max.apply(null, xs) - Math.min.apply(null, xs));
    var rows = Math.max(1, Math.max.apply(null, ys) - Math.min.apply(null, ys));
    var aspect = (cyBox.clientWidth || 1000) / (cyBox.clientHeight || 600);
    return Math.min((state.collapsed ? 12 : 4) * SY, Math.max(90, 0.9 * SY * rows / cols * aspect));
  }

  var current = []; // the shown items, for details and export
  function render() {
    var items = shownEdges();
    var elements = [], nodeIds = new Set(), maxAbs = 0;
    function addNode(id) {
      if (nodeIds.has(id)) return;
      nodeIds.add(id);
      var n = state.collapsed ? COLLAPSED[id] : NODE[id];
      var kind = state.collapsed ? (/\.\*$/.test(id) ? "layer" : (NODE[id] ? NODE[id].kind : "head")) : n.kind;
      var label = kind === "layer" ? "attn L" + id.slice(1, -2) : (kind === "q" || kind === "k" || kind === "v" ? kind : id);
      elements.push({ group: "nodes", data: { id: id, label: label, kind: kind }, position: { x: n.x * SX, y: -n.y * SY } });
    }
    var SX = scaleX();
    var shown;
    if (state.collapsed) {
      var agg = new Map();
      items.forEach(function (x) {
        var s = collapsedId(EDGES[x.e][0]), t = collapsedId(EDGES[x.e][1]);
        var key = s + "\u0000" + t;
        var a = agg.get(key);
        if (!a) { a = { s: s, t: t, members: [], score: 0, scored: false, fraction: 0 }; agg.set(key, a); }
        a.members.push(x);
        if (x.score !== null && x.score !== undefined) { a.score += x.score; a.scored = true; }
        if (x.fraction !== undefined) a.fraction += x.fraction;
      });
      shown = [];
      agg.forEach(function (a) {
        var classes = new Set(a.members.map(function (m) { return m.cls; }));
        var item = { s: a.s, t: a.t, members: a.members, score: a.scored ? a.score : null };
        if (state.mode === "compare") item.cls = classes.size === 1 ? a.members[0].cls : "mixed";
        if (state.mode === "consensus") item.fraction = a.fraction / a.members.length;
        shown.push(item);
      });
    } else {
      shown = items.map(function (x) { return { s: EDGES[x.e][0], t: EDGES[x.e][1], e: x.e, score: x.score, cls: x.cls, fraction: x.fraction, members: [x] }; });
    }
    shown.forEach(function (x) { if (x.score !== null && x.score !== undefined) maxAbs = Math.max(maxAbs, Math.abs(x.score)); });
    shown.forEach(function (x, i) {
      addNode(x.s); addNode(x.t);
      var w = 1.5;
      if (state.mode === "consensus") w = 0.8 + 4.2 * x.fraction;
      else if (maxAbs > 0 && x.score !== null && x.score !== undefined) w = 0.6 + 5.4 * Math.sqrt(Math.abs(x.score) / maxAbs);
      elements.push({ group: "edges", data: { id: "e" + i, source: x.s, target: x.t, width: w, color: edgeColor(x), cls: x.cls || "", item: i } });
    });
    if (!state.collapsed) { // q/k/v inputs feed their head (every head of a grouped-query group)
      Array.from(nodeIds).forEach(function (id) {
        var n = NODE[id];
        if (!n || !n.feeds || !n.feeds.length) return;
        n.feeds.forEach(function (h) {
          addNode(h);
          elements.push({ group: "edges", classes: "structural", data: { id: "s" + id + "\u0000" + h, source: id, target: h, width: 1, color: "#c8c8c8" } });
        });
      });
    }
    current = shown;
    curSX = SX;
    cy.batch(function () {
      cy.elements().remove();
      cy.add(elements);
    });
    cy.fit(undefined, 30);
    cy.style().update();
    updateStatus(items, maxAbs);
    updateLegend(items, maxAbs);
    updateLists(items);
    updateHealth();
    updateInfo();
  }

  // ---- the size control and faithfulness -----------------------------------------------------
  function faithAt(curve, k) {
    if (!curve) return null;
    var pts = [];
    curve.sizes.forEach(function (s, i) { if (curve.faithfulness[i] !== null) pts.push([s, curve.faithfulness[i]]); });
    for (var i = 0; i < pts.length; i++) if (pts[i][0] === k) return { value: pts[i][1], exact: true, at: k };
    for (i = 0; i + 1 < pts.length; i++) {
      var p = pts[i], q = pts[i + 1];
      if (p[0] < k && k < q[0]) {
        return { value: p[1] + (q[1] - p[1]) * (k - p[0]) / (q[0] - p[0]), exact: false, lo: p, hi: q };
      }
    }
    return { value: null, outside: true, first: pts.length ? pts[0][0] : null };
  }

  function updateStatus(items, maxAbs) {
    var A = S[state.a];
    countEl.textContent = String(items.length);
    sizeLabel.hidden = state.mode !== "topk";
    bLabel.hidden = state.mode !== "compare";
    if (state.mode === "topk" && A.ranked) {
      sizeValue.textContent = " " + Math.min(state.k, A.ranked) + " of " + A.ranked + (A.ranked < DATA.graph.nEdges ? " embedded (top |score|)" : "");
      var f = faithAt(A.curve, Math.min(state.k, A.ranked));
      var last = items.length ? items[items.length - 1] : null;
      var threshold = last && last.score !== null ? " Kept: the " + items.length + " edges with |score| \u2265 " + fmt(Math.abs(last.score)) + "." : "";
      if (!f) { faithEl.textContent = "n/a"; faithNote.textContent = "(this setting stored no faithfulness curve)." + threshold; }
      else if (f.exact) { faithEl.textContent = fmt(f.value); faithNote.textContent = "(a point of the stored faithfulness curve, measured at " + f.at + " edges)." + threshold; }
      else if (f.outside) { faithEl.textContent = "n/a"; faithNote.textContent = "(outside the stored curve's points, which start at " + f.first + " edges)." + threshold; }
      else {
        faithEl.textContent = "\u2248 " + fmt(f.value);
        faithNote.textContent = "(interpolated linearly between the stored faithfulness curve's points at " + f.lo[0] + " edges (" +
          fmt(f.lo[1]) + ") and " + f.hi[0] + " edges (" + fmt(f.hi[1]) + "); not measured at this size)." + threshold;
      }
    } else if (state.mode === "topk") {
      faithEl.textContent = "n/a"; faithNote.textContent = "(this setting has no edge scores to rank: its circuit is shown).";
    } else if (state.mode === "circuit") {
      faithEl.textContent = A.faithfulness === null ? "n/a" : fmt(A.faithfulness);
      faithNote.textContent = A.faithfulness === null ? "(" + A.faithfulnessStatus + ")" : "(measured on this circuit of " + A.nEdges + " edges).";
    } else if (state.mode === "compare") {
      var B = S[state.b];
      faithEl.textContent = "A " + fmt(A.faithfulness) + ", B " + fmt(B.faithfulness);
      faithNote.textContent = "(each measured on its own circuit).";
    } else {
      faithEl.textContent = "n/a";
      faithNote.textContent = "(the consensus is not a measured circuit; " + healthyCount() + " of " + S.length + " settings are healthy and counted).";
    }
  }

  function legendRow(parent, swatch, text) {
    var row = el("div", null, "legend-row");
    row.appendChild(swatch);
    row.appendChild(el("span", text));
    parent.appendChild(row);
  }
  function line(color, width) {
    var s = el("span", null, "swatch");
    s.style.borderTopColor = color; s.style.borderTopWidth = width + "px";
    return s;
  }
  function updateLegend(items, maxAbs) {
    legend.textContent = "";
    if (state.mode === "compare") {
      var c = counts(items);
      legendRow(legend, line(COLOR.both, 3), "in both A and B (" + c.both + ")");
      legendRow(legend, line(COLOR.onlyA, 3), "only in A (" + c.onlyA + ")");
      legendRow(legend, line(COLOR.onlyB, 3), "only in B (" + c.onlyB + ")");
      if (state.collapsed) legendRow(legend, line(COLOR.mixed, 3), "dashed: a layer-to-layer bundle mixing classes");
      legend.appendChild(el("div", "Width: |score| (A's score; B's for edges only in B).", "muted"));
    } else if (state.mode === "consensus") {
      [0.25, 0.5, 0.75, 1].forEach(function (f) { legendRow(legend, line(consensusColor(f), 0.8 + 4.2 * f), "in " + Math.round(100 * f) + "% of the healthy settings"); });
      legend.appendChild(el("div", "Colour and width: the fraction of the " + healthyCount() + " healthy settings whose circuit contains the edge (flagged settings are left out).", "muted"));
    } else {
      legendRow(legend, line(COLOR.pos, 4), "positive score");
      legendRow(legend, line(COLOR.neg, 4), "negative score");
      legendRow(legend, line(COLOR.zero, 1.5), "zero or no score");
      legend.appendChild(el("div", "Width grows with |score| (as its square root): the widest shown edge has |score| " + fmt(maxAbs) +
        (state.collapsed ? " (a layer-to-layer bundle: the sum of its edges' scores)" : "") + ".", "muted"));
    }
    legendRow(legend, line("#c8c8c8", 1), "dotted: a q/k/v input feeding its head");
    var b1 = el("span", null, "box"); b1.style.background = "#e8eef7";
    legendRow(legend, b1, "attention head a{layer}.{head}");
    var b2 = el("span", null, "box"); b2.style.background = "#f3e9d2";
    legendRow(legend, b2, "MLP m{layer}");
  }

  function counts(items) {
    var c = { both: 0, onlyA: 0, onlyB: 0 };
    items.forEach(function (x) { if (x.cls) c[x.cls] += 1; });
    return c;
  }

  function updateLists(items) {
    lists.textContent = "";
    listsHead.hidden = state.mode !== "compare";
    if (state.mode !== "compare") return;
    ["both", "onlyA", "onlyB"].forEach(function (cls) {
      var members = items.filter(function (x) { return x.cls === cls; });
      members.sort(function (p, q) { return Math.abs(q.score || 0) - Math.abs(p.score || 0); });
      var box = el("div"); box.id = "list-" + cls;
      var h = el("div", CLASS_TEXT[cls] + ": " + members.length + " edges");
      h.style.color = COLOR[cls]; h.style.fontWeight = "bold";
      box.appendChild(h);
      var ol = el("ol");
      members.forEach(function (x) { ol.appendChild(el("li", EDGES[x.e][0] + " \u2192 " + EDGES[x.e][1] + "  " + fmt(x.score))); });
      box.appendChild(ol);
      lists.appendChild(box);
    });
  }

  function updateHealth() {
    var shownSettings = state.mode === "compare" ? [state.a, state.b] : (state.mode === "consensus" ? [] : [state.a]);
    var lines = [];
    shownSettings.forEach(function (i) {
      S[i].flags.forEach(function (f) { lines.push(S[i].label + ": flagged by a health check: " + f.text); });
    });
    if (state.mode === "consensus") {
      S.forEach(function (s) { if (!s.healthy) lines.push(s.label + ": flagged, left out of the consensus (" + s.flags.map(function (f) { return f.code; }).join(", ") + ")"); });
    }
    healthBox.textContent = lines.join("\n");
    healthBox.style.whiteSpace = "pre-wrap";
    healthBox.hidden = lines.length === 0;
  }

  function updateInfo() {
    var A = S[state.a];
    var parts = [A.label, "run: " + A.run];
    Object.keys(A.info).forEach(function (k) { parts.push(k + ": " + A.info[k]); });
    parts.push("circuit: " + A.nEdges + " edges; faithfulness " + (A.faithfulness === null ? "n/a (" + A.faithfulnessStatus + ")" : fmt(A.faithfulness)));
    parts.push("intervals: " + A.intervalNote);
    A.notes.forEach(function (n) { parts.push("note: " + n); });
    A.examples.forEach(function (ex, i) {
      parts.push("example " + (i + 1) + ": " + (ex.clean || "") + (ex.answers ? "  answers " + ex.answers : "") + (ex.corrupted && ex.corrupted !== "None" ? "\n  corrupted: " + ex.corrupted : ""));
    });
    info.textContent = parts.join("\n");
  }

  // ---- details on hover and click -----------------------------------------------------------
  var pinned = null;
  function flaggedMark(s) { return s.healthy ? "" : "  [flagged: " + s.flags.map(function (f) { return f.code; }).join(", ") + "]"; }
  function settingsWithEdge(e) {
    return S.filter(function (s) { return s.circuit.has(e); }).map(function (s) { return s.label + flaggedMark(s); });
  }
  function edgeText(item) {
    var lines = [];
    var A = S[state.a];
    if (item.members.length > 1 || state.collapsed) {
      lines.push(item.s + " \u2192 " + item.t + ": a bundle of " + item.members.length + " edge" + (item.members.length === 1 ? "" : "s"));
      if (item.score !== null && item.score !== undefined) lines.push("summed score: " + fmt(item.score));
      if (item.cls) lines.push("class: " + CLASS_TEXT[item.cls]);
      if (item.fraction !== undefined) lines.push("mean fraction of healthy settings: " + fmt(item.fraction));
      item.members.slice(0, 12).forEach(function (m) { lines.push("  " + EDGES[m.e][0] + " \u2192 " + EDGES[m.e][1] + "  " + fmt(m.score)); });
      if (item.members.length > 12) lines.push("  ... " + (item.members.length - 12) + " more");
      return lines.join("\n");
    }
    var e = item.e;
    lines.push("edge " + EDGES[e][0] + " \u2192 " + EDGES[e][1]);
    if (item.cls) lines.push("class: " + CLASS_TEXT[item.cls]);
    if (item.fraction !== undefined) lines.push("in " + fmt(item.fraction) + " of the healthy settings");
    var which = state.mode === "compare" && item.cls === "onlyB" ? S[state.b] : A;
    var sides = state.mode === "compare" && item.cls === "both" ? [A, S[state.b]] : [which];
    sides.forEach(function (side) {
      var k = side.at.get(e);
      lines.push("score (" + side.label + "): " + fmt(scoreOf(side, e)));
      if (k !== undefined && side.low) lines.push("95% interval: [" + fmt(side.low[k]) + ", " + fmt(side.high[k]) + "] (" + side.intervalNote + ")");
      else lines.push("interval: none (" + side.intervalNote + ")");
    });
    var j = which.at.get(e);
    var inS = settingsWithEdge(e);
    lines.push("in the circuits of " + inS.length + " of " + S.length + " settings:");
    inS.forEach(function (l) { lines.push("  " + l); });
    if (j !== undefined && which.perPrompt && which.perPrompt[j]) {
      lines.push("per-prompt values (" + which.perPrompt[j].length + (which.nPrompts > which.perPrompt[j].length ? " of " + which.nPrompts : "") + " prompts):");
      lines.push("  " + which.perPrompt[j].map(function (v) { return fmt(v); }).join(", "));
    } else if (which.perPrompt) {
      lines.push("per-prompt values: kept for the circuit's edges only");
    }
    return lines.join("\n");
  }
  function nodeText(id) {
    var lines = [];
    var node = cy.getElementById(id);
    if (/\.\*$/.test(id)) lines.push("all heads of layer " + id.slice(1, -2) + " (collapsed)");
    else lines.push("node " + id + (NODE[id] ? " (" + NODE[id].kind + ", layer " + NODE[id].layer + ")" : ""));
    var ins = node.incomers("edge").not(".structural"), outs = node.outgoers("edge").not(".structural");
    lines.push(ins.length + " edges in, " + outs.length + " edges out in this view");
    var members = new Set([id]);
    if (state.collapsed && /\.\*$/.test(id)) DATA.nodes.forEach(function (n) { if (collapsedId(n.id) === id) members.add(n.id); });
    var inS = S.filter(function (s) { return Array.from(members).some(function (m) { return s.nodes.has(m); }); });
    lines.push("in the circuits of " + inS.length + " of " + S.length + " settings:");
    inS.forEach(function (s) { lines.push("  " + s.label + flaggedMark(s)); });
    return lines.join("\n");
  }
  function show(target) {
    if (target.isEdge && target.isEdge()) {
      if (target.hasClass("structural")) { details.textContent = target.source().id() + " feeds head " + target.target().id(); return; }
      details.textContent = edgeText(current[target.data("item")]);
    } else {
      details.textContent = nodeText(target.id());
    }
  }
  cy.on("mouseover", "node, edge", function (evt) { if (!pinned) show(evt.target); });
  cy.on("mouseout", "node, edge", function () { if (pinned) show(pinned); });
  cy.on("tap", "node, edge", function (evt) { pinned = evt.target; show(evt.target); });
  cy.on("tap", function (evt) { if (evt.target === cy) pinned = null; });

  // ---- search ------------------------------------------------------------------------------
  function find(text) {
    cy.elements().removeClass("hit");
    var q = text.trim().toLowerCase();
    if (!q) { searchResult.textContent = ""; return null; }
    var hit = cy.nodes().filter(function (n) { return n.id().toLowerCase() === q; });
    if (!hit.length && state.collapsed && NODE[text.trim()]) hit = cy.getElementById(collapsedId(text.trim()));
    if (!hit.length) hit = cy.nodes().filter(function (n) { return n.id().toLowerCase().indexOf(q) === 0; });
    if (!hit.length) {
      searchResult.textContent = (NODE[text.trim()] ? text.trim() + " is not in this view" : "no node named " + JSON.stringify(text.trim()));
      return null;
    }
    hit.addClass("hit");
    cy.animate({ center: { eles: hit }, zoom: Math.max(cy.zoom(), 1) }, { duration: 0 });
    pinned = hit[0];
    show(hit[0]);
    searchResult.textContent = "found " + hit.map(function (n) { return n.id(); }).slice(0, 5).join(", ") + (hit.length > 5 ? " ..." : "");
    return hit;
  }

  // ---- export ------------------------------------------------------------------------------
  var SVGNS = "http://www.w3.org/2000/svg";
  function svgEl(tag, attrs, text) {
    var x = document.createElementNS(SVGNS, tag);
    Object.keys(attrs).forEach(function (k) { x.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) x.textContent = String(text);
    return x;
  }
  function exportSvg() {
    var bb = cy.elements().boundingBox();
    var k = Math.max(inv(), 1); // the title keeps its size against the drawing, as the nodes do
    var pad = 30 * k, top = 50 * k;
    var w = Math.max(bb.w, 300) + 2 * pad, h = bb.h + 2 * pad + top;
    var svg = svgEl("svg", { xmlns: SVGNS, width: Math.round(w), height: Math.round(h),
      viewBox: [Math.round(bb.x1 - pad), Math.round(bb.y1 - pad - top), Math.round(w), Math.round(h)].join(" "),
      "font-family": "sans-serif" });
    svg.appendChild(svgEl("rect", { x: bb.x1 - pad, y: bb.y1 - pad - top, width: w, height: h, fill: "white" }));
    svg.appendChild(svgEl("text", { x: bb.x1, y: bb.y1 - top + 4 * k, "font-size": 14 * k, "font-weight": "bold" }, DATA.title));
    svg.appendChild(svgEl("text", { x: bb.x1, y: bb.y1 - top + 22 * k, "font-size": 11 * k }, describeView()));
    var edges = svgEl("g", { id: "edges" }), nodes = svgEl("g", { id: "nodes" });
    cy.edges().forEach(function (e) {
      var s = e.source().position(), t = e.target().position();
      var structural = e.hasClass("structural");
      var line = svgEl("line", { x1: s.x.toFixed(1), y1: s.y.toFixed(1), x2: t.x.toFixed(1), y2: t.y.toFixed(1),
        stroke: structural ? "#b0b0b0" : e.data("color"), "stroke-width": (e.data("width") * edgeFactor()).toFixed(2),
        "stroke-opacity": 0.75, "class": structural ? "structural" : "edge" });
      if (structural) line.setAttribute("stroke-dasharray", "2 2");
      line.appendChild(svgEl("title", {}, e.source().id() + " \u2192 " + e.target().id()));
      edges.appendChild(line);
    });
    cy.nodes().forEach(function (n) {
      var p = n.position(), kind = n.data("kind");
      var small = kind === "q" || kind === "k" || kind === "v";
      var dm = dims(kind);
      nodes.appendChild(svgEl("rect", { x: (p.x - dm.w / 2).toFixed(1), y: (p.y - dm.h / 2).toFixed(1), width: dm.w.toFixed(1),
        height: dm.h.toFixed(1), rx: (small ? dm.w / 2 : dm.h / 4).toFixed(1),
        fill: kind === "mlp" ? "#f3e9d2" : (small ? "#ffffff" : "#e8eef7"), stroke: "#6b7a90" }));
      if (!small) {
        nodes.appendChild(svgEl("text", { x: p.x.toFixed(1), y: (p.y + dm.font * 0.35).toFixed(1), "text-anchor": "middle",
          "font-size": dm.font.toFixed(1) }, n.data("label")));
      }
    });
    svg.appendChild(edges);
    svg.appendChild(nodes);
    return new XMLSerializer().serializeToString(svg);
  }
  function describeView() {
    var A = S[state.a];
    if (state.mode === "compare") return "A: " + A.label + " vs B: " + S[state.b].label + "; edges grey: both, orange: only A, green: only B";
    if (state.mode === "consensus") return "consensus of " + healthyCount() + " healthy settings; darker = in more settings";
    return A.label + "; " + countEl.textContent + " edges; blue: positive score, red: negative; width grows with |score|";
  }
  function download(name, href) {
    var a = document.createElement("a");
    a.download = name; a.href = href;
    document.body.appendChild(a); a.click(); a.remove();
  }
  svgBtn.addEventListener("click", function () {
    var url = URL.createObjectURL(new Blob([exportSvg()], { type: "image/svg+xml" }));
    download("circuit.svg", url);
    setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  });
  pngBtn.addEventListener("click", function () { download("circuit.png", cy.png({ full: true, scale: 2, bg: "#ffffff" })); });

  // ---- wiring ------------------------------------------------------------------------------
  function setSizeRange() {
    var A = S[state.a];
    size.max = String(Math.max(1, A.ranked));
    size.disabled = !A.ranked;
    size.value = String(Math.min(state.k, Math.max(1, A.ranked)));
  }
  modeSel.addEventListener("change", function () { state.mode = modeSel.value; pinned = null; render(); });
  aSel.addEventListener("change", function () {
    state.a = +aSel.value;
    var A = S[state.a];
    state.k = Math.max(1, A.ranked ? Math.min(A.nEdges || 1, A.ranked) : 1);
    setSizeRange(); pinned = null; render();
  });
  bSel.addEventListener("change", function () { state.b = +bSel.value; pinned = null; render(); });
  size.addEventListener("input", function () { state.k = +size.value; render(); });
  collapse.addEventListener("change", function () { state.collapsed = collapse.checked; pinned = null; render(); });
  search.addEventListener("change", function () { find(search.value); });
  search.addEventListener("keydown", function (evt) { if (evt.key === "Enter") find(search.value); });

  collapse.checked = state.collapsed;
  aSel.value = String(state.a);
  bSel.value = String(state.b);
  setSizeRange();
  render();
  window.circuitExplorer = {
    cy: cy, state: state, data: DATA, exportSvg: exportSvg, find: find,
    shown: function () { return current.length; },
    readyAt: performance.now()
  };
})();
