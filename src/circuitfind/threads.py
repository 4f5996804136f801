"""Torch thread counts chosen per piece of work.

Tiny tensor operations (the report's statistics over a few hundred edges) gain nothing from
intra-op threads and, on a shared machine, crawl when those threads have to wait for busy cores: a
1000-resample bootstrap took 8 s with 2 threads under load and 0.09 s with one.
"""

from __future__ import annotations

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
