"""Edge patching and ACDC speed.

    python benchmarks/bench_edges.py [--model toy-ioi] [--prompts 32] [--tau 0.02]

Prints: the masked forward pass (every edge mask active, random keep/patch) against the plain forward
pass on the same model and batch, for 1..C stacked candidates; ACDC with speculative candidate
batches against ACDC with one edge per forward pass (same circuit required); EAP and EAP-IG; and
peak memory (CUDA peak allocation on a GPU, max RSS on CPU).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from circuitfind import discovery as D  # noqa: E402
from circuitfind import patching as P  # noqa: E402
from circuitfind.edges import EdgePatcher  # noqa: E402
from circuitfind.models import load_model  # noqa: E402
from circuitfind.tasks import TaskBatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _timing import base_parser  # noqa: E402
from _timing import best_of as timed  # noqa: E402
from _timing import peak_memory_mb as peak_mb  # noqa: E402


def main() -> None:
    p = base_parser(__doc__, prompts=32)
    p.add_argument("--tau", type=float, default=0.02)
    args = p.parse_args()

    model = load_model(args.model)
    batch = TaskBatch.build(model, args.task, args.prompts, seed=0)
    setup = P.prepare(model, batch, "str", "kl", max_batch=args.max_batch)
    patcher = EdgePatcher(setup)
    device = next(model.parameters()).device
    print(f"\nmodel {args.model}, {batch.size} prompts x {batch.n_pos} positions, {patcher.n_edges} edges, "
          f"device {device}, torch threads {torch.get_num_threads()}\n")

    print(f"{'masked forward (all masks active)':<36} {'plain ms':>9} {'masked ms':>10} {'ratio':>7}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (1, 4, 16):
            tokens = batch.clean_tokens.repeat(n, 1)
            masks = (torch.rand(n, patcher.n_edges, generator=gen) > 0.5).float().to(device)
            plain, _ = timed(lambda: model(tokens), 5)
            masked, _ = timed(lambda: patcher.run(masks), 5)
            print(f"{f'{n} candidate(s) x {batch.size} prompts':<36} {plain * 1e3:>9.1f} {masked * 1e3:>10.1f} {masked / plain:>7.2f}")

    print(f"\n{'discovery':<36} {'seconds':>9} {'forwards':>10} {'edges':>7}")
    one, ref = timed(lambda: D.acdc(patcher, args.tau, candidates=1, reuse_prefix=False), 1)
    spec, res_spec = timed(lambda: D.acdc(patcher, args.tau, reuse_prefix=False), 1)
    fast, res = timed(lambda: D.acdc(patcher, args.tau), 1)
    for other in (res_spec, res):
        assert torch.equal(ref.in_circuit, other.in_circuit), "batched ACDC must find the reference circuit"
    print(f"{'ACDC, one edge per forward':<36} {one:>9.2f} {ref.settings['forward_passes']:>10d} {ref.n_edges:>7d}")
    print(f"{'ACDC, speculative batches':<36} {spec:>9.2f} {res_spec.settings['forward_passes']:>10d} {res_spec.n_edges:>7d}")
    print(f"{'ACDC, batches + prefix reuse':<36} {fast:>9.2f} {res.settings['forward_passes']:>10d} {res.n_edges:>7d}")
    ld = EdgePatcher(P.prepare(model, batch, "str", "logit_diff", max_batch=args.max_batch))
    t_eap, _ = timed(lambda: D.eap(ld))
    t_ig, _ = timed(lambda: D.eap_ig(ld, 5))
    print(f"{'EAP (all edges)':<36} {t_eap:>9.2f} {'1+bwd':>10} {'-':>7}")
    print(f"{'EAP-IG, 5 steps':<36} {t_ig:>9.2f} {'5+bwd':>10} {'-':>7}")
    print(f"\nACDC speed-up {one / fast:.1f}x, same circuit; peak memory {peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
