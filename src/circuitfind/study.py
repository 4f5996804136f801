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

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from circuitfind import agreement, figures, health
from circuitfind import patching as P
from circuitfind.errors import ImpossibleSignError
from circuitfind.io import write_text
from circuitfind.metrics import Metric, MetricContext, get_metric
from circuitfind.names import head_name
from circuitfind.report import render as R
from circuitfind.tasks import TaskBatch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


class MetricRecorder(Metric):
    """Several metrics from the same forward passes of one sweep.

    Passed as the sweep's metric, it computes every metric on each batch of answer logits it sees
    and keeps them, and returns the *index* of each logits row instead of a score. The sweep stores
    those indices where it would store scores, whatever order its engine ran the candidates in, so
    :meth:`gather` puts every metric's values in the right place. Indices are float64: exact up to
    2**53 rows.
    """

    name = "record"

    def __init__(self, metrics: Sequence[str | Metric]):
        self.metrics = [get_metric(m) for m in metrics]
        if len({m.name for m in self.metrics}) != len(self.metrics):
            raise ValueError(f"metrics must have different names, got {[m.name for m in self.metrics]}")
        self._rows: list[torch.Tensor] = []
        self._count = 0

    def __call__(self, logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        self._rows.append(torch.stack([m(logits, ctx) for m in self.metrics], -1).cpu())
        ids = torch.arange(self._count, self._count + logits.shape[0], dtype=torch.float64, device=logits.device)
        self._count += logits.shape[0]
        return ids

    def gather(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each metric's values at the rows named by ``ids`` (a sweep's output), same shape as ``ids``."""
        picked = torch.cat(self._rows)[ids.long().cpu()]
        return {m.name: picked[..., i].contiguous() for i, m in enumerate(self.metrics)}


def prepare_recording(model, batch: TaskBatch, corruption: str, metrics: Sequence[str | Metric]) -> P.PatchingSetup:
    """A patching setup whose sweeps record every metric in ``metrics`` (:class:`MetricRecorder`)."""
    return P.prepare(model, batch, corruption, MetricRecorder(metrics))


def patch_heads_metrics(setup: P.PatchingSetup, direction: P.Direction = "denoise") -> dict[str, P.PatchResult]:
    """Head patching under every recorded metric from one sweep (``setup`` from :func:`prepare_recording`);
    each result equals that of a separate :func:`~circuitfind.patching.patch_heads` sweep."""
    recorder = setup.metric
    if not isinstance(recorder, MetricRecorder):
        raise ValueError("patch_heads_metrics needs a setup from prepare_recording")
    ids = P.patch_heads(setup, direction)
    values = recorder.gather(ids.per_prompt)
    out = {}
    for metric in recorder.metrics:
        clean, corrupt = setup.baselines(metric)
        per_prompt = values[metric.name]
        out[metric.name] = P.PatchResult(
            per_prompt.mean(-1), per_prompt, ids.axes, metric.name, ids.corruption, direction, clean, corrupt, ids.kind
        )
    return out


def per_prompt_means(per_prompt: torch.Tensor, copies: int) -> torch.Tensor:
    """Average the ``copies`` rows of each prompt (GN stacks its noise samples, sample-major:
    ``[..., copies * prompts]``), so that a bootstrap resamples prompts, its independent units,
    not correlated prompt x sample rows."""
    n = per_prompt.shape[-1]
    if n % copies:
        raise ValueError(f"{n} rows are not {copies} copies of the same prompts")
    return per_prompt.reshape(*per_prompt.shape[:-1], copies, n // copies).mean(-2)


def bootstrap_weights(n_prompts: int, n_boot: int, seed: int = 0) -> torch.Tensor:
    """``[n_boot, n_prompts]`` resampling weights (how often each prompt is drawn, over ``n_prompts``),
    drawn as :func:`circuitfind.agreement.bootstrap_ci` draws them."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_prompts, (n_boot, n_prompts), generator=gen)
    ones = torch.ones(n_boot, n_prompts, dtype=torch.float64)
    return torch.zeros(n_boot, n_prompts, dtype=torch.float64).scatter_add_(1, idx, ones) / n_prompts


def detection_masks(means: torch.Tensor, k: float, sign: str) -> torch.Tensor:
    """The detection rule of :func:`~circuitfind.patching.detect` on each row of ``means``
    ``[n, components]`` at once: ``[n, components]`` bool, ``True`` where a component is detected."""
    mean = means.mean(-1, keepdim=True)
    sd = means.std(-1, keepdim=True)
    z = torch.where(sd > 0, (means - mean) / torch.where(sd > 0, sd, 1), torch.zeros_like(means))
    if sign == "positive":
        return z >= k
    if sign == "negative":
        return z <= -k
    return z.abs() >= k


def head_detection(
    model: TransformerBridge,
    model_name: str,
    prompts: int = 40,
    seed: int = 0,
    k: float = 2.0,
    direction: P.Direction = "denoise",
    corruptions=("str:s2_io", "gn"),
    metrics=("prob", "logit_diff", "kl"),
    variants=("str:s2_io", "str:s1_io"),
    n_boot: int = 500,
) -> dict:
    """Heads >= ``k`` SD from the mean patching effect under each setting, with bootstrap intervals.

    Each corruption is one sweep recording every metric (:func:`patch_heads_metrics`). Per setting:
    ``heads`` (the effect's sign that means "needed": positive when denoising, negative when
    noising) and ``negative_heads`` (the other sign: heads that push the answer down), or a
    ``*_reason`` where the setting cannot produce that sign (:func:`~circuitfind.patching.impossible_sign`).
    Intervals and stability resample prompts (GN's noise samples are averaged per prompt first):
    ``detection_frequency`` is how often each head is detected over ``n_boot`` resamples, and
    ``jaccard_ci`` a paired interval for the Jaccard between two settings' detected heads.
    """
    batch = TaskBatch.build(model, "ioi", prompts, seed=seed)
    sign = P.effect_sign(direction)  # the sign of a needed head's effect; the other sign pushes the answer down
    other: Literal["positive", "negative"] = "positive" if sign == "negative" else "negative"
    signs = {"heads": sign, "negative_heads": other}
    settings = [(c, m) for c in corruptions for m in metrics]
    settings += [(v, "logit_diff") for v in variants if (v, "logit_diff") not in settings]
    by_corruption: dict[str, list[str]] = {}
    for corruption, metric in settings:
        by_corruption.setdefault(corruption, []).append(metric)
    weights = bootstrap_weights(batch.size, n_boot, seed)
    rows, boot_masks = {}, {}
    for corruption, wanted in by_corruption.items():
        setup = prepare_recording(model, batch, corruption, wanted)
        copies = setup.plan.size // batch.size  # GN stacks its noise samples: rows = copies x prompts
        results = patch_heads_metrics(setup, direction)
        for metric, res in results.items():
            name = f"{corruption}/{metric}"
            per_prompt = per_prompt_means(res.per_prompt, copies)  # [layer, head, prompts]
            normalised = (per_prompt - res.base) / (res.clean - res.corrupt)
            ci = agreement.bootstrap_ci(normalised, n_boot=n_boot, seed=seed)
            frequencies: dict[str, dict[str, float]] = {}
            row: dict[str, Any] = {
                "corruption": corruption,
                "metric": metric,
                "direction": direction,
                "noise_samples": copies,
                "normalised": res.normalised.tolist(),
                "ci_low": ci.low.tolist(),
                "ci_high": ci.high.tolist(),
                "clean": res.clean,
                "corrupt": res.corrupt,
                "detection_frequency": frequencies,
            }
            resampled = (weights @ (per_prompt - res.base).reshape(-1, per_prompt.shape[-1]).double().T).float()
            for key, sign in signs.items():
                try:
                    found = P.detect(res.effect, k=k, sign=sign, metric=metric, direction=direction)
                except ImpossibleSignError as err:
                    row[key], row[f"{key}_reason"] = [], str(err)
                    continue
                row[key] = [head_name(l, h) for l, h in found]
                masks = detection_masks(resampled, k, sign)
                boot_masks[(name, key)] = masks
                frequency = masks.double().mean(0).reshape(res.effect.shape)
                frequencies[key] = {
                    head_name(l, h): float(frequency[l, h])
                    for l in range(frequency.shape[0])
                    for h in range(frequency.shape[1])
                    if frequency[l, h] > 0
                }
            rows[name] = row
    heads = {name: set(r["heads"]) for name, r in rows.items()}
    names = list(rows)
    return {
        "model": model_name,
        "prompts": batch.size,
        "direction": direction,
        "k": k,
        "n_boot": n_boot,
        "signs": signs,
        "settings": rows,
        "jaccard": agreement.matrix(agreement.pairwise(heads), names).tolist(),
        "names": names,
        "jaccard_ci": jaccard_intervals(
            {n: boot_masks[(n, "heads")] for n in names if (n, "heads") in boot_masks}, heads
        ),
        "stability": {h: f for h, f in agreement.stability(heads).items()},
        "s2_vs_s1io": {v: rows[f"{v}/logit_diff"]["heads"] for v in variants if f"{v}/logit_diff" in rows},
    }


def jaccard_intervals(masks: dict[str, torch.Tensor], found: dict[str, set], level: float = 0.95) -> dict[str, dict]:
    """For each pair of settings, the Jaccard of their detected sets and a percentile interval over
    the prompt resamples ``masks[name]`` (``[n_boot, components]``, the same resamples for every
    setting, so the pairs are compared on the same prompts)."""
    names = list(masks)
    alpha = (1 - level) / 2
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = (masks[a] & masks[b]).sum(-1).double()
            either = (masks[a] | masks[b]).sum(-1).double()
            j = torch.where(either > 0, both / either.clamp(min=1), torch.ones_like(both))  # two empty sets agree
            low, high = torch.quantile(j, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
            out[f"{a} | {b}"] = {
                "a": a,
                "b": b,
                "jaccard": agreement.jaccard(found[a], found[b]),
                "low": low,
                "high": high,
            }
    return out


def mlp_localisation(
    model: TransformerBridge,
    model_name: str,
    prompts: int = 16,
    seed: int = 0,
    windows=(1, 3, 5),
    corruption: str = "gn",
    metric: str = "prob",
    position: str = "subject_last",
) -> dict:
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
    window_agreement = {}
    for w in windows:
        if w > 1:
            a, b = torch.tensor(curves[f"window {w}"]), torch.tensor(curves[f"sum of {w} single layers"])
            window_agreement[w] = {
                "spearman": agreement.rank_correlation(a, b, absolute=False)["spearman"],
                "peak_window": peaks[f"window {w}"],
                "peak_sum": peaks[f"sum of {w} single layers"],
                "max_window": float(a.max()),
                "max_sum": float(b.max()),
            }
    return {
        "model": model_name,
        "prompts": batch.size,
        "corruption": corruption,
        "metric": metric,
        "position": position,
        "clean": setup.clean_value,
        "corrupt": setup.corrupt_value,
        "curves": curves,
        "peaks": peaks,
        "agreement": window_agreement,
    }


def _pitfalls(codes) -> R.Block:
    """The pitfalls (:data:`circuitfind.health.PITFALLS`) of the settings shown in a section, as facts with reasons."""
    return R.bullets(f"{health.PITFALLS[c][0]}. Why: {health.PITFALLS[c][1]}." for c in codes)


def _signs_and_stability(h: dict) -> list[R.Section]:
    """The heads of both signs, how often each is detected over prompt resamples, and the paired
    Jaccard intervals between settings (a section; none for a study.json written before these)."""
    if "signs" not in h:
        return []

    def listed(row: dict, key: str) -> str:
        if f"{key}_reason" in row:
            return f"cannot occur: {row[key + '_reason']}"
        freq = row["detection_frequency"].get(key, {})
        return ", ".join(f"{x} ({freq.get(x, 0.0):.2f})" for x in row[key]) or "(none)"

    signs = h["signs"]
    header = [
        "corruption/metric",
        f"heads ({signs['heads']} effects)",
        f"negative heads ({signs['negative_heads']} effects)",
    ]
    rows = [[n, listed(r, "heads"), listed(r, "negative_heads")] for n, r in h["settings"].items()]
    pairs = [[p["a"], p["b"], p["jaccard"], f"[{p['low']:.2f}, {p['high']:.2f}]"] for p in h["jaccard_ci"].values()]
    note = (
        f"In brackets: the fraction of {h['n_boot']} resamples of the prompts in which the head is detected "
        "(noise samples averaged per prompt first)."
    )
    return [
        R.section(
            "Heads of both signs, and how stable they are",
            R.text(note),
            R.table(header, rows),
            R.text("Jaccard of the heads found, with a 95% interval over the same prompt resamples:"),
            R.table(["setting A", "setting B", "Jaccard", "95% interval"], pairs),
            level=3,
        )
    ]


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
            rows.append(
                [
                    n,
                    ", ".join(r["heads"]) or "(none)",
                    f"a{l}.{hd}: {eff[l, hd]:.3f} [{r['ci_low'][l][hd]:.3f}, {r['ci_high'][l][hd]:.3f}]",
                ]
            )
        blocks = [
            R.table(["corruption/metric", "heads found", "top head: normalised effect [95% CI]"], rows),
            R.text(
                ", ".join(f"{k} {v:.2f}" for k, v in sorted(h["stability"].items(), key=lambda kv: -kv[1])),
                bold="Heads by the fraction of settings that find them:",
            ),
        ]
        if h["s2_vs_s1io"]:
            blocks.append(
                R.text(
                    "; ".join(f"{v}: {', '.join(x) or 'none'}" for v, x in h["s2_vs_s1io"].items()),
                    bold="Corrupting S2 vs S1+IO:",
                )
            )
        blocks.append(
            R.figure(
                figures.heatmap(h["jaccard"], h["names"], "Jaccard overlap of the heads found"),
                "Jaccard overlap of the heads found",
            )
        )
        settings = [
            {"metric": r["metric"], "corruption": r["corruption"], "direction": h["direction"]}
            for r in h["settings"].values()
        ]
        codes = [c for c in health.PITFALLS if any(c in health.setting_notes(x) for x in settings)]
        sections += [
            R.section(title, *blocks),
            *_signs_and_stability(h),
            R.section("Pitfalls of these settings", _pitfalls(codes), level=3),
        ]
    for m in mlps:
        title = f"Factual recall MLP localisation on {m['model']} ({m['prompts']} prompts, {m['corruption']}, {m['metric']}, at {m['position']})"
        rows = [
            [w, a["peak_window"], a["peak_sum"], a["max_window"], a["max_sum"], a["spearman"]]
            for w, a in m["agreement"].items()
        ]
        layers = list(range(len(next(iter(m["curves"].values())))))
        chart = figures.line_chart(
            {k: (layers, v) for k, v in m["curves"].items()},
            "layer (window centre)",
            "normalised restoration",
            "MLP windows vs summation of single layers",
            760,
            340,
        )
        setting = {
            "metric": m["metric"],
            "corruption": m["corruption"],
            "direction": "denoise",
            "mlp_window": max([int(w) for w in m["agreement"]] or [1]),
        }
        sections += [
            R.section(
                title,
                R.text(str(m["peaks"].get("window 1")), bold="Peak layer of single-layer patching:"),
                R.table(
                    [
                        "window",
                        "peak layer (window)",
                        "peak layer (sum)",
                        "max restored (window)",
                        "max restored (sum)",
                        "Spearman",
                    ],
                    rows,
                ),
                R.figure(chart, "MLP windows vs summation of single layers"),
            ),
            R.section("Pitfalls of this setting", _pitfalls(health.setting_notes(setting)), level=3),
        ]
    out = Path(out_dir)
    title = "Settings-sensitivity study"
    return {
        "html": str(write_text(out / "study.html", R.html_page(title, sections))),
        "markdown": str(write_text(out / "study.md", R.markdown_page(title, sections))),
    }
