"""Checkpoints of the toy trainer and the circuits-over-training flow."""

import hashlib
import json
from pathlib import Path

import pytest

from circuitfind.models.zoo.train import checkpoint_steps, train
from circuitfind.runs import checkpoints as C


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_steps_are_evenly_spaced_from_the_initialisation():
    assert checkpoint_steps(2500, 26) == list(range(0, 2501, 100))
    assert checkpoint_steps(10, 4) == [0, 3, 7, 10]
    assert checkpoint_steps(5, 1) == [5]
    assert checkpoint_steps(3, 4) == [0, 1, 2, 3]
    for bad in (0, 5, True, 1.5):
        with pytest.raises(ValueError):
            checkpoint_steps(3, bad)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """toy-ioi trained for 6 steps with 4 checkpoints, twice; and the first 2 steps of the same schedule."""
    root = tmp_path_factory.mktemp("short")
    summaries = [train("toy-ioi", root / name, log_every=0, checkpoints=4, steps=6) for name in ("a", "b")]
    partial = train("toy-ioi", root / "partial", log_every=0, checkpoints=4, steps=6, until=2)
    return root, summaries, partial


def test_checkpoints_are_deterministic_and_the_last_is_the_final_model(short_run):
    root, summaries, _ = short_run
    manifest = json.loads((root / "a" / "checkpoints" / "checkpoints.json").read_text())
    assert manifest == {
        "model": "toy-ioi",
        "steps": 6,
        "checkpoints": [{"step": s, "folder": f"step-{s:05d}"} for s in (0, 2, 4, 6)],
    }
    weights = {s: digest(root / "a" / "checkpoints" / f"step-{s:05d}" / "model.safetensors") for s in (0, 2, 4, 6)}
    assert len(set(weights.values())) == 4  # training moved the weights between checkpoints
    for s, d in weights.items():
        assert digest(root / "b" / "checkpoints" / f"step-{s:05d}" / "model.safetensors") == d
    assert weights[6] == digest(root / "a" / "model.safetensors")
    assert json.loads((root / "a" / "checkpoints" / "step-00004" / "training.json").read_text())["step"] == 4
    assert summaries[0]["accuracy"] == summaries[1]["accuracy"]
    leftovers = [p for p in root.rglob(".*") if p.name.endswith(".tmp") or ".old-" in p.name]
    assert leftovers == []


def test_stopping_early_keeps_the_full_schedules_checkpoints(short_run):
    root, _, partial = short_run
    assert partial["stopped_at"] == 2 and [c["step"] for c in partial["checkpoints"]] == [0, 2]
    for s in (0, 2):
        name = f"step-{s:05d}"
        assert digest(root / "partial" / "checkpoints" / name / "model.safetensors") == digest(
            root / "a" / "checkpoints" / name / "model.safetensors"
        )
    assert not (root / "partial" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="until must be in 0..6"):
        train("toy-ioi", root / "bad", log_every=0, steps=6, until=7)


def test_find_checkpoints(short_run, tmp_path):
    root, _, _ = short_run
    found = C.find_checkpoints(root / "a")
    assert [c.step for c in found] == [0, 2, 4, 6] and found[0].folder == root / "a" / "checkpoints" / "step-00000"
    assert [c.step for c in C.find_checkpoints(root / "a" / "checkpoints", steps=[6, 0])] == [0, 6]
    with pytest.raises(ValueError, match=r"no checkpoint at steps \[5\]"):
        C.find_checkpoints(root / "a", steps=[5])
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        C.find_checkpoints(tmp_path)


def test_edge_timeline_spans():
    results = [
        {"step": s, "edges": edges}
        for s, edges in [
            (0, []),
            (10, [["a", "b"]]),
            (20, [["a", "b"], ["c", "d"]]),
            (30, [["c", "d"]]),
            (40, [["a", "b"], ["c", "d"]]),
        ]
    ]
    t = C.edge_timeline(results)
    assert t["edges"] == ["a->b", "c->d"]
    assert t["present"] == {"a->b": [False, True, True, False, True], "c->d": [False, False, True, True, True]}
    assert t["spans"] == {"a->b": [[10, 30], [40, None]], "c->d": [[20, None]]}
    assert t["final_recall"] == [0.0, 0.5, 1.0, 0.5, 1.0]


@pytest.mark.slow
def test_checkpoints_flow_writes_the_report(prefect_harness, short_run, tmp_path):
    from flows.checkpoints import circuits_over_training

    root, _, _ = short_run
    out = circuits_over_training(str(root / "a"), steps=[0, 6], prompts=8, run="r", outputs=str(tmp_path))
    assert [r["step"] for r in out["checkpoints"]] == [0, 6]
    html = Path(out["html"]).read_text()
    assert "<svg" in html and "Circuit edges over training" in html and "share of final circuit" in html
    saved = json.loads((tmp_path / "r" / "checkpoints.json").read_text())
    assert saved["setting"]["algorithm"] == "acdc" and saved["timeline"]["steps"] == [0, 6]
    assert (tmp_path / "r" / "checkpoints.md").read_text().startswith("# Circuits over training")


@pytest.mark.slow
def test_every_top_k_algorithm_takes_top_k_in_the_checkpoints_flow(prefect_harness, short_run, tmp_path):
    """IFR and edge pruning were left out of the flow's options, so --top-k was silently dropped."""
    from flows.checkpoints import circuits_over_training

    root, _, _ = short_run
    for algorithm in ("ifr", "eap_ig_act"):
        out = circuits_over_training(
            str(root / "a"),
            steps=[6],
            prompts=8,
            algorithm=algorithm,
            options={"top_k": 7},
            run=algorithm,
            outputs=str(tmp_path),
        )
        assert [len(r["edges"]) for r in out["checkpoints"]] == [7], algorithm


def test_checkpoints_command_refuses_bad_input(tmp_path, capsys):
    from circuitfind.cli import main

    assert main(["checkpoints", str(tmp_path / "missing")]) == 2
    assert "no checkpoints folder" in capsys.readouterr().err
    assert main(["checkpoints", str(tmp_path), "--tau", "-1"]) == 2
    assert "--acdc-tau" in capsys.readouterr().err
    # edge pruning and UGS take --prune-steps here too (it was not an option: 200 steps per checkpoint)
    assert main(["checkpoints", str(tmp_path), "--algorithm", "ugs", "--prune-steps", "0"]) == 2
    assert "--prune-steps must be >= 1 (got 0)" in capsys.readouterr().err


@pytest.mark.slow
def test_ioi_circuit_edges_appear_over_training(prefect_harness, tmp_path):
    """toy-ioi's own schedule up to step 300 (checkpoints every 100 steps, as ``--checkpoints 26``), and
    the shipped model as the step-2500 checkpoint (the last checkpoint is the final model, bit for bit):
    the IOI circuit appears between steps 200 and 300, when accuracy jumps from chance to 1."""
    import shutil

    from circuitfind.models.loading import resolve_model_path
    from flows.checkpoints import circuits_over_training

    folder = tmp_path / "toy-ioi"
    train("toy-ioi", folder, log_every=0, checkpoints=26, until=300)
    ckpt = folder / "checkpoints"
    shutil.copytree(resolve_model_path("toy-ioi"), ckpt / "step-02500")
    manifest = json.loads((ckpt / "checkpoints.json").read_text())
    manifest["checkpoints"].append({"step": 2500, "folder": "step-02500"})
    (ckpt / "checkpoints.json").write_text(json.dumps(manifest))

    out = circuits_over_training(str(folder), steps=[0, 200, 300, 2500], run="ioi", outputs=str(tmp_path / "out"))
    by_step = {r["step"]: r for r in out["checkpoints"]}
    # top-1 accuracy over the vocabulary: 0 at initialisation; at step 200 the model names one of the two
    # people at random (chance: 0.5); the circuit is there by step 300
    # (steps 200 and 300 are retrained here: another CPU type rounds differently, so they get ranges; the
    # machine that trained the shipped model gave 18 and 40 of 40, CI's 18 and 39)
    correct = [round(by_step[s]["accuracy"] * 40) for s in (0, 200, 300, 2500)]  # of 40 prompts
    assert correct[0] == 0 and 10 <= correct[1] <= 30 and correct[2] >= 38 and correct[3] == 40
    assert abs(by_step[0]["logit_diff"]) < 0.01 and abs(by_step[200]["logit_diff"]) < 0.1
    assert 5 < by_step[300]["logit_diff"] < by_step[2500]["logit_diff"]  # 6.74 where the shipped model was trained
    assert by_step[2500]["logit_diff"] > 10
    final = {tuple(e) for e in by_step[2500]["edges"]}
    assert len(final) >= 15
    assert by_step[0]["edges"] == [] and by_step[200]["edges"] == []  # KL(clean || corrupt) ~ 1e-4: nothing to explain
    at_300 = {tuple(e) for e in by_step[300]["edges"]}
    assert len(final & at_300) >= 0.8 * len(final)
    recall = out["timeline"]["final_recall"]
    assert recall[0] == recall[1] == 0.0 and recall[2] >= 0.8 and recall[3] == 1.0
    html = Path(out["html"]).read_text()
    assert html.count("in the circuit</title>") == 4 * len(out["timeline"]["edges"])


def test_train_command_refuses_bad_checkpoint_counts(tmp_path, capsys):
    from circuitfind.cli import main

    assert main(["train", "toy-ioi", "--out", str(tmp_path), "--checkpoints", "-1"]) == 2
    assert "checkpoints must be >= 1, got -1" in capsys.readouterr().err
    assert main(["train", "toy-ioi", "--out", str(tmp_path), "--checkpoints", "2502"]) == 2
    assert "checkpoints must be at most 2501" in capsys.readouterr().err
    assert main(["train", "toy-ioi", "--out", str(tmp_path), "--until", "2501"]) == 2
    assert "until must be in 0..2500" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_checkpoints_flow_entry_point_loads():
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).resolve().parents[1]
    flow = load_flow_from_entrypoint(f"{root / 'flows' / 'checkpoints.py'}:circuits_over_training")
    assert flow.name == "circuitfind-checkpoints"


@pytest.mark.parametrize("n", ["0", "-1"])
def test_train_refuses_a_checkpoint_count_below_one(tmp_path, capsys, n):
    from circuitfind.cli import main

    assert main(["train", "toy-ioi", "--out", str(tmp_path), "--checkpoints", n, "--steps", "3"]) == 2
    assert "checkpoints" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("run", ["../escape", "..", "", "a/b"])
def test_run_folders_stay_inside_the_outputs(tmp_path, run):
    from circuitfind.paths import run_folder

    with pytest.raises(ValueError, match="is not a folder name"):
        run_folder(tmp_path, run)
    assert run_folder(tmp_path, "ok") == tmp_path / "ok"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--corruption", "bogus"], "bogus"),
        (["-n", "0"], "need at least one prompt"),
        (["--tau", "nan"], "tau"),
        (["--run", "../escape"], "is not a folder name"),
    ],
)
def test_checkpoints_options_are_checked_before_prefect_starts(tmp_path, capsys, argv, message):
    from circuitfind.cli import main

    assert main(["checkpoints", str(tmp_path / "none"), *argv, "--outputs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_train_until_without_checkpoints_is_refused(tmp_path, capsys):
    from circuitfind.cli import main

    assert main(["train", "toy-ioi", "--out", str(tmp_path), "--until", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoints" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def _copied_run(short_run, tmp_path) -> Path:
    import shutil

    root, _, _ = short_run
    shutil.copytree(root / "a" / "checkpoints", tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


@pytest.mark.parametrize(
    "manifest, message",
    [
        ("{not json", "unreadable"),
        ("[]", '"checkpoints" list'),
        ('{"checkpoints": {"step": 0}}', '"checkpoints" list'),
        ('{"checkpoints": [3]}', r"checkpoints\[0\] must be an object"),
        ('{"checkpoints": [{"folder": "step-00000"}]}', "step must be a whole number"),
        ('{"checkpoints": [{"step": "0", "folder": "step-00000"}]}', "step must be a whole number"),
        ('{"checkpoints": [{"step": 0, "folder": 7}]}', "folder must be a folder name"),
        ('{"checkpoints": [{"step": 0, "folder": "step-00000"}, {"step": 0, "folder": "step-00002"}]}', "twice"),
        ('{"checkpoints": [{"step": 0, "folder": "../../outside"}]}', "outside the checkpoints folder"),
        ('{"checkpoints": [{"step": 0, "folder": "/tmp"}]}', "outside the checkpoints folder"),
        ('{"checkpoints": [{"step": 0, "folder": "."}]}', "outside the checkpoints folder"),
    ],
)
def test_malformed_checkpoints_manifest_is_one_line(short_run, tmp_path, capsys, manifest, message):
    from circuitfind.cli import main

    folder = _copied_run(short_run, tmp_path)
    (folder / "checkpoints.json").write_text(manifest)
    with pytest.raises(ValueError, match=message):
        C.find_checkpoints(folder)
    assert main(["checkpoints", str(folder), "--outputs", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoints.json" in err and "Traceback" not in err


def test_a_folder_outside_the_checkpoints_is_refused_even_when_it_is_a_model(short_run, tmp_path):
    root, _, _ = short_run
    folder = _copied_run(short_run, tmp_path)
    outside = str(root / "b" / "checkpoints" / "step-00006")  # a real model folder, but not this run's
    (folder / "checkpoints.json").write_text(json.dumps({"checkpoints": [{"step": 6, "folder": outside}]}))
    with pytest.raises(ValueError, match="outside the checkpoints folder"):
        C.find_checkpoints(folder)


@pytest.mark.slow
def test_a_damaged_checkpoint_is_flagged_and_the_rest_reported(prefect_harness, short_run, tmp_path, capsys):
    from flows.checkpoints import circuits_over_training

    folder = _copied_run(short_run, tmp_path)
    weights = folder / "step-00002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    out = circuits_over_training(str(folder), steps=[0, 2, 6], prompts=8, run="r", outputs=str(tmp_path / "o"))
    assert [r["step"] for r in out["checkpoints"]] == [0, 6]
    assert [r["step"] for r in out["skipped"]] == [2] and "truncated" in out["skipped"][0]["error"]
    markdown = Path(out["markdown"]).read_text()
    assert "Skipped checkpoints" in markdown and "truncated" in markdown
    saved = json.loads((tmp_path / "o" / "r" / "checkpoints.json").read_text())
    assert [r["step"] for r in saved["skipped"]] == [2] and saved["timeline"]["steps"] == [0, 6]
    assert "SafetensorError" not in capsys.readouterr().err  # flagged, not a task's traceback


def test_the_edge_spans_header_says_the_second_step_is_the_first_without_the_edge(tmp_path):
    """``0-20`` for an edge in step 0's circuit and not in step 20's: "until step 20" read as inclusive."""
    row = {"accuracy": 0.0, "logit_diff": 0.0, "corrupt_logit_diff": 0.0, "n_edges": 1}
    results = [{**row, "step": 0, "edges": [["a0.0", "logits"]]}, {**row, "step": 20, "edges": [["a1.0", "logits"]]}]
    md = Path(C.write_report(results, {"model": "m"}, tmp_path)["markdown"]).read_text()
    assert (
        "| edge | in the circuit from step - to the first step without it (end: still in the last checkpoint) |" in md
    )
    assert "| a0.0->logits | 0-20 |" in md and "| a1.0->logits | 20-end |" in md
