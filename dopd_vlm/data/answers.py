"""Taking the final answer out of a response before it is compared (recipe key `answer_extractor`).

A recipe whose responses are the answer itself ("3", "red circle") compares whole responses, as
before. A recipe with reasoning responses (`2+3*4=0 0-1+2=1 answer 1`) names how the final
answer is found in them, so a correct answer after a differently worded chain counts as correct:

    answer_extractor: {kind: whole}                          # the default: the response is the answer
    answer_extractor: {kind: boxed}                          # the last \\boxed{...} (balanced braces)
    answer_extractor: {kind: regex, pattern: 'answer (\\S+)'}  # the last match; its group 1 if any

A response in which nothing is found is wrong, whatever its answer.

Thinking models (Qwen3, Qwen3-VL-Thinking) write their reasoning in a `<think>...</think>` block
before the answer: only the text after the last `</think>` is searched (`after_thinking`), so a
number in the reasoning never counts as the answer, and a response whose think block never closes
(cut by the length cap, or never ended) has no answer: wrong, and counted apart by evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from dopd_vlm.data.schema import answers_match
from dopd_vlm.validation import Invalid

ExtractorKind = Literal["whole", "boxed", "regex"]
BOXED = "\\boxed{"
# Qwen3's reasoning delimiters: added tokens that are not special (tokenizer_config.json of Qwen3 and
# Qwen3-VL: ids 151667 / 151668, "special": false), so decoding with skip_special_tokens keeps them.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Regex:
    """A compilable regular expression with at most one group (empty = none given)."""

    def problem(self, value: str) -> str | None:
        try:
            groups = re.compile(value).groups
        except re.error as error:
            return f"invalid regular expression {value!r}: {error}"
        return None if groups <= 1 else f"regular expression {value!r} has {groups} groups; use at most one"


@dataclass(frozen=True)
class AnswerExtractor:
    """How a response's final answer is found.

    Attributes:
        kind: `whole` (the response is the answer), `boxed` (the content of the last
            `\\boxed{...}`) or `regex` (the last match of `pattern`).
        pattern: The regular expression of `regex`: group 1 is the answer if the pattern has a
            group, else the whole match. Only for `regex`.
    """

    kind: ExtractorKind = "whole"
    pattern: Annotated[str, Regex()] = ""

    def __post_init__(self) -> None:
        if (self.kind == "regex") != bool(self.pattern):
            raise Invalid("answer_extractor.pattern", "kind regex needs a non-empty pattern, the other kinds none")

    def extract(self, response: str) -> str | None:
        """The final answer in `response`, or None where there is none."""
        if self.kind == "whole":
            return response
        if self.kind == "boxed":
            return last_boxed(response)
        matches = list(re.finditer(self.pattern, response))
        if not matches:
            return None
        last = matches[-1]
        return last.group(1) if last.re.groups else last.group(0)

    def is_correct(self, response: str, answer: str) -> bool:
        """Whether the answer found in `response` matches `answer` (`answers_match`)."""
        found = self.extract(response)
        return found is not None and answers_match(found, answer)


WHOLE_RESPONSE = AnswerExtractor()


def after_thinking(response: str, opened_by_prompt: bool = False) -> str | None:
    """The part of `response` that holds its answer: the text after the last `</think>` when
    there is one, else the whole response; None when a think block is left open (a `<think>` after
    the last `</think>`, or none closed while the prompt itself opened one: `opened_by_prompt`, see
    `DualViewCollator.generation_opens_think`)."""
    opened, closed = response.rfind(THINK_OPEN), response.rfind(THINK_CLOSE)
    if opened > closed or (closed < 0 and opened_by_prompt):
        return None
    return response[closed + len(THINK_CLOSE):].strip() if closed >= 0 else response


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, braces inside it balanced; None if there
    is none or it is not closed."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(BOXED)
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index]
    return None
