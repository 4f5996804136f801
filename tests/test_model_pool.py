"""The per-process model pool of sweep workers, and the torch threads each worker gets."""

import threading

import pytest
import torch

from circuitfind.runs.sweep import ModelPool
from circuitfind.threads import THREADS_ENV, apply_worker_threads, threads_per_worker


def test_a_process_loads_a_model_once_and_lends_it_to_one_thread_at_a_time():
    pool = ModelPool()
    with pool.lend("toy-ioi", "cpu") as first:
        pass
    with pool.lend("toy-ioi", "cpu") as again:
        assert again is first  # reused, not loaded per setting
    assert pool.loads == 1
    # two settings at once in two threads: each gets its own copy (hooks live on the model object)
    inside, release, seen = threading.Barrier(2), threading.Event(), []

    def run_setting():
        with pool.lend("toy-ioi", "cpu") as model:
            seen.append(model)
            inside.wait(timeout=60)
            release.wait(timeout=60)

    threads = [threading.Thread(target=run_setting) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        release.set()
    finally:
        for t in threads:
            t.join(timeout=120)
    assert len(seen) == 2 and seen[0] is not seen[1] and first in seen
    assert pool.loads == 2
    with pool.lend("toy-ioi", "cpu", "bfloat16") as other_dtype:
        assert other_dtype is not first and pool.loads == 3


def test_threads_per_worker_shares_the_cores():
    assert threads_per_worker(2, cores=16) == 8
    assert threads_per_worker(3, cores=16) == 5
    assert threads_per_worker(4, cores=2) == 1


def test_worker_threads_from_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(THREADS_ENV, raising=False)
        assert apply_worker_threads() is None and torch.get_num_threads() == before
        monkeypatch.setenv(THREADS_ENV, "2")
        assert apply_worker_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv(THREADS_ENV, "many")
        with pytest.raises(ValueError, match="CIRCUITFIND_TORCH_THREADS='many' is not a positive number"):
            apply_worker_threads()
    finally:
        torch.set_num_threads(before)
