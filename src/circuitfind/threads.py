"""Torch thread counts chosen per piece of work.

Tiny tensor operations (the report's statistics over a few hundred edges) gain nothing from
intra-op threads and, on a shared machine, crawl when those threads have to wait for busy cores: a
1000-resample bootstrap took 8 s with 2 threads under load and 0.09 s with one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count.

    The setting is process-wide: use it around work that no other thread runs torch at the same time.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


THREADS_ENV = "CIRCUITFIND_TORCH_THREADS"  # torch intra-op threads of a sweep worker process


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``workers`` parallel settings on one machine: its cores shared out, at least 1."""
    return max(1, (available_cores() if cores is None else cores) // max(1, workers))


def apply_worker_threads() -> int | None:
    """Set torch's intra-op threads to ``$CIRCUITFIND_TORCH_THREADS`` when it is set (a sweep worker process;
    Dask's worker nanny otherwise starts workers with ``OMP_NUM_THREADS=1``); return the count, or None."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{THREADS_ENV}={text!r} is not a positive number of threads")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
