"""One discovery under one setting, with results cached by their inputs.

A :class:`Setting` is one point of the sweep grid (model, task, algorithm, corruption, metric,
direction); :class:`SweepConfig` holds the grid and the shared parameters. :func:`run_setting`
discovers the circuit, measures its faithfulness (and the faithfulness curve of scored
algorithms), and writes ``circuits/<setting>.graphml``, ``.json`` and, for EAP/EAP-IG,
``.per_prompt.pt`` (per-prompt edge scores for bootstrap intervals) under the run folder.

Results are cached in ``<outputs>/.cache/<key>/`` where ``key`` hashes the setting, the shared
parameters, the model's weights file and the package version: a rerun, or a crashed sweep started
again, copies finished settings from the cache instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from itertools import product
from pathlib import Path

import torch
from pydantic import BaseModel, Field

import circuitfind
from circuitfind import discovery as D
from circuitfind import patching as P
from circuitfind.edges import EdgePatcher
from circuitfind.io import write_bytes, write_json
from circuitfind.models import load_model, resolve_model_path
from circuitfind.tasks import TaskBatch, load_task


class Setting(BaseModel):
    """One point of a sweep."""

    model: str
    task: str
    algorithm: str
    corruption: str
    metric: str
    direction: str

    @property
    def name(self) -> str:
        parts = [self.model, self.task, self.algorithm, self.corruption, self.metric, self.direction]
        return "__".join(p.replace(":", "-").replace("/", "_") for p in parts)


class SweepConfig(BaseModel):
    """The grid of a sweep and the parameters shared by all its settings."""

    models: list[str] = Field(default_factory=lambda: ["toy-ioi"])
    tasks: list[str] = Field(default_factory=lambda: ["ioi"])
    algorithms: list[str] = Field(default_factory=lambda: ["eap", "eap_ig", "acdc", "node"])
    corruptions: list[str] = Field(default_factory=lambda: ["str", "gn", "resample", "mean"])
    metrics: list[str] = Field(default_factory=lambda: ["logit_diff", "kl"])
    directions: list[str] = Field(default_factory=lambda: ["noise", "denoise"])
    prompts: int = 32
    seed: int = 0
    acdc_tau: float = 0.02
    top_k: int = 20
    ig_steps: int = 5
    path_depth: int = 2
    path_k: float = 1.0
    node_k: float = 2.0
    max_batch: int = 512
    device: str | None = None
    dtype: str = "float32"

    def settings(self) -> list[Setting]:
        """Every valid combination (ACDC runs in the noising direction only)."""
        for a in self.algorithms:
            if a not in D.ALGORITHMS:
                raise ValueError(f"unknown algorithm {a!r}; choose from {D.ALGORITHMS}")
        grid = product(self.models, self.tasks, self.algorithms, self.corruptions, self.metrics, self.directions)
        return [Setting(model=m, task=t, algorithm=a, corruption=c, metric=mt, direction=d)
                for m, t, a, c, mt, d in grid if not (a == "acdc" and d != "noise")]

    def shared(self) -> dict:
        """Parameters that change results (everything but the grid and the device)."""
        return self.model_dump(exclude={"models", "tasks", "algorithms", "corruptions", "metrics", "directions", "device"})


def _fingerprint(model_name: str) -> str:
    """The weights file's hash for local models, else the name (hub models are pinned by name)."""
    path = Path(resolve_model_path(model_name))
    weights = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not weights:
        return model_name
    digest = hashlib.sha256()
    for w in weights:
        digest.update(w.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(setting: Setting, config: SweepConfig) -> str:
    blob = json.dumps({"setting": setting.model_dump(), "shared": config.shared(), "model": _fingerprint(setting.model),
                       "version": circuitfind.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# Hooks live on the model object: each thread (task-runner worker) patches its own copy.
_local = threading.local()


def _model(name: str, device: str | None, dtype: str = "float32"):
    cache = _local.__dict__.setdefault("models", {})
    if (name, device, dtype) not in cache:
        cache[(name, device, dtype)] = load_model(name, device=device, dtype=dtype)
    return cache[(name, device, dtype)]


def compute_setting(setting: Setting, config: SweepConfig) -> tuple[dict, "D.Circuit", torch.Tensor | None]:
    """Discover the circuit of one setting; return its record, the circuit and per-prompt scores."""
    start = time.time()
    model = _model(setting.model, config.device, config.dtype)
    task = load_task(setting.task)
    batch = TaskBatch.build(model, task, config.prompts, seed=config.seed)
    setup = P.prepare(model, batch, setting.corruption, setting.metric, max_batch=config.max_batch)
    circuit, per_prompt = D.discover(
        setup, setting.algorithm, setting.direction, acdc_tau=config.acdc_tau, top_k=config.top_k,
        ig_steps=config.ig_steps, path_depth=config.path_depth, path_k=config.path_k, node_k=config.node_k,
        per_prompt=setting.algorithm in ("eap", "eap_ig"),
    )
    direction = setting.direction if setting.algorithm != "acdc" else "noise"
    patcher = EdgePatcher(setup, circuit.graph, direction=direction)
    faith = D.faithfulness(patcher, circuit) if circuit.n_edges else float("nan")
    curve = None
    if setting.algorithm in ("eap", "eap_ig", "acdc") and circuit.scores is not None:
        curve = D.faithfulness_curve(patcher, circuit.scores).as_dict()
    circuit.settings.update(setting.model_dump())
    record = {
        "setting": setting.name, **setting.model_dump(), "n_prompts": setup.batch.size,
        "clean": setup.clean_value, "corrupt": setup.corrupt_value,
        "n_layers": setup.n_layers, "n_heads": setup.n_heads, "n_kv_heads": circuit.graph.n_kv_heads,
        "graph_edges": circuit.graph.n_edges,
        "n_edges": circuit.n_edges, "edges": [list(e) for e in circuit.edges], "nodes": sorted(circuit.nodes),
        "scores": circuit.scores.tolist() if circuit.scores is not None else None,
        "faithfulness": faith, "curve": curve, "seconds": round(time.time() - start, 2),
    }
    return record, circuit, per_prompt


def run_setting(setting: Setting, config: SweepConfig, run_dir: str | Path, cache_dir: str | Path) -> dict:
    """Compute (or fetch from the cache) one setting and write its files under ``run_dir/circuits``."""
    key = cache_key(setting, config)
    cached = Path(cache_dir) / key
    out = Path(run_dir) / "circuits"
    files = {"graphml": out / f"{setting.name}.graphml", "json": out / f"{setting.name}.json",
             "per_prompt": out / f"{setting.name}.per_prompt.pt"}
    if not (cached / "record.json").is_file():  # record.json is written last: its presence means complete
        record, circuit, per_prompt = compute_setting(setting, config)
        circuit.save(cached / "circuit.graphml")
        if per_prompt is not None:
            buffer = io.BytesIO()
            torch.save(per_prompt.cpu(), buffer)
            write_bytes(cached / "per_prompt.pt", buffer.getvalue())
        write_json(cached / "record.json", {**record, "key": key})
        from_cache = False
    else:
        from_cache = True
    record = json.loads((cached / "record.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(files["graphml"], (cached / "circuit.graphml").read_bytes())
    has_per_prompt = (cached / "per_prompt.pt").is_file()
    if has_per_prompt:
        write_bytes(files["per_prompt"], (cached / "per_prompt.pt").read_bytes())
    record.update(graphml=str(files["graphml"]), json=str(files["json"]),
                  per_prompt=str(files["per_prompt"]) if has_per_prompt else None, from_cache=from_cache)
    write_json(files["json"], record)
    return {k: record[k] for k in ("setting", "json", "graphml", "per_prompt", "from_cache", "n_edges", "faithfulness")}


def load_records(run_dir: str | Path) -> list[dict]:
    """Every setting record of a run folder, sorted by setting name."""
    files = sorted((Path(run_dir) / "circuits").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no circuit records in {Path(run_dir) / 'circuits'}: is this a sweep run folder?")
    return [json.loads(f.read_text()) for f in files]
