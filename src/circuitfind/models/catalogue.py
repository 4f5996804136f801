"""Models by name: the public entry point for loading any model circuitfind knows.

:func:`load_model` takes a shipped toy model (``circuitfind/zoo/<name>/``), a model built by code
on first use (``known-induction``, ``known-suppress``, ``known-backup``: :mod:`circuitfind.models.zoo.known`), a fetched registry model
(:mod:`circuitfind.models.fetch`), a local HF-format folder or a Hugging Face hub name. It builds the
models that are made by code (which needs the zoo, and through it the task specs) and hands
everything else to :mod:`circuitfind.models.loading`, which loads folders and hub names and imports none of
the zoo's code. The imports run one way: ``models`` <- ``tasks`` <- ``zoo`` <- ``catalogue``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from circuitfind.models import fetch
from circuitfind.models import loading as models

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def _build_known_induction(folder: Path) -> None:
    from circuitfind.models.zoo.known import build_induction_model

    build_induction_model(folder)


def _build_known_suppress(folder: Path) -> None:
    from circuitfind.models.zoo.known import build_suppression_model

    build_suppression_model(folder)


def _build_known_backup(folder: Path) -> None:
    from circuitfind.models.zoo.known import build_backup_model

    build_backup_model(folder)


# Models whose weights are set by code (circuit known by construction), built into the cache on first use.
BUILT: dict[str, Callable[[Path], None]] = {
    "known-induction": _build_known_induction,
    "known-suppress": _build_known_suppress,
    "known-backup": _build_known_backup,
}


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map a shipped, built or fetched model name to its folder (building a built model on first
    use); leave folders and hub names as they are."""
    text = str(name_or_path)
    if text in BUILT and not (models.ZOO_DIR / text / "config.json").is_file():
        folder = fetch.model_dir(text)
        if not (folder / "config.json").is_file():
            BUILT[text](folder)
        return str(folder)
    return models.resolve_model_path(name_or_path)


def locate_model(name_or_path: str | os.PathLike) -> str:
    """The folder or hub name :func:`load_model` would load (see :func:`circuitfind.models.loading.locate_model`)."""
    return models.locate_model(resolve_model_path(name_or_path))


def load_model(
    name_or_path: str | os.PathLike, device: str | None = None, tokenizer=None, dtype: str | torch.dtype = "float32"
) -> TransformerBridge:
    """Load any model by name or folder as a ``TransformerBridge`` ready for patching (see
    :func:`circuitfind.models.loading.load_model` for the arguments and errors)."""
    return models.load_model(resolve_model_path(name_or_path), device=device, tokenizer=tokenizer, dtype=dtype)
