"""The sweep's result cache and run folders: what the key covers, entries verified on read, run
folders that can be moved, strict JSON, one computation per setting across processes."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import circuitfind
from circuitfind import patching as P
from circuitfind.circuits.circuit import Circuit
from circuitfind.edge_patching import EdgePatcher
from circuitfind.io import write_json
from circuitfind.methods import discover as D
from circuitfind.models.catalogue import load_model
from circuitfind.reports import write_run_report
from circuitfind.runs.sweep import Setting, SweepConfig, run_setting
from circuitfind.tasks.batch import TaskBatch

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(circuitfind.__file__).resolve().parent
CONFIG = SweepConfig(algorithms=["eap"], corruptions=["str"], metrics=["logit_diff"], directions=["noise"], prompts=8)
EAP = Setting(model="toy-ioi", task="ioi", algorithm="eap", corruption="str", metric="logit_diff", direction="noise")
NODE = EAP.model_copy(update={"algorithm": "node"})


def strict_json(text: str):
    """Parse JSON as the standard defines it: bare NaN / Infinity are errors."""

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def only_entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    return entry


def test_an_edited_task_file_is_recomputed(tmp_path, monkeypatch):
    tasks = tmp_path / "tasks"
    shutil.copytree(REPO / "tasks", tasks)
    monkeypatch.setenv("CIRCUITFIND_TASKS_DIR", str(tasks))

    def run(name):
        return run_setting(NODE, CONFIG, tmp_path / name, tmp_path / "cache")

    assert not run("a")["from_cache"]
    spec = json.loads((tasks / "ioi.json").read_text())
    (tasks / "ioi.json").write_text(json.dumps(spec))  # the same content laid out differently: still cached
    assert run("b")["from_cache"]
    spec["names"] = spec["names"][:10]
    (tasks / "ioi.json").write_text(json.dumps(spec))
    assert not run("c")["from_cache"]
    assert run("d")["from_cache"]


def test_any_changed_file_of_a_model_folder_is_recomputed(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(PACKAGE / "models" / "zoo" / "toy-ioi", folder)
    setting = NODE.model_copy(update={"model": str(folder)})

    def run(name):
        return run_setting(setting, CONFIG, tmp_path / name, tmp_path / "cache")

    assert not run("a")["from_cache"]
    assert run("b")["from_cache"]
    (folder / "extra.bin").write_bytes(b"\0" * 64)  # a new weights file
    assert not run("c")["from_cache"]
    (folder / "extra.bin").write_bytes(b"\1" * 64)  # a changed weights file
    assert not run("d")["from_cache"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 1024}))
    assert not run("e")["from_cache"]
    assert run("f")["from_cache"]


KEY_SCRIPT = """
import circuitfind
from circuitfind.runs.sweep import Setting, SweepConfig, cache_key
setting = Setting(model="toy-ioi", task="ioi", algorithm="node", corruption="str", metric="logit_diff", direction="noise")
print(circuitfind.__file__)
print(cache_key(setting, SweepConfig()))
"""


@pytest.mark.slow
def test_the_package_source_is_in_the_cache_key(tmp_path):
    copy = tmp_path / "src" / "circuitfind"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "CIRCUITFIND_TASKS_DIR": str(REPO / "tasks")}

    def key() -> str:
        done = subprocess.run([sys.executable, "-c", KEY_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        imported, key = done.stdout.split()
        assert Path(imported).resolve().is_relative_to(copy)  # the copy, not the checkout, was imported
        return key

    before = key()
    metrics = copy / "tasks" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n# an edit that keeps the version string\n")
    assert key() != before


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()
    elif path.name == "record.json":  # edited: still valid JSON, different content
        record = json.loads(data)
        path.write_text(json.dumps({**record, "n_edges": record["n_edges"] + 1}))
    elif path.name == "per_prompt.pt":
        tensor = torch.load(path, weights_only=True)
        buffer = path.with_suffix(".tmp")
        torch.save(tensor + 1, buffer)
        buffer.replace(path)
    else:
        path.write_bytes(data.replace(b"in_circuit", b"in_circuiT", 1))


@pytest.mark.parametrize(
    "name,how",
    [
        ("record.json", "truncate"),
        ("record.json", "edit"),
        ("circuit.graphml", "truncate"),
        ("circuit.graphml", "edit"),
        ("per_prompt.pt", "truncate"),
        ("per_prompt.pt", "delete"),
    ],
)
def test_a_damaged_cache_entry_is_detected_logged_and_recomputed(tmp_path, caplog, name, how):
    cache = tmp_path / "cache"
    first = run_setting(EAP, CONFIG, tmp_path / "a", cache)
    target = only_entry(cache) / name
    fresh = target.read_bytes()
    _damage(target, how)
    with caplog.at_level(logging.WARNING, logger="circuitfind"):
        again = run_setting(EAP, CONFIG, tmp_path / "b", cache)
    assert not again["from_cache"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(EAP.name in m and name in m for m in warnings), warnings
    # the run gets the recomputed files, equal to the first run's, and the entry is repaired
    for kind in ("graphml", "per_prompt"):
        assert Path(again[kind]).read_bytes() == Path(first[kind]).read_bytes()
    assert Circuit.load(again["graphml"]).edges == Circuit.load(first["graphml"]).edges
    if name == "record.json":  # the record holds its compute time: compare its content
        assert json.loads(target.read_text())["n_edges"] == first["n_edges"]
    else:
        assert target.read_bytes() == fresh
    assert run_setting(EAP, CONFIG, tmp_path / "c", cache)["from_cache"]


def test_the_report_skips_a_broken_per_prompt_file_with_a_note(tmp_path):
    run = tmp_path / "run"
    for setting in (EAP, NODE):
        run_setting(setting, CONFIG, run, tmp_path / "cache")
    per_prompt = run / "circuits" / f"{EAP.name}.per_prompt.pt"
    per_prompt.write_bytes(per_prompt.read_bytes()[:100])
    markdown = write_run_report(run)["markdown_text"]
    assert "eap/str/logit_diff/noise" in markdown
    assert f"{per_prompt.name} could not be read" in markdown


def test_a_copied_run_folder_gives_the_same_report_and_reads_only_itself(tmp_path):
    original = tmp_path / "original"
    for setting in (EAP, NODE):
        run_setting(setting, CONFIG, original, tmp_path / "cache")
    expected = write_run_report(original, title="the run")["markdown_text"]
    assert "Bootstrap intervals" in expected
    for record_file in (original / "circuits").glob("*.json"):
        record = strict_json(record_file.read_text())
        assert record["graphml"] == f"circuits/{record['setting']}.graphml"  # relative to the run folder
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)  # nothing can be read from the original any more
    assert write_run_report(copy, title="the run")["markdown_text"] == expected
    # records written before paths were relative name files in another folder: found by name here
    record_file = copy / "circuits" / f"{EAP.name}.json"
    record = json.loads(record_file.read_text())
    gone = tmp_path / "gone" / "circuits"
    record.update({k: str(gone / Path(record[k]).name) for k in ("graphml", "json", "per_prompt")})
    record_file.write_text(json.dumps(record))
    assert write_run_report(copy, title="the run")["markdown_text"] == expected


def test_write_json_writes_strict_json(tmp_path):
    path = write_json(
        tmp_path / "x.json",
        {
            "nan": float("nan"),
            "values": torch.tensor([1.0, float("inf"), -float("inf")]),
            "nested": [{"ok": 0.5, "bad": float("nan")}],
            "pair": (1, 2),
        },
    )
    assert strict_json(path.read_text()) == {
        "nan": None,
        "values": [1.0, None, None],
        "nested": [{"ok": 0.5, "bad": None}],
        "pair": [1, 2],
    }


def test_an_empty_circuit_is_recorded_as_strict_json_and_reported(tmp_path):
    config = CONFIG.model_copy(update={"node_k": 50.0})  # no head is 50 SD from the mean: the circuit is empty
    summary = run_setting(NODE, config, tmp_path / "run", tmp_path / "cache")
    assert summary["n_edges"] == 0 and summary["faithfulness"] is None
    files = list((tmp_path / "run").rglob("*.json")) + list((tmp_path / "cache").rglob("*.json"))
    entry = only_entry(tmp_path / "cache").name  # the cache key
    assert sorted(str(f.relative_to(tmp_path)) for f in files) == [
        f"cache/{entry}/checksums.json",
        f"cache/{entry}/record.json",
        f"run/circuits/{NODE.name}.json",
    ]
    for f in files:
        strict_json(f.read_text())
    record = strict_json((tmp_path / "run" / "circuits" / f"{NODE.name}.json").read_text())
    assert record["faithfulness"] is None and record["faithfulness_status"] == "empty circuit"
    markdown = write_run_report(tmp_path / "run")["markdown_text"]
    assert "| node/str/logit_diff/noise | 0 | 0 | empty circuit |" in markdown


WORKER = """
import json, sys, time
from pathlib import Path
from circuitfind.runs import sweep
from circuitfind.runs.sweep import Setting, SweepConfig, run_setting

run, cache, ready, go = sys.argv[1:5]
config = SweepConfig(prompts=8)
setting = Setting(model="toy-ioi", task="ioi", algorithm="node", corruption="str", metric="logit_diff", direction="noise")
with sweep.MODELS.lend("toy-ioi", config.device):  # load the model before the start line, so both start computing together
    pass
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
print(json.dumps(run_setting(setting, config, run, cache)["from_cache"]))
"""


@pytest.mark.slow
def test_two_concurrent_sweeps_compute_a_setting_once(tmp_path):
    run, cache, go = tmp_path / "run", tmp_path / "cache", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(run), str(cache), str(tmp_path / f"ready{i}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    from_cache = sorted(json.loads(out) for out, _ in outputs)
    assert from_cache == [False, True]  # computed by one process, copied from the cache by the other
    # the run and the cache are intact: a third reader finds the entry complete and verified
    again = run_setting(NODE, SweepConfig(prompts=8), tmp_path / "check", cache)
    assert again["from_cache"]
    assert Path(again["graphml"]).read_bytes() == (run / "circuits" / f"{NODE.name}.graphml").read_bytes()
    assert not list(run.rglob("*.tmp")) and not list(cache.rglob("*.tmp"))


def test_records_are_strict_json_with_finite_numbers(tmp_path):
    run_setting(EAP, CONFIG, tmp_path / "run", tmp_path / "cache")
    record = strict_json((tmp_path / "run" / "circuits" / f"{EAP.name}.json").read_text())
    assert math.isfinite(record["faithfulness"]) and record["faithfulness_status"] == "ok"
    # the recorded faithfulness is the saved circuit's, measured afresh on the same setting
    model = load_model("toy-ioi")
    setup = P.prepare(model, TaskBatch.build(model, "ioi", CONFIG.prompts, seed=CONFIG.seed), "str", "logit_diff")
    circuit = Circuit.load(tmp_path / "run" / "circuits" / f"{EAP.name}.graphml")
    assert record["faithfulness"] == pytest.approx(
        D.faithfulness(EdgePatcher(setup, circuit.graph, "noise"), circuit), abs=1e-5
    )


def test_a_broken_record_in_a_run_folder_is_named(tmp_path):
    run_setting(NODE, CONFIG, tmp_path / "run", tmp_path / "cache")
    record = tmp_path / "run" / "circuits" / f"{NODE.name}.json"
    record.write_text(record.read_text()[:50])
    with pytest.raises(ValueError, match=f"setting record .*{NODE.name}.json is not valid JSON"):
        write_run_report(tmp_path / "run")


def test_the_report_of_an_unfinished_run_says_so(tmp_path, capsys):
    """A run folder without manifest.json (a sweep killed or still running): `circuitfind report` says
    the report covers only the settings found, on stderr and at the top of the report."""
    from circuitfind.cli import main

    run = tmp_path / "unfinished"
    run_setting(EAP, CONFIG, run, tmp_path / "cache")
    assert main(["report", str(run)]) == 0
    assert "circuitfind: note: this run has no manifest.json" in capsys.readouterr().err
    assert "**Note:** this run has no manifest.json" in (run / "report.md").read_text()
    assert "<p class='flag'><b>Note:</b> this run has no manifest.json" in (run / "report.html").read_text()
    (run / "manifest.json").write_text("{}")
    assert main(["report", str(run)]) == 0
    assert "no manifest.json" not in (run / "report.md").read_text()


def test_a_cache_entry_replaced_by_a_file_is_healed(tmp_path, caplog):
    first = run_setting(NODE, CONFIG, tmp_path / "a", tmp_path / "cache")
    entry = only_entry(tmp_path / "cache")
    shutil.rmtree(entry)
    entry.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="circuitfind.runs.sweep"):
        again = run_setting(NODE, CONFIG, tmp_path / "b", tmp_path / "cache")
    assert not again["from_cache"] and entry.is_dir()
    assert any("is not a folder" in m for m in caplog.messages), caplog.messages
    assert Path(again["graphml"]).read_bytes() == Path(first["graphml"]).read_bytes()
    assert run_setting(NODE, CONFIG, tmp_path / "c", tmp_path / "cache")["from_cache"]  # healed for good
