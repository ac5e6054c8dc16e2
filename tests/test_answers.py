"""Answer extraction (recipe key `answer_extractor`) and reference responses (`Sample.reference`)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from dopd_vlm.collate import DualViewCollator, reference_responses
from dopd_vlm.data import RecipeError, Sample, load_recipe, read_recipe
from dopd_vlm.data.answers import WHOLE_RESPONSE, AnswerExtractor, last_boxed
from dopd_vlm.data.recipes import RECIPES_DIR
from dopd_vlm.lab.tiny import build_tiny_tokenizer
from dopd_vlm.validation import Invalid

CHAIN = AnswerExtractor("regex", r"answer (\S+)")


@pytest.mark.parametrize(
    "response, answer, correct",
    [
        ("1*2*6=2 2+7*2=8 8+8+3=9 answer 9", "9", True),
        ("1*2*6=2 2+7*2=8 8+8+3=9 answer 9", "8", False),
        ("a differently worded chain, then answer 9", "9", True),  # the chain's wording does not matter
        ("answer 3 ... answer 9", "9", True),  # the last match counts
        ("answer 3 ... answer 9", "3", False),
        ("answer 9.", "9", True),  # then normalised as before: the trailing period vanishes
        ("1*2*6=2 2+7*2=8 9", "9", False),  # no final answer written: wrong
        ("", "9", False),
    ],
)
def test_regex_extractor_takes_the_last_match_group(response, answer, correct):
    assert CHAIN.is_correct(response, answer) is correct


def test_regex_without_a_group_returns_the_whole_match():
    assert AnswerExtractor("regex", r"\d+").extract("x 12 y 345") == "345"


@pytest.mark.parametrize(
    "text, inner",
    [
        (r"so \boxed{42}", "42"),
        (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # the last one, nested braces kept
        (r"\boxed{unclosed", None),
        ("no box", None),
        (r"\boxed{}", ""),
    ],
)
def test_boxed_reader(text, inner):
    assert last_boxed(text) == inner


def test_boxed_extractor_matches_after_normalisation_and_empty_is_wrong():
    boxed = AnswerExtractor("boxed")
    assert boxed.is_correct(r"... = \boxed{ 3.50 }", "3.5")
    assert not boxed.is_correct(r"\boxed{}", "3")
    assert not boxed.is_correct("3", "3")  # no box: nothing found


def test_whole_response_is_the_old_exact_match():
    assert WHOLE_RESPONSE.is_correct("The red circle.", "red circle")
    assert not WHOLE_RESPONSE.is_correct("3 shapes", "3")


@pytest.mark.parametrize(
    "value, problem",
    [
        ({"kind": "regex"}, "key 'answer_extractor.pattern': kind regex needs a non-empty pattern"),
        ({"kind": "boxed", "pattern": "x"}, "key 'answer_extractor.pattern': kind regex needs a non-empty pattern"),
        ({"kind": "regex", "pattern": "(a)(b)"}, "key 'answer_extractor.pattern': regular expression '(a)(b)' has 2 groups"),
        ({"kind": "regex", "pattern": "("}, "key 'answer_extractor.pattern': invalid regular expression '('"),
        ({"kind": "last_line"}, "key 'answer_extractor.kind': 'last_line' is not one of whole, boxed, regex"),
        ("boxed", "key 'answer_extractor': expected a mapping"),
        ({"regex": "x"}, "unknown key 'answer_extractor.regex' for kind 'synthetic_scenes' (allowed: kind, pattern)"),
    ],
)
def test_bad_extractor_values_are_refused_naming_the_key(value, problem):
    scenes = yaml.safe_load((RECIPES_DIR / "synthetic_scenes.yaml").read_text())
    with pytest.raises(RecipeError, match=f"^recipe <mapping>: {re.escape(problem)}"):
        read_recipe({**scenes, "answer_extractor": value})


def test_recipe_key_answer_extractor_defaults_to_whole_and_is_read():
    scenes = yaml.safe_load((RECIPES_DIR / "synthetic_scenes.yaml").read_text())
    assert read_recipe(scenes).answer_extractor == WHOLE_RESPONSE  # the default: unchanged behaviour
    assert read_recipe({**scenes, "answer_extractor": {"kind": "boxed"}}).answer_extractor == AnswerExtractor("boxed")
    dataset = load_recipe({**scenes, "answer_extractor": {"kind": "regex", "pattern": r"is (\w+)"}}, "test", limit=1)
    assert dataset.answer_extractor.pattern == r"is (\w+)"
    with pytest.raises(Invalid, match="needs a non-empty pattern"):
        AnswerExtractor("regex")


@pytest.mark.parametrize("kind", ["synthetic_scenes", "arithmetic_chains", "local_files"])
def test_answer_instruction_ends_every_question_in_samples_and_headers(tmp_path, kind):
    # Real instruct models answer in sentences ("3 shapes"); a recipe can ask for the format.
    if kind == "local_files":
        (tmp_path / "test.jsonl").write_text(json.dumps({"question": "How many?", "answer": "3", "privileged": "p"}) + "\n")
        recipe = {"kind": "local_files", "files": {"test": str(tmp_path / "test.jsonl")}}
    else:
        recipe = yaml.safe_load((RECIPES_DIR / f"{kind}.yaml").read_text())
    plain = load_recipe(recipe, "test", limit=2)
    asked = load_recipe({**recipe, "answer_instruction": "Answer with one word."}, "test", limit=2)
    for before, after, header in zip(plain, asked, asked.headers(0, 2)):
        assert after.question == before.question + "\nAnswer with one word." == header.question
        assert (after.answer, after.privileged, after.reference) == (before.answer, before.privileged, before.reference)
    with pytest.raises(RecipeError, match="answer_instruction"):
        read_recipe({**recipe, "answer_instruction": ["Answer", "briefly"]})


# -- reference responses ---------------------------------------------------------------------


def test_reference_response_falls_back_to_the_answer():
    plain = Sample(id="a", question="q", answer="3", privileged="p", images=())
    chained = Sample(id="b", question="q", answer="3", privileged="p", images=(), reference="1+2=3 answer 3")
    assert plain.reference_response == "3"
    assert chained.reference_response == "1+2=3 answer 3"


def test_existing_recipes_have_no_reference_and_sft_targets_are_the_answers():
    samples = list(load_recipe("synthetic_scenes", "test", limit=4))
    assert all(s.reference == "" for s in samples)
    tokenizer = build_tiny_tokenizer()
    collator = DualViewCollator(tokenizer, privileged_template="{privileged}\n{question}", max_privileged_tokens=0)
    ids, mask = reference_responses(collator, samples)
    for row, row_mask, sample in zip(ids, mask, samples):
        expected = tokenizer(sample.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert row[row_mask].tolist() == expected


def test_sft_targets_are_the_reference_chains_where_a_recipe_has_them():
    samples = list(load_recipe("arithmetic_chains", "test", family="qwen3", limit=3))
    tokenizer = build_tiny_tokenizer()
    collator = DualViewCollator(tokenizer, privileged_template="{privileged}\n{question}", max_privileged_tokens=0)
    ids, mask = reference_responses(collator, samples)
    decoded = [tokenizer.decode(row[row_mask][:-1].tolist()) for row, row_mask in zip(ids, mask)]
    assert decoded == [s.reference for s in samples]
    assert all(CHAIN.is_correct(text, s.answer) for text, s in zip(decoded, samples))
    assert torch.equal(mask.sum(1), torch.tensor([len(tokenizer(s.reference)["input_ids"]) + 1 for s in samples]))


def test_local_files_read_an_optional_reference_column(tmp_path):
    rows = [
        {"question": "q0", "answer": "3", "privileged": "p", "solution": "1+2=3 answer 3"},
        {"question": "q1", "answer": "4", "privileged": "p", "solution": None},
        {"question": "q2", "answer": "5", "privileged": "p"},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = {
        "kind": "local_files",
        "files": {"train": str(tmp_path / "train.jsonl")},
        "fields": {"reference": "solution"},
        "answer_extractor": {"kind": "regex", "pattern": r"answer (\S+)"},
    }
    dataset = load_recipe(recipe, "train")
    assert [s.reference for s in dataset] == ["1+2=3 answer 3", "", ""]
    assert dataset.answer_extractor == CHAIN
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "solution": 7}) + "\n")
    with pytest.raises(RecipeError, match=r"bad.jsonl line 1 field 'solution' \(reference\): expected a string"):
        load_recipe({**recipe, "files": {"train": str(tmp_path / "bad.jsonl")}}, "train")
