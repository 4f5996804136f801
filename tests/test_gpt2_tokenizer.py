"""GPT-2's BPE rebuilt offline from openai-whisper's ranks (skipped until built)."""

import pytest
import torch

from circuitfind.errors import TaskError
from circuitfind.models.bpe import _split, bytes_to_unicode, merges_from_ranks, tokenizer_dir
from circuitfind.tasks.batch import TaskBatch, load_task, single_token_id

built = pytest.mark.skipif(
    not (tokenizer_dir() / "tokenizer.json").is_file(),
    reason="GPT-2 tokenizer not built: run `circuitfind models fetch gpt2-tokenizer`",
)


def test_merges_are_recovered_from_ranks():
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"abc", b"bc", b"abcd"):
        ranks[token] = len(ranks)
    merges = merges_from_ranks(ranks)
    assert merges == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c"), (b"abc", b"d")]
    assert _split(ranks, b"abcd", max_rank=10**9) == [b"abcd"]
    assert len(set(bytes_to_unicode().values())) == 256


@built
def test_known_gpt2_ids():
    from circuitfind.models.bpe import gpt2_tokenizer

    tok = gpt2_tokenizer(fetch_if_missing=False)
    assert tok(" Mary", add_special_tokens=False)["input_ids"] == [5335]
    assert tok(" John", add_special_tokens=False)["input_ids"] == [1757]
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 50256 and len(tok) == 50257
    text = "When Mary and John went to the store, John gave a drink to"
    assert tok.decode(tok(text)["input_ids"]) == text


@built
def test_factual_mlp_localisation_runs_on_a_gpt2_family_model(random_gpt2):
    from circuitfind.runs.study import mlp_localisation

    out = mlp_localisation(random_gpt2, "random-gpt2", prompts=6, windows=(1, 3))
    assert set(out["curves"]) == {"window 1", "window 3", "sum of 3 single layers"}
    assert all(len(c) == 3 for c in out["curves"].values())
    assert set(out["agreement"]) == {3}


@built
def test_gpt2_family_tasks_are_exact(random_gpt2):
    """A GPT-2 architecture folder without a tokenizer, run with the rebuilt one: IOI names are single
    GPT-2 tokens, STR pairs have equal lengths, a multi-token answer is refused."""
    model = random_gpt2
    for name in load_task("ioi").data["names"]:
        single_token_id(model, " " + name)
    batch = TaskBatch.build(model, "ioi", 20, seed=0)
    assert batch.clean_tokens[0, 0].item() == 50256  # BOS
    assert torch.equal(batch.clean_tokens[torch.arange(20), batch.positions["IO"]], batch.answers)
    with pytest.raises(TaskError, match=r"' Eiffel' is 3 tokens \['ĠE', 'iff', 'el'\]"):
        single_token_id(model, " Eiffel")
