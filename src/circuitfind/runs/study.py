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

from circuitfind import patching as P
from circuitfind import progress
from circuitfind.circuits import agreement
from circuitfind.errors import ImpossibleSignError, TaskError
from circuitfind.io import write_text
from circuitfind.names import head_name
from circuitfind.patching.node_patching import window_layers
from circuitfind.reports import figures
from circuitfind.reports import render as R
from circuitfind.runs import health
from circuitfind.runs.statistics import interval_reason, mean_interval
from circuitfind.tasks.batch import TaskBatch
from circuitfind.tasks.corruptions import Corruption, GaussianNoise, get_corruption
from circuitfind.tasks.metrics import Metric, MetricContext, get_metric

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


def prepare_recording(
    model, batch: TaskBatch, corruption: str | Corruption, metrics: Sequence[str | Metric], progress: bool = False
) -> P.PatchingSetup:
    """A patching setup whose sweeps record every metric in ``metrics`` (:class:`MetricRecorder`);
    ``progress``: its sweeps show bars on stderr."""
    if batch.answer_sequences is not None:  # its probability metrics and per-row bootstrap need one token
        raise TaskError(
            f"task {batch.task.name!r} has multi-token answers (answer_tokens: multi): the settings-sensitivity "
            "study scores one next token (its prob metric and per-row bootstrap); use discover or sweep"
        )
    return P.prepare(model, batch, corruption, MetricRecorder(metrics), progress=progress)


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


def paired_effects(per_prompt: torch.Tensor, base_rows: torch.Tensor, copies: int, gap: float) -> torch.Tensor:
    """Each prompt's own normalised effect ``(patched_i - base_i) / (clean - corrupt)``, GN's noise
    samples averaged per prompt (``[..., prompts]``).

    Paired per prompt: each row is compared with the base run of *that* row, so a component that
    leaves every prompt unchanged gets exactly zero on every prompt (and a zero-width interval),
    whatever the base run's spread between prompts. Its mean over prompts is the point reported
    (``effect / gap``), so a point and its bootstrap interval are of the same quantity.
    """
    if base_rows.shape[-1] != per_prompt.shape[-1]:
        raise ValueError(f"{per_prompt.shape[-1]} patched rows but {base_rows.shape[-1]} base rows")
    diff = per_prompt.double() - base_rows.double().cpu()
    return (per_prompt_means(diff, copies) / gap).float()


def base_rows(setup: P.PatchingSetup, metric: str | Metric, direction: P.Direction) -> torch.Tensor:
    """The metric on each row of the unpatched run that the patch starts from (corrupt when
    denoising, clean when noising): ``[rows]``, from the baselines' logits (no new forward)."""
    logits = setup.corrupt_logits if direction == "denoise" else setup.clean_logits
    if logits is None:
        raise ValueError("the setup holds no baseline logits")
    return get_metric(metric)(logits, setup.ctx).detach().cpu()


def base_probability(setup: P.PatchingSetup, direction: P.Direction) -> float:
    """The answer's mean probability on the base run: a patch can lower it by at most this much,
    which is what the probability pitfall (:data:`circuitfind.runs.health.PITFALLS`) is about."""
    return float(base_rows(setup, "prob", direction).mean())


def early_layers(n_layers: int) -> int:
    """How many first layers count as "early" for the Gaussian-noise pitfall: the first third, at least one."""
    return max(1, n_layers // 3)


def kl_negative_heads(rows: dict[str, dict], corruption: str) -> dict[str, float]:
    """Heads found needed by noising with KL that push the answer *up* when removed under logit
    difference (or probability) with the same corruption: KL counts any change of the output
    distribution, so heads that suppress the answer look needed too. Head -> that metric's effect."""
    kl = rows.get(f"{corruption}/kl")
    signed = rows.get(f"{corruption}/logit_diff") or rows.get(f"{corruption}/prob")
    if kl is None or signed is None or kl["direction"] != "noise":
        return {}
    out = {}
    for name in kl["heads"]:
        layer, head = (int(x) for x in name[1:].split("."))
        value = signed["effect"][layer][head]
        if value > 0:
            out[name] = value
    return out


# A "found" head whose largest mean effect is under this fraction of the clean - corrupt gap is flagged.
SMALL_EFFECT = 0.01


def bootstrap_weights(n_prompts: int, n_boot: int, seed: int = 0) -> torch.Tensor:
    """``[n_boot, n_prompts]`` resampling weights (how often each prompt is drawn, over ``n_prompts``),
    drawn as :func:`circuitfind.circuits.agreement.bootstrap_ci` draws them."""
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
    direction: P.Direction | Literal["both"] = "denoise",
    corruptions=("str:s2_io", "gn"),
    metrics=("prob", "logit_diff", "kl"),
    variants=("str:s2_io", "str:s1_io"),
    n_boot: int = 500,
    gn_scale: float = 3.0,
    gn_samples: int = 3,
    noise_seed: int | None = None,
    task: str = "ioi",
) -> dict:
    """Heads >= ``k`` SD from the mean patching effect under each setting, with bootstrap intervals.

    Each corruption is one sweep recording every metric (:func:`patch_heads_metrics`). Per setting:
    ``heads`` (the effect's sign that means "needed": positive when denoising, negative when
    noising) and ``negative_heads`` (the other sign: heads that push the answer down), or a
    ``*_reason`` where the setting cannot produce that sign (:func:`~circuitfind.patching.impossible_sign`).
    Intervals and stability resample prompts (GN's noise samples are averaged per prompt first):
    ``detection_frequency`` is how often each head is detected over ``n_boot`` resamples, and
    ``jaccard_ci`` a paired interval for the Jaccard between two settings' detected heads.
    GN draws ``gn_samples`` noise samples of ``gn_scale`` embedding SDs from ``noise_seed``
    (default: ``seed``). ``direction="both"`` runs both directions (:func:`both_directions`).
    ``task``: a task name, spec file or dataset file (``ioi`` by default); the STR corruptions and
    ``variants`` name its STR variants. The result names it as :func:`task_identity` does.
    """
    if direction == "both":
        return both_directions(
            model,
            model_name,
            prompts,
            seed,
            k,
            corruptions,
            metrics,
            variants,
            n_boot,
            gn_scale,
            gn_samples,
            noise_seed,
            task,
        )
    return _head_detection(
        model, model_name, prompts, seed, k, direction, corruptions, metrics, variants, n_boot, gn_scale, gn_samples,
        noise_seed, task,
    )[0]  # fmt: skip


def task_identity(task: str) -> dict[str, str]:
    """How a study names its task: ``task`` (the name, or a dataset file's name and the start of its
    content hash, as the sweep's records) and ``task_sha256`` (of the spec's content, or the file's bytes
    and options: :func:`circuitfind.runs.sweep.task_fingerprint`)."""
    from circuitfind.runs.sweep import task_fingerprint, task_label

    return {"task": task_label(task), "task_sha256": task_fingerprint(task)}


def study_corruption(spec: str, gn_scale: float, gn_samples: int, noise_seed: int) -> str | Corruption:
    """``gn`` as the study's Gaussian noise (scale, samples, seed); other names as they are."""
    if spec.split(":")[0] != "gn":
        return spec
    if spec != "gn":
        get_corruption(spec)  # the library's message for a ':' argument
    return GaussianNoise(factor=gn_scale, samples=gn_samples, seed=noise_seed)


def _head_detection(
    model, model_name, prompts, seed, k, direction, corruptions, metrics, variants, n_boot, gn_scale, gn_samples,
    noise_seed, task="ioi",
) -> tuple[dict, dict]:  # fmt: skip
    """:func:`head_detection` in one direction, and its resampled detection masks (per setting)."""
    noise_seed = seed if noise_seed is None else noise_seed
    batch = TaskBatch.build(model, task, prompts, seed=seed)
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
    show = progress.enabled()  # the head sweeps take minutes on a real model: bars on stderr, stages to a listener
    sweeps = progress.bar(show=show, desc=f"{model_name}: head sweeps ({direction})", total=len(by_corruption))
    for corruption, wanted in by_corruption.items():
        sweeps.set_description(f"{model_name}: head sweep, {corruption} ({direction})")
        setup = prepare_recording(
            model, batch, study_corruption(corruption, gn_scale, gn_samples, noise_seed), wanted, progress=show
        )
        copies = setup.plan.size // batch.size  # GN stacks its noise samples: rows = copies x prompts
        results = patch_heads_metrics(setup, direction)
        for metric, res in results.items():
            name = f"{corruption}/{metric}"
            gap = res.clean - res.corrupt
            paired = paired_effects(res.per_prompt, base_rows(setup, metric, direction), copies, gap)
            ci = agreement.bootstrap_ci(paired, n_boot=n_boot, seed=seed)
            frequencies: dict[str, dict[str, float]] = {}
            row: dict[str, Any] = {
                "corruption": corruption,
                "metric": metric,
                "direction": direction,
                "noise_samples": copies,
                "normalised": res.normalised.tolist(),
                "effect": ci.mean.tolist(),
                "ci_low": ci.low.tolist(),
                "ci_high": ci.high.tolist(),
                "clean": res.clean,
                "corrupt": res.corrupt,
                "base_prob": base_probability(setup, direction),
                "detection_frequency": frequencies,
            }
            resampled = (weights @ paired.reshape(-1, paired.shape[-1]).double().T).float()
            for key, sign in signs.items():
                try:
                    found = P.detect(res.effect, k=k, sign=sign, metric=metric, direction=direction)
                except ImpossibleSignError as err:
                    row[key], row[f"{key}_reason"] = [], str(err)
                    continue
                row[key] = [head_name(l, h) for l, h in found]
                if key == "heads":
                    small = [head_name(l, h) for l, h in found if abs(float(ci.mean[l, h])) < SMALL_EFFECT]
                    row["small_heads"] = small
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
        sweeps.update()
    sweeps.close()
    for row in rows.values():
        row["kl_negative_heads"] = kl_negative_heads(rows, row["corruption"]) if row["metric"] == "kl" else {}
    heads = {name: set(r["heads"]) for name, r in rows.items()}
    names = list(rows)
    return {
        "model": model_name,
        **task_identity(task),
        "prompts": batch.size,
        "direction": direction,
        "k": k,
        "n_boot": n_boot,
        "interval_reason": interval_reason(n_boot),  # None: the 95% intervals are defined
        "gn_scale": gn_scale,
        "gn_samples": gn_samples,
        "noise_seed": noise_seed,
        "signs": signs,
        "settings": rows,
        "jaccard": agreement.matrix(agreement.pairwise(heads), names).tolist(),
        "names": names,
        "jaccard_ci": jaccard_intervals(
            {n: boot_masks[(n, "heads")] for n in names if (n, "heads") in boot_masks}, heads
        ),
        "stability": {h: f for h, f in agreement.stability(heads).items()},
        "s2_vs_s1io": {v: rows[f"{v}/logit_diff"]["heads"] for v in variants if f"{v}/logit_diff" in rows},
    }, {n: boot_masks[(n, "heads")] for n in names if (n, "heads") in boot_masks}


def both_directions(
    model, model_name, prompts, seed, k, corruptions, metrics, variants, n_boot, gn_scale, gn_samples, noise_seed,
    task="ioi",
) -> dict:  # fmt: skip
    """Head detection denoising and noising on the same prompts and resamples, and per corruption and
    metric the Jaccard between the two directions' needed heads, with a 95% interval over the same
    prompt resamples (Zhang & Nanda 2023 sec. 5: noising and denoising can find different circuits)."""
    args = (prompts, seed, k)
    rest = (corruptions, metrics, variants, n_boot, gn_scale, gn_samples, noise_seed, task)
    den = _head_detection(model, model_name, *args, "denoise", *rest)
    noi = _head_detection(model, model_name, *args, "noise", *rest)
    return combine_directions(model_name, task, den, noi)


def one_direction(model, model_name: str, direction: P.Direction, **options) -> tuple[dict, dict]:
    """:func:`head_detection` in one ``direction`` with the same options (``direction="both"`` excepted),
    and its resampled detection masks, for :func:`combine_directions`: a flow runs the two directions
    at once this way."""
    full = {**HEAD_DEFAULTS, **options}
    return _head_detection(model, model_name, direction=direction, **{n: full[n] for n in HEAD_ARGS})


HEAD_ARGS = ("prompts", "seed", "k", "corruptions", "metrics", "variants", "n_boot", "gn_scale", "gn_samples",
             "noise_seed", "task")  # fmt: skip
HEAD_DEFAULTS: dict[str, Any] = {
    "prompts": 40, "seed": 0, "k": 2.0, "corruptions": ("str:s2_io", "gn"), "metrics": ("prob", "logit_diff", "kl"),
    "variants": ("str:s2_io", "str:s1_io"), "n_boot": 500, "gn_scale": 3.0, "gn_samples": 3, "noise_seed": None,
    "task": "ioi",
}  # fmt: skip


def combine_directions(model_name: str, task: str, denoised: tuple[dict, dict], noised: tuple[dict, dict]) -> dict:
    """The study of both directions from each direction's result and masks (:func:`one_direction`)."""
    (den, den_masks), (noi, noi_masks) = denoised, noised
    between = {}
    for name in den["settings"]:
        if name in den_masks and name in noi_masks:
            a, b = f"denoise {name}", f"noise {name}"
            found = {a: set(den["settings"][name]["heads"]), b: set(noi["settings"][name]["heads"])}
            (pair,) = jaccard_intervals({a: den_masks[name], b: noi_masks[name]}, found).values()
            between[name] = {"jaccard": pair["jaccard"], "low": pair["low"], "high": pair["high"]}
    return {
        "model": model_name,
        **task_identity(task),
        "direction": "both",
        "interval_reason": den.get("interval_reason"),  # each direction resamples as often
        "by_direction": [den, noi],
        "directions": between,
    }


def axis_ranking(h: dict) -> list[dict]:
    """Which choice moves the detected heads most: for each axis (corruption, STR variant, metric,
    direction), the mean 1 - Jaccard over pairs of settings that differ in that choice only, with a 95%
    percentile bootstrap interval over those pairs (:func:`circuitfind.runs.statistics.mean_interval`;
    undefined, with its ``reason``, from fewer than 3 pairs); largest first."""
    studies = h["by_direction"] if h.get("direction") == "both" else [h]
    found = {
        (d["direction"], r["corruption"], r["metric"]): set(r["heads"]) for d in studies for r in d["settings"].values()
    }
    moves: dict[str, list[float]] = {"corruption": [], "STR variant": [], "metric": [], "direction": []}
    keys = list(found)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            differ = [j for j in range(3) if a[j] != b[j]]
            if len(differ) != 1:
                continue
            axis = ("direction", "corruption", "metric")[differ[0]]
            if axis == "corruption" and a[1].startswith("str") and b[1].startswith("str"):
                axis = "STR variant"
            moves[axis].append(1 - agreement.jaccard(found[a], found[b]))
    ranked = []
    for x, v in moves.items():
        if v:
            ci = mean_interval(v)
            ranked.append(
                {"axis": x, "pairs": len(v), "change": sum(v) / len(v), "low": ci["low"], "high": ci["high"],
                 "reason": ci["reason"]}
            )  # fmt: skip
    return sorted(ranked, key=lambda r: -r["change"])


def _change_interval(r: dict) -> str:
    return f"no interval: {r['reason']}" if r.get("reason") else f"95% CI [{r['low']:.3f}, {r['high']:.3f}]"


def ranking_summary(ranking: list[dict]) -> str:
    """One sentence: which choice changes the detected heads most."""
    if not ranking:
        return "No two settings differ in one choice only, so no choice can be ranked."
    top = ranking[0]
    if top["change"] == 0:
        return "Every choice finds the same heads: no choice moves the detected heads."
    text = (
        f"The {top['axis']} moves the detected heads most: settings that differ only in it share "
        f"{1 - top['change']:.0%} of their heads on average (Jaccard), over {top['pairs']} pair(s) "
        f"(1 - Jaccard {top['change']:.3f}, {_change_interval(top)})."
    )
    if len(ranking) > 1:
        second = ranking[1]
        defined = not top.get("reason") and not second.get("reason")
        if not defined:
            text += f" Whether it moves them more than the {second['axis']} ({second['change']:.3f}) is not known: "
            text += "an interval is missing."
        elif top["low"] <= second["high"]:
            text += (
                f" The {second['axis']} ({second['change']:.3f}, {_change_interval(second)}) is within that "
                "interval's reach: the two are not told apart."
            )
    return text


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
    direction: P.Direction = "denoise",
    task: str = "factual",
    n_boot: int = 500,
) -> dict:
    """Per-layer effect of MLP windows at the subject's last token (Meng et al. 2022's restoration when
    denoising; the damage of noising them when noising), and the summation baseline. The curves are
    the effect against the base run, ``(patched - base) / (clean - corrupt)``. ``task``: a task name,
    spec file or dataset file (``factual`` by default) with the key token ``position``.

    With intervals (``n_boot`` prompt resamples, noise samples averaged per prompt): the single-layer
    peak's effect (``peak_single``), and per window the inflation test, the per-prompt window effect
    minus the sum of its single layers at the window's peak layer (``excess``, ``excess_low/high``;
    ``sum_at_peak`` is the sum curve at that layer, ``max_sum`` the sum curve's own peak elsewhere)."""
    P.check_direction(direction)
    batch = TaskBatch.build(model, task, prompts, seed=seed)
    progress.stage(f"{model_name}: MLP windows ({direction})")
    setup = P.prepare(model, batch, corruption, metric, progress=progress.enabled())
    gap = setup.clean_value - setup.corrupt_value
    sign = 1 if direction == "denoise" else -1  # a needed MLP's effect: restoring raises, noising lowers
    copies = setup.plan.size // batch.size  # GN stacks its noise samples
    base = base_rows(setup, metric, direction)
    curves, peaks, paired = {}, {}, {}
    single = None
    for w in sorted(set(windows) | {1}):
        res = P.patch_mlp_windows(setup, w, direction, [position])
        if w == 1:
            single = res
        curves[f"window {w}"] = (res.effect / gap).tolist()
        paired[w] = paired_effects(res.per_prompt, base, copies, gap)  # [layer, prompts]
    sums = {}
    for w in windows:
        if w > 1:
            summed = P.window_sum_baseline(single, w)
            curves[f"sum of {w} single layers"] = (summed.effect / gap).tolist()
            # each prompt's own single-layer effects summed (the summed curve subtracts the mean base run)
            layers = [list(window_layers(c, w, setup.n_layers)) for c in range(setup.n_layers)]
            sums[w] = torch.stack([paired[1][ls].sum(0) for ls in layers])
    for name, curve in curves.items():
        peaks[name] = int((sign * torch.tensor(curve)).argmax())
    peak = peaks["window 1"]
    single_ci = agreement.bootstrap_ci(paired[1], n_boot=n_boot, seed=seed)
    window_agreement = {}
    for w in windows:
        if w > 1:
            a, b = torch.tensor(curves[f"window {w}"]), torch.tensor(curves[f"sum of {w} single layers"])
            at = peaks[f"window {w}"]
            # the inflation test: per prompt, the window's effect minus the sum of its single layers, at the window's peak
            excess = agreement.bootstrap_ci((paired[w][at] - sums[w][at])[None], n_boot=n_boot, seed=seed)
            window_agreement[w] = {
                "spearman": agreement.rank_correlation(a, b, absolute=False)["spearman"],
                "peak_window": at,
                "peak_sum": peaks[f"sum of {w} single layers"],
                "max_window": float(a[at]),
                "max_sum": float(b[(sign * b).argmax()]),
                "sum_at_peak": float(b[at]),
                "excess": float(excess.mean[0]),
                "excess_low": float(excess.low[0]),
                "excess_high": float(excess.high[0]),
            }
    return {
        "model": model_name,
        **task_identity(task),
        "prompts": batch.size,
        "corruption": corruption,
        "metric": metric,
        "position": position,
        "direction": direction,
        "clean": setup.clean_value,
        "corrupt": setup.corrupt_value,
        "curves": curves,
        "peaks": peaks,
        "peak_single": {
            "layer": peak,
            "effect": float(single_ci.mean[peak]),
            "low": float(single_ci.low[peak]),
            "high": float(single_ci.high[peak]),
        },
        "n_boot": n_boot,
        "agreement": window_agreement,
    }


SIGN_CONVENTION = {
    "denoise": "denoising patches one head's clean activation into the corrupted run: a positive effect "
    "means the head restores the answer (a needed head), a negative one that it pushes the answer down",
    "noise": "noising patches one head's corrupted activation into the clean run: a negative effect "
    "means the answer needs the head (a needed head), a positive one that the head pushes the answer down",
}


def quantity_note(direction: str) -> str:
    """What the study's points and intervals are, and the direction's sign convention."""
    return (
        "Effect = (patched - base) / (clean - corrupt), the change from the unpatched base run "
        f"({'corrupted' if direction == 'denoise' else 'clean'} here) as a fraction of the clean - corrupt gap; "
        "0 means no effect. Intervals: 95% percentile bootstrap of the per-prompt effect "
        "(patched_i - base_i) / gap, paired per prompt (noise samples averaged per prompt first). "
        f"Sign convention: {SIGN_CONVENTION[direction]}."
    )


def setting_effect(row: dict) -> torch.Tensor:
    """A setting's effect per head (``[layer, head]``); a study.json from before the paired
    effects holds only the normalised values, from which the effect follows."""
    if "effect" in row:
        return torch.tensor(row["effect"])
    normalised = torch.tensor(row["normalised"])
    return normalised if row["direction"] == "denoise" else normalised - 1


def interval_text(low: float, high: float, reason: str | None = None, digits: int = 3) -> str:
    """``[low, high]``, or why there is no interval (:func:`circuitfind.runs.statistics.interval_reason`)."""
    return f"(no interval: {reason})" if reason else f"[{low:.{digits}f}, {high:.{digits}f}]"


def top_head(row: dict, reason: str | None = None) -> str:
    """The head of the largest |effect|, with its effect and interval (``reason``: why there is none)."""
    eff = setting_effect(row)
    layer, head = divmod(int(eff.flatten().abs().argmax()), eff.shape[1])
    ci = interval_text(row["ci_low"][layer][head], row["ci_high"][layer][head], reason)
    return f"a{layer}.{head}: {eff[layer, head]:.3f} {ci}"


def head_warnings(h: dict) -> list[str]:
    """Warnings the data calls for: heads found needed under KL noising that push the answer down
    under a signed metric, and found heads whose largest effect is under 1% of the gap."""
    out = []
    for name, row in h["settings"].items():
        negative = row.get("kl_negative_heads") or {}
        if negative:
            listed = ", ".join(f"{x} ({v:+.3f})" for x, v in negative.items())
            out.append(
                f"{name}: {listed} are listed as needed, but removing them raises the answer under "
                f"{row['corruption']}/logit_diff (effect in brackets): KL counts any change of the output, "
                "so heads that push the answer down look needed too"
            )
        small = row.get("small_heads") or []
        if small:
            largest = max(abs(float(setting_effect(row)[tuple(int(x) for x in s[1:].split("."))])) for s in small)
            out.append(
                f"{name}: {len(small)} found head(s) ({', '.join(small)}) have effects under "
                f"{SMALL_EFFECT:.0%} of the gap (largest {largest:.3f}): they stand out from the other heads, "
                "not from zero"
            )
    return out


def _head_pitfalls(h: dict, codes: Sequence[str]) -> R.Block:
    """Each pitfall of the head study, with what this run shows about it."""
    items = []
    for code in codes:
        text = f"{health.PITFALLS[code][0]}. Why: {health.PITFALLS[code][1]}."
        if code == "probability_metric":
            evidence = [
                probability_bound(name, row)
                for name, row in h["settings"].items()
                if row["metric"] == "prob" and "base_prob" in row
            ]
            if h.get("direction") == "noise":
                text = (
                    f"{health.PITFALLS[code][0]}. Why, when noising: removing a component that suppresses the "
                    "answer raises its probability from the clean run's p by at most 1 - p, so when p is near 1 "
                    "such components show next to no effect."
                )
            text += " In this run: " + ("; ".join(evidence) or "no base-run p recorded") + "."
        elif code == "gaussian_noise" and h.get("direction") == "noise":
            text = (
                f"{health.PITFALLS[code][0]}. Why, when noising: patching an early component's noised activation "
                "into the clean run carries the noise's out-of-distribution damage, not only the task's "
                "information, so early components look needed."
            )
            text += gaussian_noise_evidence(h)
        elif code == "gaussian_noise":
            text += gaussian_noise_evidence(h)
        items.append(text)
    return R.bullets(items)


def probability_bound(name: str, row: dict) -> str:
    """The bound of the probability metric that hides answer-suppressing heads in this setting. Their
    effect has the other sign from a needed head's: below 0 when denoising, where ``p - p_base >= -p``
    floors it at ``-p / gap``; above 0 when noising, where ``p <= 1`` caps it at ``(1 - p) / gap``.
    A bound binds (such heads show next to no effect) when it is within 0.1 of 0."""
    p, gap = row["base_prob"], row["clean"] - row["corrupt"]
    if row.get("direction") == "noise":
        room, bound, which = 1 - p, (1 - p) / gap if gap else float("nan"), "above"
        test = "1 - p"
    else:
        room, bound, which = p, -p / gap if gap else float("nan"), "below"
        test = "p"
    binds = f"{test} < 0.1: the bound binds" if room < 0.1 else f"{test} >= 0.1: the bound does not bind"
    return f"{name}: p = {p:.3f} on the base run, so no effect can go {which} {bound:.3f} ({binds} here)"


def gaussian_noise_evidence(h: dict) -> str:
    """The early heads found under Gaussian noise in this run (a sentence)."""
    gn = {n: r for n, r in h["settings"].items() if str(r["corruption"]).split(":")[0] == "gn"}
    n_layers = len(next(iter(h["settings"].values()))["ci_low"])
    early = early_layers(n_layers)
    flagged = {n: [x for x in r["heads"] if int(x[1:].split(".")[0]) < early] for n, r in gn.items()}
    found = "; ".join(f"{n}: {', '.join(x)}" for n, x in flagged.items() if x)
    if found:
        return f" In this run: early heads (layers 0-{early - 1}) found under Gaussian noise: {found}."
    return f" In this run: no early head (layers 0-{early - 1}) was found under Gaussian noise."


def _pitfalls(codes) -> R.Block:
    """The pitfalls (:data:`circuitfind.runs.health.PITFALLS`) of the settings shown in a section, as facts with reasons."""
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
    reason = h.get("interval_reason")
    pairs = [
        [p["a"], p["b"], p["jaccard"], interval_text(p["low"], p["high"], reason, 2)] for p in h["jaccard_ci"].values()
    ]
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


def _first_screen(heads: list[dict]) -> R.Section:
    """Which choice moves the detected heads most, ranked, with one sentence, per model."""
    blocks: list[R.Block] = []
    for h in heads:
        ranking = axis_ranking(h)
        blocks += [
            R.text(ranking_summary(ranking), bold=f"{h['model']}:"),
            R.table(
                [
                    "choice",
                    "pairs of settings differing only in it",
                    "mean 1 - Jaccard of the heads found",
                    "95% CI over pairs",
                ],
                [[r["axis"], r["pairs"], r["change"], _change_interval(r).removeprefix("95% CI ")] for r in ranking],
            ),
        ]
    return R.section("Which choice moves the detected heads most", *blocks)


def _directions_section(h: dict) -> R.Section:
    """Denoising vs noising: the Jaccard of their needed heads per corruption and metric, with intervals."""
    reason = h.get("interval_reason")
    rows = [[n, a["jaccard"], interval_text(a["low"], a["high"], reason, 2)] for n, a in h["directions"].items()]
    return R.section(
        f"Denoising vs noising on {h['model']}",
        R.text(
            "Jaccard of the needed heads found by denoising and by noising, with a 95% interval over the same "
            "prompt resamples in both directions."
        ),
        R.table(["corruption/metric", "Jaccard", "95% interval"], rows),
    )


def variants_label(variants: list[str]) -> str:
    """The heading of the STR-variant comparison: Zhang & Nanda's S2 vs S1+IO only when those are the
    variants compared (a dataset task's variants are its own)."""
    if set(variants) <= {"str:s2_io", "str:s1_io"}:
        return "Corrupting S2 vs S1+IO:"
    return "STR variants compared (logit difference):"


def _head_sections(h: dict) -> list[R.Section]:
    """The sections of one direction's head detection."""
    sections: list[R.Section] = []
    what = "IOI head detection" if h.get("task", "ioi") == "ioi" else f"Head detection, task {h['task']},"
    title = f"{what} on {h['model']} ({h['prompts']} prompts, {h['direction']}, heads >= {h['k']} SD)"
    rows = [
        [n, ", ".join(r["heads"]) or "(none)", top_head(r, h.get("interval_reason"))] for n, r in h["settings"].items()
    ]
    blocks = [
        R.text(quantity_note(h["direction"])),
        R.table(["corruption/metric", "heads found", "top head by |effect|: effect [95% interval]"], rows),
        R.text(
            ", ".join(f"{k} {v:.2f}" for k, v in sorted(h["stability"].items(), key=lambda kv: -kv[1])),
            bold="Heads by the fraction of settings that find them:",
        ),
    ]
    if h["s2_vs_s1io"]:
        blocks.append(
            R.text(
                "; ".join(f"{v}: {', '.join(x) or 'none'}" for v, x in h["s2_vs_s1io"].items()),
                bold=variants_label(list(h["s2_vs_s1io"])),
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
    warnings = head_warnings(h)
    sections += [
        R.section(title, *blocks),
        *_signs_and_stability(h),
        *([R.section("Warnings", R.bullets(warnings), level=3)] if warnings else []),
        R.section("Pitfalls of these settings, with this run's evidence", _head_pitfalls(h, codes), level=3),
    ]
    return sections


def _mlp_sections(mlps: list[dict]) -> list[R.Section]:
    """The sections of the MLP localisation."""
    sections: list[R.Section] = []
    for m in mlps:
        what = "Factual recall" if m.get("task", "factual") == "factual" else f"Task {m['task']},"
        title = f"{what} MLP localisation on {m['model']} ({m['prompts']} prompts, {m['corruption']}, {m['metric']}, at {m['position']}, {m.get('direction', 'denoise')})"
        rows = [mlp_row(w, a) for w, a in m["agreement"].items()]
        layers = list(range(len(next(iter(m["curves"].values())))))
        chart = figures.line_chart(
            {k: (layers, v) for k, v in m["curves"].items()},
            "layer (window centre)",
            "effect / (clean - corrupt)",
            "MLP windows vs summation of single layers",
            760,
            340,
            fit_y=True,
            integer_x=True,
        )
        setting = {
            "metric": m["metric"],
            "corruption": m["corruption"],
            "direction": m.get("direction", "denoise"),
            "mlp_window": max([int(w) for w in m["agreement"]] or [1]),
        }
        sections += [
            R.section(
                title,
                R.text(single_peak_text(m), bold="Peak of single-layer patching:"),
                R.table(MLP_HEADER, rows),
                *([R.text(inflation_text(m))] if inflation_text(m) else []),
                R.figure(chart, "MLP windows vs summation of single layers"),
            ),
            R.section("Pitfalls of this setting", _pitfalls(health.setting_notes(setting)), level=3),
        ]
    return sections


MLP_HEADER = [
    "window",
    "peak layer (window)",
    "effect at that layer (window)",
    "sum of single layers at that layer",
    "window - sum per prompt [95% interval]",
    "peak layer of the sum curve (its value)",
    "Spearman (window vs sum curves)",
]


def mlp_row(window, a: dict) -> list:
    """One window's row of the MLP table: both curves at the window's peak layer, the paired inflation
    test, and the sum curve's own peak named as such (a study.json from before these lacks the test)."""
    if "excess" not in a:
        test = "(not recorded)"
        at_peak = "-"
    else:
        test = f"{a['excess']:.3f} [{a['excess_low']:.3f}, {a['excess_high']:.3f}]"
        at_peak = f"{a['sum_at_peak']:.3f}"
    return [
        window,
        a["peak_window"],
        f"{a['max_window']:.3f}",
        at_peak,
        test,
        f"layer {a['peak_sum']} ({a['max_sum']:.3f})",
        f"{a['spearman']:.3f}",
    ]


def single_peak_text(m: dict) -> str:
    """The single-layer peak: its layer, its effect and interval."""
    p = m.get("peak_single")
    if p is None:
        return f"layer {m['peaks'].get('window 1')}"
    return f"layer {p['layer']}, effect {p['effect']:.3f} [95% interval {p['low']:.3f}, {p['high']:.3f}]"


def inflation_text(m: dict) -> str:
    """What this run shows about window inflation: per window, whether the per-prompt window - sum
    interval at the window's peak excludes 0."""
    parts = []
    for w, a in m["agreement"].items():
        if "excess" not in a:
            continue
        if a["excess_low"] > 0 or a["excess_high"] < 0:
            verdict = "more than" if a["excess_low"] > 0 else "less than"
            parts.append(f"window {w}: {verdict} the sum of its single layers (the interval excludes 0)")
        else:
            parts.append(f"window {w}: not distinguishable from the sum of its single layers (the interval includes 0)")
    if not parts:
        return ""
    return (
        "Window inflation test (window effect minus the sum of its single layers, per prompt, at the window's "
        "peak layer; 95% bootstrap interval over prompts): " + "; ".join(parts) + "."
    )


def study_report(heads: list[dict], mlps: list[dict], out_dir: str | Path) -> dict[str, str]:
    """Write ``study.html`` and ``study.md``: the settings' disagreements, with figures."""
    for study_ in heads:  # a study.json from before the paired effects names the direction once, not per row
        for h in study_["by_direction"] if study_.get("direction") == "both" else [study_]:
            for row in h["settings"].values():
                row.setdefault("direction", h["direction"])
    sections = [_first_screen(heads)] if heads else []
    for study_ in heads:
        if study_.get("direction") == "both":
            sections.append(_directions_section(study_))
        for h in study_["by_direction"] if study_.get("direction") == "both" else [study_]:
            sections += _head_sections(h)
    sections += _mlp_sections(mlps)
    out = Path(out_dir)
    title = "Settings-sensitivity study"
    return {
        "html": str(write_text(out / "study.html", R.html_page(title, sections))),
        "markdown": str(write_text(out / "study.md", R.markdown_page(title, sections))),
    }
