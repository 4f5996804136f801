"""Shared fixtures: the shipped toy models and batches, loaded once per session."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from circuitfind.models import load_model  # noqa: E402
from circuitfind.tasks import TaskBatch  # noqa: E402


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

    with prefect_test_harness():
        yield
