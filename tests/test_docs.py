"""The README and the documentation site: the README stays a front page, every relative link resolves,
every module path named exists, and every code block of the tutorials runs.

A tutorial block is run unless an HTML comment on the line before its fence says otherwise:

* ``<!-- file: NAME -->``: the block is a file the reader saves; it is written as ``NAME`` in the
  page's working folder before the blocks after it run;
* ``<!-- slow -->``: the block runs in ``make test-slow`` only (a Prefect sweep, the study);
* ``<!-- not run: WHY -->``: the block is not run, and the page says why (its run time, a GPU, ...).

``python`` blocks run in one namespace per page, in the page's working folder. In ``bash`` blocks each
line is a command (a ``#`` comment after it is dropped): ``circuitfind ...`` and ``python ...``; any
other command must be marked ``not run``. The fast pass runs the page's unmarked blocks in order; the
slow pass runs all of them in order, since a slow block can need an earlier one's output.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
RUNNABLE = [README, *TUTORIALS]  # pages whose code blocks run (or are marked)
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*(file:\s*(?P<file>\S+)|(?P<slow>slow)|not run:\s*(?P<why>.+?))\s*-->$")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    file: str | None = None
    slow: bool = False
    not_run: str | None = None

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, each with the marker on the line before its fence."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise AssertionError(f"{page}:{i + 1}: a code block that is never closed")
        block = Block(page, i + 1, m[1], "\n".join(lines[i + 1 : end]) + "\n")
        mark = MARK.match(lines[i - 1].strip()) if i else None
        if mark:
            block.file, block.slow, block.not_run = mark["file"], bool(mark["slow"]), mark["why"]
        out.append(block)
        i = end + 1
    return out


def test_blocks_reads_markers_and_fences(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("<!-- file: a.py -->\n```python\nx = 1\n```\ntext\n<!-- not run: 4 min -->\n```bash\nmake\n```\n")
    a, b = blocks(page)
    assert (a.lang, a.file, a.text, a.line) == ("python", "a.py", "x = 1\n", 2)
    assert (b.lang, b.not_run, b.slow) == ("bash", "4 min", False)


# --- the README is a front page -------------------------------------------------------------------


def test_the_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; move detail into docs/ (the site)"
    text = "\n".join(lines)
    for needed in ("make demo", "make test", "docs/report-first-screen.png", "docs/quickstart.md"):
        assert needed in text, needed


# --- links and names -------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


def slug(heading: str) -> str:
    """Python-Markdown's toc anchor of a heading (its default ``slugify``, markup stripped first)."""
    text = re.sub(r"`|\*\*|\*|\[([^\]]*)\]\([^)]*\)", lambda m: m[1] or "", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    inside = False
    found = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside and (m := HEADING.match(line)):
            found.add(slug(m[1]))
    return found


def outside_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = []
    for target in LINK.findall(outside_code(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:, file:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{target}: no heading with the anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not bad, "\n".join(bad)


def test_slug_follows_python_markdown():
    assert slug("4. From Python, with a metric of your own") == "4-from-python-with-a-metric-of-your-own"
    assert slug("A Llama-3.2-1B-shaped model") == "a-llama-32-1b-shaped-model"
    assert slug("Node patching against `transformer_lens.patching`") == "node-patching-against-transformer_lenspatching"


DOTTED = re.compile(r"(?<![\w./-])circuitfind(?:\.[A-Za-z_]\w*)+")
NOT_MODULES = {"circuitfind.methods"}  # also the entry-point group's name, which is a module too


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module of this checkout, or an attribute of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_path_named_exists(page):
    """Old paths (``circuitfind.sweep``, ``circuitfind.discovery``, ...: CHANGELOG.md) are caught here."""
    text = page.read_text(encoding="utf-8")
    names = {m.rstrip(".") for m in DOTTED.findall(text)} - NOT_MODULES
    names = {n for n in names if not n.startswith("circuitfind.task_specs")}  # the wheel's copy of tasks/
    missing = sorted(n for n in names if not resolves(n))
    assert not missing, f"{page.relative_to(ROOT)} names modules or attributes that do not exist: {missing}"


IMPORT = re.compile(
    r"^\s*(?:from\s+(circuitfind[\w.]*)\s+import\s+([\w\s,()]+?)\s*(?:#.*)?$|import\s+(circuitfind[\w.]*))"
)


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_of_a_snippet_works(page):
    """Every ``from circuitfind... import ...`` line of every Python block, run or not, imports."""
    for block in blocks(page):
        if block.lang != "python":
            continue
        for line in block.text.splitlines():
            m = IMPORT.match(line)
            if not m:
                continue
            module = importlib.import_module(m[1] or m[3])
            for part in (m[2] or "").strip("() ").split(","):
                name = part.split(" as ")[0].strip()
                if name:
                    assert hasattr(module, name) or importlib.util.find_spec(f"{module.__name__}.{name}"), (
                        f"{block.where()}: {line.strip()}"
                    )


# --- the tutorials run ----------------------------------------------------------------------------


def commands(block: Block) -> list[list[str]]:
    """The commands of a bash block: ``circuitfind ...`` and ``python ...`` lines."""
    out = []
    for raw in block.text.splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        argv = shlex.split(line)
        if argv[0] not in ("circuitfind", "python"):
            raise AssertionError(f"{block.where()}: {line!r} is neither `circuitfind` nor `python`: mark it not run")
        out.append(argv)
    return out


def run_command(argv: list[str], cwd: Path, slow: bool, prefect_home: Path | None = None) -> None:
    """A fast ``circuitfind`` command runs in this process (torch is loaded once); a slow one, and any
    ``python`` script, in a subprocess, as a reader's shell would run it, with the session's Prefect home
    (its database is created once: 20 s and more)."""
    if argv[0] == "circuitfind" and not slow:
        from circuitfind.cli import main

        assert main(argv[1:]) == 0, shlex.join(argv)
        return
    if argv[0] == "circuitfind":
        argv = [sys.executable, "-m", "circuitfind", *argv[1:]]
    else:  # python flows/study.py ...: the scripts are the checkout's
        argv = [sys.executable, *(str(ROOT / a) if a.startswith("flows/") else a for a in argv[1:])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), str(cwd)]),
        "PREFECT_HOME": str(prefect_home or cwd / ".prefect"),
        "CIRCUITFIND_PROGRESS": "0",
    }
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (
        f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def run_page(page: Path, cwd: Path, monkeypatch, slow: bool, prefect_home: Path | None = None) -> int:
    """Run a tutorial's blocks in order in ``cwd``: the unmarked ones, and the slow ones when ``slow``.
    Returns how many blocks ran."""
    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))
    monkeypatch.setenv("CIRCUITFIND_PROGRESS", "0")
    namespace: dict = {"__name__": "__tutorial__"}
    ran = 0
    for block in blocks(page):
        if block.not_run or (block.slow and not slow):
            continue
        if block.file:
            (cwd / block.file).write_text(block.text, encoding="utf-8")
        elif block.lang == "python":
            exec(compile(block.text, block.where(), "exec"), namespace)
        elif block.lang in ("bash", "sh", "shell"):
            for argv in commands(block):
                run_command(argv, cwd, block.slow, prefect_home)
        else:
            continue
        ran += 1
    for name in [m for m in sys.modules if m.startswith("my_")]:  # the page's own modules
        monkeypatch.delitem(sys.modules, name)
    return ran


def test_every_tutorial_block_is_runnable_or_marked():
    for page in RUNNABLE:
        for block in blocks(page):
            if block.lang in ("python", "bash", "sh", "shell") and not block.not_run and not block.file:
                if block.lang != "python":
                    commands(block)  # raises on a command the test cannot run
            elif block.lang not in ("json", "text", "") and not block.not_run and not block.file:
                raise AssertionError(f"{block.where()}: a {block.lang} block that is neither run, a file nor marked")


FAST = [p for p in RUNNABLE if any(not (b.slow or b.not_run or b.file) for b in blocks(p))]
SLOW = [p for p in RUNNABLE if any(b.slow for b in blocks(p))]


@pytest.mark.parametrize("page", FAST, ids=lambda p: p.stem)
def test_tutorial_blocks_run(page, tmp_path, monkeypatch):
    assert run_page(page, tmp_path, monkeypatch, slow=False) > 0


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory):
    return tmp_path_factory.mktemp("prefect-home")


@pytest.mark.slow
@pytest.mark.parametrize("page", SLOW, ids=lambda p: p.stem)
def test_tutorial_blocks_run_with_the_slow_ones(page, tmp_path, monkeypatch, prefect_home):
    assert run_page(page, tmp_path, monkeypatch, slow=True, prefect_home=prefect_home) > 0


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: every page in the navigation, every link and anchor, the generated
    pages (the CLI's help, the methods) and the API pages from the docstrings."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    methods = (tmp_path / "site" / "reference" / "methods.html").read_text(encoding="utf-8")
    assert "Kramár et al. 2024" in methods and "--prune-steps" in methods
    assert "--algorithm" in (tmp_path / "site" / "reference" / "cli.html").read_text(encoding="utf-8")


def test_the_performance_page_joins_the_site_once_it_exists(tmp_path):
    """``docs/performance.md`` is written in another part of the issue: until it exists the benchmarks page
    names it as text (a link would fail the strict build), then it is linked and in the navigation."""
    from tools import docs_hooks

    assert "performance.md)" not in docs_hooks.performance_link("benchmarks.md", tmp_path)
    nav: list = [{"Home": "index.md"}, {"Benchmarks": "benchmarks.md"}, {"Architecture": "architecture.md"}]
    docs_hooks.on_config({"docs_dir": str(tmp_path), "nav": nav})
    assert len(nav) == 3
    (tmp_path / "performance.md").write_text("# Performance\n")
    assert docs_hooks.performance_link("benchmarks.md", tmp_path) == "[the performance notes](performance.md)"
    assert docs_hooks.performance_link("how-to/x.md", tmp_path) == "[the performance notes](../performance.md)"
    docs_hooks.on_config({"docs_dir": str(tmp_path), "nav": nav})
    assert nav[2] == {"Performance": "performance.md"}
    assert "<!-- link: performance -->" in (DOCS / "benchmarks.md").read_text(encoding="utf-8")


def test_every_built_in_method_has_a_sign_convention_in_the_reference():
    from circuitfind.methods import registry
    from tools import docs_hooks

    text = docs_hooks.methods_reference()
    for name, method in registry.builtin().items():
        assert f"\n## {name}\n" in text and method.paper in text
        for field, info in method.Options.model_fields.items():
            assert f"`--{field.replace('_', '-')}`" in text and info.description.replace("|", "\\|") in text
