"""The canonical sample every later stage consumes, and verifiable-answer matching.

Whatever a recipe reads (synthetic scenes, local JSONL/Parquet), it hands out `Sample`s, so
collate, rollout and evaluation never learn about file formats.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping

from PIL import Image

from dopd_vlm.errors import InputError


IMAGE_PLACEHOLDER = "<image>"
"""Marks where an image goes in a question. A question holds either none (the images come before
the text) or exactly one per image (each image is placed at its placeholder, in order)."""


class RecipeError(InputError):
    """A recipe or a data row is unusable; the message is one line naming where and why."""


@dataclass(frozen=True)
class Sample:
    """One prompt of the distillation task.

    Attributes:
        id: Unique within its split.
        question: What the student sees (together with `images`); may hold one
            `IMAGE_PLACEHOLDER` per image to place the images inside the text.
        answer: Short verifiable answer; compare predictions with `answers_match` (after the
            recipe's answer extractor took it out of the response, see data/answers.py).
        privileged: Privileged text p, seen only by the privileged views ("" only where the recipe
            allows it).
        images: RGB images, 0..n, in the order the question refers to them.
        meta: Free-form extras, e.g. the objects of a synthetic scene.
        reference: A full reference response (a reasoning chain that ends in the answer), the
            target of supervised training (SFT, warm-ups); "" where the answer itself is the
            reference response. See `reference_response`.
    """

    id: str
    question: str
    answer: str
    privileged: str
    images: tuple[Image.Image, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    reference: str = ""

    @property
    def reference_response(self) -> str:
        """What supervised training teaches the model to answer: the reference, else the answer."""
        return self.reference or self.answer


@dataclass(frozen=True)
class SampleHeader:
    """A sample without its pixels, as load-time checks of whole splits read it
    (`SampleDataset.headers`).

    Attributes:
        id, question, answer, privileged, reference: As in `Sample`.
        image_sizes: (width, height) of each image, from the image headers.
        location: Where the row comes from, as messages name it (e.g. `data/train.jsonl line 5`).
    """

    id: str
    question: str
    answer: str
    privileged: str
    image_sizes: tuple[tuple[int, int], ...]
    location: str
    reference: str = ""

    @property
    def reference_response(self) -> str:
        """As `Sample.reference_response`."""
        return self.reference or self.answer


_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = {"a", "an", "the"}
# A signed decimal number, or a run of letters/digits; everything else separates tokens.
_TOKEN = re.compile(r"-?\d+(?:\.\d+)?|[^\W_]+")


def normalize_answer(text: str) -> str:
    """The canonical form two answers are compared in.

    Rule: Unicode NFKC, lower case; punctuation and whitespace only separate tokens (so a trailing
    period, quotes or brackets vanish); numbers are canonical decimals ("3.50" -> "3.5",
    "-0" -> "0") and the number words zero..twenty become digits ("three" -> "3"); a leading
    article ("a", "an", "the") is dropped when other tokens follow it. Tokens are joined by one
    space.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    tokens = [_canonical_token(token) for token in _TOKEN.findall(text)]
    if len(tokens) > 1 and tokens[0] in _ARTICLES:
        tokens = tokens[1:]
    return " ".join(tokens)


def answers_match(prediction: str, answer: str) -> bool:
    """Whether a prediction is exactly the answer after `normalize_answer`.

    Exact, not substring: "3 shapes" does not match "3", so a model cannot pass by listing
    several candidates. Nothing normalises to "" matches anything.
    """
    expected = normalize_answer(answer)
    return bool(expected) and normalize_answer(prediction) == expected


def _canonical_token(token: str) -> str:
    if token in _NUMBER_WORDS:
        return _NUMBER_WORDS[token]
    if token[0].isdigit() or token[0] == "-":
        try:
            number = Decimal(token)
        except InvalidOperation:
            return token
        return "0" if number == 0 else f"{number.normalize():f}"
    return token
