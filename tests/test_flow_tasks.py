"""A dataset file as the task of the study and checkpoints flows: the same results as the shipped task,
named by file name and content hash, cached by content."""

import json
import shutil
from pathlib import Path

import pytest

from circuitfind.runs import study
from circuitfind.runs.sweep import task_fingerprint
from circuitfind.tasks.batch import generate_prompts, load_task

TOY_IOI = Path(study.__file__).parents[1] / "models" / "zoo" / "toy-ioi"


def _ioi_jsonl(path, n=8, seed=0, subject_last=False):
    """The shipped generator's IOI prompts as circuitfind JSONL (with the key tokens)."""
    rows = []
    for p in generate_prompts("ioi", n, seed):
        keys = dict(p.key_chars)
        if subject_last:
            keys["subject_last"] = keys["S2"]
        rows.append(
            {
                "clean": p.text,
                "answers": p.answer,
                "counter_answers": p.counter_answer,
                **{f"corrupted.{v}": t for v, t in p.corrupted.items()},
                "keys": keys,
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _label(path):
    return f"{path.name}-{load_task(str(path)).data['sha256'][:10]}"


def test_head_detection_on_a_dataset_file_is_the_shipped_tasks(ioi_model, tmp_path):
    """IOI prompts as a dataset file give the same head effects (STR and GN) as the shipped ``ioi``;
    the result and the report name the file by its name and content hash."""
    path = _ioi_jsonl(tmp_path / "pairs.jsonl")
    grid = dict(prompts=8, corruptions=("str:s2_io", "gn"), metrics=("logit_diff",), variants=("str:s1_io",), n_boot=40)
    ours = study.head_detection(ioi_model, "toy-ioi", task=str(path), **grid)
    ref = study.head_detection(ioi_model, "toy-ioi", **grid)
    assert ours["task"] == _label(path) and ours["task_sha256"] == task_fingerprint(str(path))
    assert ref["task"] == "ioi" and ref["task_sha256"] == task_fingerprint("ioi")
    assert (
        set(ours["settings"])
        == set(ref["settings"])
        == {"str:s2_io/logit_diff", "gn/logit_diff", "str:s1_io/logit_diff"}
    )
    for name, row in ref["settings"].items():
        assert ours["settings"][name]["effect"] == row["effect"], name
        assert ours["settings"][name]["heads"] == row["heads"], name
    md = Path(study.study_report([ours, ref], [], tmp_path / "report")["markdown"]).read_text()
    assert f"Head detection, task {_label(path)}, on toy-ioi (8 prompts" in md
    assert "IOI head detection on toy-ioi (8 prompts" in md


def test_study_checks_the_task_before_prefect_starts(tmp_path, capsys):
    from circuitfind.flows.study_flow import main

    mib = Path(__file__).parent / "data" / "mib" / "ioi.jsonl"  # its STR variant is s2_io_flip, not s2_io
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a b", "corrupted": "a b", "answers": " x"}\n')
    for argv, message in [
        (["--ioi-task", str(mib)], f"--ioi-task {mib}: no STR variant 's2_io' for 'str:s2_io'"),
        (["--ioi-task", str(bad)], "bad.jsonl:1: 'corrupted' is identical to 'clean'"),
        (["--ioi-task", "no-such-task"], "unknown task 'no-such-task'"),
        (["--factual-models", "toy-ioi", "--factual-task", str(bad)], "bad.jsonl:1:"),
    ]:
        assert main([*argv, "--outputs", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, argv
    assert not (tmp_path / "out").exists()


def test_mlp_study_caches_a_dataset_by_its_content(tmp_path):
    """The MLP part's cache key holds the task's content: a copy of the file elsewhere is served from the
    cache, other content is computed anew."""
    from circuitfind.flows.study_flow import mlps_task

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path = _ioi_jsonl(tmp_path / "a" / "facts.jsonl", n=4, subject_last=True)
    cache = str(tmp_path / "cache")
    options = dict(windows=(1,), corruption="str", metric="logit_diff", position="subject_last")
    first = mlps_task.fn(str(TOY_IOI), 4, 0, cache, str(path), **options)
    assert "cached" not in first and first["task"] == _label(path) and first["prompts"] == 4
    moved = shutil.copy(path, tmp_path / "b" / "facts.jsonl")
    again = mlps_task.fn(str(TOY_IOI), 4, 0, cache, str(moved), **options)
    assert again["cached"] is True and again["curves"] == first["curves"]
    _ioi_jsonl(Path(moved), n=4, seed=1, subject_last=True)
    other = mlps_task.fn(str(TOY_IOI), 4, 0, cache, str(moved), **options)
    assert "cached" not in other and other["task_sha256"] != first["task_sha256"]


def test_a_checkpoint_analysed_on_a_dataset_file_is_the_shipped_tasks(tmp_path):
    from circuitfind.runs.checkpoints import analyse_checkpoint

    path = _ioi_jsonl(tmp_path / "pairs.jsonl")
    setting = dict(prompts=8, algorithm="eap", metric="logit_diff", top_k=12)
    ours = analyse_checkpoint(TOY_IOI, 0, task=str(path), **setting)
    ref = analyse_checkpoint(TOY_IOI, 0, task="ioi", **setting)
    assert ours["n_edges"] == 12 and ours["edges"] == ref["edges"] and ours["scores"] == ref["scores"]
    assert ours["accuracy"] == ref["accuracy"] and ours["logit_diff"] == ref["logit_diff"]


def _checkpoints_folder(root: Path) -> Path:
    """A checkpoints folder whose one checkpoint (step 0) is the shipped toy-ioi."""
    ckpt = root / "run" / "checkpoints"
    shutil.copytree(TOY_IOI, ckpt / "step-00000")
    (ckpt / "checkpoints.json").write_text(json.dumps({"checkpoints": [{"step": 0, "folder": "step-00000"}]}))
    return root / "run"


@pytest.mark.slow
def test_checkpoints_flow_takes_a_dataset_file(prefect_harness, tmp_path, monkeypatch):
    """The flow with a relative dataset path: the checkpoint's circuit is the shipped task's, and the
    report and checkpoints.json name the file by its name and content hash."""
    from flows.checkpoints import circuits_over_training

    folder = _checkpoints_folder(tmp_path)
    path = _ioi_jsonl(tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tmp_path)
    common = dict(prompts=8, algorithm="eap", metric="logit_diff", options={"top_k": 12}, outputs=str(tmp_path / "out"))
    out = circuits_over_training(str(folder), task="pairs.jsonl", run="ds", **common)
    ref = circuits_over_training(str(folder), task="ioi", run="ref", **common)
    assert out["checkpoints"][0]["edges"] == ref["checkpoints"][0]["edges"] and not out["skipped"]
    saved = json.loads((tmp_path / "out" / "ds" / "checkpoints.json").read_text())
    assert saved["setting"]["task"] == _label(path) and saved["setting"]["task_sha256"] == task_fingerprint(str(path))
    assert f"task {_label(path)}" in (tmp_path / "out" / "ds" / "checkpoints.md").read_text()


@pytest.mark.slow
def test_study_flow_takes_a_dataset_file(prefect_harness, tmp_path, monkeypatch):
    from flows.study import settings_study

    path = _ioi_jsonl(tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tmp_path)
    grid = {"metrics": ("logit_diff",), "corruptions": ("str:s2_io",), "variants": ()}
    out = settings_study(
        ioi_prompts=8, n_boot=20, run="ds", outputs=str(tmp_path / "out"), grid=grid, ioi_task="pairs.jsonl"
    )
    (heads,) = out["heads"]
    assert heads["task"] == _label(path) and heads["settings"]["str:s2_io/logit_diff"]["heads"] is not None
    saved = json.loads((tmp_path / "out" / "ds" / "study.json").read_text())
    assert saved["heads"][0]["task_sha256"] == task_fingerprint(str(path))
    assert f"Head detection, task {_label(path)}, on toy-ioi" in Path(out["markdown"]).read_text()
