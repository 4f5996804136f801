"""Pickles can run code: no unrestricted ``torch.load`` anywhere, and model folders whose weights
are only pickled are refused."""

import ast
from pathlib import Path

import pytest
import torch

from circuitfind import errors
from circuitfind.cli import main
from circuitfind.models.loading import load_model

REPO = Path(__file__).resolve().parents[1]


def _torch_load_calls_without_weights_only(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            if not safe:
                lines.append(node.lineno)
    return lines


def test_every_torch_load_uses_weights_only():
    files = [p for folder in ("src", "flows", "tests", "benchmarks") for p in (REPO / folder).rglob("*.py")]
    assert len(files) > 20
    offenders = {str(p.relative_to(REPO)): lines for p in files if (lines := _torch_load_calls_without_weights_only(p))}
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_the_ast_check_finds_an_unsafe_call(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\nx = torch.load('a.pt')\ny = torch.load('b.pt', weights_only=False)\nz = torch.load('c.pt', weights_only=True)\n"
    )
    assert _torch_load_calls_without_weights_only(bad) == [2, 3]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A real tiny Llama whose weights are a pickle (``pytorch_model.bin``, no safetensors), with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from circuitfind.models.zoo.train import build_tokenizer, task_words
    from circuitfind.tasks.batch import load_task

    folder = tmp_path_factory.mktemp("pickled-llama")
    tokenizer = build_tokenizer(task_words(load_task("ioi")))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # What save_pretrained(safe_serialization=False) wrote before transformers 5 (which always writes
    # safetensors) and what older hub repos hold: the config and a pickled state dict.
    config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tokenizer.save_pretrained(folder)
    return folder, model


def test_pickled_model_folder_is_refused(tiny_llama):
    folder, _ = tiny_llama
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    with pytest.raises(errors.UnsafeModelError) as info:
        load_model(folder, device="cpu")
    message = str(info.value)
    assert "pytorch_model.bin" in message and "pickle" in message and "safetensors" in message
    assert isinstance(info.value, errors.CircuitfindError)


def test_pickled_model_folder_is_one_line_in_the_cli(tiny_llama, capsys):
    folder, _ = tiny_llama
    assert main(["evaluate", "--model", str(folder), "-n", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitfind: error: ") and err.count("\n") == 1 and "pickle" in err


def test_the_converted_folder_loads(tiny_llama, tmp_path):
    """The fix the message suggests (safetensors) works on the same model."""
    folder, model = tiny_llama
    converted = tmp_path / "converted"
    model.save_pretrained(converted, safe_serialization=True)
    assert (converted / "model.safetensors").is_file()
    for f in folder.iterdir():
        if f.suffix != ".bin" and not (converted / f.name).exists():
            (converted / f.name).write_bytes(f.read_bytes())
    bridge = load_model(converted, device="cpu")
    assert bridge.cfg.n_layers == 1 and bridge.cfg.n_heads == 2
