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
from pydantic import BaseModel, ConfigDict, Field, field_validator

import circuitfind
from circuitfind import discovery as D
from circuitfind import patching as P
from circuitfind.corruptions import get_corruption
from circuitfind.edges import EdgePatcher
from circuitfind.errors import TaskError
from circuitfind.io import write_bytes, write_json
from circuitfind.metrics import get_metric
from circuitfind.models import load_model, locate_model, resolve_model_path
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
    prompts: int = Field(32, ge=1, description="prompts per setting")
    seed: int = Field(0, description="prompt sampling seed")
    acdc_tau: float = Field(0.02, ge=0, allow_inf_nan=False, description="ACDC threshold")
    top_k: int = Field(20, ge=1, description="edges kept by EAP / EAP-IG")
    ig_steps: int = Field(5, ge=1, description="EAP-IG integration steps")
    path_depth: int = Field(2, ge=1, description="path patching depth")
    path_k: float = Field(1.0, ge=0, allow_inf_nan=False, description="path patching detection rule in SDs")
    node_k: float = Field(2.0, ge=0, allow_inf_nan=False, description="node patching detection rule in SDs")
    max_batch: int = Field(512, ge=1, description="prompts x copies per forward pass")
    device: str | None = None

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
            if a not in D.ALGORITHMS:
                raise ValueError(f"unknown algorithm {a!r}; choose from {', '.join(D.ALGORITHMS)}")
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
            try:
                torch.device(value)
            except RuntimeError:
                raise ValueError(f"{value!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
        return value

    def check(self) -> "SweepConfig":
        """Resolve the grid's names without loading a model: every model is found (shipped, fetched, a local
        folder, or the hub when online), every task loads and has each ``str:<variant>`` asked for, the
        device exists. Raises the first problem (``ModelNotFoundError``, ``TaskError``, ``ValueError``);
        returns the config."""
        for name in self.models:
            locate_model(name)
        for spec in map(load_task, self.tasks):
            for c in self.corruptions:
                kind, _, variant = c.partition(":")
                if kind != "str":
                    continue
                if not spec.str_variants:
                    raise TaskError(f"corruption {c!r}: task {spec.name!r} defines no STR variants")
                if (variant or spec.default_str) not in spec.str_variants:
                    raise TaskError(f"corruption {c!r}: task {spec.name!r} has no STR variant {variant or spec.default_str!r} "
                                    f"(its variants: {', '.join(spec.str_variants)})")
        if self.device is not None and torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: no CUDA device is available here")
        return self

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


def _model(name: str, device: str | None):
    cache = _local.__dict__.setdefault("models", {})
    if (name, device) not in cache:
        cache[(name, device)] = load_model(name, device=device)
    return cache[(name, device)]


def compute_setting(setting: Setting, config: SweepConfig) -> tuple[dict, "D.Circuit", torch.Tensor | None]:
    """Discover the circuit of one setting; return its record, the circuit and per-prompt scores."""
    start = time.time()
    model = _model(setting.model, config.device)
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
