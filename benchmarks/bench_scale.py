"""Edge patching at scale: a randomly initialised Llama-3.2-1B-shaped model, and how time and memory
grow with layers, heads and prompts.

    python benchmarks/bench_scale.py [--quick] [--prompts 8] [--tokens 32] [--max-memory 2GB|auto] [--acdc-passes 20]

The model (16 layers, 32 heads, 8 key/value heads, d_model 2048, d_mlp 8192, vocab 128256, tied
embeddings, random weights from transformers' ``LlamaConfig``) is built once and saved as an HF
folder under ``~/.cache/circuitfind/bench/`` (``$CIRCUITFIND_CACHE/bench``), never in git. The
prompts are induction-style word sequences of exactly ``--tokens`` tokens. Each measurement runs
in its own subprocess and reports that process's peak RSS (``getrusage``; on a GPU also the CUDA
peak allocation), which includes the model's weights; "loaded" is the RSS right after loading.

Rows: the plain forward pass (the yardstick: the model as circuitfind loads it, per-head q/k/v
inputs and results switched on); one masked forward pass with every edge mask active (random
keep/patch masks, one candidate) on each engine; EAP over all edges; ACDC for a fixed number of
forward passes. Then the growth table: the same on small Llama shapes, one factor (layers, heads,
prompts) at a time. ``--quick`` runs everything on toy shapes (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _timing import best_of  # noqa: E402

LLAMA_1B = dict(layers=16, heads=32, kv_heads=8, d_model=2048, d_mlp=8192, vocab=128256)
TOY = dict(layers=2, heads=4, kv_heads=2, d_model=64, d_mlp=128, vocab=1000)
GROWTH_BASE = dict(layers=4, heads=8, kv_heads=2, d_model=512, d_mlp=2048, vocab=32000)
TOY_GROWTH_BASE = dict(layers=1, heads=2, kv_heads=1, d_model=32, d_mlp=64, vocab=500)


# -- the model and the prompts --------------------------------------------------------------
def shape_name(shape: dict) -> str:
    return "llama-L{layers}-H{heads}-KV{kv_heads}-d{d_model}-m{d_mlp}-v{vocab}".format(**shape)


def bench_dir() -> Path:
    from circuitfind.models.fetch import cache_root

    return cache_root() / "bench"


def build_model(shape: dict, folder: Path) -> Path:
    """A random Llama of ``shape`` saved as an HF folder (built once, in a child process)."""
    if not (folder / "config.json").is_file():
        proc = subprocess.run(
            [sys.executable, __file__, "--child", "build", "--model-dir", str(folder), "--shape", json.dumps(shape)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"building {folder.name} failed:\n{proc.stderr[-3000:]}")
    return folder


def _build(shape: dict, folder: Path) -> None:
    """Random weights, the induction task's word tokenizer, saved with an atomic rename."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from circuitfind.models.fetch import replace_dir
    from circuitfind.models.zoo.train import build_tokenizer, task_words
    from circuitfind.tasks.batch import load_task

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer(task_words(load_task("induction")))
    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["d_model"],
        intermediate_size=shape["d_mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # half the disk; loaded as float32
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, folder)


def bench_batch(model, n: int, tokens: int):
    """``n`` induction prompts of exactly ``tokens`` tokens (BOS, 16+ words, their repeat up to the answer)."""
    import random

    from circuitfind.tasks.batch import TaskBatch, induction_prompt, load_task

    spec = load_task("induction")
    vocab = list(spec.data["vocab"])
    length = tokens // 2  # words before the repeat; the repeat has length - 1 words
    if length + 1 > len(vocab) or tokens < 4:
        raise SystemExit(f"--tokens must be in 4..{2 * (len(vocab) - 1)}")
    rng = random.Random(0)
    prompts = []
    for _ in range(n):
        seq = rng.sample(vocab, length + 1)
        prompts.append(induction_prompt(seq[:-1], seq[-1], tokens - 1 - length))
    batch = TaskBatch.build(model, spec, prompts)
    assert batch.n_pos == tokens, batch.n_pos
    return batch


# -- measurements (each in a child process) --------------------------------------------------
def peak_mb() -> float:
    """This process's peak RSS so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Start a new peak-RSS window (Linux: VmHWM reset through /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def window_peak_mb() -> float:
    """Peak RSS since :func:`reset_peak` (MB; the process peak where the window cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return peak_mb()


def measured(out: dict, key: str, fn, repeats: int = 1):
    """Time ``fn`` (best of ``repeats``) into ``out[key + '_s']`` and its peak RSS into ``out[key + '_peak_mb']``."""
    reset_peak()
    out[key + "_s"], result = best_of(fn, repeats)
    out[key + "_peak_mb"] = window_peak_mb()
    return result


def child(args) -> dict:
    """One measurement in this process; returns what the parent prints."""
    from circuitfind import patching as P
    from circuitfind.edge_patching import EdgePatcher
    from circuitfind.methods import discover as D
    from circuitfind.models.loading import load_model

    t0 = time.perf_counter()
    if args.max_memory == "auto":
        args.max_memory = None
    model = load_model(args.model_dir, dtype=args.dtype)
    load_s, loaded_mb = time.perf_counter() - t0, peak_mb()
    batch = bench_batch(model, args.prompts, args.tokens)
    setup = P.prepare(model, batch, "str", "kl" if args.what == "acdc" else "logit_diff", max_memory=args.max_memory)
    patcher = EdgePatcher(setup)
    out = {"edges": patcher.n_edges, "load_s": load_s, "loaded_mb": loaded_mb, "budget_mb": patcher.budget() / 2**20}
    with torch.no_grad():
        out["forward_s"], _ = best_of(lambda: model(batch.clean_tokens), args.repeats)
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(1, patcher.n_edges, generator=gen) > 0.5).float().to(batch.clean_tokens.device)
    if args.what in ("masked", "growth"):
        patcher.run(masks)  # caches the runs' activations the engine reads
        measured(out, "masked", lambda: patcher.run(masks), args.repeats)
        out["masked_passes"] = len(patcher._passes(1, patcher.engine, True, slice(0, setup.size)))
        if args.hooks:
            hooks = EdgePatcher(setup, engine="hooks")
            measured(out, "hooks", lambda: hooks.run(masks), args.repeats)
    if args.what in ("eap", "growth"):
        scores = measured(out, "eap", lambda: D.eap(patcher))
        out["eap_passes"] = len(patcher.passes(1))
        out["eap_nonzero"] = int((scores != 0).sum())
    if args.what == "acdc":
        circuit = measured(out, "acdc", lambda: D.acdc(patcher, 0.02, max_passes=args.acdc_passes))
        out["acdc_passes"] = circuit.settings["forward_passes"]
        out["acdc_candidates"] = circuit.settings["candidates_evaluated"]
        out["acdc_removed"] = patcher.n_edges - circuit.n_edges
    out["peak_mb"] = peak_mb()
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(what: str, folder: Path, prompts: int, args, extra: list[str] = ()) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        what,
        "--model-dir",
        str(folder),
        "--prompts",
        str(prompts),
        "--tokens",
        str(args.tokens),
        "--repeats",
        str(args.repeats),
        "--acdc-passes",
        str(args.acdc_passes),
        "--dtype",
        args.dtype,
        *extra,
    ]
    cmd += ["--max-memory", args.max_memory]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"measurement {what} on {folder.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the report ----------------------------------------------------------------------------
def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not measured, no device lent"
    return (
        f"CPU cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; GPU: {gpu}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy shapes: a smoke run")
    p.add_argument("--prompts", type=int, default=None, help="prompts (default 8; 4 with --quick)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per prompt (default 32; 12 with --quick)")
    p.add_argument(
        "--max-memory",
        default="2GB",
        help="working-memory budget of a pass (default 2GB; 'auto': a quarter of the free memory)",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=None, help="best of this many timings (default 3; 1 with --quick)")
    p.add_argument("--acdc-passes", type=int, default=20, help="ACDC forward passes to time")
    p.add_argument("--no-hooks", dest="hooks", action="store_false", help="skip the hooks engine's masked forward")
    p.add_argument("--no-growth", dest="growth", action="store_false", help="skip the growth table")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.prompts = args.prompts or (4 if args.quick else 8)
    args.tokens = args.tokens or (12 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.child == "build":
        _build(json.loads(args.shape), Path(args.model_dir))
        return
    if args.child:
        args.what = args.child
        print(json.dumps(child(args)))
        return

    big = TOY if args.quick else LLAMA_1B
    folder = build_model(big, bench_dir() / shape_name(big))
    print(
        f"\n{shape_name(big)} ({folder}), {args.prompts} prompts x {args.tokens} tokens, dtype {args.dtype}, "
        f"max_memory {args.max_memory}\n{machine()}\n"
    )
    rows = {
        what: run_child(what, folder, args.prompts, args, [] if args.hooks else ["--no-hooks"])
        for what in ("masked", "eap", "acdc")
    }
    m, e, a = rows["masked"], rows["eap"], rows["acdc"]
    fwd = m["forward_s"]
    print(
        f"edges {m['edges']:,}; load {m['load_s']:.1f} s, RSS after loading {m['loaded_mb']:,.0f} MB; "
        f"pass budget {m['budget_mb']:,.0f} MB"
    )
    print("peak RSS: of the measurement's whole process (loading included) / during the operation alone\n")
    print(f"{'measurement':<46} {'seconds':>9} {'x forward':>10} {'process MB':>11} {'operation MB':>13}")
    print(f"{'plain forward pass':<46} {fwd:>9.3f} {1.0:>10.2f} {'':>11} {'':>13}")
    print(
        f"{'masked forward, every mask active (functional)':<46} {m['masked_s']:>9.3f} {m['masked_s'] / fwd:>10.2f} "
        f"{m['peak_mb']:>11,.0f} {m['masked_peak_mb']:>13,.0f}"
    )
    if "hooks_s" in m:
        print(
            f"{'masked forward, every mask active (hooks)':<46} {m['hooks_s']:>9.3f} {m['hooks_s'] / fwd:>10.2f} "
            f"{'':>11} {m['hooks_peak_mb']:>13,.0f}"
        )
    print(
        f"{'EAP over all edges (' + str(e['eap_passes']) + ' passes)':<46} {e['eap_s']:>9.2f} {e['eap_s'] / e['forward_s']:>10.1f} "
        f"{e['peak_mb']:>11,.0f} {e['eap_peak_mb']:>13,.0f}"
    )
    print(
        f"{'ACDC, ' + str(a['acdc_passes']) + ' passes (' + str(a['acdc_candidates']) + ' candidates)':<46} "
        f"{a['acdc_s']:>9.2f} {a['acdc_s'] / a['forward_s']:>10.1f} {a['peak_mb']:>11,.0f} {a['acdc_peak_mb']:>13,.0f}"
    )
    ratio = m["masked_s"] / fwd
    peak = max(r["peak_mb"] for r in rows.values())
    print(
        f"\nmasked forward {ratio:.2f}x the plain forward (goal <= 1.5x): {'met' if ratio <= 1.5 else 'NOT met'}; "
        f"peak RSS {peak / 1024:.1f} GB (goal < 12 GB): {'met' if peak < 12 * 1024 else 'NOT met'}"
    )
    if torch.cuda.is_available():
        print("CUDA peak allocation (MB): " + ", ".join(f"{k} {r['cuda_peak_mb']:,.0f}" for k, r in rows.items()))
    if args.growth:
        growth(args)


def growth(args) -> None:
    """Time and peak memory on small Llama shapes, one factor at a time."""
    base = TOY_GROWTH_BASE if args.quick else GROWTH_BASE
    steps = (1, 2) if args.quick else (1, 2, 4)
    configs = [("base", base, args.prompts)]
    configs += [(f"layers x{k}", {**base, "layers": base["layers"] * k}, args.prompts) for k in steps[1:]]
    configs += [
        (f"heads x{k}", {**base, "heads": base["heads"] * k, "kv_heads": base["kv_heads"] * k}, args.prompts)
        for k in steps[1:]
    ]
    configs += [(f"prompts x{k}", base, args.prompts * k) for k in steps[1:]]
    print(
        f"\ngrowth (base: {shape_name(base)}, {args.prompts} prompts x {args.tokens} tokens; RSS in MB: after "
        f"loading, during the masked forward, during EAP (all with the weights), process peak)"
    )
    print(
        f"{'config':<14} {'layers':>6} {'heads':>5} {'prompts':>7} {'edges':>9} {'fwd s':>8} {'masked s':>9} "
        f"{'ratio':>6} {'EAP s':>8} {'loaded MB':>10} {'masked MB':>10} {'EAP MB':>8} {'peak MB':>9}"
    )
    for label, shape, prompts in configs:
        r = run_child("growth", build_model(shape, bench_dir() / shape_name(shape)), prompts, args, ["--no-hooks"])
        print(
            f"{label:<14} {shape['layers']:>6} {shape['heads']:>5} {prompts:>7} {r['edges']:>9,} {r['forward_s']:>8.3f} "
            f"{r['masked_s']:>9.3f} {r['masked_s'] / r['forward_s']:>6.2f} {r['eap_s']:>8.2f} {r['loaded_mb']:>10,.0f} "
            f"{r['masked_peak_mb']:>10,.0f} {r['eap_peak_mb']:>8,.0f} {r['peak_mb']:>9,.0f}"
        )
    overall = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\nlargest peak RSS of any measurement process: {overall:,.0f} MB")


if __name__ == "__main__":
    main()
