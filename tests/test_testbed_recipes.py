"""The reasoning testbeds' recipes: arithmetic_chains (text, and its hidden-operand and shared-rule
variants) and cell_chains (vision)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dopd_vlm.data import RecipeError, load_recipe
from dopd_vlm.data.arithmetic_chains import Chain, apply
from dopd_vlm.data.cell_chains import PALETTE

TEXT, VISION = "arithmetic_chains", "cell_chains"
HIDDEN, RULE = "arithmetic_chains_hidden", "arithmetic_chains_rule"  # the variants of issue 24
STEP = re.compile(r"(\d)((?:[-+*]\d)+)=(\d)")


def evaluate_step(text: str, modulus: int = 10, swap_minus: bool = False) -> int:
    value = int(text[0])
    for op, digit in re.findall(r"([-+*])(\d)", text[1:]):
        value = apply(value, op, int(digit), modulus, swap_minus)
    return value


@pytest.mark.parametrize("recipe", [TEXT, VISION, HIDDEN, RULE])
def test_reference_chains_are_correct_and_end_in_the_answer(recipe):
    dataset = load_recipe(recipe, "train", limit=300)
    swap_minus = dataset.recipe.hint == "shared_rule" if recipe != VISION else False
    for sample in dataset:
        *steps, last = sample.reference.split(" answer ")[0].split(" "), sample.reference.split(" answer ")[1]
        steps = steps[0]
        assert last == sample.answer
        previous = None
        for step in steps:
            first, rest, result = STEP.fullmatch(step).groups()
            assert previous is None or int(first) == previous  # each step starts from the last result
            assert evaluate_step(first + rest, swap_minus=swap_minus) == int(result)
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


def expression(sample) -> str:
    return sample.question.removeprefix("Compute ").removesuffix(" left to right mod 10.")


def test_hidden_operand_is_absent_from_the_question_and_only_p_gives_it():
    usual = load_recipe(TEXT, "test")
    hidden = load_recipe(HIDDEN, "test")
    shown = []
    for plain, sample in zip(usual, hidden):
        assert sample.reference == plain.reference  # the same problem, one operand written `?`
        position = sample.meta["hidden_position"]
        shown.append(position < 0)
        if position < 0:
            assert sample.question == plain.question and sample.privileged == "nothing hidden"
            assert sample.meta["p_free_ceiling"] == 1.0
            continue
        written = expression(sample)
        assert position == 0 and written.count("?") == 1 and len(re.findall(r"\d", written)) == len(re.findall(r"\d", expression(plain))) - 1
        digit = int(expression(plain)[2 * position])
        assert written[2 * position] == "?" and written.replace("?", str(digit)) == expression(plain)
        assert sample.privileged == f"? is {digit}"
        # the p-free ceiling: the share of the ten values of `?` whose chain gives the most frequent answer
        answers = [Chain(tuple(int(c) if c != "?" else d for c in written[::2]), tuple(written[1::2]), 10, 2).answer
                   for d in range(10)]
        assert sample.meta["p_free_ceiling"] == pytest.approx(max(answers.count(a) for a in answers) / 10)
        assert answers[digit] == int(sample.answer)
    assert 0.35 < 1 - sum(shown) / len(shown) < 0.65  # hidden_fraction 0.5
    assert all(len(re.findall(r"\d", s.privileged)) <= 1 for s in hidden)  # p: one operand, never a result


def test_shared_rule_holds_on_every_row_and_p_is_the_same_rule_text():
    usual = load_recipe(TEXT, "train", limit=400)
    rule = load_recipe(RULE, "train", limit=400)
    changed = 0
    for plain, sample in zip(usual, rule):
        assert sample.question == plain.question  # the same expressions, evaluated with the rule
        assert sample.privileged == "rule: a-b means b-a"
        operands, operators = [int(c) for c in expression(sample)[::2]], tuple(expression(sample)[1::2])
        assert sample.answer == str(Chain(tuple(operands), operators, 10, 2, swap_minus=True).answer)
        changed += sample.answer != plain.answer
    assert changed / len(rule) > 0.5  # the rule changes most answers: a model must know it


@pytest.mark.parametrize("recipe", [TEXT, HIDDEN, RULE])
def test_p_never_determines_the_answer(recipe):
    by_p: dict[str, set[str]] = {}
    samples = load_recipe(recipe, "train", limit=600)
    for sample in samples:
        by_p.setdefault(sample.privileged, set()).add(sample.answer)
        assert f"answer {sample.answer}" not in sample.privileged
    # every p shared by several problems comes with several answers: p alone never gives the answer
    assert all(len(answers) > 1 for p, answers in by_p.items() if sum(s.privileged == p for s in samples) >= 10)


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
        ({"hint": "answer"}, "key 'hint': 'answer' is not one of first_step, all_but_last, hidden_operand, shared_rule"),
        ({"hint": "shared_rule", "operators": ["+", "*"]}, "key 'hint': shared_rule redefines '-', which 'operators' lacks"),
        ({"hidden_fraction": 0.3}, "key 'hidden_fraction': only hint 'hidden_operand' hides operands, hint is 'first_step'"),
        ({"hint": "hidden_operand", "hidden_fraction": 1.5}, "key 'hidden_fraction': must be in [0, 1], got 1.5"),
    ],
)
def test_text_recipe_key_errors_name_the_key(keys, problem):
    with pytest.raises(RecipeError, match=re.escape(problem)):
        load_recipe({**_yaml(TEXT), **keys}, "test", limit=1)


def test_vision_recipe_refuses_a_text_only_hint_key():
    with pytest.raises(RecipeError, match="unknown key 'hint' for kind 'cell_chains'"):
        load_recipe({**_yaml(VISION), "hint": "first_step"}, "test", limit=1)
