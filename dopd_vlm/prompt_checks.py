"""Load-time checks of every prompt against the models that will read it.

`train.setup` runs `check_splits` on every split once the processors are known and before any
model loads. A row fails when

- its question, privileged text or answer holds one of the tokenizer's special tokens
  (`collate.SpecialTokens`) and `data.special_tokens` is `reject` (with `escape` the collator
  keeps them as plain characters; the rows are counted and logged);
- it has images but a model that reads it is text-only;
- a view of its prompt cannot fit: the prompt's real token count (chat template, truncated p,
  image tokens) plus the response budget (`rollout.max_new_tokens`; for off-policy methods the
  reference answer, if longer) exceeds the context of the model reading that view, or the
  longest view exceeds `data.max_prompt_tokens`, or a view plus the response budget exceeds the
  token budget of a micro-batch (`train.micro_batch_tokens`, which must hold one whole sequence).

A failing row is an `InputError` naming the row, the field and the numbers, or with
`data.skip_bad_rows` a skip that is logged and counted in `SampleDataset.skipped`.

Cheap enough for large splits: texts are read without the pixels (`SampleDataset.headers`),
tokenised in batches, and image tokens come from the image sizes and the processor's own resize
rule (`collate.image_tokens`), never from running the image processor.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from dopd_vlm.collate import DualViewCollator, SpecialTokens
from dopd_vlm.config import ConfigError, RunConfig
from dopd_vlm.data.dataset import SampleDataset
from dopd_vlm.data.schema import SampleHeader
from dopd_vlm.errors import InputError
from dopd_vlm.methods import METHODS, step_views

log = logging.getLogger(__name__)

BATCH_ROWS = 512  # rows read, templated and tokenised at once


@dataclass(frozen=True)
class View:
    """One way prompts are shown to a model: plain (x) or with p, through that model's processor."""

    name: str  # as messages say it: "student view (x)", ...
    privileged: bool
    processor: Any
    model_key: str  # the config key of the model reading it
    context: int | None  # that model's max_position_embeddings (None: unknown, not checked)
    counts_key: str  # views with equal keys have equal token counts (`counting_key`)
    in_step: bool = True  # a training step's pass reads it (train.micro_batch_tokens bounds it); else evaluation only


@dataclass(frozen=True)
class Limits:
    """What every view of a prompt must fit."""

    views: tuple[View, ...]
    max_new_tokens: int
    reference_answers: bool  # off-policy methods train on the reference answer, not a sample
    max_prompt_tokens: int  # 0: no cap
    micro_batch_tokens: int = 0  # train.micro_batch_tokens (0: fixed micro-batches, no budget)


def run_views(cfg: RunConfig, collator: DualViewCollator, student_context: int | None,
              teacher_context: int | None) -> tuple[View, ...]:
    """The views a run shows its prompts in: the student's x (rollouts, the gradient pass,
    evaluation), its x + p when the step scores the privileged student, and the teacher's x and
    x + p (the one its scoring pass reads, and both for the baseline evaluations) when there is a
    teacher."""
    in_step = step_views(cfg.method)
    student, teacher = counting_key(collator.processor), counting_key(collator.teacher_processor)
    views = [View("student view (x)", False, collator.processor, "model.student", student_context, student)]
    if ("student", True) in in_step:
        views.append(View("privileged-student view (x + p)", True, collator.processor, "model.student",
                          student_context, student))
    if cfg.model.teacher:
        views += [View("teacher view (x + p)", True, collator.teacher_processor, "model.teacher", teacher_context, teacher,
                       in_step=("teacher", True) in in_step),
                  View("teacher view (x)", False, collator.teacher_processor, "model.teacher", teacher_context, teacher,
                       in_step=("teacher", False) in in_step)]
    return tuple(views)


def counting_key(processor: Any) -> str:
    """What a prompt's token count depends on besides its text: the tokenizer, the chat template
    and the image processor's settings. A teacher and student of one family share it, so each
    prompt is counted once for both."""
    tokenizer = getattr(processor, "tokenizer", processor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
             str(getattr(processor, "chat_template", None) or tokenizer.chat_template)]
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        parts.append(image_processor.to_json_string())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def run_limits(cfg: RunConfig, collator: DualViewCollator, student_context: int | None,
               teacher_context: int | None) -> Limits:
    return Limits(run_views(cfg, collator, student_context, teacher_context), cfg.rollout.max_new_tokens,
                  not METHODS[cfg.method.name].on_policy, cfg.data.max_prompt_tokens, cfg.train.micro_batch_tokens)


def check_template(template: str, specials: SpecialTokens) -> None:
    """The privileged template is config, not data: a special token in it is always an error."""
    token = specials.find(template)
    if token is not None:
        raise ConfigError(f"config key 'data.privileged_template': contains the tokenizer's special token {token!r}")


def check_splits(splits: dict[str, SampleDataset], collator: DualViewCollator, limits: Limits, *,
                 skip_bad_rows: bool) -> dict[str, SampleDataset]:
    """Every split checked (see the module docstring); with `skip_bad_rows`, without its bad rows."""
    return {name: check_split(dataset, collator, limits, skip_bad_rows=skip_bad_rows) for name, dataset in splits.items()}


def check_split(dataset: SampleDataset, collator: DualViewCollator, limits: Limits, *,
                skip_bad_rows: bool) -> SampleDataset:
    """One split checked; bad rows are skipped with `skip_bad_rows` or when the split skips them."""
    skip_bad_rows = skip_bad_rows or dataset.skip_bad_rows
    bad, reasons, escaped = [], [], 0
    for start in range(0, len(dataset), BATCH_ROWS):
        headers = dataset.headers(start, min(start + BATCH_ROWS, len(dataset)))
        if collator.special_tokens == "escape":
            escaped += sum(special_token_field(collator.specials, h) is not None for h in headers)
        for offset, problem in batch_problems(dataset, headers, collator, limits):
            if not skip_bad_rows:
                raise InputError(problem)
            log.warning("skipping bad row: %s", problem)
            bad.append(start + offset)
            reasons.append(problem)
    if escaped:
        log.warning("split '%s': %d rows hold the tokenizer's special tokens, kept as plain text "
                    "(data.special_tokens=escape)", dataset.split, escaped)
    if not bad:
        return dataset
    log.warning("skipped %d bad rows of %d in split '%s' (prompt checks, skip_bad_rows)", len(bad), len(dataset),
                dataset.split)
    return dataset.without(bad, reasons)


def batch_problems(dataset: SampleDataset, headers: Sequence[SampleHeader], collator: DualViewCollator,
                   limits: Limits) -> list[tuple[int, str]]:
    """(row offset in `headers`, one-line problem) for each failing row, in row order."""
    problems: dict[int, str] = {}
    for offset, header in enumerate(headers):
        problem = text_problem(dataset, header, collator, limits)
        if problem is not None:
            problems[offset] = f"{header.location} {problem}"
    fitting = [offset for offset in range(len(headers)) if offset not in problems]
    rows = [headers[i] for i in fitting]
    counted: dict[tuple[str, bool], list[int]] = {}  # views that count alike are counted once
    for view in limits.views:
        key = (view.counts_key, view.privileged)
        if key not in counted:
            counted[key] = prompt_lengths(collator, rows, view)
    lengths = [counted[(view.counts_key, view.privileged)] for view in limits.views]  # [view][row]
    answers = answer_lengths(collator, rows) if limits.reference_answers else None
    for position, offset in enumerate(fitting):
        per_view = [counts[position] for counts in lengths]
        response = max(limits.max_new_tokens, answers[position]) if answers is not None else limits.max_new_tokens
        problem = length_problem(dataset, per_view, response, limits)
        if problem is not None:
            problems[offset] = f"{headers[offset].location} {problem}"
    return sorted(problems.items())


def special_token_field(specials: SpecialTokens, header: SampleHeader) -> tuple[str, str] | None:
    """(field, token) of the first special token in a row's texts, or None."""
    for field in ("question", "privileged", "answer", "reference"):
        token = specials.find(getattr(header, field))
        if token is not None:
            return field, token
    return None


def text_problem(dataset: SampleDataset, header: SampleHeader, collator: DualViewCollator,
                 limits: Limits) -> str | None:
    """A special token under `reject`, or images for a text-only model: "field ...: why"."""
    found = special_token_field(collator.specials, header) if collator.special_tokens == "reject" else None
    if found is not None:
        field, token = found
        return (f"field {dataset.field_label(field)}: contains the tokenizer's special token {token!r}, which would "
                "change the prompt's structure; remove it, or set data.special_tokens=escape to keep it as plain text")
    if header.image_sizes:
        for view in limits.views:
            if not hasattr(view.processor, "image_processor"):
                return (f"field {dataset.field_label('images')}: {len(header.image_sizes)} image(s), but "
                        f"{view.model_key} is a text-only model")
    return None


def length_problem(dataset: SampleDataset, lengths: Sequence[int], response: int, limits: Limits) -> str | None:
    """The first view that does not fit (`lengths[i]`: the prompt's tokens in `limits.views[i]`), as
    "field ...: why": the question when a plain view is too long, else the privileged text."""
    for view, length in zip(limits.views, lengths):
        field = dataset.field_label("privileged" if view.privileged else "question")
        if view.context is not None and length + response > view.context:
            return (f"field {field}: prompt too long: the {view.name} has {length} tokens (images included), "
                    f"plus {response} response tokens (rollout.max_new_tokens or the answer) = {length + response} > "
                    f"{view.context}, the context of {view.model_key} (max_position_embeddings)")
        if limits.max_prompt_tokens and length > limits.max_prompt_tokens:
            return (f"field {field}: prompt too long: the {view.name} has {length} tokens (images included) "
                    f"> data.max_prompt_tokens = {limits.max_prompt_tokens}")
        if view.in_step and limits.micro_batch_tokens and length + response > limits.micro_batch_tokens:
            return (f"field {field}: prompt too long: the {view.name} has {length} tokens (images included), "
                    f"plus {response} response tokens = {length + response} > train.micro_batch_tokens = "
                    f"{limits.micro_batch_tokens} (a micro-batch must hold one whole sequence)")
    return None


def prompt_lengths(collator: DualViewCollator, headers: Sequence[SampleHeader], view: View) -> list[int]:
    """The real token count of each row's prompt in `view` (`DualViewCollator.prompt_lengths`:
    its chat-templated text tokenised as the processor does, image tokens from the image sizes)."""
    return collator.prompt_lengths([(h.id, h.question, h.privileged if view.privileged else None, h.image_sizes)
                                    for h in headers], view.processor)


def answer_lengths(collator: DualViewCollator, headers: Sequence[SampleHeader]) -> list[int]:
    """Tokens of each reference response as an off-policy response (reference or answer, + EOS)."""
    if not headers:
        return []
    answers = [collator.data_text(h.reference_response) for h in headers]
    return [len(ids) + 1 for ids in collator.tokenizer(answers, add_special_tokens=False)["input_ids"]]
