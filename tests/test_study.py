"""The settings study's computations: several metrics from one sweep, bootstrap over prompts (not
GN's prompt x noise-sample rows), stability of the detected heads, and signs a setting cannot show."""

import json
from pathlib import Path

import pytest
import torch

from circuitfind import patching as P
from circuitfind.circuits import agreement
from circuitfind.errors import ImpossibleSignError
from circuitfind.runs import study
from circuitfind.tasks.batch import TaskBatch

METRICS = ("logit_diff", "prob", "kl", "logprob")


@pytest.fixture(scope="module")
def batch8(ioi_model):
    return TaskBatch.build(ioi_model, "ioi", 8, seed=5)


@pytest.mark.parametrize("engine", ["auto", "hooks"])
@pytest.mark.parametrize("corruption,direction", [("str", "denoise"), ("gn", "noise"), ("str:s1_io", "noise")])
def test_one_recording_sweep_equals_a_sweep_per_metric_exactly(ioi_model, batch8, corruption, direction, engine):
    setup = study.prepare_recording(ioi_model, batch8, corruption, METRICS)
    setup.engine = engine
    recorded = study.patch_heads_metrics(setup, direction)
    assert list(recorded) == list(METRICS)
    for metric in METRICS:
        alone = P.patch_heads(P.prepare(ioi_model, batch8, corruption, metric, engine=engine), direction)
        got = recorded[metric]
        assert torch.equal(got.per_prompt, alone.per_prompt), metric
        assert torch.equal(got.values, alone.values), metric
        assert (got.clean, got.corrupt, got.metric, got.direction, got.axes) == (
            alone.clean,
            alone.corrupt,
            metric,
            direction,
            alone.axes,
        )


def test_recording_sweep_refuses_an_ordinary_setup(ioi_model, batch8):
    with pytest.raises(ValueError, match="prepare_recording"):
        study.patch_heads_metrics(P.prepare(ioi_model, batch8, "str", "kl"))


def test_gn_rows_are_averaged_per_prompt_before_the_bootstrap():
    # 6 prompts x 3 noise samples, sample-major as GaussianNoise stacks them; the samples of a prompt are
    # perfectly correlated (identical), so the 18 rows hold only 6 independent values
    prompts = torch.tensor([[0.0, 1.0, 2.0, 4.0, 7.0, 11.0]])
    rows = prompts.repeat(1, 3)
    assert torch.equal(study.per_prompt_means(rows, 3), prompts)
    assert torch.equal(study.per_prompt_means(torch.tensor([[1.0, 2.0, 3.0, 5.0]]), 2), torch.tensor([[2.0, 3.5]]))
    fair = agreement.bootstrap_ci(study.per_prompt_means(rows, 3), n_boot=2000)
    rows_as_independent = agreement.bootstrap_ci(rows, n_boot=2000)
    width = lambda ci: float(ci.high - ci.low)  # noqa: E731
    # treating correlated rows as independent shrinks the interval by about sqrt(3)
    assert width(rows_as_independent) < 0.7 * width(fair)
    with pytest.raises(ValueError, match="not 3 copies"):
        study.per_prompt_means(torch.zeros(2, 7), 3)


def test_head_detection_bootstraps_gn_over_prompts(ioi_model):
    out = study.head_detection(
        ioi_model, "toy-ioi", prompts=10, corruptions=("gn",), metrics=("logit_diff",), variants=(), n_boot=200
    )
    row = out["settings"]["gn/logit_diff"]
    assert row["noise_samples"] == 3
    batch = TaskBatch.build(ioi_model, "ioi", 10, seed=0)
    setup = P.prepare(ioi_model, batch, "gn", "logit_diff")
    res = P.patch_heads(setup, "denoise")
    assert res.per_prompt.shape[-1] == 30  # 10 prompts x 3 noise samples
    base = study.base_rows(setup, "logit_diff", "denoise")  # each row's own base run (paired)
    gap = res.clean - res.corrupt
    per_prompt = ((res.per_prompt - base).reshape(3, 4, 3, 10).mean(-2) / gap).float()
    expected = agreement.bootstrap_ci(per_prompt, n_boot=200, seed=0)
    assert torch.allclose(torch.tensor(row["ci_low"]), expected.low, atol=1e-6)
    assert torch.allclose(torch.tensor(row["ci_high"]), expected.high, atol=1e-6)
    rows = agreement.bootstrap_ci((res.per_prompt - base) / gap, n_boot=200)
    assert (expected.high - expected.low).mean() > (rows.high - rows.low).mean()  # the old, too narrow intervals


def test_detection_masks_follow_detect():
    scores = torch.tensor([0.0, 0.1, -0.1, 0.05, 0.0, -0.05, 0.02, 5.0, -0.02, 0.0, -4.0])
    for k, sign in [(2.0, "positive"), (1.5, "negative"), (1.5, "both")]:
        mask = study.detection_masks(scores[None], k, sign)[0]
        assert mask.nonzero().flatten().tolist() == sorted(i for (i,) in P.detect(scores, k=k, sign=sign))
    assert not study.detection_masks(torch.ones(2, 5), 2.0, "both").any()  # no spread: nothing stands out


def test_bootstrap_weights_are_those_of_bootstrap_ci():
    x = torch.arange(12.0).reshape(2, 6) ** 2
    means = study.bootstrap_weights(6, 300, seed=4) @ x.double().T
    ci = agreement.bootstrap_ci(x, n_boot=300, seed=4)
    q = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0).float()
    assert torch.equal(q[0], ci.low) and torch.equal(q[1], ci.high)


def test_jaccard_interval_between_two_settings():
    a = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    out = study.jaccard_intervals({"A": a, "B": b}, {"A": {"a0.0", "a0.1"}, "B": {"a0.0"}})
    (pair,) = out.values()
    # resampled Jaccards 0.5, 1, 1 (two empty sets agree): percentiles 0.025 and 0.975 by linear interpolation
    assert pair == {"a": "A", "b": "B", "jaccard": 0.5, "low": pytest.approx(0.525), "high": 1.0}


def test_detect_says_when_a_sign_cannot_occur():
    scores = -torch.tensor([0.0, 0.1, 0.3, 0.0, 2.0, 0.05])
    with pytest.raises(ImpossibleSignError, match="positive effects cannot occur when noising with the kl metric"):
        P.detect(scores, sign="positive", metric="kl", direction="noise")
    assert P.detect(scores, k=1.5, sign="negative", metric="kl", direction="noise") == [(4,)]
    assert P.detect(scores, k=1.5, sign="both", metric="kl", direction="noise") == [(4,)]
    for metric, direction in [("kl", "denoise"), ("prob", "noise"), ("logit_diff", "noise"), ("logprob", "noise")]:
        assert P.impossible_sign(metric, direction, "positive") is None
    assert P.impossible_sign("kl", "noise", "negative") is None


def test_head_detection_reports_both_signs_and_stability(ioi_model):
    out = study.head_detection(
        ioi_model,
        "toy-ioi",
        prompts=12,
        corruptions=("str:s2_io",),
        metrics=("logit_diff", "kl"),
        variants=(),
        n_boot=100,
        direction="noise",
    )
    assert out["signs"] == {"heads": "negative", "negative_heads": "positive"}
    kl, ld = out["settings"]["str:s2_io/kl"], out["settings"]["str:s2_io/logit_diff"]
    assert kl["negative_heads"] == [] and "cannot occur when noising with the kl metric" in kl["negative_heads_reason"]
    assert "negative_heads_reason" not in ld and "negative_heads" in ld["detection_frequency"]
    for row in (kl, ld):
        freq = row["detection_frequency"]["heads"]
        assert set(row["heads"]) <= set(freq) and all(0 < f <= 1 for f in freq.values())
    (pair,) = out["jaccard_ci"].values()
    assert pair["jaccard"] == agreement.jaccard(kl["heads"], ld["heads"]) and 0 <= pair["low"] <= pair["high"] <= 1


def test_patch_command_says_when_a_sign_cannot_occur(capsys):
    from circuitfind.cli import main

    args = ["patch", "-n", "8", "--metric", "kl", "--direction", "noise", "--sign"]
    assert main(args + ["positive"]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last_line.startswith("circuitfind: error: positive effects cannot occur when noising with the kl metric")
    assert main(args + ["negative"]) == 0
    assert "components >= 2.0 SD from the mean (negative)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ioi-models"], "nothing to study"),
        (["--ioi-prompts", "0"], "need at least one prompt"),
        (["--ioi-prompts", "1"], "--ioi-prompts must be at least 2 (got 1)"),
        (["--n-boot", "0"], "n_boot"),
        (["--ioi-models", "no-such-model"], "no-such-model"),
        (["--run", "../escape"], "is not a folder name"),
        (["--metrics", "nope"], "nope"),
        (["--corruptions", "bogus"], "unknown corruption 'bogus'"),
        (["--variants", "gn:x"], "takes no ':' argument"),
        (["--k", "0"], "--k must be a finite number > 0"),
        (["--gn-scale", "nan"], "--gn-scale must be a finite number > 0"),
        (["--gn-samples", "0"], "--gn-samples"),
    ],
)
def test_study_options_are_checked_before_prefect_starts(tmp_path, capsys, argv, message):
    from circuitfind.flows.study_flow import main

    assert main([*argv, "--outputs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module", params=["denoise", "noise"])
def detection(request, ioi_model):
    """The study's head detection in one direction, every metric, STR and GN (the flow's settings, fewer prompts)."""
    return study.head_detection(
        ioi_model,
        "toy-ioi",
        prompts=10,
        direction=request.param,
        corruptions=("str:s2_io", "gn"),
        metrics=("prob", "logit_diff", "kl", "logprob"),
        variants=(),
        n_boot=200,
    )


def test_every_point_lies_inside_its_interval_in_both_directions(detection):
    # the point was (patched - corrupt) / gap while noising, the interval (patched - clean) / gap: none inside
    for name, row in detection["settings"].items():
        eff, low, high = (torch.tensor(row[k]) for k in ("effect", "ci_low", "ci_high"))
        assert ((low <= eff + 1e-6) & (eff <= high + 1e-6)).all(), name
        res = torch.tensor(row["normalised"])
        expected = res if row["direction"] == "denoise" else res - 1  # the effect against the base run
        assert torch.allclose(eff, expected, atol=1e-5), name


def test_top_head_has_the_largest_effect_and_the_report_names_the_quantity(detection, tmp_path):
    for name, row in detection["settings"].items():
        eff = torch.tensor(row["effect"])
        layer, head = divmod(int(eff.abs().flatten().argmax()), eff.shape[1])
        shown = study.top_head(row)
        assert shown.startswith(f"a{layer}.{head}: {eff[layer, head]:.3f} ["), name
        assert abs(eff[layer, head]) == eff.abs().max()
    md = Path(study.study_report([detection], [], tmp_path)["markdown"]).read_text()
    assert "Effect = (patched - base) / (clean - corrupt)" in md and "paired per prompt" in md
    assert study.SIGN_CONVENTION[detection["direction"]] in md
    assert "top head by \\|effect\\|: effect [95% interval]" in md  # Markdown escapes the bars


def test_a_zero_effect_head_gets_a_zero_width_interval():
    # prompts whose base run varies a lot; head 0 changes nothing, head 1 adds 0.5 to every prompt
    base = torch.tensor([0.1, 0.9, 0.4, 0.7, 0.2, 0.8])
    per_prompt = torch.stack([base, base + 0.5])
    paired = study.paired_effects(per_prompt, base, 1, 2.0)
    ci = agreement.bootstrap_ci(paired, n_boot=500)
    assert ci.low[0] == ci.high[0] == ci.mean[0] == 0  # the unpaired (per_prompt - mean base) was [-0.16, 0.16]
    assert torch.allclose(torch.stack([ci.low[1], ci.mean[1], ci.high[1]]), torch.tensor(0.25))
    unpaired = agreement.bootstrap_ci((per_prompt - base.mean()) / 2.0, n_boot=500)
    assert unpaired.high[0] - unpaired.low[0] > 0.1
    # GN: 2 noise samples of 3 prompts, sample-major; each row against its own base row
    rows = torch.tensor([[1.0, 2.0, 3.0, 1.5, 2.5, 3.5]])
    assert torch.allclose(study.paired_effects(rows + 1, rows[0], 2, 1.0), torch.ones(1, 3))
    with pytest.raises(ValueError, match="base rows"):
        study.paired_effects(rows, torch.zeros(5), 1, 1.0)


@pytest.fixture(scope="module")
def silent_head_model():
    """toy-ioi with head a1.2's output weights zeroed: patching it can change nothing, on any prompt."""
    from circuitfind.models.catalogue import load_model

    model = load_model("toy-ioi", device="cpu")
    weight = dict(model.named_parameters())["transformer.h.1._original_component.attn.o._original_component.weight"]
    d_head = model.cfg.d_head
    with torch.no_grad():
        weight[2 * d_head : 3 * d_head].zero_()  # GPT-2's Conv1D: rows are the heads' inputs to W_O
    assert model.W_O[1, 2].abs().sum() == 0 and model.W_O[1, 1].abs().sum() > 0
    return model


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_a_head_that_does_nothing_gets_a_zero_width_interval_in_the_study(silent_head_model, direction):
    out = study.head_detection(
        silent_head_model, "toy-ioi", prompts=10, direction=direction, corruptions=("str:s2_io",),
        metrics=("logit_diff", "kl"), variants=(), n_boot=200,
    )  # fmt: skip
    for name, row in out["settings"].items():
        eff, low, high = (torch.tensor(row[k])[1, 2].item() for k in ("effect", "ci_low", "ci_high"))
        # the suffix engine recomputes the rest of the model in another order: rounding only
        assert abs(eff) < 1e-5 and high - low < 1e-5, (name, eff, low, high)
        assert "a1.2" not in row["heads"]
    setup = P.prepare(silent_head_model, TaskBatch.build(silent_head_model, "ioi", 8, seed=5), "str", "logit_diff")
    setup.engine = "hooks"  # full forward passes: the patched run is the base run, bit for bit
    base = study.base_rows(setup, "logit_diff", direction)
    assert base.std() > 0  # the prompts differ, so an unpaired interval would not be zero-width
    paired = study.paired_effects(P.patch_heads(setup, direction).per_prompt, base, 1, 1.0)
    assert (paired[1, 2] == 0).all() and (paired[1, 1] != 0).any()


def _row(corruption, metric, direction, effect, heads, **extra):
    zeros = [[0.0] * 2 for _ in range(3)]
    return {"corruption": corruption, "metric": metric, "direction": direction, "effect": effect, "heads": heads,
            "ci_low": zeros, "ci_high": zeros, "clean": 1.0, "corrupt": 0.0, **extra}  # fmt: skip


def test_warnings_for_kl_noising_negative_heads_and_tiny_found_heads():
    kl = _row("str", "kl", "noise", [[0.0, -0.5], [-0.3, 0.0], [0.0, 0.0]], ["a0.1", "a1.0"])
    ld = _row("str", "logit_diff", "noise", [[0.0, -0.4], [0.2, 0.0], [0.0, 0.0]], ["a0.1"])
    rows = {"str/kl": kl, "str/logit_diff": ld}
    assert study.kl_negative_heads(rows, "str") == {"a1.0": 0.2}  # removing a1.0 raises the logit difference
    kl["kl_negative_heads"] = study.kl_negative_heads(rows, "str")
    prob = _row("gn", "prob", "noise", [[0.0, -0.009], [0.0, 0.0], [0.0, 0.0]], ["a0.1"], small_heads=["a0.1"])
    warnings = study.head_warnings({"settings": {**rows, "gn/prob": prob}})
    assert len(warnings) == 2
    assert warnings[0].startswith("str/kl: a1.0 (+0.200) are listed as needed")
    assert warnings[1].startswith("gn/prob: 1 found head(s) (a0.1) have effects under 1% of the gap (largest 0.009)")
    kl["kl_negative_heads"] = {}
    assert study.head_warnings({"settings": rows}) == []  # nothing to warn about: no warning
    kl_denoise = {**kl, "direction": "denoise"}
    assert study.kl_negative_heads({"str/kl": kl_denoise, "str/logit_diff": ld}, "str") == {}


def test_pitfalls_state_the_runs_own_evidence(tmp_path):
    # denoising: the floor -p / gap hides answer-suppressing heads (noising: the ceiling, the next test)
    small_p = _row("str", "prob", "denoise", [[0.0, -0.05], [0.0, 0.0], [0.0, 0.0]], ["a0.1"], base_prob=0.05)
    gn = _row("gn", "logit_diff", "noise", [[0.0, -0.5], [0.0, 0.0], [0.0, -0.4]], ["a0.1", "a2.1"])
    h = {"settings": {"str/prob": small_p, "gn/logit_diff": gn}}
    text = str(study._head_pitfalls(h, ["probability_metric", "gaussian_noise"]))
    assert "str/prob: p = 0.050 on the base run, so no effect can go below -0.050 (p < 0.1: the bound binds" in text
    assert "early heads (layers 0-0) found under Gaussian noise: gn/logit_diff: a0.1" in text
    gn["heads"] = ["a2.1"]
    small_p["base_prob"] = 0.35
    text = str(study._head_pitfalls(h, ["probability_metric", "gaussian_noise"]))
    assert "p = 0.350" in text and "does not bind" in text
    assert "no early head (layers 0-0) was found under Gaussian noise" in text


def test_noising_pitfalls_quote_the_ceiling_and_explain_gaussian_noise_for_noising():
    """Noising, a head that pushes the answer down has a positive effect, capped by (1 - p) / gap: with
    p = 1.000 the cap is 0 and it binds; the Gaussian-noise pitfall says why early heads look needed."""
    saturated = _row("str", "prob", "noise", [[0.0, -0.05], [0.0, 0.0], [0.0, 0.0]], ["a0.1"], base_prob=1.0)
    gn = _row("gn", "logit_diff", "noise", [[0.0, -0.5], [0.0, 0.0], [0.0, -0.4]], ["a0.1"])
    h = {"direction": "noise", "settings": {"str/prob": saturated, "gn/logit_diff": gn}}
    text = str(study._head_pitfalls(h, ["probability_metric", "gaussian_noise"]))
    assert "str/prob: p = 1.000 on the base run, so no effect can go above 0.000 (1 - p < 0.1: the bound binds" in text
    assert "does not bind" not in text and "below" not in text
    assert "noised activation into the clean run" in text and "restoring early layers" not in text
    assert "early heads (layers 0-0) found under Gaussian noise: gn/logit_diff: a0.1" in text
    saturated["base_prob"] = 0.5
    text = str(study._head_pitfalls(h, ["probability_metric"]))
    assert "can go above 0.500 (1 - p >= 0.1: the bound does not bind here)" in text


def test_the_mlp_part_gives_the_peak_value_and_the_paired_window_minus_sum_test(random_gpt2, tmp_path):
    m = study.mlp_localisation(random_gpt2, "g", prompts=6, windows=(1, 3), n_boot=200)
    peak = m["peak_single"]
    assert peak["layer"] == m["peaks"]["window 1"]
    # the curve's own point (the paired mean uses each row's base run, the curve the baseline: float32 apart)
    assert peak["effect"] == pytest.approx(m["curves"]["window 1"][peak["layer"]], abs=1e-3)
    assert peak["low"] <= peak["effect"] <= peak["high"]
    a = m["agreement"][3]
    at = a["peak_window"]
    window, summed = m["curves"]["window 3"], m["curves"]["sum of 3 single layers"]
    assert a["max_window"] == pytest.approx(window[at]) and a["sum_at_peak"] == pytest.approx(summed[at])
    assert a["max_sum"] == pytest.approx(summed[a["peak_sum"]])  # the sum curve's own peak, named as such
    # the mean of the per-prompt differences is the difference of the curves at that layer
    assert a["excess"] == pytest.approx(window[at] - summed[at], abs=1e-3)
    assert a["excess_low"] <= a["excess"] <= a["excess_high"] and a["excess_low"] < a["excess_high"]
    md = Path(study.study_report([], [m], tmp_path)["markdown"]).read_text()
    assert f"layer {peak['layer']}, effect {peak['effect']:.3f} [95% interval" in md
    assert "window - sum per prompt [95% interval]" in md and "Window inflation test" in md
    assert f"{a['excess']:.3f} [{a['excess_low']:.3f}, {a['excess_high']:.3f}]" in md


def test_every_grid_option_has_help_and_its_default(capsys):
    from circuitfind.flows.study_flow import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [
        ("--metrics", "default prob logit_diff kl"), ("--corruptions", "default str:s2_io gn"),
        ("--variants", "default str:s2_io str:s1_io"), ("--k", "default 2.0"), ("--gn-scale", "default 3.0"),
        ("--gn-samples", "default 3"), ("--noise-seed", "default: --seed"), ("--direction", "default denoise"),
        ("--n-boot", "default 500"), ("--seed", "default 0"),
    ]:  # fmt: skip
        assert option in text and default in text, option


def test_gn_options_reach_the_noise_and_the_noise_seed_follows_seed(ioi_model):
    grid = dict(corruptions=("gn",), metrics=("logit_diff",), variants=(), n_boot=50, prompts=6)
    a = study.head_detection(ioi_model, "toy-ioi", seed=1, **grid)
    b = study.head_detection(ioi_model, "toy-ioi", seed=1, noise_seed=7, **grid)
    c = study.head_detection(ioi_model, "toy-ioi", seed=1, gn_samples=2, gn_scale=1.0, **grid)
    assert a["noise_seed"] == 1 and b["noise_seed"] == 7  # tied to --seed unless given (it was fixed at 0)
    ra, rb, rc = (x["settings"]["gn/logit_diff"] for x in (a, b, c))
    assert ra["effect"] != rb["effect"] and rc["noise_samples"] == 2 and c["gn_scale"] == 1.0
    batch = TaskBatch.build(ioi_model, "ioi", 6, seed=1)
    from circuitfind.tasks.corruptions import GaussianNoise

    setup = P.prepare(ioi_model, batch, GaussianNoise(factor=1.0, samples=2, seed=1), "logit_diff")
    assert torch.allclose(torch.tensor(rc["normalised"]), P.patch_heads(setup, "denoise").normalised, atol=1e-6)


def test_both_directions_with_their_jaccard_and_the_ranked_first_screen(ioi_model, tmp_path):
    out = study.head_detection(
        ioi_model, "toy-ioi", prompts=10, direction="both", corruptions=("str:s2_io", "gn"),
        metrics=("logit_diff", "kl"), variants=("str:s2_io", "str:s1_io"), n_boot=100,
    )  # fmt: skip
    den, noi = out["by_direction"]
    assert (den["direction"], noi["direction"]) == ("denoise", "noise")
    for name, agree in out["directions"].items():
        a, b = set(den["settings"][name]["heads"]), set(noi["settings"][name]["heads"])
        assert agree["jaccard"] == agreement.jaccard(a, b) and 0 <= agree["low"] <= agree["high"] <= 1
    assert set(out["directions"]) == set(den["settings"])
    ranking = study.axis_ranking(out)
    assert {r["axis"] for r in ranking} == {"corruption", "STR variant", "metric", "direction"}
    assert [r["change"] for r in ranking] == sorted((r["change"] for r in ranking), reverse=True)
    direction = next(r for r in ranking if r["axis"] == "direction")
    assert direction["pairs"] == len(den["settings"])  # each setting once in each direction
    expected = sum(1 - a["jaccard"] for a in out["directions"].values()) / direction["pairs"]
    assert direction["change"] == pytest.approx(expected)
    md = Path(study.study_report([out], [], tmp_path)["markdown"]).read_text()
    first = md.split("## ")[1]
    assert first.startswith("Which choice moves the detected heads most") and study.ranking_summary(ranking) in first
    assert "Denoising vs noising on toy-ioi" in md and md.count("IOI head detection on toy-ioi") >= 2


def test_ranking_summary_in_one_sentence():
    metric = {"axis": "metric", "pairs": 3, "change": 0.75, "low": 0.6, "high": 0.9, "reason": None}
    direction = {"axis": "direction", "pairs": 3, "change": 0.0, "low": 0.0, "high": 0.1, "reason": None}
    assert study.ranking_summary([metric, direction]) == (
        "The metric moves the detected heads most: settings that differ only in it share 25% of their heads "
        "on average (Jaccard), over 3 pair(s) (1 - Jaccard 0.750, 95% CI [0.600, 0.900])."
    )
    zero = {"axis": "metric", "pairs": 1, "change": 0.0, "low": float("nan"), "high": float("nan"), "reason": "x"}
    assert "no choice moves" in study.ranking_summary([zero])


def test_a_near_tie_in_the_ranking_is_said_to_be_one():
    """Issue 25: corruption 0.556 and direction 0.541 were ranked with no interval."""
    corruption = {"axis": "corruption", "pairs": 6, "change": 0.556, "low": 0.40, "high": 0.70, "reason": None}
    direction = {"axis": "direction", "pairs": 6, "change": 0.541, "low": 0.45, "high": 0.62, "reason": None}
    text = study.ranking_summary([corruption, direction])
    assert "95% CI [0.400, 0.700]" in text and "not told apart" in text
    few = {**direction, "pairs": 2, "reason": "2 pairs, at least 3 needed for an interval"}
    assert "not known: an interval is missing" in study.ranking_summary([corruption, few])


def test_the_ranking_carries_intervals_over_pairs():
    h = {
        "direction": "denoise",
        "settings": {
            f"{c}/{m}": {"corruption": c, "metric": m, "heads": heads}
            for (c, m), heads in {
                ("str", "a"): ["a0.0"], ("str", "b"): ["a0.0", "a0.1"], ("str", "c"): ["a0.1"],
                ("gn", "a"): ["a0.1"], ("gn", "b"): ["a0.0", "a0.1"], ("gn", "c"): ["a1.0"],
            }.items()
        },
    }  # fmt: skip
    by_axis = {r["axis"]: r for r in study.axis_ranking(h)}
    corruption = by_axis["corruption"]  # 3 pairs: (a) 1 - 0 = 1, (b) 1 - 1 = 0, (c) 1 - 0 = 1
    assert corruption["pairs"] == 3 and corruption["change"] == pytest.approx(2 / 3)
    assert corruption["reason"] is None and 0 <= corruption["low"] <= 2 / 3 <= corruption["high"] <= 1


def test_the_mlp_chart_fits_its_y_axis_and_ticks_whole_layers():
    from circuitfind.reports import figures

    curves = {"window 1": (list(range(30)), [0.001 * i for i in range(30)])}  # below 0.09, as on SmolLM2

    def ticks(fig, axis):  # the labels of the ticks inside the axis's range, as drawn
        figures.to_svg(fig)
        ax = fig.axes[0]
        low, high = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
        labels = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
        return [t.get_text() for t in labels if low <= (t.get_position()[1 if axis == "y" else 0]) <= high]

    fitted = figures.line_chart_figure(curves, "layer", "effect", "t", fit_y=True, integer_x=True)
    assert max(fitted.axes[0].get_ylim()) < 0.035  # the axis ends near the data's 0.029, not at 1
    assert "0.030" in ticks(fitted, "y") and "1.0" not in ticks(fitted, "y")
    xticks = ticks(fitted, "x")
    assert all(t.isdigit() for t in xticks) and len(xticks) <= 11  # whole layers (not 0.00 / 14.50 / 29.00)
    assert "<svg" in figures.line_chart(curves, "layer", "effect", "t", fit_y=True, integer_x=True)
    default = figures.line_chart_figure(curves, "layer", "effect", "t")
    assert max(default.axes[0].get_ylim()) >= 1.0 and "1.0" in ticks(default, "y")  # other charts keep 0-1


def test_the_mlp_part_honours_its_direction(random_gpt2):
    out = {d: study.mlp_localisation(random_gpt2, "g", prompts=6, windows=(1, 3), direction=d) for d in P.DIRECTIONS}
    batch = TaskBatch.build(random_gpt2, "factual", 6, seed=0)
    setup = P.prepare(random_gpt2, batch, "gn", "prob")
    for d, got in out.items():
        res = P.patch_mlp_windows(setup, 1, d, ["subject_last"])
        expected = res.effect / (setup.clean_value - setup.corrupt_value)
        assert got["direction"] == d and torch.allclose(torch.tensor(got["curves"]["window 1"]), expected, atol=1e-6)
    assert out["denoise"]["curves"] != out["noise"]["curves"]
    with pytest.raises(ValueError, match="direction"):
        study.mlp_localisation(random_gpt2, "g", prompts=6, direction="sideways")


def test_the_mlp_part_is_cached_by_model_files_and_options(tmp_path):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    from circuitfind.flows.study_flow import mlps_task
    from circuitfind.models.bpe import tokenizer_dir

    if not (tokenizer_dir() / "tokenizer.json").is_file():
        pytest.skip("GPT-2 tokenizer not built")
    folder = tmp_path / "gpt2-random"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=3, n_head=2, n_positions=64)).save_pretrained(folder)
    for f in tokenizer_dir().iterdir():
        shutil.copy(f, folder / f.name)
    cache = tmp_path / "cache"
    first = mlps_task.fn(str(folder), 6, 0, str(cache), windows=(1, 3))
    assert "cached" not in first and len(list(cache.iterdir())) == 1
    again = mlps_task.fn(str(folder), 6, 0, str(cache), windows=(1, 3))
    assert again.pop("cached") is True and again == json.loads(json.dumps(first))
    noised = mlps_task.fn(str(folder), 6, 0, str(cache), windows=(1, 3), direction="noise")
    assert "cached" not in noised and noised["direction"] == "noise" and len(list(cache.iterdir())) == 2
    for entry in cache.iterdir():
        entry.write_text("{ damaged")  # a damaged entry is recomputed, not an error
    assert mlps_task.fn(str(folder), 6, 0, str(cache), windows=(1, 3))["curves"] == first["curves"]


def test_the_variant_comparison_is_called_s2_vs_s1io_only_for_those_variants():
    """A dataset task's own variants (``str:corrupted``) are not Zhang & Nanda's S2 / S1+IO."""
    from circuitfind.runs.study import variants_label

    assert variants_label(["str:s2_io", "str:s1_io"]) == "Corrupting S2 vs S1+IO:"
    assert variants_label(["str:corrupted"]) == "STR variants compared (logit difference):"
    assert variants_label(["str:s2_io_flip", "str:abc"]) == "STR variants compared (logit difference):"
