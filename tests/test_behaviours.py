"""The shipped data-only behaviours (capital, pronouns, agreement, greater-than by digits and by years) and
``evaluate``'s set numbers (issue 17)."""

import pytest
import torch

from circuitfind.models import fetch
from circuitfind.patching import answer_logits
from circuitfind.tasks.batch import Prompt, TaskBatch, generate_prompts
from circuitfind.tasks.evaluation import evaluate


def test_evaluate_set_numbers_match_a_hand_computation(ioi_model):
    prompts = [
        Prompt(
            "When Mary and John went to the store, John gave a drink to",
            " Mary",
            " John",
            {"swap": "When Mary and John went to the store, Mary gave a drink to"},
            {},
            answers=(" Mary", " Alice"),
            counter_answers=(" John",),
        ),
        Prompt(
            "When Alice and Bob went to the store, Bob gave a drink to",
            " Alice",
            " Bob",
            {"swap": "When Alice and Bob went to the store, Alice gave a drink to"},
            {},
        ),
    ]
    batch = TaskBatch.from_prompts(ioi_model, prompts)
    report = evaluate(ioi_model, batch, corruptions=("str",))
    with torch.no_grad():
        logits = answer_logits(ioi_model(batch.clean_tokens), batch.end_pos).float()
    tok = ioi_model.tokenizer
    ids = [[tok(w, add_special_tokens=False)["input_ids"][0] for w in ws] for ws in ([" Mary", " Alice"], [" John"])]
    mary, alice, john = ids[0][0], ids[0][1], ids[1][0]
    al, bob = batch.answers[1].item(), batch.counter_answers[1].item()
    ld0 = (logits[0, mary] + logits[0, alice]) / 2 - logits[0, john]
    ld1 = logits[1, al] - logits[1, bob]
    p = logits.softmax(-1)
    pd0, pd1 = p[0, mary] + p[0, alice] - p[0, john], p[1, al] - p[1, bob]
    assert report.logit_diff == pytest.approx(((ld0 + ld1) / 2).item(), abs=1e-5)
    assert report.prob_diff == pytest.approx(((pd0 + pd1) / 2).item(), abs=1e-6)
    pair0 = max(logits[0, mary], logits[0, alice]) > logits[0, john]
    pair1 = logits[1, al] > logits[1, bob]
    assert report.pair_accuracy == (float(pair0) + float(pair1)) / 2
    assert report.pair_chance == pytest.approx((2 / 3 + 1 / 2) / 2)
    top = logits.argmax(-1)
    assert report.accuracy == (float(top[0].item() in (mary, alice)) + float(top[1].item() == al)) / 2
    assert set(report.corrupted["str"]) == {"logit_diff", "prob_diff", "kl"}


def test_greater_than_by_digits_sets_are_the_decades_after_and_before():
    for p in generate_prompts("greater_than_digits", 40, seed=0):
        yy = p.text.split("the year 17")[1][:2]
        tens = int(yy[0])
        assert p.answers == tuple(str(d) for d in range(tens + 1, 10))
        assert p.counter_answers == tuple(str(d) for d in range(tens))  # the tens digit of YY is in neither set
        assert p.corrupted["01-year"] == p.text.replace(f"year 17{yy}", "year 1701")


def test_greater_than_years_sets_are_the_years_after_and_up_to_yy():
    for p in generate_prompts("greater_than_years", 40, seed=0):
        yy = int(p.text.split("the year 17")[1][:2])
        assert 2 <= yy <= 98
        assert p.answers == tuple(f"{y:02d}" for y in range(yy + 1, 100))
        assert p.counter_answers == tuple(f"{y:02d}" for y in range(yy + 1))  # Hanna et al.: years <= YY
        assert p.corrupted["01-year"] == p.text.replace(f"year 17{yy:02d}", "year 1701")


@pytest.mark.slow  # five evaluations of SmolLM2 on the CPU (one of 11 rows a prompt): about 90 s on a shared 2-core machine
@pytest.mark.skipif(not fetch.is_fetched("smollm2-135m"), reason="SmolLM2 not in the cache")
def test_shipped_behaviours_are_above_chance_on_smollm2():
    from circuitfind.models.loading import load_model

    model = load_model("smollm2-135m", device="cpu")
    for task in ("capital", "pronouns", "agreement", "greater_than_digits", "greater_than_years"):
        r = evaluate(model, TaskBatch.build(model, task, 16, seed=0), corruptions=("str",))
        print(f"\n{task}: {r.as_dict()}")
        assert r.pair_accuracy >= r.pair_chance + 0.3, task
        assert r.logit_diff > 1.0 and r.prob_diff > 0.05, task
        assert r.corrupted["str"]["prob_diff"] < r.prob_diff, task  # the corruption removes the behaviour
