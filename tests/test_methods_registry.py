"""Methods as plug-ins: one registry lists them; a method of a researcher's own, given by import path,
runs through ``discover``, the command line and a sweep, and the report ranks it with the built-in ones."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import circuitfind
from circuitfind import patching as P
from circuitfind.cli import build_parser, main
from circuitfind.edge_patching import EdgePatcher
from circuitfind.methods import discover as D
from circuitfind.methods import registry
from circuitfind.methods.base import Found, Method, TopK
from circuitfind.methods.eap import eap
from circuitfind.methods.selection import select_top_k, settings_of
from circuitfind.tasks import TaskBatch

SRC = Path(circuitfind.__file__).parent
HERE = f"{__name__}:AbsEAP"


class AbsEAP(Method):
    """EAP's per-prompt scores by magnitude before averaging, so prompts whose effects have opposite signs
    do not cancel (Kramár et al. 2024 rank by |AtP| for the same reason)."""

    name = "abs_eap"
    paper = "Kramár et al. 2024, AtP*"
    summary = "mean over prompts of the EAP score's magnitude"
    Options = TopK
    gradients = True
    score = "estimated"

    def find(self, setup, direction, options, per_prompt=False):
        patcher = EdgePatcher(setup, direction=direction)
        scores = eap(patcher, per_prompt=True).abs().mean(-1)
        settings = settings_of(patcher, self.name, k=options.top_k)
        return Found(select_top_k(patcher.graph, scores, options.top_k, settings))


@pytest.fixture(scope="module")
def setup(ioi_model):
    return P.prepare(ioi_model, TaskBatch.build(ioi_model, "ioi", 8, seed=0), "str", "logit_diff")


def test_a_method_by_import_path_runs_through_discover(setup):
    found = D.discover(setup, HERE, "noise", {"top_k": 7})
    expected = EdgePatcher(setup)
    reference = eap(expected, per_prompt=True).abs().mean(-1)
    assert found.circuit.n_edges == 7
    assert set(found.circuit.edges) == set(select_top_k(expected.graph, reference, 7).edges)
    assert found.circuit.settings["algorithm"] == HERE and found.circuit.settings["method"] == "abs_eap"
    assert found.faithfulness is not None and found.curve is not None  # ranks every edge: a curve applies


def test_a_method_by_import_path_runs_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "c.graphml"
    assert (
        main(["discover", "-n", "8", "--algorithm", HERE, "--metric", "logit_diff", "--top-k", "5", "--out", str(out)])
        == 0
    )
    assert out.is_file() and "faithfulness" in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:M", "cannot import module"),
        (f"{__name__}:nothing_here", "has no attribute"),
        (f"{__name__}:SRC", "not a subclass"),
        ("magic", "unknown algorithm 'magic'"),
    ],
)
def test_a_bad_method_is_one_line(spec, message, capsys):
    assert main(["discover", "--algorithm", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_method_without_find_or_name_is_refused():
    class NoFind(Method):
        name, paper, summary = "nofind", "p", "s"

    class BadName(AbsEAP):
        name = "Bad Name"

    with pytest.raises(registry.MethodError, match="does not implement find"):
        registry.check_class(NoFind, "x:NoFind")
    with pytest.raises(registry.MethodError, match="lower-case"):
        registry.check_class(BadName, "x:BadName")


def test_the_source_of_a_method_and_of_its_helpers_is_in_the_fingerprint(tmp_path, monkeypatch):
    (tmp_path / "my_method_helper.py").write_text("SCALE = 1\n")
    (tmp_path / "my_method_mod.py").write_text(
        "import my_method_helper\nfrom tests.test_methods_registry import AbsEAP as M\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    before = registry.method_fingerprint("my_method_mod:M")
    (tmp_path / "my_method_helper.py").write_text("SCALE = 3\n")
    assert registry.method_fingerprint("my_method_mod:M") != before  # a helper's edit reaches the cache key
    assert registry.method_fingerprint("eap") is None  # built-in: the package's code fingerprint covers it


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}


def test_every_method_option_of_the_commands_comes_from_an_options_class():
    from circuitfind.flows import sweep_flow

    fields = registry.option_fields()
    sub = build_parser()._subparsers._group_actions[0].choices
    for parser in (sub["discover"], sub["checkpoints"], sweep_flow.build_parser()):
        options = _options(parser)
        for name, info in fields.items():
            action = options[name]
            assert action.option_strings[0] == "--" + name.replace("_", "-")
            assert action.type is registry.value_type(info.annotation) and info.description in action.help
        # no option of the commands is a method option under another name
        method_like = {"tau", "k", "depth", "path_steps"}  # the old spellings, once defined per command
        assert not (method_like & set(options)), parser.prog


def test_no_option_is_defined_by_two_classes():
    owners: dict[str, set[type]] = {}
    for method in registry.builtin().values():
        for name in method.Options.model_fields:
            definers = {c for c in method.Options.__mro__ if name in getattr(c, "__annotations__", {})}
            owners.setdefault(name, set()).update(definers)
    assert all(len(v) == 1 for v in owners.values()), owners


def test_the_sweep_config_and_the_traits_are_derived_from_the_registry():
    from circuitfind.runs.sweep import SweepConfig

    assert set(registry.option_fields()) <= set(SweepConfig.model_fields)
    assert D.ALGORITHMS == tuple(registry.BUILTIN)
    assert set(D.PER_PROMPT) == {n for n, m in registry.builtin().items() if m.per_prompt}
    config = SweepConfig(acdc_tau=0.5, top_k=3)
    assert config.method_options("eap") == {"top_k": 3} and config.method_options("acdc") == {"acdc_tau": 0.5}


def test_the_package_layout():
    modules = [p for p in SRC.rglob("*.py") if p.name != "__init__.py"]
    names = [p.name for p in modules]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    top = [p for p in SRC.glob("*.py")]
    assert len(top) <= 12, sorted(p.name for p in top)
    for method in registry.builtin().values():  # one module per method (AtP* is AtP's variant)
        assert method.__module__.startswith("circuitfind.methods."), method


@pytest.mark.slow
def test_a_method_of_your_own_in_a_two_setting_sweep_is_ranked_by_the_report(prefect_harness, tmp_path):
    from circuitfind.runs.sweep import SweepConfig
    from flows.sweep import sweep

    config = SweepConfig(
        algorithms=["eap", HERE], corruptions=["str"], metrics=["logit_diff"], directions=["noise"], prompts=8
    )
    manifest = sweep(config, run="r", outputs=str(tmp_path))
    assert len(manifest["settings"]) == 2 and not manifest["failures"]
    md = (tmp_path / "r" / "report.md").read_text()
    ranked = md[md.index("Methods, ranked") :]
    assert HERE in ranked and "| eap |" in ranked
    assert "mean over prompts of the EAP score's magnitude" in ranked and "Syed" in ranked
    records = [json.loads(p.read_text()) for p in (tmp_path / "r" / "circuits").glob("*.json")]
    assert {r["method"]["name"] for r in records} == {"eap", "abs_eap"}  # what the report reads


def test_an_installed_packages_method_is_found_by_its_entry_point(tmp_path, monkeypatch, setup):
    """A package that declares ``[project.entry-points."circuitfind.methods"] abs_eap = "...:AbsEAP"``:
    its method is listed and runs by its entry-point name (a dist-info folder on the path is what pip
    installs)."""
    dist = tmp_path / "my_methods-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-methods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[circuitfind.methods]\nmy_abs_eap = {HERE}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._installed.cache_clear()
    try:
        assert "my_abs_eap" in registry.names()
        assert registry.get_method("my_abs_eap") is AbsEAP
        found = D.discover(setup, "my_abs_eap", "noise", {"top_k": 4}, curve=False)
        assert found.circuit.n_edges == 4 and found.circuit.settings["algorithm"] == "my_abs_eap"
    finally:
        registry._installed.cache_clear()


def test_the_methods_command_lists_each_method_with_its_paper(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, method in registry.builtin().items():
        assert f"{name}: {method.summary}" in out and method.paper in out
    assert "--acdc-tau (default 0.02)" in out and "noising only" in out


class ExitsInFind(AbsEAP):
    name = "exits"

    def find(self, setup, direction, options, per_prompt=False):
        raise SystemExit(0)


class ReturnsNone(AbsEAP):
    name = "returns_none"

    def find(self, setup, direction, options, per_prompt=False):
        return None


class RaisesInFind(AbsEAP):
    name = "raises"

    def find(self, setup, direction, options, per_prompt=False):
        raise KeyError("inside find")


class BadOptions(AbsEAP):
    name = "bad_options"
    Options = 5  # type: ignore[assignment]


class TakesABuiltinName(AbsEAP):
    name = "eap"


@pytest.mark.parametrize(
    "cls, message",
    [
        ("ExitsInFind", "raised SystemExit"),
        ("ReturnsNone", "find() returned NoneType, not a circuitfind.methods.base.Found"),
        ("RaisesInFind", "raised KeyError: 'inside find'"),
        ("BadOptions", "its Options must be a subclass"),
        ("TakesABuiltinName", "its name 'eap' is taken by a built-in method"),
    ],
)
def test_a_plug_in_that_misbehaves_is_one_line_naming_it(cls, message, capsys):
    """Found by a newcomer's review: sys.exit in find exited 0 with no output; a wrong return value or Options
    was a traceback; a plug-in could pass as a built-in method."""
    spec = f"{__name__}:{cls}"
    assert main(["discover", "-n", "4", "--algorithm", spec, "--metric", "logit_diff"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and spec in err and len(err.splitlines()) == 1, err
