"""The settings-sensitivity study (after Zhang & Nanda 2023, "Towards Best Practices of Activation
Patching"), on whichever models are available.

* :func:`head_detection`: IOI heads found by node patching and the 2-SD rule, under STR vs GN
  corruption x probability / logit difference / KL, and under corrupting S2 vs S1+IO.
* :func:`mlp_localisation`: factual recall, MLP outputs patched at the subject's last token in
  sliding windows of 1, 3 and 5 layers, against the summation of single-layer effects.
* :func:`study_report`: where the settings disagree (overlap statistics, bootstrap intervals,
  curves), as HTML and Markdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from circuitfind import compare, figures, health
from circuitfind import patching as P
from circuitfind.io import write_text
from circuitfind.names import head_name
from circuitfind.report import render as R
from circuitfind.tasks import TaskBatch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def head_detection(model: TransformerBridge, model_name: str, prompts: int = 40, seed: int = 0, k: float = 2.0,
                   direction: P.Direction = "denoise", corruptions=("str:s2_io", "gn"), metrics=("prob", "logit_diff", "kl"),
                   variants=("str:s2_io", "str:s1_io"), n_boot: int = 500) -> dict:
    """Heads >= ``k`` SD from the mean patching effect under each setting, with bootstrap intervals."""
    batch = TaskBatch.build(model, "ioi", prompts, seed=seed)
    sign = P.effect_sign(direction)
    settings = [(c, m) for c in corruptions for m in metrics]
    settings += [(v, "logit_diff") for v in variants if (v, "logit_diff") not in settings]
    rows = {}
    for corruption, metric in settings:
        setup = P.prepare(model, batch, corruption, metric)
        res = P.patch_heads(setup, direction)
        normalised = (res.per_prompt - res.base) / (res.clean - res.corrupt)
        ci = compare.bootstrap_ci(normalised, n_boot=n_boot)
        found = [head_name(l, h) for l, h in P.detect(res.effect, k=k, sign=sign)]
        rows[f"{corruption}/{metric}"] = {"corruption": corruption, "metric": metric, "heads": found,
                                          "normalised": res.normalised.tolist(), "ci_low": ci.low.tolist(), "ci_high": ci.high.tolist(),
                                          "clean": res.clean, "corrupt": res.corrupt}
    heads = {name: set(r["heads"]) for name, r in rows.items()}
    names = list(rows)
    return {"model": model_name, "prompts": batch.size, "direction": direction, "k": k, "settings": rows,
            "jaccard": compare.matrix(compare.pairwise(heads), names).tolist(), "names": names,
            "stability": {h: f for h, f in compare.stability(heads).items()},
            "s2_vs_s1io": {v: rows[f"{v}/logit_diff"]["heads"] for v in variants if f"{v}/logit_diff" in rows}}


def mlp_localisation(model: TransformerBridge, model_name: str, prompts: int = 16, seed: int = 0, windows=(1, 3, 5), corruption: str = "gn",
                     metric: str = "prob", position: str = "subject_last") -> dict:
    """Per-layer restoration by MLP windows at the subject's last token, and the summation baseline."""
    batch = TaskBatch.build(model, "factual", prompts, seed=seed)
    setup = P.prepare(model, batch, corruption, metric)
    curves, peaks = {}, {}
    single = None
    for w in sorted(set(windows) | {1}):
        res = P.patch_mlp_windows(setup, w, "denoise", [position])
        if w == 1:
            single = res
        curves[f"window {w}"] = res.normalised.tolist()
    for w in windows:
        if w > 1:
            curves[f"sum of {w} single layers"] = P.window_sum_baseline(single, w).normalised.tolist()
    for name, curve in curves.items():
        peaks[name] = int(torch.tensor(curve).argmax())
    agreement = {}
    for w in windows:
        if w > 1:
            a, b = torch.tensor(curves[f"window {w}"]), torch.tensor(curves[f"sum of {w} single layers"])
            agreement[w] = {"spearman": compare.rank_correlation(a, b, absolute=False)["spearman"],
                            "peak_window": peaks[f"window {w}"], "peak_sum": peaks[f"sum of {w} single layers"],
                            "max_window": float(a.max()), "max_sum": float(b.max())}
    return {"model": model_name, "prompts": batch.size, "corruption": corruption, "metric": metric, "position": position,
            "clean": setup.clean_value, "corrupt": setup.corrupt_value, "curves": curves, "peaks": peaks, "agreement": agreement}


def _pitfalls(codes) -> R.Block:
    """The pitfalls (:data:`circuitfind.health.PITFALLS`) of the settings shown in a section, as facts with reasons."""
    return R.bullets(f"{health.PITFALLS[c][0]}. Why: {health.PITFALLS[c][1]}." for c in codes)


def study_report(heads: list[dict], mlps: list[dict], out_dir: str | Path) -> dict[str, str]:
    """Write ``study.html`` and ``study.md``: the settings' disagreements, with figures."""
    sections = []
    for h in heads:
        title = f"IOI head detection on {h['model']} ({h['prompts']} prompts, {h['direction']}, heads >= {h['k']} SD)"
        rows = []
        for n, r in h["settings"].items():
            eff = torch.tensor(r["normalised"])
            top = int(eff.flatten().abs().argmax())
            l, hd = divmod(top, eff.shape[1])
            rows.append([n, ", ".join(r["heads"]) or "(none)",
                         f"a{l}.{hd}: {eff[l, hd]:.3f} [{r['ci_low'][l][hd]:.3f}, {r['ci_high'][l][hd]:.3f}]"])
        blocks = [R.table(["corruption/metric", "heads found", "top head: normalised effect [95% CI]"], rows),
                  R.text(", ".join(f"{k} {v:.2f}" for k, v in sorted(h["stability"].items(), key=lambda kv: -kv[1])),
                         bold="Heads by the fraction of settings that find them:")]
        if h["s2_vs_s1io"]:
            blocks.append(R.text("; ".join(f"{v}: {', '.join(x) or 'none'}" for v, x in h["s2_vs_s1io"].items()), bold="Corrupting S2 vs S1+IO:"))
        blocks.append(R.figure(figures.heatmap(h["jaccard"], h["names"], "Jaccard overlap of the heads found"), "Jaccard overlap of the heads found"))
        settings = [{"metric": r["metric"], "corruption": r["corruption"], "direction": h["direction"]} for r in h["settings"].values()]
        codes = [c for c in health.PITFALLS if any(c in health.setting_notes(x) for x in settings)]
        sections += [R.section(title, *blocks), R.section("Pitfalls of these settings", _pitfalls(codes), level=3)]
    for m in mlps:
        title = f"Factual recall MLP localisation on {m['model']} ({m['prompts']} prompts, {m['corruption']}, {m['metric']}, at {m['position']})"
        rows = [[w, a["peak_window"], a["peak_sum"], a["max_window"], a["max_sum"], a["spearman"]] for w, a in m["agreement"].items()]
        layers = list(range(len(next(iter(m["curves"].values())))))
        chart = figures.line_chart({k: (layers, v) for k, v in m["curves"].items()}, "layer (window centre)",
                                   "normalised restoration", "MLP windows vs summation of single layers", 760, 340)
        setting = {"metric": m["metric"], "corruption": m["corruption"], "direction": "denoise",
                   "mlp_window": max([int(w) for w in m["agreement"]] or [1])}
        sections += [R.section(title, R.text(str(m["peaks"].get("window 1")), bold="Peak layer of single-layer patching:"),
                               R.table(["window", "peak layer (window)", "peak layer (sum)", "max restored (window)", "max restored (sum)", "Spearman"], rows),
                               R.figure(chart, "MLP windows vs summation of single layers")),
                     R.section("Pitfalls of this setting", _pitfalls(health.setting_notes(setting)), level=3)]
    out = Path(out_dir)
    title = "Settings-sensitivity study"
    return {"html": str(write_text(out / "study.html", R.html_page(title, sections))),
            "markdown": str(write_text(out / "study.md", R.markdown_page(title, sections)))}
