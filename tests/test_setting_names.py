"""Setting names are file names of a run folder: distinct inputs must never share one (a result would be lost)."""

import pytest

from circuitfind.runs.sweep import Setting, SweepConfig, name_part


def setting(model: str, corruption: str = "str", task: str = "ioi") -> Setting:
    return Setting(model=model, task=task, algorithm="eap", corruption=corruption, metric="kl", direction="noise")


def test_plain_names_stay_readable():
    assert setting("toy-ioi").name == "toy-ioi__ioi__eap__str__kl__noise"
    assert name_part("smollm2-135m") == "smollm2-135m" and name_part("logit_diff") == "logit_diff"


@pytest.mark.parametrize(
    "a, b",
    [("col/a_b", "col/a/b"), ("col/a", "col_a"), ("a__b", "a_b"), ("x/", "x"), ("str:a-b", "str:a:b")],
)
def test_distinct_inputs_get_distinct_names(a, b):
    assert setting(a).name != setting(b).name
    assert setting("toy-ioi", corruption=a).name != setting("toy-ioi", corruption=b).name
    assert "/" not in setting(a).name and not setting(a).name.startswith(".")


def test_a_part_with_double_underscores_cannot_shift_the_parts():
    assert setting("a__b", task="c").name != setting("a", task="b__c").name


def test_the_grid_refuses_two_settings_with_one_name():
    # a plain folder name spelled like another model's hashed name: caught before anything runs
    twin = name_part("col/a_b")
    config = SweepConfig(models=["col/a_b", twin], algorithms=["eap"], corruptions=["str"], metrics=["kl"])
    with pytest.raises(ValueError, match="share the name"):
        config.settings()
    with pytest.raises(ValueError, match="share the name"):
        config.check()
    names = [s.name for s in SweepConfig(models=["col/a_b", "col/a/b"], algorithms=["eap"]).settings()]
    assert len(names) == len(set(names))
