"""Edge patching and ACDC speed.

    python benchmarks/bench_edges.py [--model toy-ioi] [--prompts 32] [--tau 0.02] [--quick]

Prints: the masked forward pass (every edge mask active, random keep/patch) on both engines against
the plain forward pass on the same model and batch, for 1..C stacked candidates. The yardstick is
the model as circuitfind loads it (split q/k/v inputs and per-head results switched on, which
patching needs); the plain forward with them switched off is shown too. Then ACDC in each engine
and batching mode against the one-edge-per-forward reference through the bridge's hooks (same
circuit required), EAP and EAP-IG, and peak memory (CUDA peak allocation on a GPU, max RSS on CPU).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from circuitfind import patching as P  # noqa: E402
from circuitfind.edge_patching import EdgePatcher  # noqa: E402
from circuitfind.methods import discover as D  # noqa: E402
from circuitfind.models.loading import load_model, model_device  # noqa: E402
from circuitfind.tasks.batch import TaskBatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _timing import base_parser  # noqa: E402
from _timing import best_of as timed  # noqa: E402
from _timing import peak_memory_mb as peak_mb  # noqa: E402


def main() -> None:
    p = base_parser(__doc__, prompts=32)
    p.add_argument("--tau", type=float, default=0.02)
    p.add_argument("--repeats", type=int, default=3, help="best of this many ACDC runs")
    p.add_argument(
        "--candidates", type=int, nargs="+", default=[1, 4, 16], help="stacked candidates per masked forward"
    )
    p.add_argument(
        "--no-discovery", action="store_true", help="masked forward only (ACDC's reference is slow on real models)"
    )
    p.add_argument("--quick", action="store_true", help="8 prompts, one timing each, 1 and 4 candidates (a smoke test)")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.repeats, args.candidates = 8, 1, [1, 4]
    load = os.getloadavg()
    print(
        f"CPU cores {os.cpu_count()}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not measured, no device lent'}"
    )

    model = load_model(args.model)
    batch = TaskBatch.build(model, args.task, args.prompts, seed=0)
    setup = P.prepare(model, batch, "str", "kl", max_batch=args.max_batch)
    patcher = EdgePatcher(setup)
    device = model_device(model)
    print(
        f"\nmodel {args.model}, {batch.size} prompts x {batch.n_pos} positions, {patcher.n_edges} edges, "
        f"device {device}, torch threads {torch.get_num_threads()}, default engine {patcher.engine}\n"
    )

    hooks = EdgePatcher(setup, engine="hooks")
    print(
        f"{'masked forward (all masks active)':<32} {'plain ms':>9} {'unsplit':>8} {'hooks ms':>9} {'ratio':>6} "
        f"{'functional':>10} {'ratio':>6}"
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in args.candidates:
            tokens = batch.clean_tokens.repeat(n, 1)
            masks = (torch.rand(n, patcher.n_edges, generator=gen) > 0.5).float().to(device)
            reps = 1 if args.quick else 5
            plain, _ = timed(lambda: model(tokens), reps)
            unsplit, _ = timed(lambda: unsplit_forward(model, tokens), reps)
            t_hooks, _ = timed(lambda: hooks.run(masks), reps)
            t_fast, _ = timed(lambda: patcher.run(masks), reps)
            print(
                f"{f'{n} candidate(s) x {batch.size} prompts':<32} {plain * 1e3:>9.1f} {unsplit * 1e3:>8.1f} "
                f"{t_hooks * 1e3:>9.1f} {t_hooks / plain:>6.2f} {t_fast * 1e3:>10.1f} {t_fast / plain:>6.2f}"
            )

    if args.no_discovery:
        print(f"\npeak memory {peak_mb():.0f} MB")
        return
    print(f"\n{'discovery':<44} {'seconds':>8} {'forwards':>9} {'edges':>6} {'speed-up':>9}")
    one, ref = timed(lambda: D.acdc(hooks, args.tau, candidates=1, reuse_prefix=False), args.repeats)
    rows = [("ACDC reference: hooks, one edge per forward", one, ref)]
    for label, p, kw in [
        ("ACDC hooks, batches + prefix", hooks, {}),
        ("ACDC functional, one edge per forward", patcher, dict(candidates=1, reuse_prefix=False)),
        ("ACDC functional, one edge, incremental", patcher, dict(candidates=1)),
        ("ACDC functional, batches + incremental", patcher, {}),
    ]:
        t, res = timed(lambda: D.acdc(p, args.tau, **kw), args.repeats)
        assert torch.equal(ref.in_circuit, res.in_circuit), f"{label} must find the reference circuit"
        rows.append((label, t, res))
    for label, t, res in rows:
        print(f"{label:<44} {t:>8.2f} {res.settings['forward_passes']:>9d} {res.n_edges:>6d} {one / t:>8.1f}x")
    ld = EdgePatcher(P.prepare(model, batch, "str", "logit_diff", max_batch=args.max_batch))
    t_eap, _ = timed(lambda: D.eap(ld), args.repeats)
    t_ig, _ = timed(lambda: D.eap_ig(ld, 5), args.repeats)
    print(f"{'EAP (all edges)':<44} {t_eap:>8.2f} {'1+bwd':>9} {'-':>6}")
    print(f"{'EAP-IG, 5 steps':<44} {t_ig:>8.2f} {'5+bwd':>9} {'-':>6}")
    print(f"\nACDC speed-up {one / rows[-1][1]:.1f}x, same circuit; peak memory {peak_mb():.0f} MB")


def unsplit_forward(model, tokens):
    """The plain forward with split q/k/v inputs, per-head results and MLP-input hooks switched off."""
    switches = (model.set_use_split_qkv_input, model.set_use_attn_result, model.set_use_hook_mlp_in)
    for switch in switches:
        switch(False)
    try:
        return model(tokens)
    finally:
        for switch in switches:  # back to how load_model leaves it
            switch(True)


if __name__ == "__main__":
    main()
