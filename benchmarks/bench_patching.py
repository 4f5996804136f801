"""Patching speed against the plain forward pass and against transformer_lens.patching.

    python benchmarks/bench_patching.py [--model toy-ioi] [--prompts 64] [--repeats 3]

Prints one row per operation: wall time (best of ``repeats``), the number of patched candidates,
time per candidate in units of one plain forward pass over the same batch, and peak memory
(CUDA peak allocation on a GPU; the process's max RSS on CPU).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformer_lens import patching as tl_patching  # noqa: E402

from circuitfind import patching as P  # noqa: E402
from circuitfind.models import load_model, model_device  # noqa: E402
from circuitfind.tasks import TaskBatch, load_task  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _timing import base_parser, best_of, peak_memory_mb  # noqa: E402


def main() -> None:
    p = base_parser(__doc__, prompts=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    model = load_model(args.model)
    batch = TaskBatch.build(model, load_task(args.task), args.prompts, seed=0)
    setup = P.prepare(model, batch, "str", "logit_diff", max_batch=args.max_batch)
    L, H, T = setup.n_layers, setup.n_heads, setup.n_pos
    clean, corrupt = batch.clean_tokens, batch.corrupted()
    _, clean_cache = model.run_with_cache(clean)

    def tl_metric(logits):
        ans = P.answer_logits(logits, batch.end_pos)
        return (ans.gather(1, batch.answers[:, None]) - ans.gather(1, batch.counter_answers[:, None])).mean()

    with torch.no_grad():
        forward, _ = best_of(lambda: model(corrupt), args.repeats)
    rows = [("plain forward pass", forward, 1)]
    ops = [
        ("heads, all pos (circuitfind)", lambda: P.patch_heads(setup), L * H),
        ("heads, all pos (transformer_lens)", lambda: tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupt, clean_cache, tl_metric), L * H),
        ("resid_pre x pos (circuitfind)", lambda: P.patch_block(setup, "resid_pre"), L * T),
        ("resid_pre x pos (transformer_lens)", lambda: tl_patching.get_act_patch_resid_pre(model, corrupt, clean_cache, tl_metric), L * T),
        ("heads x pos (circuitfind)", lambda: P.patch_heads(setup, by_position=True), L * T * H),
        ("MLP windows w=3 (circuitfind)", lambda: P.patch_mlp_windows(setup, 3), L),
        ("path patching -> logits (circuitfind)", lambda: P.path_patch(setup, P.LOGITS, "end", "noise"), L * H),
    ]
    import tqdm as _tqdm  # silence TransformerLens's progress bars while timing

    _tqdm.tqdm.__init__.__kwdefaults__ = {**(_tqdm.tqdm.__init__.__kwdefaults__ or {}), "disable": True}
    for name, fn, n in ops:
        rows.append((name, best_of(fn, args.repeats)[0], n))

    device = model_device(model)
    print(f"\nmodel {args.model} ({L} layers x {H} heads), {batch.size} prompts x {T} positions, device {device}, "
          f"torch threads {torch.get_num_threads()}, max_batch {args.max_batch}\n")
    print(f"{'operation':<40} {'seconds':>9} {'candidates':>11} {'fwd-equiv/candidate':>20}")
    print("-" * 84)
    for name, secs, n in rows:
        print(f"{name:<40} {secs:>9.4f} {n:>11d} {secs / n / forward:>20.2f}")
    print(f"\npeak memory: {peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
