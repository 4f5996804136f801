"""Shared fixtures: the shipped toy models and batches, loaded once per session."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread per test process (and its subprocesses): the suite's tensors are small, and on a
# shared 2-core machine extra threads wait on each other (SmolLM2's accuracy test: 14 s with one thread,
# 39 s with two while another process keeps a core busy). CIRCUITFIND_TEST_THREADS overrides it.
TEST_THREADS = int(os.environ.get("CIRCUITFIND_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

from circuitfind.models.loading import load_model  # noqa: E402
from circuitfind.tasks.batch import TaskBatch  # noqa: E402

torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def ioi_model():
    return load_model("toy-ioi", device="cpu")


@pytest.fixture(scope="session")
def induction_model():
    return load_model("toy-induction", device="cpu")


@pytest.fixture(scope="session")
def ioi_batch(ioi_model):
    return TaskBatch.build(ioi_model, "ioi", 24, seed=3)


@pytest.fixture(scope="session")
def induction_batch(induction_model):
    return TaskBatch.build(induction_model, "induction", 24, seed=3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def prefect_harness():
    """One embedded Prefect server for the whole session (it costs seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):  # a fresh database: 15-20 s under load, Prefect allows 30
        yield


@pytest.fixture(scope="session")
def random_gpt2(tmp_path_factory):
    """A small random GPT-2 (3 layers, seed 0) loaded with the GPT-2 tokenizer rebuilt offline; the tests
    that need it skip when that tokenizer is not built."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from circuitfind.models.bpe import tokenizer_dir
    from circuitfind.models.loading import load_model

    if not (tokenizer_dir() / "tokenizer.json").is_file():
        pytest.skip("GPT-2 tokenizer not built: run `circuitfind models fetch gpt2-tokenizer`")
    folder = tmp_path_factory.mktemp("gpt2-random")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=3, n_head=2, n_positions=128)).save_pretrained(folder)
    return load_model(folder, device="cpu", tokenizer="gpt2")


@pytest.fixture(scope="session")
def gqa_model(tmp_path_factory):
    """A small random Llama (grouped-query attention: 4 query heads, 2 key/value heads, RMSNorm,
    rotary positions, gated MLP) with the IOI word-level vocabulary, built offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from circuitfind.models.zoo.train import build_tokenizer, task_words
    from circuitfind.tasks.batch import load_task

    folder = tmp_path_factory.mktemp("tiny-llama-gqa")
    tokenizer = build_tokenizer(task_words(load_task("ioi")))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so patches have visible effects
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(folder, device="cpu")


# --------------------------------------------------------------------------------------------
# `circuitfind sweep` in subprocesses, as a user runs it

TINY_SWEEP = [
    "--algorithms",
    "eap",
    "--corruptions",
    "str",
    "--metrics",
    "logit_diff",
    "--directions",
    "noise",
    "--prompts",
    "8",
]


def sweep_environment(prefect_home) -> dict[str, str]:
    """The environment of a sweep subprocess: its own Prefect home, no configured Prefect server, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PYTHONPATH", "CIRCUITFIND_TASKS_DIR")}
    env.update(
        PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1"
    )
    return env


@pytest.fixture(scope="session")
def sweep_env():
    """``sweep_env(prefect_home)``: the environment of a sweep subprocess."""
    return sweep_environment


@pytest.fixture(scope="session")
def first_sweep(tmp_path_factory):
    """``circuitfind sweep`` (one setting) on a never-used Prefect home: the server's first start creates the
    database. Later subprocess sweeps use this home, whose server then starts in seconds.

    Prefect's own limit for its temporary server (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``,
    20 s by default) is set to 1 s here, as on a machine where the first start takes longer than that
    limit: the sweep must not depend on it."""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    tmp = tmp_path_factory.mktemp("first-sweep")
    home = tmp / "prefect-home"
    env = {**sweep_environment(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "circuitfind",
            "sweep",
            *TINY_SWEEP,
            "--run",
            "first",
            "--outputs",
            str(tmp / "outputs"),
        ],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return SimpleNamespace(home=home, proc=proc, outputs=tmp / "outputs", seconds=time.monotonic() - start)
