import pytest
import torch

from circuitfind.errors import TaskError
from circuitfind.tasks.batch import Prompt, TaskBatch, generate_prompts, load_task, single_token_id


def test_prompts_are_deterministic_per_seed():
    a = generate_prompts("ioi", 10, seed=7)
    b = generate_prompts("ioi", 10, seed=7)
    c = generate_prompts("ioi", 10, seed=8)
    assert a == b and a != c


def test_ioi_key_positions_point_at_the_names(ioi_model, ioi_batch):
    b = ioi_batch
    rows = torch.arange(b.size)
    assert torch.equal(b.clean_tokens[rows, b.positions["IO"]], b.answers)
    assert torch.equal(b.clean_tokens[rows, b.positions["S1"]], b.counter_answers)
    assert torch.equal(b.clean_tokens[rows, b.positions["S2"]], b.counter_answers)
    assert (b.positions["S1"] != b.positions["IO"]).all()
    # padding is to the right, end_pos is the last real token
    assert torch.equal(b.mask.sum(1) - 1, b.end_pos)


def test_ioi_str_variants_change_only_the_named_tokens(ioi_batch):
    b = ioi_batch
    rows = torch.arange(b.size)
    diff = b.clean_tokens != b.corrupted("s2_io")
    assert diff.sum(1).eq(1).all()
    assert diff[rows, b.positions["S2"]].all()
    assert torch.equal(b.corrupted("s2_io")[rows, b.positions["S2"]], b.answers)
    abc = b.clean_tokens != b.corrupted("abc")
    for key in ("IO", "S1", "S2"):
        assert abc[rows, b.positions[key]].all()
    s1io = b.clean_tokens != b.corrupted("s1_io")
    assert not s1io[rows, b.positions["S2"]].any()
    assert s1io[rows, b.positions["IO"]].all() and s1io[rows, b.positions["S1"]].all()


def test_induction_positions(induction_batch):
    b = induction_batch
    rows = torch.arange(b.size)
    assert torch.equal(b.clean_tokens[rows, b.positions["B"]], b.answers)
    assert torch.equal(b.clean_tokens[rows, b.positions["A"]], b.clean_tokens[rows, b.end_pos])
    assert torch.equal(b.corrupted("swap_next")[rows, b.positions["B"]], b.counter_answers)


def test_mismatched_str_lengths_are_a_clear_error(ioi_model):
    p = Prompt(
        "When Mary and John went to the store, John gave a drink to",
        "Mary",
        "John",
        {"s2_io": "When Mary and John went to the store, Mary Mary gave a drink to"},
        {"IO": 5},
    )
    with pytest.raises(TaskError, match=r"different token lengths \(15 vs 16\)"):
        TaskBatch.build(ioi_model, "ioi", [p])


def test_multi_token_answer_is_a_clear_error(ioi_model):
    with pytest.raises(TaskError, match="2 tokens"):
        single_token_id(ioi_model, "Mary John")
    with pytest.raises(TaskError, match="not in this model's vocabulary"):
        single_token_id(ioi_model, "Zyxwv")


def test_unknown_task_and_variant(ioi_batch):
    with pytest.raises(TaskError, match="unknown task"):
        load_task("no-such-task")
    with pytest.raises(TaskError, match="no STR variant"):
        ioi_batch.corrupted("nope")


@pytest.mark.parametrize("at", [-1, -5, 14, 1.0, True])
def test_prompt_key_offsets_must_lie_in_the_text(at):
    with pytest.raises(TaskError, match=r"key_chars\['IO'\] must be a character offset in 0..13"):
        Prompt("Mary gave John", " Mary", " John", {}, {"IO": at})
    assert Prompt("Mary gave John", " Mary", " John", {}, {"IO": 10}).key_chars["IO"] == 10


@pytest.mark.parametrize("n", [True, False])
def test_batch_size_as_a_bool_is_refused(ioi_model, n):
    with pytest.raises(TaskError, match="whole number"):
        TaskBatch.build(ioi_model, "ioi", n)
