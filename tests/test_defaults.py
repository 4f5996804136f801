"""Defaults that give a meaningful result, and results flagged where they are printed (issue 25)."""

from __future__ import annotations

from pathlib import Path

import pytest

from circuitfind.cli import build_parser, main
from circuitfind.methods import discover as discovery
from circuitfind.methods import registry
from circuitfind.tasks.batch import Prompt


def test_gradient_methods_default_to_logit_diff_and_acdc_to_kl():
    """EAP under discover's old default (kl, noising) scored every edge 0: KL's gradient vanishes at the
    clean run. Each method now names its default metric."""
    methods = registry.builtin()
    assert methods["acdc"].default_metric == "kl"
    for name, method in methods.items():
        if method.gradients:
            assert method.default_metric == "logit_diff", name


def test_default_metric_falls_back_where_a_prompt_has_no_wrong_answer():
    both = [Prompt("a b", " c", " d", {}, {}), Prompt("a b", " c", " e", {}, {})]
    assert discovery.default_metric("eap", both, "t") == ("logit_diff", None)
    lacking = [Prompt("a b", " c", " d", {}, {}), Prompt("a b", " c", "", {}, {})]
    metric, note = discovery.default_metric("eap", lacking, "t")
    assert metric == "logprob" and note is not None and "1 of 2 prompts of task 't' have no wrong answer" in note
    assert discovery.default_metric("acdc", lacking, "t") == ("kl", None)  # kl needs no wrong answer


def test_help_shows_the_defaults_and_every_metric(capsys):
    from circuitfind.tasks.metrics import METRICS

    for command in ("discover", "checkpoints"):
        with pytest.raises(SystemExit):
            build_parser(sweep_options=False).parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "kl for acdc; logit_diff for eap, eap_ig" in text, command
    with pytest.raises(SystemExit):
        build_parser(sweep_options=False).parse_args(["patch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in METRICS:
        assert name in text
    assert "logprob_diff" in text and "(default: logit_diff)" in text


def test_discover_default_scores_edges_and_flags_on_stdout(capsys):
    """The default EAP setting ranks edges (no zero-score flag); an explicitly chosen flagged setting says
    so on stdout, beside the faithfulness it qualifies."""
    assert main(["discover", "--algorithm", "eap", "-n", "4"]) == 0
    out, err = capsys.readouterr()
    assert "--metric defaults to logit_diff for eap" in err
    assert "warning" not in err and "FLAGGED" not in out
    assert main(["discover", "--algorithm", "eap", "-n", "4", "--metric", "kl"]) == 0
    out, err = capsys.readouterr()
    assert "(FLAGGED, see below)" in out and "FLAGGED: zero_scores" in out


def test_acdc_refuses_a_constant_metric_as_eap_does(tmp_path, monkeypatch, capsys):
    """ACDC under a constant metric returned an empty circuit with rc 0; EAP refused it."""
    (tmp_path / "constant_metric.py").write_text("def const(logits, ctx):\n    return logits[:, 0] * 0 + 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for algorithm in ("acdc", "eap"):
        assert main(["discover", "--algorithm", algorithm, "-n", "4", "--metric", "constant_metric:const"]) == 2
        err = capsys.readouterr().err
        assert "clean (1) and corrupted (1) metric values are equal" in err, algorithm


def test_intervals_from_too_few_resamples_or_pairs_are_undefined_with_a_reason():
    """--n-boot 1 was printed as a "95% interval" [0.493, 0.493]; two identical pairs as [0.401, 0.401]."""
    from circuitfind.runs.statistics import mean_interval

    two = mean_interval([0.401, 0.401])
    assert two["reason"] == "2 pairs, at least 3 needed for an interval"
    assert mean_interval([0.3, 0.4, 0.5], n_boot=1)["reason"] == "1 resample(s), at least 100 needed for an interval"
    defined = mean_interval([0.3, 0.4, 0.5])
    assert defined["reason"] is None and defined["low"] < defined["mean"] < defined["high"]


def test_sweep_and_study_tables_print_no_interval_where_it_is_undefined():
    from circuitfind.reports.sweep_report import _interval
    from circuitfind.runs.statistics import mean_interval
    from circuitfind.runs.study import top_head

    assert _interval(mean_interval([0.401, 0.401])) == "0.401 (no interval: 2 pairs, at least 3 needed for an interval)"
    row = {"effect": [[0.493, 0.1]], "ci_low": [[0.493, 0.1]], "ci_high": [[0.493, 0.1]]}
    assert top_head(row) == "a0.0: 0.493 [0.493, 0.493]"
    assert (
        top_head(row, "1 resample(s), at least 100 needed")
        == "a0.0: 0.493 (no interval: 1 resample(s), at least 100 needed)"
    )


def test_edge_bootstrap_refuses_fewer_than_100_resamples(tmp_path):
    import torch

    from circuitfind.circuits.graph import ModelGraph
    from circuitfind.runs.statistics import _bootstrap, _Unusable

    graph = ModelGraph(1, 2)
    path = tmp_path / "per_prompt.pt"
    torch.save(torch.randn(graph.n_edges, 6), path)
    record = {"per_prompt": str(path), "n_layers": 1, "n_heads": 2}
    assert _bootstrap(record, 100)["top"]
    with pytest.raises(_Unusable, match="1 resample"):
        _bootstrap(record, 1)


def test_study_report_with_one_resample_shows_no_interval(ioi_model, tmp_path):
    from circuitfind.runs import study

    grid = dict(corruptions=("str:s2_io",), metrics=("logit_diff",), variants=(), prompts=6)
    h = study.head_detection(ioi_model, "toy-ioi", n_boot=1, **grid)
    assert h["interval_reason"] == "1 resample(s), at least 100 needed for an interval"
    text = Path(study.study_report([h], [], tmp_path)["markdown"]).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| str:s2_io/logit_diff | "))
    assert row.endswith("(no interval: 1 resample(s), at least 100 needed for an interval) |") and "[" not in row


def test_sweep_cache_key_changes_when_a_helper_module_of_the_metric_changes(tmp_path, monkeypatch):
    """The key of a setting with an import-path metric covers the user's modules that metric imports."""
    import sys

    from circuitfind.runs.sweep import SweepConfig, cache_key

    (tmp_path / "key_metric_helper.py").write_text("SCALE = 0.5\n")
    (tmp_path / "key_metric_mod.py").write_text(
        "from circuitfind.tasks.metrics import get_metric\nfrom key_metric_helper import SCALE\n"
        "def scaled(logits, ctx):\n    return SCALE * get_metric('logit_diff')(logits, ctx)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("key_metric_mod", "key_metric_helper"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    config = SweepConfig(
        algorithms=["eap"], corruptions=["str"], metrics=["key_metric_mod:scaled"], directions=["noise"], prompts=8
    )
    (setting,) = config.settings()
    key = cache_key(setting, config)
    assert cache_key(setting, config) == key
    (tmp_path / "key_metric_helper.py").write_text("SCALE = 0.25\n")
    assert cache_key(setting, config) != key


def test_models_says_what_smollm2_is_and_names_the_fetch_extra(capsys, monkeypatch):
    import importlib.util

    from circuitfind.models import fetch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(fetch, "is_fetched", lambda name: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real_find_spec(n, *a))
    assert main(["models"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "not fetched: pip install 'circuitfind[fetch]' (the gguf package), then circuitfind models fetch smollm2-135m"
        in out
    )
    assert "SmolLM2-135M-Instruct dequantised from 4-bit Q4_1 GGUF, not the float base model" in out
    assert "no float reference can be had" in out


def test_outputs_default_to_the_current_folder_not_the_checkout(tmp_path, monkeypatch):
    """An editable install wrote runs into the checkout it was installed from, wherever the command ran."""
    from circuitfind.paths import default_outputs, run_folder

    monkeypatch.chdir(tmp_path)
    assert default_outputs() == tmp_path / "outputs"
    assert run_folder(None, "nightly") == tmp_path / "outputs" / "nightly"


def test_data_file_checks_run_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """A bad row 3, a metric that needs a wrong answer, a metric that cannot score multi-token answers:
    refused before the model loads (60-97 s for SmolLM2), not after."""
    import json

    from circuitfind.models import catalogue

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(catalogue, "load_model", no_model)
    row = {"clean": "When Mary and John went to the store, John gave a drink to", "answers": " Mary"}
    good = {**row, "corrupted": "When Mary and John went to the store, Mary gave a drink to"}
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps(good) + "\n" + json.dumps({**good, "counter_answers": " John"}) + "\n" + json.dumps(row) + "\n"
    )
    argv = ["discover", "--task", str(data), "-n", "3", "--algorithm", "eap", "--metric", "prob"]
    assert main(argv) == 2
    assert "pairs.jsonl:3: missing key 'corrupted'" in capsys.readouterr().err
    data.write_text(json.dumps(good) + "\n")
    assert main([*argv[:-1], "logit_diff"]) == 2
    assert "pairs.jsonl:1: no wrong answer, which metric 'logit_diff' needs" in capsys.readouterr().err
    spec = tmp_path / "multi.json"
    spec.write_text(json.dumps({"kind": "dataset", "file": "pairs.jsonl", "answer_tokens": "multi"}))
    (tmp_path / "row_metric.py").write_text("def first(logits, ctx):\n    return logits[:, 0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["discover", "--task", str(spec), "-n", "1", "--algorithm", "eap", "--metric", "row_metric:first"]) == 2
    assert "metric 'row_metric:first' cannot score them" in capsys.readouterr().err
