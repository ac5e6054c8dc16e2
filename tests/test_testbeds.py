"""dopd_vlm.lab.testbeds: every testbed's config loads, and the pair it ships is the one its warm-ups describe."""

import hashlib
import json
from dataclasses import asdict

import pytest

from dopd_vlm.data import load_recipe
from dopd_vlm.lab.testbeds import TESTBEDS


@pytest.mark.parametrize("name", sorted(TESTBEDS))
def test_a_testbed_reads_its_config_and_ships_the_pair_its_warmups_describe(name):
    testbed = TESTBEDS[name]
    teacher_warmup, student_warmup = testbed.warmups()
    teacher_size, student_size = testbed.sizes()
    assert teacher_size == student_size  # the warm-ups alone make the gap
    assert student_warmup.steps < teacher_warmup.steps
    sample = load_recipe(testbed.recipe, "test", family=testbed.family, limit=1)[0]
    assert "{privileged}" in testbed.template and sample.privileged
    assert sample.reference.count("=") >= 2  # a reasoning chain of steps, not a bare answer
    for role, folder in testbed.shipped_pair().items():
        manifest = json.loads((folder / "warmup_manifest.json").read_text())
        assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == manifest["sha256"], folder
        warmup = asdict(teacher_warmup if role == "teacher" else student_warmup)
        assert {key: warmup[key] for key in manifest["warmup"]} == manifest["warmup"], (name, role)
        config = json.loads((folder / "config.json").read_text())
        text = config.get("text_config", config)
        assert text["hidden_size"] == testbed.size["hidden_size"] and text["num_hidden_layers"] == testbed.size["num_layers"]
    pair = testbed.shipped_pair()
    accuracy = {role: json.loads((pair[role] / "warmup_manifest.json").read_text())["accuracy_greedy_200_samples"]
                for role in pair}
    # the preconditions the testbed was built for: the student reads p, the teacher leads given the same p
    assert accuracy["student"]["test_with_p"] > accuracy["student"]["test"] + 0.1
    assert accuracy["teacher"]["test_with_p"] > accuracy["student"]["test_with_p"] + 0.2


def sha256(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("name", [name for name in sorted(TESTBEDS) if TESTBEDS[name].base])
def test_a_variant_ships_its_base_pair_warmed_up_further_on_its_own_recipe(name):
    testbed = TESTBEDS[name]
    base = TESTBEDS[testbed.base]
    assert (testbed.family, testbed.size, testbed.template, testbed.max_new_tokens) == \
        (base.family, base.size, base.template, base.max_new_tokens)  # one knob: the recipe's kind of p
    train = {**asdict(testbed.settings.train), "output_dir": None}
    assert train == {**asdict(base.settings.train), "output_dir": None} and testbed.settings.method == base.settings.method
    assert testbed.settings.rollout == base.settings.rollout and testbed.settings.optim == base.settings.optim
    assert testbed.recipe != base.recipe and testbed.shipped_pair() != base.shipped_pair()
    for role, folder in testbed.shipped_pair().items():
        manifest = json.loads((folder / "warmup_manifest.json").read_text())
        assert manifest["base_sha256"] == sha256(base.shipped_pair()[role]), (name, role)
        assert manifest.get("plain_view_recipe", "") == (testbed.student_plain_recipe if role == "student" else "")
        assert (folder / "model.safetensors").stat().st_size < 2_000_000  # small enough to ship in git


def test_the_information_gap_variant_needs_p_and_its_ceiling_is_below_one():
    testbed = TESTBEDS["arithmetic_hidden"]
    test = load_recipe(testbed.recipe, "test", family=testbed.family)
    ceiling = sum(s.meta["p_free_ceiling"] for s in test) / len(test)
    teacher = json.loads((testbed.shipped_pair()["teacher"] / "warmup_manifest.json").read_text())
    accuracy = teacher["accuracy_greedy_200_samples"]
    assert 0.5 < ceiling < 0.75  # half the problems hide an operand
    assert accuracy["test_with_p"] > accuracy["test"] + 0.1 and accuracy["test"] <= ceiling + 0.05
