"""Circuit-finding methods judged against ground truth and by faithfulness (MIB's measures).

    python benchmarks/bench_methods.py [--models known-induction ... smollm2-135m] [--quick]

One table per model; one row per algorithm. Columns: edge AUROC and precision / recall at the true
circuit's size against the known-answer models' documented edges (:data:`circuitfind.models.zoo.known.KNOWN_TRUTH`);
CPR and CMD (MIB's areas, :func:`circuitfind.methods.discover.faithfulness_curve`); the fewest top-scored edges that
reach faithfulness 0.8 and 0.9 (searched on a grid of sizes, in one batched run); wall time; and peak memory
(the max RSS of a fresh process per row on CPU, CUDA's peak allocation on a GPU). Algorithms that give no
ranking of every edge (path patching, node circuits) show their own circuit's size and faithfulness.

Each row runs in its own process (``--one MODEL ALGORITHM``), so that its peak memory is its own. Setting:
resample ablation for the known-answer models (their prompts share one length), STR otherwise; KL; noising;
``--prompts`` prompts (8). ACDC is left out for models with more than ``--acdc-max-edges`` edges (it visits
edges one at a time). ``--quick``: the known-answer models and toy-ioi, fewer steps (a smoke test).

After the tables (not with ``--quick``): AtP and AtP* against exact node patching per model, with their
misses (:func:`circuitfind.methods.atp.compare_with_exact`), under the logit difference (under KL when noising
every gradient at the clean run is zero, so AtP has nothing to estimate), each with its wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))

MODELS = ["known-induction", "known-suppress", "known-backup", "toy-ioi", "toy-induction", "smollm2-135m"]
TASKS = {"toy-induction": "induction", "toy-ioi": "ioi", "smollm2-135m": "ioi"}
THRESHOLDS = (0.8, 0.9)


def _batch(model, name: str, prompts: int):
    from circuitfind.tasks.batch import TaskBatch, generate_prompts

    if name.startswith("known-"):  # resample ablation needs prompts of one length
        pool = generate_prompts("induction", 600, seed=0)
        length = Counter(len(p.text.split()) for p in pool).most_common(1)[0][0]
        return TaskBatch.build(model, "induction", [p for p in pool if len(p.text.split()) == length][:prompts])
    return TaskBatch.build(model, TASKS.get(name, "ioi"), prompts, seed=0)


def edges_to_reach(patcher, scores, thresholds=THRESHOLDS) -> dict[float, int | None]:
    """The fewest top-|score| edges whose circuit reaches each faithfulness threshold, on a grid of
    sizes (1, 2, 3, 5, 8, ... up to every edge) evaluated in one batched run; ``None`` if none does."""
    import torch

    from circuitfind.methods import discover as D
    from circuitfind.tasks.metrics import normalise

    flat = scores.abs().flatten().cpu()
    total = flat.numel()
    sizes = sorted({min(total, max(1, round(1.25**i))) for i in range(200)} | {total})
    order = flat.argsort(descending=True)
    masks = torch.zeros(len(sizes), total)
    for i, n in enumerate(sizes):
        masks[i, order[:n]] = 1.0
    values = patcher.value(D.circuit_masks(patcher, masks.reshape(len(sizes), *scores.shape))).cpu()
    faith = normalise(values, patcher.setup.clean_value, patcher.setup.corrupt_value).tolist()
    return {t: next((n for n, f in zip(sizes, faith, strict=True) if f >= t), None) for t in thresholds}


def one(name: str, algorithm: str, prompts: int, quick: bool) -> dict:
    """One row: discover with ``algorithm`` on model ``name``; its measures as a dict."""
    import torch
    from _timing import peak_memory_mb

    from circuitfind import patching as P
    from circuitfind.circuits import agreement
    from circuitfind.edge_patching import EdgePatcher
    from circuitfind.methods import discover as D
    from circuitfind.models.catalogue import load_model
    from circuitfind.models.zoo.known import KNOWN_TRUTH

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    model = load_model(name)
    batch = _batch(model, name, prompts)
    corruption = "resample" if name.startswith("known-") else "str"
    setup = P.prepare(model, batch, corruption, "kl")
    options = {"top_k": 20, "prune_steps": 60 if quick else 200, "ig_steps": 5, "acdc_tau": 0.02}
    truth = KNOWN_TRUTH.get(name)
    if truth is not None:
        options["top_k"] = len(truth)
    start = time.perf_counter()
    found = D.discover(setup, algorithm, "noise", **options)
    wall = time.perf_counter() - start
    circuit = found.circuit
    row: dict = {"model": name, "algorithm": algorithm, "wall_s": wall, "peak_mb": peak_memory_mb()}
    row["edges"], row["faithfulness"] = circuit.n_edges, found.faithfulness
    patcher = EdgePatcher(setup, circuit.graph)
    if truth is not None:
        reference = torch.tensor([e in truth for e in circuit.graph.edges])
        if algorithm in D.SCORED:
            row["auroc"] = agreement.roc_auc(circuit.scores, reference).auc
            top = D.select_top_k(circuit.graph, circuit.scores, len(truth)).edges
        else:
            top = circuit.edges
        pr = agreement.precision_recall_f1(top, truth)
        row["precision"], row["recall"] = pr["precision"], pr["recall"]
    if found.curve is not None:
        row["cpr"], row["cmd"] = found.curve.cpr, found.curve.cmd
        row["to_faith"] = {str(t): n for t, n in edges_to_reach(patcher, circuit.scores).items()}
    return row


def atp_lines(name: str, prompts: int) -> list[str]:
    """AtP / AtP* against exact node patching on model ``name`` (noising, logit difference)."""
    import torch

    from circuitfind import patching as P
    from circuitfind.methods import atp
    from circuitfind.models.catalogue import load_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    model = load_model(name)
    corruption = "resample" if name.startswith("known-") else "str"
    setup = P.prepare(model, _batch(model, name, prompts), corruption, "logit_diff")
    start = time.perf_counter()
    exact = P.patch_heads(setup, "noise").effect
    lines = [f"exact node patching: {time.perf_counter() - start:.1f} s"]
    for variant in atp.VARIANTS:
        start = time.perf_counter()
        estimate = atp.atp_scores(setup, "noise", variant)
        wall = time.perf_counter() - start
        found = atp.compare(estimate, exact, 0.1, variant)
        lines += [f"{found.lines()[0]}; {wall:.1f} s"] + found.lines()[1:]
    return lines


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(name: str, rows: list[dict]) -> None:
    known = name.startswith("known-")
    head = ["algorithm", "AUROC", "P@true", "R@true"] if known else ["algorithm"]
    head += ["CPR", "CMD", "edges@0.8", "edges@0.9", "circuit", "faith", "wall s", "peak MB"]
    print(f"\n{name}")
    print("  ".join(f"{h:>10}" for h in head))
    for r in rows:
        if "error" in r:
            print(f"{r['algorithm']:>10}  failed: {r['error']}")
            continue
        cells = [r["algorithm"]]
        if known:
            cells += [_fmt(r.get("auroc"), ".3f"), _fmt(r.get("precision"), ".2f"), _fmt(r.get("recall"), ".2f")]
        reach = r.get("to_faith", {})
        cells += [
            _fmt(r.get("cpr"), ".3f"),
            _fmt(r.get("cmd"), ".3f"),
            _fmt(reach.get("0.8"), "d"),
            _fmt(reach.get("0.9"), "d"),
            str(r["edges"]),
            _fmt(r["faithfulness"], ".3f"),
            f"{r['wall_s']:.1f}",
            f"{r['peak_mb']:.0f}",
        ]
        print("  ".join(f"{c:>10}" for c in cells))


def main() -> None:
    import argparse

    from circuitfind.methods import discover as D

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--algorithms", nargs="+", default=list(D.ALGORITHMS))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--acdc-max-edges", type=int, default=5000)
    p.add_argument("--quick", action="store_true", help="known-answer models and toy-ioi, fewer steps")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "ALGORITHM"), help=argparse.SUPPRESS)
    p.add_argument("--atp", metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.prompts, args.quick)))
        return
    if args.atp:
        print("\n".join(atp_lines(args.atp, args.prompts)))
        return
    if args.quick:
        args.models = [m for m in args.models if m.startswith("known-")][:1] + ["toy-ioi"]
    load = os.getloadavg()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not measured, no device lent"
    print(
        f"CPU cores {os.cpu_count()}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
        f"one thread a row; GPU: {gpu}"
    )
    for name in args.models:
        rows = []
        for algorithm in args.algorithms:
            if algorithm == "acdc" and _n_edges(name) > args.acdc_max_edges:
                rows.append({"algorithm": algorithm, "error": f"left out: more than {args.acdc_max_edges} edges"})
                continue
            cmd = [sys.executable, __file__, "--one", name, algorithm, "--prompts", str(args.prompts)]
            done = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True)
            if done.returncode:
                rows.append({"algorithm": algorithm, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print_table(name, rows)
    if args.quick:
        return
    print("\nAtP and AtP* against exact node patching (noising, logit difference)")
    for name in args.models:
        cmd = [sys.executable, __file__, "--atp", name, "--prompts", str(args.prompts)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        failed = (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"\n{name}\n" + (f"failed: {failed}" if done.returncode else done.stdout.strip()))


def _n_edges(name: str) -> int:
    from circuitfind.models.catalogue import locate_model
    from circuitfind.runs.sweep import model_edge_count

    return model_edge_count(locate_model(name)) or 0


if __name__ == "__main__":
    main()
