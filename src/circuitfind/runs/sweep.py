"""One discovery under one setting, with results cached by their inputs.

A :class:`Setting` is one point of the sweep grid (model, task, algorithm, corruption, metric,
direction); :class:`SweepConfig` holds the grid and the shared parameters. :func:`run_setting`
discovers the circuit, measures its faithfulness (and the faithfulness curve of scored
algorithms), and writes ``circuits/<setting>.graphml``, ``.json`` and, for EAP/EAP-IG,
``.per_prompt.pt`` (per-prompt edge scores for bootstrap intervals) under the run folder.

Results are cached in ``<outputs>/.cache/<key>/`` where ``key`` hashes everything that changes a
result: the setting, the shared parameters, every file of the model's folder, the task spec's
content and the package's source code. A rerun, or a crashed sweep started again, copies finished
settings from the cache instead of recomputing them. Each entry carries the sha256 of its files
(``checksums.json``, written last); an entry that does not match is recomputed, never served. A
per-setting file lock lets concurrent sweeps share the cache and compute each setting once.

Records in a run folder name their files relative to the run folder, so the folder can be moved
or copied; :func:`load_records` resolves them inside the folder it reads.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import product
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

import circuitfind
from circuitfind import patching as P
from circuitfind import progress
from circuitfind.circuits.graph import edge_count
from circuitfind.errors import CircuitfindError, TaskError
from circuitfind.io import to_json, write_bytes, write_json
from circuitfind.methods import discover as D
from circuitfind.methods import registry
from circuitfind.models.catalogue import load_model, locate_model, resolve_model_path
from circuitfind.models.loading import check_device, device_type
from circuitfind.runs import records
from circuitfind.tasks import datasets, multitoken
from circuitfind.tasks.batch import MAX_PROMPTS, TaskBatch, generate_prompts, load_task
from circuitfind.tasks.corruptions import get_corruption, no_key_tokens
from circuitfind.tasks.metrics import get_metric, metric_fingerprint

log = logging.getLogger(__name__)

# a run folder's records are read without the sweep (runs/records.py); their names stay here too
MANIFEST = records.MANIFEST
RECORD_FIELDS = records.RECORD_FIELDS
TEXT_FIELDS = records.TEXT_FIELDS
load_records = records.load_records
missing_records = records.missing_records
read_manifest = records.read_manifest
resolve_in_run = records.resolve_in_run


class Setting(BaseModel):
    """One point of a sweep."""

    model: str
    task: str
    algorithm: str
    corruption: str
    metric: str
    direction: P.Direction

    @property
    def name(self) -> str:
        """The setting's file name: its parts joined by ``__``. A part that is not a plain name (a path, a hub
        name, ``str:<variant>``, one with ``__``) is made readable and given a short hash of its exact text,
        so two distinct inputs (``col/a_b`` and ``col/a/b``) never share a name and lose a result."""
        parts = [self.model, task_label(self.task), self.algorithm, self.corruption, self.metric, self.direction]
        return "__".join(map(name_part, parts))


_PLAIN_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*(?:_[A-Za-z0-9.+-]+)*")


def name_part(text: str) -> str:
    """``text`` itself when it is a plain name, else a readable form of it plus ``-`` and 8 hex digits of its sha256."""
    if _PLAIN_PART.fullmatch(text):
        return text
    readable = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.+-]", "_", text.replace(":", "-"))).strip("_.")
    return f"{readable or 'x'}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


class SweepConfig(registry.all_options()):  # type: ignore[misc]  # the methods' options, from the registry
    """The grid of a sweep and the parameters shared by all its settings.

    Values are validated when the config is built (pydantic); :meth:`check` also resolves the names
    (models, tasks, STR variants), so a command can refuse a grid that cannot run before it starts."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=lambda: ["toy-ioi"], min_length=1)
    tasks: list[str] = Field(default_factory=lambda: ["ioi"], min_length=1)
    algorithms: list[str] = Field(default_factory=lambda: ["eap", "eap_ig", "acdc", "node"], min_length=1)
    corruptions: list[str] = Field(default_factory=lambda: ["str", "gn", "resample", "mean"], min_length=1)
    metrics: list[str] = Field(default_factory=lambda: ["logit_diff", "kl"], min_length=1)
    directions: list[str] = Field(default_factory=lambda: ["noise", "denoise"], min_length=1)
    prompts: int = Field(32, ge=1, le=MAX_PROMPTS, description="prompts per setting")
    seed: int = Field(0, description="prompt sampling seed")
    max_batch: int = Field(512, ge=1, description="prompts x copies per forward pass")
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("models", "tasks", "algorithms", "corruptions", "metrics", "directions")
    @classmethod
    def _distinct(cls, values: list[str]) -> list[str]:
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{', '.join(map(repr, repeated))} given twice")
        return values

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, values: list[str]) -> list[str]:
        for a in values:
            registry.get_method(a)  # a built-in name, an installed method, or package.module:Class
        return values

    @field_validator("corruptions")
    @classmethod
    def _known_corruptions(cls, values: list[str]) -> list[str]:
        for c in values:
            get_corruption(c)  # raises for unknown kinds; STR variants are checked against the tasks by check()
        return values

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, values: list[str]) -> list[str]:
        for m in values:
            get_metric(m)
        return values

    @field_validator("directions")
    @classmethod
    def _known_directions(cls, values: list[str]) -> list[str]:
        for d in values:
            if d not in ("noise", "denoise"):
                raise ValueError(f"unknown direction {d!r}; choose from noise, denoise")
        return values

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        if value is not None:
            device_type(value)  # a name torch knows; whether it is present is check()'s question
        return value

    def check(self, device_here: bool = True) -> SweepConfig:
        """Resolve the grid's names without loading a model: every model is found (shipped, fetched, a local
        folder, or the hub when online), every task loads and has each ``str:<variant>`` asked for, the
        device exists (on this machine, unless ``device_here`` is False: the settings run on other machines,
        whose workers check it). Raises the first problem (``ModelNotFoundError``, ``TaskError``,
        ``ValueError``); returns the config."""
        self.settings()  # two settings that would share a name are refused here, before any starts
        for name in self.models:
            located = locate_model(name)
            if any(registry.get_method(a).keeps_top_k() for a in self.algorithms):
                edges = model_edge_count(located)
                if edges is not None and self.top_k > edges:
                    raise ValueError(
                        f"--top-k: must be at most the {edges} edges of model {name!r}'s graph (got {self.top_k})"
                    )
        for spec in map(load_task, self.tasks):
            if spec.kind == "dataset":  # its rows are read and checked now, before anything starts
                generate_prompts(spec, self.prompts, self.seed)
            if spec.answer_tokens == "multi":
                multitoken.check_grid(spec.name, self.algorithms, self.metrics)
            for c in self.corruptions:
                kind, _, variant = c.partition(":")
                if kind == "gn" and not spec.key_tokens:
                    raise TaskError(no_key_tokens(spec.name))
                if kind != "str":
                    continue
                if not spec.str_variants:
                    raise TaskError(f"corruption {c!r}: task {spec.name!r} defines no STR variants")
                if (variant or spec.default_str) not in spec.str_variants:
                    raise TaskError(
                        f"corruption {c!r}: task {spec.name!r} has no STR variant {variant or spec.default_str!r} "
                        f"(its variants: {', '.join(spec.str_variants)})"
                    )
        if not device_here:
            return self
        kind = device_type(check_device(self.device)) if self.device is not None else None
        if self.dtype == "float16" and kind != "cuda" and not (kind is None and torch.cuda.is_available()):
            raise ValueError("dtype 'float16' runs on a GPU only (on CPU use bfloat16 or float32)")
        return self

    def settings(self) -> list[Setting]:
        """Every valid combination (ACDC runs in the noising direction only)."""
        for a in self.algorithms:
            registry.get_method(a)
        grid = product(self.models, self.tasks, self.algorithms, self.corruptions, self.metrics, self.directions)
        settings = [
            Setting(model=m, task=t, algorithm=a, corruption=c, metric=mt, direction=d)
            for m, t, a, c, mt, d in grid
            if D.allows_direction(a, d)
        ]
        seen: dict[str, Setting] = {}
        for s in settings:  # names are files of the run folder: two settings with one name would lose a result
            other = seen.setdefault(s.name, s)
            if other is not s:
                raise ValueError(
                    f"settings {other.model_dump()} and {s.model_dump()} would share the name {s.name!r}; "
                    "rename a model folder or a task file"
                )
        return settings

    def method_options(self, algorithm: str) -> dict:
        """The options of ``algorithm``'s method, from this config (a method's own fields at their defaults)."""
        return registry.get_method(algorithm).options(self.model_dump()).model_dump()

    def shared(self) -> dict:
        """Parameters that change results (everything but the grid and the device)."""
        return self.model_dump(
            exclude={"models", "tasks", "algorithms", "corruptions", "metrics", "directions", "device"}
        )


def model_edge_count(located: str) -> int | None:
    """The edge count of a model's graph from its ``config.json`` (GPT-2 and Llama-style names), without
    loading it; ``None`` when the config is not here (a hub model not yet cached) or names no shape."""
    path = Path(located) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(located, "config.json")
        except Exception:  # a malformed repo id is simply "not cached"
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        config = json.loads(path.read_text())
        layers = config.get("n_layer", config.get("num_hidden_layers"))
        heads = config.get("n_head", config.get("num_attention_heads"))
        kv = config.get("num_key_value_heads") or heads
    except (OSError, ValueError, AttributeError):
        return None  # the model loader names a damaged config; this check only bounds top_k
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (layers, heads, kv)):
        return None
    return edge_count(layers, heads, n_kv_heads=kv)


def _file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, inode, size, mtime) so a large weights file is hashed once per process."""
    stat = path.stat()
    stamp = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        if stamp in _file_hashes:
            return _file_hashes[stamp]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    with _hash_lock:
        _file_hashes[stamp] = digest.hexdigest()
    return digest.hexdigest()


_file_hashes: dict[tuple, str] = {}
_hash_lock = threading.Lock()


def _folder_sha256(folder: Path, pattern: str = "*") -> str:
    """One hash over the names and contents of every file in ``folder`` (hidden files and ``__pycache__`` aside)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob(pattern)):
        parts = path.relative_to(folder).parts
        if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in parts):
            digest.update(f"{'/'.join(parts)}\0{_file_sha256(path)}\0".encode())
    return digest.hexdigest()


def model_fingerprint(model_name: str) -> dict[str, str | None]:
    """What identifies a model's results: a hash of every file of a local folder (weights in any
    format, config, tokenizer), or for a hub model its name and, when cached, the revision."""
    path = Path(resolve_model_path(model_name))
    if path.is_dir():
        return {"files": _folder_sha256(path)}
    return {"hub": model_name, "revision": _hub_revision(model_name)}


def _hub_revision(name: str) -> str | None:
    """The commit of the hub model's cached snapshot (``.../snapshots/<commit>/config.json``), if any."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # a malformed repo id is simply "not cached"
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def task_fingerprint(task_name: str) -> str:
    """A hash of the task spec's content (as parsed: layout changes do not count); for a dataset file,
    of its bytes (``sha256`` in the spec) and options, not of where it lies."""
    spec = load_task(task_name)
    data = {k: v for k, v in spec.data.items() if not (spec.kind == "dataset" and k == "file")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def task_label(task: str) -> str:
    """How records and setting names call a task: its name, or for a dataset file its file name and
    the start of its content hash (``pairs.jsonl-1a2b3c4d5e``), never a mangled path."""
    path = Path(task)
    if not datasets.is_dataset_file(path):
        return task
    stat = path.stat()
    return _dataset_label(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _dataset_label(path: str, mtime_ns: int, size: int) -> str:
    spec = load_task(path)
    return f"{Path(path).name}-{spec.data['sha256'][:10]}"


@functools.cache
def package_fingerprint() -> str:
    """A hash of the installed package's source files, computed once per process: code changes
    change results even when the version string stays the same."""
    return _folder_sha256(Path(circuitfind.__file__).resolve().parent, "*.py")


def cache_key(setting: Setting, config: SweepConfig) -> str:
    """A hash of everything that changes a setting's result: the setting, the shared parameters,
    the model's files, the task spec, the source of a metric given by import path and the package's code."""
    blob = json.dumps(
        {
            "setting": {**setting.model_dump(), "task": task_label(setting.task)},  # a dataset by content
            "shared": {k: v for k, v in config.shared().items() if k not in registry.option_fields()},
            "options": config.method_options(setting.algorithm),  # the method's own: another's leave the key alone
            "model": model_fingerprint(setting.model),
            "task": task_fingerprint(setting.task),
            "metric": metric_fingerprint(setting.metric),  # a metric given by import path: its source
            "method": registry.method_fingerprint(setting.algorithm),  # likewise a method of the user's
            "code": package_fingerprint(),
            "version": circuitfind.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ModelPool:
    """Loaded models shared by the threads of one process.

    Hooks live on the model object, so a model is lent to one thread at a time (:meth:`lend`); a thread
    that finds every copy lent out loads another. A Dask worker process (one thread) therefore loads a
    model once and reuses it for every setting it runs; the thread runner holds one copy per thread.
    A copy whose model files have changed since it was loaded is dropped and loaded again."""

    def __init__(self) -> None:
        self._idle: dict[tuple, list[tuple[dict, object]]] = {}
        self._lock = threading.Lock()
        self.loads = 0  # models loaded by this process (reported with each setting)

    @contextmanager
    def lend(self, name: str, device: str | None, dtype: str = "float32") -> Iterator[object]:
        key = (name, device, dtype)
        fingerprint = model_fingerprint(name)
        with self._lock:
            idle = self._idle.setdefault(key, [])
            idle[:] = [(f, m) for f, m in idle if f == fingerprint]
            copy = idle.pop() if idle else None
        if copy is None:
            copy = (fingerprint, load_model(name, device=device, dtype=dtype))
            with self._lock:
                self.loads += 1
        try:
            yield copy[1]
        finally:
            with self._lock:
                self._idle.setdefault(key, []).append(copy)


MODELS = ModelPool()


def compute_setting(setting: Setting, config: SweepConfig) -> tuple[dict, D.Circuit, torch.Tensor | None]:
    """Discover the circuit of one setting with a model lent by this process's :data:`MODELS`."""
    with MODELS.lend(setting.model, config.device, config.dtype) as model:
        return _compute_setting(model, setting, config)


def _compute_setting(model, setting: Setting, config: SweepConfig) -> tuple[dict, D.Circuit, torch.Tensor | None]:
    """Discover the circuit of one setting; return its record, the circuit and per-prompt scores."""
    start = time.time()
    task = load_task(setting.task)
    batch = TaskBatch.build(model, task, config.prompts, seed=config.seed)
    progress.stage("baselines")  # to the flow's run logger (circuitfind.progress.stages); the search stages follow
    setup = P.prepare(model, batch, setting.corruption, setting.metric, max_batch=config.max_batch)
    method = registry.get_method(setting.algorithm)
    options = config.method_options(setting.algorithm)
    found = D.discover(setup, setting.algorithm, setting.direction, options, per_prompt=method.per_prompt)
    circuit, per_prompt = found.circuit, found.per_prompt
    # strict JSON has no NaN: an undefined faithfulness is null, with the reason beside it
    faith, faith_status = found.faithfulness, found.faithfulness_status
    curve = found.curve.as_dict() if found.curve else None
    circuit.settings.update(setting.model_dump())
    record = {
        "setting": setting.name,
        **setting.model_dump(),
        "task": task_label(setting.task),
        "examples": [  # a few of the task's rows, shown by the report
            {
                "clean": q.text,
                "corrupted": q.corrupted.get(batch.task.default_str) if batch.task.str_variants else None,
                "answers": list(q.answer_set),
                "counter_answers": list(q.counter_answer_set),
            }
            for q in batch.prompts[:3]
        ],
        "n_prompts": batch.size,  # prompts, not the teacher-forced rows of multi-token answers
        "clean": setup.clean_value,
        "corrupt": setup.corrupt_value,
        "n_layers": setup.n_layers,
        "n_heads": setup.n_heads,
        "n_kv_heads": circuit.graph.n_kv_heads,
        "graph_edges": circuit.graph.n_edges,
        "n_edges": circuit.n_edges,
        "edges": [list(e) for e in circuit.edges],
        "nodes": sorted(circuit.nodes),
        "scores": circuit.scores.tolist() if circuit.scores is not None else None,
        "faithfulness": faith,
        "faithfulness_status": faith_status,
        "curve": curve,
        "corruption_free": not method.needs_corruption,  # IFR: the corruption only scores the circuit
        "method": {"name": method.name, "paper": method.paper, "summary": method.summary},  # for the report
        "seconds": round(time.time() - start, 2),
    }
    return record, circuit, per_prompt


RUN_MARKER = ".circuitfind-run"  # written by the flow into the run folder before any setting starts


class WorkerError(CircuitfindError, RuntimeError):
    """A worker cannot run a setting: it does not see or cannot write the shared folders, or lacks the device."""


def _where() -> str:
    return f"the worker on host {socket.gethostname()!r} (process {os.getpid()})"


def mark_run_folder(run_dir: str | Path, cache_dir: str | Path) -> None:
    """Create the run folder and the cache and mark the run folder (:data:`RUN_MARKER`), so that workers can
    tell that they see the same folders as the flow (:func:`check_worker`)."""
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(run_dir) / RUN_MARKER, {"host": socket.gethostname(), "pid": os.getpid()})


def check_worker(setting: Setting, config: SweepConfig, run_dir: str | Path, cache_dir: str | Path) -> None:
    """Fail early, with a message naming the worker, when this process cannot run ``setting``: the run folder
    the flow marked is not visible here (outputs on a filesystem the worker does not share), the run folder or
    the cache cannot be written, or the setting asks for a CUDA device this machine does not have."""
    run_dir, cache_dir = Path(run_dir), Path(cache_dir)
    if config.device is not None and torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise WorkerError(
            f"setting {setting.name} runs on {config.device!r} but {_where()} has no CUDA device: "
            "give the GPU resource only to workers on machines with a GPU (dask worker --resources GPU=1)"
        )
    if not (run_dir / RUN_MARKER).is_file():
        raise WorkerError(
            f"{_where()} does not see the run folder {run_dir} that the flow created: outputs and "
            "cache must be on a filesystem every worker shares, at the same path (--outputs)"
        )
    for folder in (run_dir / "circuits", cache_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise WorkerError(
                f"{_where()} cannot write {folder} ({err.strerror or err}): outputs and cache must be "
                "writable by every worker"
            ) from None


def worker_info() -> dict:
    """Where a setting ran, for the manifest: host, process and how many models that process has loaded."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "models_loaded": MODELS.loads}


ENTRY_FILES = ("record.json", "circuit.graphml", "per_prompt.pt")
CHECKSUMS = "checksums.json"  # the entry's manifest: written last, its presence means the entry is complete


def run_setting(setting: Setting, config: SweepConfig, run_dir: str | Path, cache_dir: str | Path) -> dict:
    """Compute (or fetch from the cache) one setting and write its files under ``run_dir/circuits``.

    A cache entry is used only when every file matches the checksum written with it; a missing,
    truncated or edited file is logged and the setting recomputed. A per-setting lock
    (``<cache>/<key>.lock``) makes concurrent sweeps, in any process, compute a setting once: the
    others wait, then copy the finished entry. The record written into the run folder names its
    files relative to the run folder; the returned summary gives them as paths under ``run_dir``.
    """
    key = cache_key(setting, config)
    entry = Path(cache_dir) / key
    files = _read_entry(entry, setting.name, quiet=True)
    from_cache = files is not None
    if files is None:
        with _entry_lock(Path(cache_dir), key, setting.name):
            files = _read_entry(entry, setting.name)  # another process may have finished it meanwhile
            from_cache = files is not None
            if files is None:
                files = _compute_entry(setting, config, entry, key)
    record = json.loads(files["record.json"])
    names = {
        "graphml": f"{setting.name}.graphml",
        "json": f"{setting.name}.json",
        "per_prompt": f"{setting.name}.per_prompt.pt" if "per_prompt.pt" in files else None,
    }
    run_dir = Path(run_dir)
    out = run_dir / "circuits"
    write_bytes(out / names["graphml"], files["circuit.graphml"])
    if names["per_prompt"]:
        write_bytes(out / names["per_prompt"], files["per_prompt.pt"])
    record.update({k: f"circuits/{v}" if v else None for k, v in names.items()}, from_cache=from_cache)
    write_json(out / names["json"], record)
    summary = {k: record[k] for k in ("setting", "from_cache", "n_edges", "faithfulness")}
    summary["faithfulness_status"] = record.get("faithfulness_status", "ok")
    return {**summary, **{k: str(out / v) if v else None for k, v in names.items()}}


def describe(summary: dict) -> str:
    """One line for the log: edges, faithfulness (or why there is none), cached or not."""
    faith = summary.get("faithfulness")
    text = (
        f"faithfulness {faith:.3f}" if faith is not None else f"no faithfulness ({summary.get('faithfulness_status')})"
    )
    return f"{summary['n_edges']} edges, {text}{' (cached)' if summary['from_cache'] else ''}"


def _compute_entry(setting: Setting, config: SweepConfig, entry: Path, key: str) -> dict[str, bytes]:
    """Compute the setting and write its cache entry: the files, then their checksums last."""
    record, circuit, per_prompt = compute_setting(setting, config)
    if entry.is_symlink() or (entry.exists() and not entry.is_dir()):  # damage like any other: replaced, not fatal
        log.warning("cache entry %s of setting %s is not a folder; replacing it", entry, setting.name)
        entry.unlink()
    (entry / CHECKSUMS).unlink(missing_ok=True)  # the entry is incomplete until its files are rewritten
    circuit.save(entry / "circuit.graphml")
    files = {"circuit.graphml": (entry / "circuit.graphml").read_bytes()}
    if per_prompt is not None:
        buffer = io.BytesIO()
        torch.save(per_prompt.cpu(), buffer)
        files["per_prompt.pt"] = buffer.getvalue()
        write_bytes(entry / "per_prompt.pt", files["per_prompt.pt"])
    files["record.json"] = to_json({**record, "key": key}).encode()
    write_bytes(entry / "record.json", files["record.json"])
    write_json(entry / CHECKSUMS, {"sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}})
    return files


def _read_entry(entry: Path, setting_name: str, quiet: bool = False) -> dict[str, bytes] | None:
    """The files of a complete cache entry whose checksums match, or None (logged unless ``quiet``)."""

    def damaged(problem: str) -> None:
        if not quiet:
            log.warning("cache entry %s of setting %s: %s; recomputing the setting", entry, setting_name, problem)

    if not entry.is_dir():
        return None
    try:
        checksums = json.loads((entry / CHECKSUMS).read_text())["sha256"]
    except FileNotFoundError:
        damaged(f"{CHECKSUMS} is missing (an interrupted computation or an older version's entry)")
        return None
    except (ValueError, KeyError, TypeError):
        damaged(f"{CHECKSUMS} is unreadable")
        return None
    if not (isinstance(checksums, dict) and {"record.json", "circuit.graphml"} <= set(checksums) <= set(ENTRY_FILES)):
        damaged(f"{CHECKSUMS} does not list the entry's files")
        return None
    files = {}
    for name, expected in checksums.items():
        try:
            data = (entry / name).read_bytes()
        except FileNotFoundError:
            damaged(f"{name} is missing")
            return None
        if hashlib.sha256(data).hexdigest() != expected:
            damaged(f"{name} does not match its checksum (truncated or edited)")
            return None
        files[name] = data
    return files


@contextmanager
def _entry_lock(cache_dir: Path, key: str, setting_name: str) -> Iterator[None]:
    """Hold ``<cache>/<key>.lock`` exclusively (``flock``: across processes and threads alike)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{key}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("setting %s is being computed by another sweep: waiting for it", setting_name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


RUN_LOCK = ".circuitfind-lock"  # in the run folder: who sweeps into it now, with which grid and parameters


class RunLockedError(CircuitfindError, ValueError):
    """Another live sweep with a different grid or other parameters writes into the run folder."""


def _lock_content(config: SweepConfig) -> dict:
    """What two sweeps must share to write into one run folder at once: the grid and the shared parameters."""
    return json.loads(to_json(config.model_dump(exclude={"device"})))


def _refuse_holder(run_dir: Path, fh, config: SweepConfig) -> None:
    """Raise when the lock file's holder sweeps another grid or other parameters than ``config``."""
    fh.seek(0)
    try:
        holder = json.loads(fh.read() or b"{}")
    except ValueError:
        holder = {}
    if not isinstance(holder, dict) or holder.get("config") != _lock_content(config):
        theirs = holder.get("config") if isinstance(holder, dict) and isinstance(holder.get("config"), dict) else {}
        ours = _lock_content(config)
        changed = sorted(k for k in ours if k in theirs and theirs[k] != ours[k])
        what = f" ({', '.join(f'{k} {theirs[k]!r}, here {ours[k]!r}' for k in changed)})" if changed else ""
        pid = holder.get("pid", "?") if isinstance(holder, dict) else "?"
        raise RunLockedError(
            f"run folder {run_dir} is being written by another sweep (process {pid}) with other parameters{what}; "
            "wait for it or choose another --run"
        )


def check_run_lock(run_dir: str | Path, config: SweepConfig) -> None:
    """Refuse, before anything starts, a run folder a live sweep with other parameters holds (:func:`run_lock`)."""
    path = Path(run_dir) / RUN_LOCK
    try:
        fh = open(path, "rb")
    except OSError:  # no lock file (or no run folder yet): nobody holds it
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a live sweep
            _refuse_holder(Path(run_dir), fh, config)
        else:
            fcntl.flock(fh, fcntl.LOCK_UN)  # a stale file of a finished or dead sweep: free


@contextmanager
def run_lock(run_dir: str | Path, config: SweepConfig) -> Iterator[None]:
    """Hold the run folder for this sweep: ``<run>/.circuitfind-lock`` records its pid, grid and parameters.

    Sweeps of the same grid and parameters share the folder (they resume one run, and the cache computes
    each setting once); one with a different grid or other parameters is refused (:class:`RunLockedError`),
    else it would replace the first run's manifest and report. Liveness is the kernel's ``flock``: a lock
    file left by a dead sweep is not held, so it is taken over. The first holder writes the file under an
    exclusive lock, then every holder keeps a shared one and checks the content it holds."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RUN_LOCK, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live holder: wait until it has written the file, then compare
            fcntl.flock(fh, fcntl.LOCK_SH)
        else:
            fh.seek(0)
            fh.truncate()
            fh.write(
                to_json({"pid": os.getpid(), "host": socket.gethostname(), "config": _lock_content(config)}).encode()
            )
            fh.flush()
            os.fsync(fh.fileno())
            fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            _refuse_holder(run_dir, fh, config)  # also catches one that took the lock over while we converted ours
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_run_folder(run_dir: str | Path, settings: list[Setting], config: SweepConfig | None = None) -> None:
    """Refuse to sweep into a run folder that holds settings of another grid, or (with ``config``)
    a finished run made with other shared parameters: reusing a run name resumes that run, it never
    mixes two grids in one folder and one report, nor silently replaces a finished run."""
    earlier = (read_manifest(run_dir) or {}).get("config") if config is not None else None
    if config is not None and isinstance(earlier, dict):
        now = config.shared()
        changed = sorted(k for k, v in now.items() if k in earlier and earlier[k] != v)
        if changed:
            raise ValueError(
                f"run folder {run_dir} was made with other parameters "
                f"({', '.join(f'{k} {earlier[k]!r} -> {now[k]!r}' for k in changed)}); choose another --run"
            )
    existing = {f.stem for f in (Path(run_dir) / "circuits").glob("*.json")}
    foreign = sorted(existing - {s.name for s in settings})
    if foreign:
        raise ValueError(
            f"run folder {run_dir} holds settings of another grid ({len(foreign)}, e.g. {foreign[0]}); "
            "reuse a run name only to resume the same grid, or choose another --run"
        )
