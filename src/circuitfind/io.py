"""Atomic file output: results are written to a temporary file and renamed into place, so a crash
never leaves a half-written file behind. JSON is written strictly (RFC 8259): there is no NaN or
Infinity in JSON, so non-finite floats become ``null``; writers that need to say why a value is
missing add a reason field next to it (e.g. ``"faithfulness_status"``)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename). An
    ``OSError`` names ``path``, never the temporary file (``--out /proc/version.graphml`` named it)."""
    path = Path(path)
    try:
        return _write_bytes(path, data)
    except OSError as err:
        if err.errno is None:
            raise
        raise type(err)(err.errno, f"cannot write {path}: {err.strerror}") from None


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as strict JSON (non-finite floats as ``null``), atomically."""
    return write_text(path, to_json(obj))


def to_json(obj: Any) -> str:
    """``obj`` as strict, indented JSON: tensors and arrays as lists, non-finite floats as ``null``."""
    return json.dumps(_strict(obj), indent=2, allow_nan=False) + "\n"


def _strict(obj: Any) -> Any:
    if isinstance(obj, float):  # also numpy's float64
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_strict(v) for v in obj]
    if hasattr(obj, "tolist"):  # tensors, arrays and numpy scalars
        return _strict(obj.tolist())
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
