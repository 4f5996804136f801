"""The package as others get it: every import declared, and a wheel that works outside the checkout."""

import ast
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from conftest import TINY_SWEEP

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _distribution(requirement: str) -> str:
    """The normalised distribution name of a requirement string (``"torch>=2.4"`` -> ``"torch"``)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level names of the absolute imports of a module: (at module level, inside functions or try blocks)."""
    tree = ast.parse(path.read_text(), str(path))
    module_level: set[str] = set()
    nested: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            (module_level if top else nested).update(n.split(".")[0] for n in names)
            # imports guarded by try/except (optional extras) or inside functions are not module-level
            inner_top = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try, ast.Lambda))
            visit(child, inner_top)

    visit(tree, True)
    return module_level, nested


def _declared(requirements: list[str]) -> set[str]:
    """Import names provided by the given requirements (through the installed distributions' metadata)."""
    dists = {_distribution(r) for r in requirements}
    provided = {
        name for name, owners in packages_distributions().items() if any(_distribution(o) in dists for o in owners)
    }
    return provided | {d.replace("-", "_") for d in dists}  # extras not installed here: their usual import name


def test_every_import_is_declared():
    core = _declared(PYPROJECT["project"]["dependencies"])
    extras = _declared([r for reqs in PYPROJECT["project"]["optional-dependencies"].values() for r in reqs])
    own = {"circuitfind", "flows", "tools", "benchmarks", "__future__"}
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for folder, module_level_allowed in (
        ("src", core),
        ("flows", core),
        ("tests", core | extras),
        ("benchmarks", core | extras),
    ):
        for path in sorted((ROOT / folder).rglob("*.py")):
            local = {p.stem for p in path.parent.glob("*.py")}  # scripts importing their neighbours
            module_level, nested = _imports(path)
            for name in sorted(module_level - stdlib - own - local - module_level_allowed):
                problems.append(f"{path.relative_to(ROOT)}: `import {name}` at module level is not a dependency")
            for name in sorted(nested - stdlib - own - local - core - extras):
                problems.append(f"{path.relative_to(ROOT)}: `import {name}` is in no dependency or extra")
    assert not problems, "\n".join(problems)


def test_every_package_is_listed_for_the_build():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src").rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject's [tool.setuptools] packages: {sorted(found - listed)}"


# --------------------------------------------------------------------------------------------
# The wheel, installed outside the checkout


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The project built as a wheel (offline, from a copy of the checkout) and installed with ``--no-deps``
    into a fresh venv that reuses this environment's packages through a ``.pth`` path (not its ``.pth``
    files, so not the editable install that points at the checkout's ``src/``)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp / "dist").glob("circuitfind-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site_packages / "test-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return wheel, venv, site_packages


def _run(venv: Path, *args: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_wheel_carries_tasks_flows_and_models(installed_wheel):
    wheel, _, _ = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    tasks = sorted(task.name for task in (ROOT / "tasks").glob("*.json"))
    assert {"factual.json", "induction.json", "ioi.json", "greater_than.json", "ioi_template.json"} <= set(tasks)
    assert {f"circuitfind/task_specs/{task}" for task in tasks} <= names
    assert {
        "circuitfind/flows/sweep_flow.py",
        "circuitfind/flows/study_flow.py",
        "circuitfind/flows/deploy.py",
        "circuitfind/models/zoo/toy-ioi/model.safetensors",
        "circuitfind/py.typed",
        "circuitfind/circuits/schemas/neuronpedia-graph-schema.json",  # the Neuronpedia export validates against it
        "circuitfind/circuits/schemas/README.md",
    } <= names


@pytest.mark.slow  # 40 s with a busy core: `make test` stays under 5 minutes; CI runs the slow tests too
def test_installed_wheel_discovers_and_sweeps_outside_the_checkout(installed_wheel, first_sweep, sweep_env, tmp_path):
    _, venv, site_packages = installed_wheel
    work = tmp_path / "empty"
    work.mkdir()
    env = sweep_env(first_sweep.home)  # a Prefect home whose database exists
    where = _run(
        venv,
        "python",
        "-c",
        "import circuitfind, circuitfind.paths as p; print(circuitfind.__file__); "
        "print(p.default_tasks_dir()); print(p.checkout_root())",
        cwd=work,
        env=env,
    )
    package, tasks, checkout = where.stdout.split()
    assert Path(package).is_relative_to(site_packages) and Path(tasks).is_relative_to(site_packages), where.stdout
    assert checkout == "None"
    assert sorted(p.name for p in Path(tasks).glob("*.json")) == sorted(p.name for p in (ROOT / "tasks").glob("*.json"))

    found = _run(
        venv,
        "circuitfind",
        "discover",
        "-n",
        "8",
        "--algorithm",
        "eap",
        "--top-k",
        "10",
        "--out",
        "c.graphml",
        cwd=work,
        env=env,
    )
    assert found.returncode == 0, found.stderr[-3000:]
    assert "eap: 10 of 262 edges" in found.stdout and (work / "c.graphml").is_file()

    swept = _run(
        venv,
        "circuitfind",
        "sweep",
        *TINY_SWEEP,
        "--run",
        "w",
        cwd=work,
        env=env,
    )
    assert swept.returncode == 0, swept.stderr[-3000:]
    # the installed package's default outputs folder is ./outputs of the current directory
    run = work / "outputs" / "w"
    assert (run / "report.html").is_file() and '"failures": []' in (run / "manifest.json").read_text()


def test_flows_load_from_the_package_and_from_the_checkout_entry_points():
    from prefect.flows import load_flow_from_entrypoint

    from circuitfind.flows.deploy import build_deployment

    deployment = build_deployment()
    assert deployment.entrypoint == "circuitfind.flows.sweep_flow.sweep"  # runs wherever circuitfind is installed
    assert load_flow_from_entrypoint(deployment.entrypoint).name == "circuitfind-sweep"
    assert load_flow_from_entrypoint(f"{ROOT / 'flows' / 'study.py'}:settings_study").name == "circuitfind-study"
