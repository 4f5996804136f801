"""Where circuitfind finds its task specs and writes its results, in a checkout and when installed.

The project keeps its task specs in the checkout's top-level ``tasks/``; a wheel carries a copy as
package data in ``circuitfind/task_specs/`` (mapped by ``pyproject.toml``), so one set of files
serves a checkout, an editable install and an installed wheel.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def checkout_root() -> Path | None:
    """The source checkout this package runs from (``<root>/src/circuitfind`` beside ``<root>/pyproject.toml``),
    or ``None`` when it runs from an installed wheel."""
    root = PACKAGE_DIR.parents[1]
    if PACKAGE_DIR.parent.name == "src" and (root / "pyproject.toml").is_file():
        return root
    return None


def default_tasks_dir() -> Path:
    """The task specs: the wheel's ``circuitfind/task_specs/``, else the checkout's ``tasks/``."""
    packaged = PACKAGE_DIR / "task_specs"
    root = checkout_root()
    if packaged.is_dir() or root is None:
        return packaged
    return root / "tasks"


def default_outputs() -> Path:
    """Where runs are written by default: ``./outputs`` of the current directory, whether circuitfind runs
    from a checkout, an editable install or a wheel (an editable install once wrote into the checkout it
    was installed from, wherever the command ran)."""
    return Path.cwd() / "outputs"


def check_run_name(run: str) -> str:
    """A run name is one folder of the outputs: never empty, ``.``/``..`` or a path that leads elsewhere, and
    never hidden: names starting with ``.`` are the outputs' own (``.cache``, ``.series``)."""
    if not run.strip() or run in (".", "..") or "/" in run or "\\" in run:
        raise ValueError(f"--run: {run!r} is not a folder name (the run is a folder of --outputs)")
    if run.startswith("."):
        raise ValueError(f"--run: {run!r} is reserved (names starting with '.' hold the cache and the series)")
    return run


def check_writable_folder(folder: str | Path, option: str = "--outputs") -> Path:
    """``folder`` is, or can be made, a folder this process writes into: refused up front (one line naming
    ``option``) when it or a parent is a file, or the nearest existing folder is not writable."""
    import os
    import tempfile

    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link
            raise ValueError(f"{option}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option}: {existing} is a file, not a folder")
    try:  # a probe, not os.access: it also sees read-only mounts and ACLs
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{option}: cannot write into {existing} ({err.strerror or err})") from None
    return folder


def run_folder(outputs: str | Path | None, run: str | None, prefix: str = "") -> Path:
    """The folder of a run: ``<outputs>/<run>``, by default ``<default outputs>/<prefix><timestamp>``."""
    import time

    name = check_run_name(run) if run is not None else prefix + time.strftime("%Y%m%d-%H%M%S")
    return Path(outputs or default_outputs()) / name
