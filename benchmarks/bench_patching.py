"""Node patching speed against the plain forward pass and against transformer_lens.patching.

    python benchmarks/bench_patching.py [--models toy-ioi smollm2-135m] [--grid 4 8 32] [--prompts 8]
        [--repeats 3] [--threads N] [--quick]

For each model, first the goal grid: head patching at all positions by the default path
(``patch_heads(setup, direction)`` on a fresh default ``prepare``, from an empty activation cache)
against ``get_act_patch_attn_head_out_all_pos``, at each prompt count of ``--grid`` and in both
directions, with the plain forward pass over the same batch as yardstick. transformer_lens is timed
once per prompt count (denoising: the corrupted tokens with the clean cache); noising costs it the
same forward passes with the roles swapped. Then, at ``--prompts``, one row per operation: wall time (best of ``repeats``), the number of patched
candidates, time per candidate in units of one plain forward pass over the same batch, and the
same sweep through ``transformer_lens.patching`` where it has one. The goal line compares head
patching (all positions) with ``get_act_patch_attn_head_out_all_pos``: <= 0.55x its time.
``circuitfind (full passes)`` is the engine without suffix passes (``engine="hooks"``: a full
forward pass of the bridge per candidate), for reference. Peak memory: CUDA peak allocation on a
GPU, the process's max RSS on CPU. Operations over 20 s are timed once. On models other than the
toy ones the sweeps of one full forward pass per candidate (per-position transformer_lens sweeps,
the full-pass references, heads x positions) are left out. SmolLM2 rows need
``circuitfind models fetch smollm2-135m``; ``--quick`` runs toy-ioi only, with a grid of 4 and 8
prompts, 4 prompts for the table and one timing each (a smoke test). ``--threads`` sets torch's
thread count (default: torch's own); on a CPU shared with other jobs, one thread per process times
more steadily.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformer_lens.patching as tl_patching  # noqa: E402

from circuitfind import patching as P  # noqa: E402
from circuitfind.models import fetch  # noqa: E402
from circuitfind.models.loading import load_model, model_device  # noqa: E402
from circuitfind.tasks.batch import TaskBatch, load_task  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _timing import best_of, peak_memory_mb  # noqa: E402

GOAL = 0.55
LONG = 20.0  # seconds: an operation that takes longer is timed once


def _quiet(iterable, *args, **kwargs):  # TransformerLens's progress bars, silenced while timing
    return iterable


tl_patching.tqdm = _quiet


def cold(setup: P.PatchingSetup, sweep, *args, **kwargs):
    """A timed sweep from an empty activation cache: it pays for the runs it caches (transformer_lens
    is handed its clean cache)."""

    def run():
        setup._cache.clear()
        return sweep(setup, *args, **kwargs)

    return run


def heads_grid(name: str, counts: list[int], repeats: int) -> float:
    """Print the goal grid of one model; return its worst circuitfind / transformer_lens ratio."""
    model = load_model(name)
    print(f"\nmodel {name}: head patching, all positions, default path vs transformer_lens (goal <= {GOAL}x)\n")
    print(
        f"{'prompts':>7} {'direction':>9} {'forward s':>10} {'circuitfind s':>14} {'tl s':>9} {'ratio':>6} {'goal':>8}"
    )
    print("-" * 70)
    worst = 0.0
    for n in counts:
        batch = TaskBatch.build(model, load_task("ioi"), n, seed=0)
        clean, corrupt = batch.clean_tokens, batch.corrupted()
        with torch.no_grad():
            forward, _ = best_of(lambda: model(corrupt), repeats)  # noqa: B023
        _, clean_cache = model.run_with_cache(clean)

        def tl_metric(logits, batch=batch):
            ans = P.answer_logits(logits, batch.end_pos)
            return (ans.gather(1, batch.answers[:, None]) - ans.gather(1, batch.counter_answers[:, None])).mean()

        tl, _ = best_of(
            lambda: tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupt, clean_cache, tl_metric),  # noqa: B023
            repeats,
            once_after=LONG,
        )
        for direction in P.DIRECTIONS:
            setup = P.prepare(model, batch)  # the default options
            secs, _ = best_of(cold(setup, P.patch_heads, direction), repeats, once_after=LONG)
            ratio = secs / tl
            worst = max(worst, ratio)
            print(
                f"{n:>7} {direction:>9} {forward:>10.4f} {secs:>14.3f} {tl:>9.3f} {ratio:>6.2f} "
                f"{'met' if ratio <= GOAL else 'NOT met':>8}",
                flush=True,
            )
    return worst


def bench_model(name: str, prompts: int, repeats: int, max_batch: int, full: bool) -> float:
    """Print one model's table; return circuitfind / transformer_lens time for heads, all positions."""
    model = load_model(name)
    batch = TaskBatch.build(model, load_task("ioi"), prompts, seed=0)
    setup = P.prepare(model, batch, "str", "logit_diff", max_batch=max_batch)
    hooks = dataclasses.replace(setup, engine="hooks", _cache={})
    L, H, T = setup.n_layers, setup.n_heads, setup.n_pos
    clean, corrupt = batch.clean_tokens, batch.corrupted()
    _, clean_cache = model.run_with_cache(clean)

    def tl_metric(logits):
        ans = P.answer_logits(logits, batch.end_pos)
        return (ans.gather(1, batch.answers[:, None]) - ans.gather(1, batch.counter_answers[:, None])).mean()

    with torch.no_grad():
        forward, _ = best_of(lambda: model(corrupt), repeats)
    heads_tl = lambda: tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupt, clean_cache, tl_metric)  # noqa: E731
    ops = [
        ("heads, all pos (circuitfind)", cold(setup, P.patch_heads), L * H),
        ("heads, all pos (transformer_lens)", heads_tl, L * H),
        ("resid_pre x pos (circuitfind)", cold(setup, P.patch_block, "resid_pre"), L * T),
        ("MLP windows w=3 (circuitfind)", cold(setup, P.patch_mlp_windows, 3), L),
        ("path patching -> logits (circuitfind)", cold(setup, P.path_patch, P.LOGITS, "end", "noise"), L * H),
    ]
    if full:  # the long sweeps (one full forward pass per candidate) on small models only
        ops[2:2] = [("heads, all pos (circuitfind, full passes)", cold(hooks, P.patch_heads), L * H)]
        ops[4:4] = [
            (
                "resid_pre x pos (transformer_lens)",
                lambda: tl_patching.get_act_patch_resid_pre(model, corrupt, clean_cache, tl_metric),
                L * T,
            ),
            ("heads x pos (circuitfind)", cold(setup, P.patch_heads, by_position=True), L * T * H),
        ]
        ops.append(
            (
                "path patching -> logits (circuitfind, full passes)",
                cold(hooks, P.path_patch, P.LOGITS, "end", "noise"),
                L * H,
            )
        )
    rows = [("plain forward pass", forward, 1)]
    times = {}
    for label, fn, n in ops:
        times[label] = best_of(fn, repeats, once_after=LONG)[0]
        rows.append((label, times[label], n))
    ratio = times["heads, all pos (circuitfind)"] / times["heads, all pos (transformer_lens)"]
    print(
        f"\nmodel {name} ({L} layers x {H} heads), {batch.size} prompts x {T} positions, device {model_device(model)}, "
        f"torch threads {torch.get_num_threads()}, max_batch {max_batch}\n"
    )
    print(f"{'operation':<52} {'seconds':>9} {'candidates':>11} {'fwd-equiv/candidate':>20}")
    print("-" * 96)
    for label, secs, n in rows:
        print(f"{label:<52} {secs:>9.4f} {n:>11d} {secs / n / forward:>20.2f}")
    print(
        f"\nheads, all positions: circuitfind {ratio:.2f}x transformer_lens.patching's time "
        f"(goal <= {GOAL}x): {'met' if ratio <= GOAL else 'NOT met'}"
    )
    return ratio


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["toy-ioi", "smollm2-135m"])
    p.add_argument("--grid", nargs="+", type=int, default=[4, 8, 32], help="prompt counts of the goal grid")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--grid-only", action="store_true", help="only the goal grid, not the table of operations")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="toy-ioi only, 4 prompts, one timing each")
    args = p.parse_args()
    if args.quick:
        args.models, args.grid, args.prompts, args.repeats = ["toy-ioi"], [4, 8], 4, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"CPU cores {os.cpu_count()}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
        f"torch threads {torch.get_num_threads()}; GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not measured, no device lent'}"
    )
    for name in args.models:
        if name in fetch.FETCHABLE and not fetch.is_fetched(name):
            print(f"\nmodel {name}: skipped, not fetched (circuitfind models fetch {name})")
            continue
        worst = heads_grid(name, args.grid, args.repeats)
        print(f"\nworst ratio over the grid: {worst:.2f}x ({'met' if worst <= GOAL else 'NOT met'})")
        if not args.grid_only:
            bench_model(name, args.prompts, args.repeats, args.max_batch, full=name.startswith("toy"))
    print(f"\npeak memory: {peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
