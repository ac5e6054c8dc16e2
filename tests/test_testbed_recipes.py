"""The reasoning testbeds' recipes: arithmetic_chains (text) and cell_chains (vision)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dopd_vlm.data import RecipeError, load_recipe
from dopd_vlm.data.arithmetic_chains import Chain, apply
from dopd_vlm.data.cell_chains import PALETTE

TEXT, VISION = "arithmetic_chains", "cell_chains"
STEP = re.compile(r"(\d)((?:[-+*]\d)+)=(\d)")


def evaluate_step(text: str, modulus: int = 10) -> int:
    value = int(text[0])
    for op, digit in re.findall(r"([-+*])(\d)", text[1:]):
        value = apply(value, op, int(digit), modulus)
    return value


@pytest.mark.parametrize("recipe", [TEXT, VISION])
def test_reference_chains_are_correct_and_end_in_the_answer(recipe):
    dataset = load_recipe(recipe, "train", limit=300)
    for sample in dataset:
        *steps, last = sample.reference.split(" answer ")[0].split(" "), sample.reference.split(" answer ")[1]
        steps = steps[0]
        assert last == sample.answer
        previous = None
        for step in steps:
            first, rest, result = STEP.fullmatch(step).groups()
            assert previous is None or int(first) == previous  # each step starts from the last result
            assert evaluate_step(first + rest) == int(result)
            previous = int(result)
        assert previous == int(sample.answer)
        assert len(steps) >= 2  # so the hint is never the final answer
        assert dataset.answer_extractor.is_correct(sample.reference, sample.answer)


def test_text_hint_is_the_first_step_value_and_the_question_the_whole_expression():
    for sample in load_recipe(TEXT, "test", limit=100):
        first_step = sample.reference.split(" ")[0]
        assert sample.privileged == f"step 1 gives {first_step.split('=')[1]}"
        expression = sample.question.removeprefix("Compute ").removesuffix(" left to right mod 10.")
        assert "".join(s.split("=")[0][1:] for s in sample.reference.split(" answer ")[0].split(" ")) == expression[1:]
        assert sample.images == ()


def test_vision_cells_show_the_operands_and_p_names_them():
    dataset = load_recipe(VISION, "test", limit=50)
    for sample in dataset:
        operands = sample.meta["operands"]
        assert sample.privileged == "cells " + " ".join(map(str, operands))
        (image,) = sample.images
        pixels = np.asarray(image)
        assert pixels.shape == (28, 28 * len(operands), 3)
        for index, digit in enumerate(operands):
            cell = pixels[:, index * 28 : (index + 1) * 28].reshape(-1, 3)
            assert (cell == PALETTE[digit]).all()
        operators = re.search(r"with (\S+) and", sample.question).group(1)
        assert len(operators) == len(operands) - 1
        chain = Chain(tuple(operands), tuple(operators), 10, 2)
        assert chain.reference() == sample.reference
        assert str(operands) not in sample.question  # the operands are only in the image and p


@pytest.mark.parametrize("recipe", [TEXT, VISION])
def test_splits_are_deterministic_disjoint_and_ood_is_longer(recipe):
    first = load_recipe(recipe, "train", limit=800)
    again = load_recipe(recipe, "train", limit=40)
    assert [s.reference for s in again] == [s.reference for s in first][:40]
    test = load_recipe(recipe, "test")
    assert len(test) == 200
    train_questions = {(s.question, s.privileged) for s in first}
    assert not train_questions & {(s.question, s.privileged) for s in test}
    operations = lambda ds: [len(re.findall(r"[-+*]", s.reference.split(" answer")[0])) for s in ds]  # noqa: E731
    low, high = first.recipe.operation_range("test")
    assert {low, high} <= set(operations(test)) <= set(range(low, high + 1))  # a step's start holds no operator
    ood_low, ood_high = first.recipe.operation_range("ood")
    ood = load_recipe(recipe, "ood", limit=50)
    assert set(operations(ood)) <= set(range(ood_low, ood_high + 1)) and ood_low > high
    other = load_recipe({**_yaml(recipe), "seed": 1}, "train", limit=40)
    assert [s.reference for s in other] != [s.reference for s in again]


def _yaml(recipe: str) -> dict:
    import yaml

    from dopd_vlm.data.recipes import RECIPES_DIR

    return yaml.safe_load((RECIPES_DIR / f"{recipe}.yaml").read_text())


@pytest.mark.parametrize(
    "keys, problem",
    [
        ({"operations": {"train": [2, 4], "ood": [7, 8]}}, "key 'operations.train': must be > ops_per_step (2)"),
        ({"operations": {"ood": [7, 8]}}, "key 'operations': has no range for split 'train'"),
        ({"modulus": 11}, "key 'modulus': must be in [2, 10], got 11"),
        ({"operators": ["/"]}, "key 'operators[0]': '/' is not one of +, -, *"),
        ({"hint": "answer"}, "key 'hint': 'answer' is not one of first_step, all_but_last"),
    ],
)
def test_text_recipe_key_errors_name_the_key(keys, problem):
    with pytest.raises(RecipeError, match=re.escape(problem)):
        load_recipe({**_yaml(TEXT), **keys}, "test", limit=1)


def test_vision_recipe_refuses_a_text_only_hint_key():
    with pytest.raises(RecipeError, match="unknown key 'hint' for kind 'cell_chains'"):
        load_recipe({**_yaml(VISION), "hint": "first_step"}, "test", limit=1)
