"""Code a researcher gives by import path (``package.module:name``: a metric, a method): importing it
with one-line errors, and a fingerprint of its source for cache keys.

The fingerprint covers the module and, transitively, every module it imports that is the user's own:
any module whose file lies outside the standard library, the installed packages (``site-packages``,
``dist-packages``) and circuitfind itself. A helper module's edit therefore invalidates the cache as
an edit of the module named on the command line does.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import sys
import sysconfig
from pathlib import Path
from typing import Any

_INSTALLED = {Path(p).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_path(k))}
_OWN = Path(__file__).resolve().parent


def is_import_path(spec: object) -> bool:
    """``package.module:attribute``."""
    return isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":"))


def import_object(spec: str, what: str, error: type[Exception] = ValueError) -> Any:
    """The object ``package.module:attribute``; ``error`` (one line naming ``what`` and ``spec``) when the
    module cannot be imported, raises while importing, or lacks the attribute."""
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"{what} {spec!r}: cannot import module {module_name!r} ({exc})") from None
    except (Exception, SystemExit) as exc:  # the user's module failed while importing (a SyntaxError, a raise, exit)
        raise error(f"{what} {spec!r}: importing module {module_name!r} raised {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise error(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _user_file(module_name: str) -> Path | None:
    """The source file of a module that is the user's own (see the module docstring), else ``None``."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError, AttributeError):
        return None
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        return None
    path = Path(origin).resolve()
    if path.is_relative_to(_OWN) or any(path.is_relative_to(p) for p in _INSTALLED):
        return None
    if any(part in ("site-packages", "dist-packages") for part in path.parts):
        return None
    return path


def _imported_names(path: Path, module_name: str) -> set[str]:
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return set()
    package = module_name if path.name == "__init__.py" else module_name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: max(0, len(package.split(".")) - node.level + 1)]
                base = ".".join(parts + ([base] if base else []))
            if base:
                names.add(base)
                names.update(f"{base}.{a.name}" for a in node.names)
    return names


def source_fingerprint(module_name: str) -> str:
    """A hash of the user's module and of every user module it imports, transitively (at most 500)."""
    digest = hashlib.sha256()
    seen: set[str] = set()
    todo = [module_name]
    while todo and len(seen) < 500:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _user_file(name)
        if path is None:
            continue
        digest.update(f"{name}\0".encode() + path.read_bytes() + b"\0")
        todo.extend(sorted(_imported_names(path, name) - seen))
    if module_name in sys.modules and _user_file(module_name) is None:  # not a file (built in a notebook, say)
        digest.update(repr(sorted(vars(sys.modules[module_name]))).encode())
    return digest.hexdigest()[:20]
