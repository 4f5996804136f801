"""Reading a sweep's run folder without the sweep: its setting records (``circuits/*.json``), the
manifest the sweep writes last, and the files records name. Light on purpose (no torch, no model
code), so ``circuitfind report`` and the statistics read a run without importing the engines."""

from __future__ import annotations

import json
from pathlib import Path

RECORD_FIELDS = (
    "setting",
    "n_layers",
    "n_heads",
    "n_edges",
    "model",
    "task",
    "algorithm",
    "corruption",
    "metric",
    "direction",
)
TEXT_FIELDS = (
    "setting",
    "model",
    "task",
    "algorithm",
    "corruption",
    "metric",
    "direction",
)  # the report groups by these
MANIFEST = "manifest.json"  # written last by the sweep: a run folder with one is a finished run


def read_manifest(run_dir: str | Path) -> dict | None:
    """The run's manifest, or ``None`` when it has none that reads as a JSON object (unfinished, damaged)."""
    try:
        manifest = json.loads((Path(run_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _manifest_settings(run_dir: Path) -> set[str] | None:
    """The settings the run's manifest lists (a finished sweep), or ``None`` without a readable one.
    A run folder reused with another grid keeps the old grid's records beside the new ones: the
    manifest says which belong to the last sweep."""
    manifest = read_manifest(run_dir)
    try:
        return {r["setting"] for r in manifest["settings"]} | {f["setting"] for f in manifest.get("failures", [])}
    except (KeyError, TypeError, AttributeError):  # no manifest, or not one the sweep wrote
        return None


def load_records(run_dir: str | Path) -> list[dict]:
    """The setting records of a run folder (those its manifest lists, when it has one), sorted by
    setting name, with their file paths resolved inside ``run_dir`` (records store them relative to
    the run folder, so a run folder can move). A file that is not a setting record is a ``ValueError``."""
    run_dir = Path(run_dir)
    files = sorted((run_dir / "circuits").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no circuit records in {run_dir / 'circuits'}: is this a sweep run folder?")
    listed = _manifest_settings(run_dir)
    records = []
    for f in files:
        try:
            record = json.loads(f.read_text())
        except ValueError as err:  # truncated or edited by hand: name the file, not just the JSON position
            raise ValueError(f"setting record {f} is not valid JSON ({err})") from err
        missing = [k for k in RECORD_FIELDS if k not in record] if isinstance(record, dict) else None
        if missing is None or missing:
            raise ValueError(
                f"setting record {f} is not a circuitfind setting record "
                + ("(not a JSON object)" if missing is None else f"(no {', '.join(missing)})")
            )
        not_text = [k for k in TEXT_FIELDS if not isinstance(record[k], str)]
        if not_text:
            raise ValueError(f"setting record {f}: {', '.join(not_text)} not a string")
        if listed is None or record["setting"] in listed:
            records.append(record)
    if not records:
        raise FileNotFoundError(f"none of the circuit records in {run_dir / 'circuits'} is listed in its {MANIFEST}")
    for record in records:
        for field in ("graphml", "json", "per_prompt"):
            if record.get(field):
                record[field] = str(resolve_in_run(run_dir, record[field]))
    return records


def missing_records(run_dir: str | Path) -> list[str]:
    """The settings a finished run's manifest lists as done whose record file is gone (deleted or moved)."""
    manifest = read_manifest(run_dir)
    try:
        listed = [r["setting"] for r in manifest["settings"]]
    except (KeyError, TypeError):
        return []
    circuits = Path(run_dir) / "circuits"
    return sorted(n for n in listed if isinstance(n, str) and not (circuits / f"{Path(n).name}.json").is_file())


def resolve_in_run(run_dir: str | Path, recorded: str) -> Path:
    """A file named by a record, inside ``run_dir``. Paths relative to the run folder are taken as
    they are; absolute paths (records of older versions) and paths leading out of the folder are
    looked up by file name in ``run_dir/circuits``."""
    path = Path(recorded)
    if path.is_absolute() or ".." in path.parts:
        path = Path("circuits") / path.name
    return Path(run_dir) / path
