"""The circuit explorer (``circuitfind view``), its layered layout and ``circuitfind draw``.

The browser tests open the page of a small real toy-ioi sweep in headless Chromium driven by Selenium
(Debian's ``chromium`` and ``chromium-driver``; skipped with the reason when they are missing) and read
what a researcher would: the edge count and faithfulness of the size control against the stored curve, the
details of a hovered edge against the bootstrap of its per-prompt scores, the three classes of the
comparison against the two circuits' edge sets, collapse, search, the SVG export, the health banner, and
that hostile names and prompts are shown as text and run nothing.
"""

import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch

from circuitfind.circuits.agreement import bootstrap_ci
from circuitfind.circuits.circuit import Circuit
from circuitfind.circuits.graph import ModelGraph
from circuitfind.cli import main
from circuitfind.reports import layout
from circuitfind.reports.explorer import default_out, embed_json, write_explorer
from circuitfind.runs.sweep import SweepConfig, load_records, run_setting

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
DRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False
browser = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None or not HAVE_SELENIUM,
    reason="needs chromium, chromium-driver (apt-get, as .ci/run does) and selenium (the dev extra)",
)

# EAP under two corruptions (healthy) and with KL noising (every score zero: flagged)
GRID = SweepConfig(
    algorithms=["eap"], corruptions=["str", "resample"], metrics=["logit_diff", "kl"], directions=["noise"], prompts=8
)
HOSTILE = (
    '</script><script>window.__pwned=1</script>"><img src=x onerror="window.__pwned=2">javascript:window.__pwned=3'
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    for setting in GRID.settings():
        run_setting(setting, GRID, run, cache)
    return run


@pytest.fixture(scope="module")
def records(run):
    return {r["setting"]: r for r in load_records(run)}


# -- layout ----------------------------------------------------------------------------------------
def test_layout_puts_input_at_the_bottom_layers_in_rows_and_qkv_with_their_head():
    graph = ModelGraph(3, 6, n_kv_heads=2)
    pos = layout.positions(graph)
    assert pos["input"][1] == pytest.approx(0) and pos["logits"][1] == pytest.approx(4)
    for l in range(3):
        assert {round(pos[f"a{l}.{h}"][1], 6) for h in range(6)} == {l + 1} and pos[f"m{l}"][1] == pytest.approx(l + 1)
        assert [pos[f"a{l}.{h}"][0] for h in range(6)] == sorted(pos[f"a{l}.{h}"][0] for h in range(6))
        for h in range(6):  # heads stay in the same column in every layer; q just below its head
            assert pos[f"a{l}.{h}"][0] == pytest.approx(pos[f"a0.{h}"][0])
            qx, qy = pos[f"a{l}.{h}<q>"]
            assert abs(qx - pos[f"a{l}.{h}"][0]) < 0.5 and l < qy < l + 1
        for g in range(2):  # a group's k and v: below the middle of its three heads
            middle = sum(pos[f"a{l}.{h}"][0] for h in range(3 * g, 3 * g + 3)) / 3
            for kind in "kv":
                x, y = pos[f"a{l}.g{g}<{kind}>"]
                assert abs(x - middle) < 0.5 and l < y < l + 1
    collapsed = layout.collapsed_positions(3)
    assert set(collapsed) == {"input", "logits", "a0.*", "a1.*", "a2.*", "m0", "m1", "m2"}
    assert collapsed["a2.*"][1] == pytest.approx(3) and collapsed["logits"][1] == pytest.approx(4)


# -- the page's data ----------------------------------------------------------------------------
def page_json(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


def test_embedded_json_escapes_markup_and_reads_back():
    data = {"name": HOSTILE, "x": "a & b <c>"}
    text = embed_json(data)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == data


def test_the_page_of_a_run_holds_its_circuits_curves_and_flags(run, records):
    page = write_explorer(run)
    assert page == run / "explorer.html" == default_out(run)
    html = page.read_text()
    data = page_json(html)
    assert "https://" not in html.split("<script>")[0] and "Content-Security-Policy" in html
    by_label = {s["label"]: s for s in data["settings"]}
    assert set(by_label) == set(records)
    for name, record in records.items():
        s = by_label[name]
        edges = [tuple(data["edges"][e]) for e, keep in zip(s["edges"], s["inCircuit"], strict=True) if keep]
        assert set(edges) == {tuple(e) for e in record["edges"]} and s["nEdges"] == record["n_edges"]
        assert s["curve"]["sizes"] == record["curve"]["sizes"]
        assert [c["code"] for c in s["flags"]] == (["zero_scores"] if record["metric"] == "kl" else [])
        ranked = [abs(x) for x in s["score"][: s["ranked"]]]
        assert ranked == sorted(ranked, reverse=True) and s["ranked"] == record["graph_edges"]  # toy-ioi: every edge


def test_view_command_writes_beside_a_circuit_file_and_refuses_bad_input(run, records, tmp_path, capsys):
    record = next(iter(records.values()))
    circuit = Circuit.load(record["graphml"])
    path = circuit.save(tmp_path / "c.graphml")
    assert main(["view", str(path)]) == 0
    assert (tmp_path / "c.explorer.html").is_file()
    assert main(["view", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "no such run folder or circuit file" in err[0]
    small = ModelGraph(2, 2)  # not toy-ioi's shape
    other = Circuit(small, torch.ones(small.n_edges, dtype=torch.bool), torch.ones(small.n_edges))
    other_path = other.save(tmp_path / "other.graphml")
    out = tmp_path / "never.html"
    assert main(["view", str(run), "--compare", str(other_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only circuits of one model" in err[0] and not out.exists()


def test_a_circuit_files_stored_faithfulness_and_curve_are_shown(records, tmp_path):
    """Found by a newcomer's review: the page said "not stored" of a file whose graph attributes hold it."""
    record = next(iter(records.values()))
    circuit = Circuit.load(record["graphml"])
    circuit.settings.update(faithfulness=0.39977, faithfulness_status="ok", curve=record["curve"])
    page = write_explorer(circuit.save(tmp_path / "c.graphml"))
    (s,) = page_json(page.read_text())["settings"]
    assert s["faithfulness"] == pytest.approx(0.39977, abs=1e-4) and s["faithfulnessStatus"] == "ok"
    assert s["curve"]["sizes"] == record["curve"]["sizes"]


# -- draw -------------------------------------------------------------------------------------
def test_draw_writes_pdf_svg_and_png_and_says_when_every_score_is_zero(tmp_path, capsys):
    graph = ModelGraph(2, 4)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(1))
    circuit = Circuit(graph, scores.abs() > 1.5, scores, {"algorithm": "eap"})
    path = circuit.save(tmp_path / "c.graphml")
    for suffix, magic in ((".pdf", b"%PDF-"), (".png", b"\x89PNG\r\n\x1a\n"), (".svg", b"<?xml")):
        out = tmp_path / f"c{suffix}"
        assert main(["draw", str(path), "--out", str(out), "--title", "My <circuit>"]) == 0
        assert out.read_bytes().startswith(magic)
    root = ET.fromstring((tmp_path / "c.svg").read_text())
    text = " ".join(t for el in root.iter() if el.tag.endswith("text") for t in el.itertext())
    assert "My <circuit>" in text and "positive score" in text and "every score is zero" not in text
    zero = Circuit(graph, scores.abs() > 1.5, torch.zeros(graph.n_edges), {"algorithm": "eap"})
    zpath = zero.save(tmp_path / "z.graphml")
    assert main(["draw", str(zpath), "--out", str(tmp_path / "z.svg")]) == 0
    root = ET.fromstring((tmp_path / "z.svg").read_text())
    assert "every score is zero" in " ".join(t for el in root.iter() for t in el.itertext())
    assert main(["draw", str(zpath), "--out", str(tmp_path / "z.gif")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("circuitfind: error: --out") and not (tmp_path / "z.gif").exists()


# -- in the browser ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,950"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield d
    d.quit()


@pytest.fixture
def page(run, driver):
    path = run / "explorer.html"
    if not path.exists():
        write_explorer(run)
    driver.get(path.as_uri())
    assert wait_ready(driver)
    driver.get_log("browser")  # (read once: later reads see only new lines)
    return driver


def js(d, code, *args):
    return d.execute_script(code, *args)


def wait_ready(d, seconds: float = 30.0) -> bool:
    """Whether the page's script has built the explorer within ``seconds`` (a loaded machine is slow)."""
    import time

    end = time.monotonic() + seconds
    while not js(d, "return !!window.circuitExplorer"):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def text(d, id_):
    return d.find_element("id", id_).text


def choose(d, id_, value):
    js(
        d,
        "var s = document.getElementById(arguments[0]); s.value = arguments[1]; s.dispatchEvent(new Event('change'));",
        id_,
        str(value),
    )


def setting_index(d, label):
    found = js(
        d,
        "var l = arguments[0]; return window.circuitExplorer.data.settings.findIndex(function (s) { return s.label === l; });",
        label,
    )
    assert found >= 0, label
    return found


@browser
def test_page_opens_without_console_messages(run, driver):
    driver.get((run / "explorer.html").as_uri() if (run / "explorer.html").exists() else write_explorer(run).as_uri())
    assert wait_ready(driver) and driver.get_log("browser") == []
    assert int(text(driver, "edge-count")) > 0


@browser
def test_size_control_shows_edge_count_and_the_curve_faithfulness(page, records):
    name = next(n for n, r in records.items() if r["corruption"] == "str" and r["metric"] == "logit_diff")
    curve = records[name]["curve"]
    choose(page, "setting-a", setting_index(page, name))
    choose(page, "mode", "topk")
    points = sorted({(s, f) for s, f in zip(curve["sizes"], curve["faithfulness"], strict=True) if s > 0})
    (s0, f0), (s1, f1) = points[-3], points[-2]
    for k, expected, word in ((s0, f0, "a point of the stored"), ((s0 + s1) // 2, None, "interpolated linearly")):
        js(
            page,
            "var r = document.getElementById('size'); r.value = arguments[0]; r.dispatchEvent(new Event('input'));",
            k,
        )
        assert (
            int(text(page, "edge-count"))
            == k
            == js(page, "return window.circuitExplorer.cy.edges().not('.structural').length")
        )
        if expected is None:
            expected = f0 + (f1 - f0) * (k - s0) / (s1 - s0)
        shown = float(text(page, "faithfulness").lstrip("≈ "))
        assert shown == pytest.approx(expected, abs=0.0051) and word in text(page, "faith-note")
    assert page.get_log("browser") == []


@browser
def test_hovering_an_edge_shows_its_score_interval_and_settings(page, records):
    from selenium.webdriver.common.action_chains import ActionChains

    name = next(n for n, r in records.items() if r["corruption"] == "resample" and r["metric"] == "logit_diff")
    choose(page, "setting-a", setting_index(page, name))
    choose(page, "mode", "circuit")
    box = page.find_element("id", "cy")
    # the widest edge's midpoint, as the page draws it (canvas pixels from the box's top-left corner)
    x, y = js(
        page,
        "var cy = window.circuitExplorer.cy; var e = cy.edges().not('.structural').max(function (e) { return e.data('width'); }).ele;"
        "var p = e.renderedMidpoint(); return [p.x, p.y];",
    )
    size = box.size
    ActionChains(page).move_to_element_with_offset(
        box, int(x - size["width"] / 2), int(y - size["height"] / 2)
    ).perform()
    details = text(page, "details")
    match = re.match(r"edge (\S+) → (\S+)", details)
    assert match, details
    record = records[name]
    graph = ModelGraph(record["n_layers"], record["n_heads"])
    i = graph.edge_lookup[(match.group(1), match.group(2))]
    per = torch.load(record["per_prompt"], weights_only=True)
    ci = bootstrap_ci(per[[i]], n_boot=1000)
    assert f"score ({name}): {record['scores'][i]:.3g}"[:-1] in details  # 3 significant digits (last may round)
    low, high = re.search(r"95% interval: \[(\S+), (\S+)\]", details).groups()
    assert float(low) == pytest.approx(float(ci.low[0]), rel=5e-3, abs=1e-6)
    assert float(high) == pytest.approx(float(ci.high[0]), rel=5e-3, abs=1e-6)
    containing = [n for n, r in records.items() if [match.group(1), match.group(2)] in r["edges"]]
    assert f"in the circuits of {len(containing)} of {len(records)} settings" in details
    assert all(n in details for n in containing)
    values = re.search(r"per-prompt values \(8 prompts\):\n\s+(.*)", details).group(1).split(", ")
    assert [float(v) for v in values] == pytest.approx(per[i].tolist(), rel=5e-3, abs=1e-6)


@browser
def test_compare_mode_colours_three_classes_that_match_the_two_circuits(page, records):
    names = [n for n, r in records.items() if r["metric"] == "logit_diff"]
    a, b = ({tuple(e) for e in records[n]["edges"]} for n in names)
    choose(page, "setting-a", setting_index(page, names[0]))
    choose(page, "mode", "compare")
    choose(page, "setting-b", setting_index(page, names[1]))
    classes = js(
        page,
        "var c = {}; window.circuitExplorer.cy.edges().not('.structural').forEach(function (e) {"
        " var k = e.data('cls') + ' ' + e.data('color'); c[k] = (c[k] || 0) + 1; }); return c;",
    )
    assert classes == {
        "both #4d4d4d": len(a & b),
        "onlyA #e66101": len(a - b),
        "onlyB #1b9e77": len(b - a),
    }
    for cls, n in (("both", len(a & b)), ("onlyA", len(a - b)), ("onlyB", len(b - a))):
        listed = page.find_elements("css selector", f"#list-{cls} li")
        assert len(listed) == n
    first = page.find_elements("css selector", "#list-onlyA li")
    if first:
        s, r = first[0].text.split()[:3:2]
        assert (s, r) in a - b


@browser
def test_consensus_counts_healthy_settings_and_the_banner_names_flagged_ones(page, records):
    healthy = [n for n, r in records.items() if r["metric"] == "logit_diff"]
    flagged = [n for n in records if n not in healthy]
    choose(page, "mode", "consensus")
    union = set().union(*({tuple(e) for e in records[n]["edges"]} for n in healthy))
    assert int(text(page, "edge-count")) == len(union)
    banner = text(page, "health")
    assert all(n in banner for n in flagged) and "left out of the consensus" in banner
    choose(page, "mode", "circuit")
    choose(page, "setting-a", setting_index(page, flagged[0]))
    assert "flagged by a health check: every edge score is zero" in text(page, "health")


@browser
def test_collapse_search_and_svg_export(page, records):
    choose(page, "mode", "circuit")
    n_shown = int(text(page, "edge-count"))
    svg = js(page, "return window.circuitExplorer.exportSvg();")
    root = ET.fromstring(svg)
    lines = [el for el in root.iter() if el.tag.endswith("line") and el.get("class") == "edge"]
    assert len(lines) == n_shown
    png = js(page, "return window.circuitExplorer.cy.png({full: true, scale: 2, bg: '#ffffff'});")
    assert png.startswith("data:image/png;base64,") and len(png) > 5000
    page.find_element("id", "export-png").click()
    page.find_element("id", "export-svg").click()
    label = js(page, "return window.circuitExplorer.data.settings[window.circuitExplorer.state.a].label;")
    head = sorted(n for n in records[label]["nodes"] if n.startswith("a"))[0]
    page.find_element("id", "search").send_keys(head + "\n")
    assert text(page, "search-result") == f"found {head}"
    assert js(page, "return window.circuitExplorer.cy.getElementById(arguments[0]).hasClass('hit');", head)
    assert text(page, "details").startswith(f"node {head}")
    page.find_element("id", "collapse").click()
    ids = js(page, "return window.circuitExplorer.cy.nodes().map(function (n) { return n.id(); });")
    assert not any("<" in i or re.fullmatch(r"a\d+\.\d+", i) for i in ids) and f"a{head[1]}.*" in ids
    page.find_element("id", "search").clear()
    page.find_element("id", "search").send_keys("zz9\n")
    assert text(page, "search-result") == 'no node named "zz9"'
    assert page.get_log("browser") == []


@browser
def test_hostile_names_and_prompts_render_as_text_and_run_nothing(run, driver, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(run, hostile)
    first = sorted((hostile / "circuits").glob("*.json"))[0]
    record = json.loads(first.read_text())
    record.update(setting=record["setting"] + HOSTILE, task="ioi" + HOSTILE)
    record["examples"][0]["clean"] = HOSTILE
    first.write_text(json.dumps(record))
    circuit = Circuit.load(record["graphml"].replace("circuits/", str(hostile / "circuits") + "/"))
    circuit.settings.update(algorithm=HOSTILE, corruption="javascript:window.__pwned=4")
    graph_file = circuit.save(tmp_path / 'c<script>x"y.graphml')
    page = write_explorer(hostile, compare=graph_file)
    html = page.read_text()
    assert html.count("</script>") == 3  # the data's, the library's and the explorer's: no other
    driver.get(page.as_uri())
    assert wait_ready(driver) and driver.get_log("browser") == []
    assert js(driver, "return typeof window.__pwned;") == "undefined"
    assert len(driver.find_elements("css selector", "img")) == 0
    options = [o.text for o in driver.find_elements("css selector", "#setting-a option")]
    assert any(HOSTILE in o for o in options) and any('c<script>x"y.graphml' in o for o in options)
    choose(driver, "setting-a", setting_index(driver, "A: " + record["setting"]))
    assert HOSTILE in text(driver, "setting-info")
    choose(driver, "setting-a", setting_index(driver, 'B: c<script>x"y.graphml'))
    assert "algorithm: " + HOSTILE in text(driver, "setting-info")
    assert js(driver, "return typeof window.__pwned;") == "undefined" and driver.get_log("browser") == []
