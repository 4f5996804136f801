"""Timing, memory and option helpers shared by the benchmark scripts."""

from __future__ import annotations

import resource
import time

import torch


def best_of(fn, repeats: int = 3, once_after: float = float("inf")):
    """Best wall time of ``repeats`` calls (synchronising CUDA), and the last call's result; a call
    longer than ``once_after`` seconds is not repeated."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if best > once_after and best < float("inf"):
            break
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def peak_memory_mb() -> float:
    """CUDA peak allocation on a GPU, the process's max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def base_parser(doc: str, prompts: int):
    """The options every benchmark takes: model, task, number of prompts, max stacked batch."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-ioi")
    p.add_argument("--task", default="ioi")
    p.add_argument("--prompts", type=int, default=prompts)
    p.add_argument("--max-batch", type=int, default=1024)
    return p
