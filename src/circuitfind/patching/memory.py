"""Working-memory budgets for the patching engines.

Edge patching keeps one difference per sender for every stacked row (candidate x prompt), so a
pass over a large model costs ``senders x positions x d_model`` floats per row: on a
Llama-3.2-1B-shaped model about 180 MB. The engines therefore run as many rows per pass as a byte
budget allows (splitting the prompts when even one candidate's prompts do not fit), with results
identical to a single pass up to float rounding.

The budget is ``PatchingSetup.max_memory``: bytes, or a string such as ``"4GB"`` / ``"512MB"``;
``None`` (the default) takes a quarter of the memory available when the pass starts (free GPU
memory on CUDA, ``MemAvailable`` on Linux; 4 GB where neither is known). It bounds the scratch
memory of one pass; the model's weights and the cached activations of the clean and corrupted runs
(about ``2 x senders x prompts x positions x d_model`` floats for edge patching) come on top.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

FALLBACK_AVAILABLE = 16 * 2**30  # when the available memory cannot be read (the default budget is a quarter)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 2**10,
    "mb": 2**20,
    "gb": 2**30,
    "tb": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(value: str | int | float | None) -> int | None:
    """Bytes from ``4e9``, ``"4GB"``, ``"512 MB"``, ``"1.5G"`` (binary units); ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"max_memory must be a number of bytes or a size such as '4GB' or '512MB', got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return size


def available_memory(device: torch.device | str) -> int:
    """Free memory of ``device`` in bytes: free GPU memory on CUDA, ``MemAvailable`` on Linux."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return FALLBACK_AVAILABLE


def budget(max_memory: str | int | float | None, device: torch.device | str) -> int:
    """The scratch budget of one pass in bytes: ``max_memory``, or a quarter of the available memory."""
    explicit = parse_memory(max_memory)
    return explicit if explicit is not None else available_memory(device) // 4


def rows_per_pass(budget_bytes: int, row_bytes: int, max_rows: int) -> int:
    """How many stacked rows (candidate x prompt) one pass may run: at least one, at most ``max_rows``."""
    return max(1, min(max_rows, budget_bytes // max(1, row_bytes)))


def schedule(
    n_candidates: int, n_prompts: int, rows: int, split_prompts: bool = True, starts: Sequence[int] | None = None
) -> list[tuple[slice, slice]]:
    """Passes ``(candidates, prompts)`` covering every candidate and prompt with at most ``rows``
    rows each: whole prompt batches when a candidate's prompts fit, else one candidate at a time
    over chunks of prompts (unless ``split_prompts`` is off: then one candidate, every prompt).
    ``starts``: the only rows where a chunk may start (teacher-forced rows of one prompt stay in one
    pass, :attr:`circuitfind.tasks.multitoken.AnswerRows.split_points`); a group larger than ``rows`` is one
    pass of its own."""
    if rows >= n_prompts or not split_prompts:
        per = max(1, rows // n_prompts)
        return [(slice(c, min(c + per, n_candidates)), slice(0, n_prompts)) for c in range(0, n_candidates, per)]
    bounds = sorted({0, *(s for s in (starts if starts is not None else range(n_prompts)) if 0 < s < n_prompts)})
    bounds.append(n_prompts)
    chunks, start = [], 0
    for i, point in enumerate(bounds[1:], 1):
        if point - start > rows and bounds[i - 1] > start:
            chunks.append(slice(start, bounds[i - 1]))
            start = bounds[i - 1]
    chunks.append(slice(start, n_prompts))
    return [(slice(c, c + 1), p) for c in range(n_candidates) for p in chunks]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
