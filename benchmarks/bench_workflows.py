"""Research workflows end to end: the time of each on toy-ioi and SmolLM2, against a plain forward pass.

    python benchmarks/bench_workflows.py [--models toy-ioi smollm2-135m] [--quick] [--threads 1]
    python benchmarks/bench_workflows.py --profile study_gn --models smollm2-135m   # cProfile's top entries

Workflows (issue 26), each shortened where a full run takes minutes on a 2-core CPU, and scaled:
the row says what ran.

* ``study_str``, ``study_gn``: one head sweep of the settings study (8 prompts, denoising, every default
  metric recorded from the same passes; GN with 3 noise samples), :func:`circuitfind.runs.study.head_detection`'s
  inner sweep.
* ``study_mlp``: the study's MLP part (8 prompts, windows 1 3 5, GN, prob), on the factual task.
* ``edge_pruning``: edge pruning of the IOI graph, STR, KL, ``--prune-steps`` steps (toy: 200; SmolLM2: 5).
* ``ugs``: UGS, the same setup, 4 samples a step, the same steps.
* ``heads_by_pos``: ``patch_heads(by_position=True)`` on IOI (STR, logit difference).
* ``greater_than_eap``: EAP on ``greater_than_years`` (100 two-digit years, teacher forcing), STR, prob_diff
  (SmolLM2 only: the toy models' tokenizer does not split digits).

Columns: the wall time, what it ran, and the ratio to one plain forward pass of that workflow's batch (the
clean prompts, no hooks). ``--quick``: toy-ioi only. ``--profile NAME``: run that workflow under cProfile and
print the top entries by cumulative and by own time instead of the table.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

MODELS = ["toy-ioi", "smollm2-135m"]
PROMPTS = 8


def _forward(model, batch) -> float:
    """Best of three plain forward passes of the batch's clean tokens (no hooks)."""
    import torch
    from _timing import best_of

    tokens = batch.clean_tokens
    with torch.no_grad():
        return best_of(lambda: model(tokens), repeats=3)[0]


def _ioi_setup(model, metric: str = "kl"):
    from circuitfind import patching as P
    from circuitfind.tasks.batch import TaskBatch

    batch = TaskBatch.build(model, "ioi", PROMPTS, seed=0)
    return P.prepare(model, batch, "str", metric), batch


def study_sweep(model, name: str, corruption: str, small: bool) -> tuple[Callable[[], object], str, object]:
    from circuitfind.runs import study
    from circuitfind.tasks.batch import TaskBatch

    batch = TaskBatch.build(model, "ioi", PROMPTS, seed=0)

    def run():
        setup = study.prepare_recording(
            model, batch, study.study_corruption(corruption, 3.0, 3, 0), ["prob", "logit_diff", "kl"]
        )
        return study.patch_heads_metrics(setup, "denoise")

    return run, f"{corruption} head sweep, 3 metrics, denoise", batch


def study_mlp(model, name: str, small: bool):
    from circuitfind.runs import study
    from circuitfind.tasks.batch import TaskBatch

    task = "ioi" if small else "factual"  # the toy models know no facts: their IOI prompts stand in
    position = "S2" if small else "subject_last"
    windows = (1, 3) if small else (1, 3, 5)  # toy-ioi has 3 layers
    batch = TaskBatch.build(model, task, PROMPTS, seed=0)
    return (
        lambda: study.mlp_localisation(model, name, PROMPTS, 0, windows, "gn", "prob", position, task=task),
        f"MLP windows {' '.join(map(str, windows))}, gn, prob, {task}",
        batch,
    )


def mask_method(model, name: str, small: bool, which: str):
    from circuitfind.edge_patching import EdgePatcher
    from circuitfind.methods.pruning import edge_pruning
    from circuitfind.methods.ugs import ugs_scores

    setup, batch = _ioi_setup(model)
    patcher = EdgePatcher(setup)
    steps = 200 if small else 5
    k = 20 if small else 1000
    fn = edge_pruning if which == "edge_pruning" else ugs_scores
    return lambda: fn(patcher, k, steps=steps), f"{which}, k {k}, {steps} steps, {patcher.n_edges} edges", batch


def heads_by_pos(model, name: str, small: bool):
    from circuitfind import patching as P

    setup, batch = _ioi_setup(model, "logit_diff")
    return lambda: P.patch_heads(setup, "denoise", by_position=True), "patch_heads(by_position=True)", batch


def greater_than_eap(model, name: str, small: bool):
    from circuitfind import patching as P
    from circuitfind.methods import discover as D
    from circuitfind.tasks.batch import TaskBatch

    batch = TaskBatch.build(model, "greater_than_years", PROMPTS, seed=0)

    def run():
        setup = P.prepare(model, batch, "str", "prob_diff")
        return D.discover(setup, "eap", "noise", top_k=100)

    return run, "EAP (setup, scores, faithfulness), greater_than_years, prob_diff", batch


WORKFLOWS: dict[str, Callable] = {
    "study_str": lambda m, n, s: study_sweep(m, n, "str:s2_io", s),
    "study_gn": lambda m, n, s: study_sweep(m, n, "gn", s),
    "study_mlp": study_mlp,
    "edge_pruning": lambda m, n, s: mask_method(m, n, s, "edge_pruning"),
    "ugs": lambda m, n, s: mask_method(m, n, s, "ugs"),
    "heads_by_pos": heads_by_pos,
    "greater_than_eap": greater_than_eap,
}
SMOLLM2_ONLY = {"greater_than_eap"}


def profile(name: str, model_name: str, top: int) -> None:
    from circuitfind.models.catalogue import load_model

    model = load_model(model_name)
    fn, what, _ = WORKFLOWS[name](model, model_name, not model_name.startswith("smollm2"))
    load = os.getloadavg()[0]
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    wall = time.perf_counter() - start
    print(f"{name} on {model_name}: {what}; {wall:.1f} s, load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats(key).print_stats(top)
        print(f"\nby {key}:\n" + out.getvalue().split("ncalls", 1)[-1].join(["ncalls", ""]))


def main() -> None:
    import argparse

    global PROMPTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--workflows", nargs="+", default=list(WORKFLOWS), choices=list(WORKFLOWS))
    p.add_argument("--prompts", type=int, default=8, help="prompts per workflow (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--quick", action="store_true", help="toy-ioi only")
    p.add_argument("--profile", choices=list(WORKFLOWS), help="cProfile one workflow instead of the table")
    p.add_argument("--top", type=int, default=15, help="entries of each --profile listing (default 15)")
    args = p.parse_args()
    import torch

    PROMPTS = args.prompts
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args.profile, args.models[0], args.top)
        return
    from circuitfind.models.catalogue import load_model

    models = ["toy-ioi"] if args.quick else args.models
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not measured, no device lent"
    load = os.getloadavg()
    print(
        f"CPU cores {os.cpu_count()}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
        f"{args.threads} torch thread(s); GPU: {gpu}"
    )
    print(f"{'model':>14}  {'workflow':>16}  {'wall s':>8}  {'x forward':>10}  {'load':>5}  what")
    for model_name in models:
        model = load_model(model_name)
        small = not model_name.startswith("smollm2")
        for name in args.workflows:
            if small and name in SMOLLM2_ONLY:
                continue
            fn, what, batch = WORKFLOWS[name](model, model_name, small)
            forward = _forward(model, batch)
            start = time.perf_counter()
            fn()
            wall = time.perf_counter() - start
            print(
                f"{model_name:>14}  {name:>16}  {wall:8.1f}  {wall / forward:10.0f}  {os.getloadavg()[0]:5.1f}  {what}",
                flush=True,
            )


if __name__ == "__main__":
    main()
