"""docs/architecture.md names every module of the library, so the map stays complete."""

import re
from pathlib import Path

import circuitfind

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(circuitfind.__file__).parent


def test_every_module_is_named_in_the_architecture_doc():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"^\| `([\w/]+\.py)` \|", doc, flags=re.M))
    modules = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")}
    assert modules - named == set(), "modules missing from docs/architecture.md"
    assert named - modules == set(), "docs/architecture.md names modules that do not exist"
