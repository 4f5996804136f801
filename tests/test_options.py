"""Numeric options are validated by the library (so the API, the CLI and the sweep all refuse them),
before any work is done, and the CLI reports each as one line with exit code 2."""

import math
import time

import pytest
import torch

from circuitfind import patching as P
from circuitfind.circuits.graph import ModelGraph
from circuitfind.cli import main
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods import discover as D
from circuitfind.tasks import batch as tasks

BAD_FLOATS = [float("nan"), float("inf"), float("-inf")]


@pytest.fixture(scope="module")
def setup(ioi_model):
    batch = tasks.TaskBatch.build(ioi_model, "ioi", 8, seed=0)
    return P.prepare(ioi_model, batch, "str", "kl")


@pytest.fixture(scope="module")
def patcher(setup):
    return EdgePatcher(setup)


@pytest.mark.parametrize("tau", [-1.0, -1e-9, *BAD_FLOATS])
def test_acdc_refuses_negative_or_non_finite_tau(patcher, tau):
    with pytest.raises(ValueError, match="tau"):
        D.acdc(patcher, tau)


def test_zero_tau_is_allowed_and_bad_candidates_are_refused(patcher):
    D.check_options("acdc", acdc_tau=0.0)  # tau 0: remove only edges whose removal does not hurt
    assert D.select_threshold(patcher.graph, torch.ones(patcher.n_edges), 0.0).n_edges == patcher.n_edges
    with pytest.raises(ValueError, match="candidates"):
        D.acdc(patcher, 0.02, candidates=0)


@pytest.mark.parametrize("k", [0.0, -2.0, *BAD_FLOATS])
def test_detect_refuses_non_positive_or_non_finite_k(k):
    with pytest.raises(ValueError, match="k"):
        P.detect(torch.arange(10.0), k=k)


@pytest.mark.parametrize("k", [0.0, float("nan")])
def test_node_and_path_circuits_refuse_bad_k_before_patching(setup, k, monkeypatch):
    def no_patching(*args, **kw):
        raise AssertionError("patched before checking k")

    monkeypatch.setattr(P, "patch_heads", no_patching)
    monkeypatch.setattr(P, "path_patch", no_patching)
    with pytest.raises(ValueError, match="k"):
        D.node_circuit(setup, k=k)
    with pytest.raises(ValueError, match="k"):
        D.iterative_path_patching(setup, k=k)


def test_top_k_larger_than_the_graph_is_refused_by_every_entry_point(setup, patcher):
    """One behaviour for too-large k everywhere: a clear error naming the graph's edge count."""
    n = patcher.n_edges
    scores = torch.randn(n)
    message = rf"k must be in 1\.\.{n}"
    with pytest.raises(ValueError, match=message):
        D.select_top_k(patcher.graph, scores, n + 1)
    with pytest.raises(ValueError, match=message):
        D.discover(setup, "eap", top_k=n + 1)
    with pytest.raises(ValueError, match=message):
        D.eap_circuit(patcher, k=n + 1)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="--top-k|k must"):
            D.discover(setup, "eap", top_k=bad)
    assert D.select_top_k(patcher.graph, scores, n).n_edges == n  # the whole graph, when asked for exactly


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(algorithm="acdc", acdc_tau=float("nan")), "tau"),
        (dict(algorithm="acdc", acdc_tau=-1.0), "tau"),
        (dict(algorithm="eap_ig", ig_steps=0), "--ig-steps"),
        (dict(algorithm="path_patching", path_depth=0), "--path-depth"),
        (dict(algorithm="path_patching", path_k=float("nan")), "--path-k"),
        (dict(algorithm="node", node_k=-1.0), "--node-k"),
        (dict(algorithm="eap", top_k=0), "--top-k"),
    ],
)
def test_discover_checks_every_option_up_front(setup, kwargs, name):
    with pytest.raises(ValueError, match=name):
        D.check_options(**kwargs)
    algorithm = kwargs.pop("algorithm")
    with pytest.raises(ValueError, match=name):
        D.discover(setup, algorithm, **kwargs)


def test_select_threshold_and_curve_refuse_non_finite_values(patcher):
    scores = torch.randn(patcher.n_edges)
    with pytest.raises(ValueError, match="tau"):
        D.select_threshold(patcher.graph, scores, float("nan"))
    with pytest.raises(ValueError, match="fractions"):
        D.faithfulness_curve(patcher, scores, fractions=(0.0, float("nan"), 1.0))


def test_prepare_refuses_a_bad_max_batch(ioi_model):
    batch = tasks.TaskBatch.build(ioi_model, "ioi", 4, seed=0)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_batch"):
            P.prepare(ioi_model, batch, "str", "kl", max_batch=bad)


def test_window_and_steps_are_checked(setup, patcher):
    with pytest.raises(ValueError, match="window"):
        P.patch_mlp_windows(setup, window=0)
    with pytest.raises(ValueError, match="steps"):
        D.eap_ig(patcher, steps=0)


@pytest.mark.timeout(60)
def test_prompt_count_is_bounded_before_anything_is_allocated(ioi_model):
    limit = tasks.MAX_PROMPTS
    assert 1000 <= limit <= 100_000
    start = time.monotonic()
    for n in (limit + 1, 10**8, 10**18):
        with pytest.raises(ValueError, match=f"at most {limit}"):
            tasks.generate_prompts("ioi", n)
        with pytest.raises(ValueError, match=f"at most {limit}"):
            tasks.TaskBatch.build(ioi_model, "ioi", n)
    for n in (0, -5):
        with pytest.raises(ValueError, match="at least one prompt"):
            tasks.generate_prompts("ioi", n)
    for n in (2.5, "10", True):
        with pytest.raises((TypeError, ValueError), match="prompts"):
            tasks.generate_prompts("ioi", n)
    assert time.monotonic() - start < 5.0
    assert len(tasks.generate_prompts("ioi", 3)) == 3


def _one_line_error(capsys, argv, *fragments, seconds=60.0) -> str:
    start = time.monotonic()
    assert main(argv) == 2, argv
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert elapsed < seconds, f"{argv} took {elapsed:.1f} s"
    return err


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["discover", "--tau", "-1"], ["tau"]),
        (["discover", "--tau", "nan"], ["tau"]),
        (["discover", "--tau", "inf"], ["tau"]),
        (["discover", "--algorithm", "node", "--node-k", "nan"], ["--node-k"]),
        (["discover", "--algorithm", "path_patching", "--path-k", "0"], ["--path-k"]),
        (["discover", "--algorithm", "eap", "--top-k", "0"], ["--top-k"]),
        (["discover", "--algorithm", "eap_ig", "--ig-steps", "0"], ["--ig-steps"]),
        (["discover", "--algorithm", "path_patching", "--depth", "0"], ["--path-depth"]),
        (["discover", "--algorithm", "acdc", "--top-k", "100000"], ["--top-k", "262 edges"]),
        (["discover", "--ig-steps", "0"], ["--ig-steps"]),
        (["discover", "--depth", "0"], ["--path-depth"]),
        (["discover", "--top-k", "0"], ["--top-k"]),
        (["discover", "--node-k", "0"], ["--node-k"]),
        (["patch", "-k", "nan"], ["k"]),
        (["patch", "--what", "mlp_window", "--window", "0"], ["window"]),
        (["evaluate", "-n", "100000000"], ["at most"]),
        (["evaluate", "-n", "-1"], ["at least one prompt"]),
        (["evaluate", "-n", "0"], ["at least one prompt"]),
    ],
)
def test_cli_refuses_bad_numbers_fast(capsys, argv, fragments):
    """Checked before the model is loaded or anything runs: fast even on a loaded machine."""
    _one_line_error(capsys, argv + ["-n", "8"] if "-n" not in argv else argv, *fragments, seconds=60.0)


def test_cli_top_k_larger_than_the_graph(capsys):
    err = _one_line_error(
        capsys, ["discover", "--algorithm", "eap", "--top-k", "100000", "-n", "8"], "--top-k", "262 edges"
    )
    assert "100000" in err


def test_edge_count_formula_matches_the_graph():
    from circuitfind.circuits.graph import edge_count

    for shape in [(1, 1), (3, 4), (2, 3), (5, 6)]:
        for split in (True, False):
            assert edge_count(*shape, split_qkv=split) == ModelGraph(*shape, split_qkv=split).n_edges
    assert edge_count(4, 6, n_kv_heads=2) == ModelGraph(4, 6, n_kv_heads=2).n_edges
    assert edge_count(30, 9, n_kv_heads=3) == 70651
    assert math.isfinite(edge_count(10**6, 10**6))  # arithmetic only: no allocation
