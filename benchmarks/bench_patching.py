"""Node patching speed against the plain forward pass and against transformer_lens.patching.

    python benchmarks/bench_patching.py [--models toy-ioi smollm2-135m] [--prompts 8] [--repeats 3] [--quick]

For each model, one row per operation: wall time (best of ``repeats``), the number of patched
candidates, time per candidate in units of one plain forward pass over the same batch, and the
same sweep through ``transformer_lens.patching`` where it has one. The goal line compares head
patching (all positions) with ``get_act_patch_attn_head_out_all_pos``: <= 0.55x its time.
``circuitfind (full passes)`` is the engine without suffix passes (``engine="hooks"``: a full
forward pass of the bridge per candidate), for reference. Peak memory: CUDA peak allocation on a
GPU, the process's max RSS on CPU. Operations over 20 s are timed once. On models other than the
toy ones the sweeps of one full forward pass per candidate (per-position transformer_lens sweeps,
the full-pass references, heads x positions) are left out. SmolLM2 rows need
``circuitfind models fetch smollm2-135m``; ``--quick`` runs toy-ioi only, with 4 prompts and one
timing each (a smoke test).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformer_lens.patching as tl_patching  # noqa: E402

from circuitfind import fetch  # noqa: E402
from circuitfind import patching as P  # noqa: E402
from circuitfind.models import load_model, model_device  # noqa: E402
from circuitfind.tasks import TaskBatch, load_task  # noqa: E402

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
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="toy-ioi only, 4 prompts, one timing each")
    args = p.parse_args()
    if args.quick:
        args.models, args.prompts, args.repeats = ["toy-ioi"], 4, 1
    load = os.getloadavg()
    print(
        f"CPU cores {os.cpu_count()}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not measured, no device lent'}"
    )
    for name in args.models:
        if name in fetch.FETCHABLE and not fetch.is_fetched(name):
            print(f"\nmodel {name}: skipped, not fetched (circuitfind models fetch {name})")
            continue
        bench_model(name, args.prompts, args.repeats, args.max_batch, full=name.startswith("toy"))
    print(f"\npeak memory: {peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
