"""The settings study's computations: several metrics from one sweep, bootstrap over prompts (not
GN's prompt x noise-sample rows), stability of the detected heads, and signs a setting cannot show."""

import pytest
import torch

from circuitfind import agreement, study
from circuitfind import patching as P
from circuitfind.errors import ImpossibleSignError
from circuitfind.tasks import TaskBatch

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
    res = P.patch_heads(P.prepare(ioi_model, batch, "gn", "logit_diff"), "denoise")
    assert res.per_prompt.shape[-1] == 30  # 10 prompts x 3 noise samples
    per_prompt = (res.per_prompt.reshape(3, 4, 3, 10).mean(-2) - res.base) / (res.clean - res.corrupt)
    expected = agreement.bootstrap_ci(per_prompt, n_boot=200, seed=0)
    assert row["ci_low"] == expected.low.tolist() and row["ci_high"] == expected.high.tolist()
    rows = agreement.bootstrap_ci((res.per_prompt - res.base) / (res.clean - res.corrupt), n_boot=200)
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
        (["--n-boot", "0"], "n_boot"),
        (["--ioi-models", "no-such-model"], "no-such-model"),
        (["--run", "../escape"], "is not a folder name"),
    ],
)
def test_study_options_are_checked_before_prefect_starts(tmp_path, capsys, argv, message):
    from circuitfind.flows.study import main

    assert main([*argv, "--outputs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
