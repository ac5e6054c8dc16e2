"""Dual-view multimodal collation: the rollout view and the three aligned scoring views.

The student samples from the *rollout view* (images + question). Every sampled response is
then scored under three views that share the response token ids and the images but not the
prompt: student (x), privileged student (x + p) and teacher (x + p). Prompts differ in length,
so each view gets its own `logit_index`: `logit_index[b, n]` is the sequence position whose
output predicts response token n of row b. Gathering hidden states there lines the three views
up token by token, whatever their padding or prompt lengths.

Only this module knows chat templates, padding and multimodal token bookkeeping.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from PIL import Image

from dopd_vlm import image_cache
from dopd_vlm.choices import SpecialTokenPolicy
from dopd_vlm.data.answers import THINK_CLOSE, THINK_OPEN
from dopd_vlm.data.schema import IMAGE_PLACEHOLDER, Sample
from dopd_vlm.errors import InputError

if TYPE_CHECKING:
    from dopd_vlm.config import DataConfig

TEXT_TOKEN_TYPE = 0  # mm_token_type_ids: 0 text, 1 image, 2 video
# The image of a vision batch's padding row (see DualViewCollator): one object for the whole
# process, so the image cache preprocesses it once; processors resize it to their minimum budget.
PADDING_IMAGE = Image.new("RGB", (32, 32))
# What data text holding a tokenizer's special token gets (`data.special_tokens`): refused at load
# (prompt_checks), or kept as plain characters, the token broken by ESCAPE_MARK after its first
# character so that the tokenizer no longer reads it as the token.
ESCAPE_MARK = "\u200b"  # ZERO WIDTH SPACE

log = logging.getLogger(__name__)


@dataclass
class ModelView:
    """Model inputs for one scoring pass plus where each response token is predicted.

    `inputs` may hold one row more than `logit_index`: the padding row of a vision batch without
    images (see `DualViewCollator`), last, which no response position is ever read from.
    """

    inputs: dict[str, torch.Tensor]
    logit_index: torch.Tensor  # [B, R] long; valid where ScoringViews.response_mask

    def to(self, device: torch.device) -> "ModelView":
        return ModelView({k: v.to(device) for k, v in self.inputs.items()}, self.logit_index.to(device))


@dataclass
class ScoringViews:
    """The views one batch of responses is scored under; unneeded views are None."""

    response_ids: torch.Tensor  # [B, R] long, padded with pad_token_id
    response_mask: torch.Tensor  # [B, R] bool: response text tokens up to and including EOS
    student: ModelView
    privileged_student: ModelView | None
    teacher: ModelView | None
    rollout_logprobs: torch.Tensor | None = None  # [B, R] float32: the sampling engine's (vLLM's) log-probs

    @property
    def num_sequences(self) -> int:
        return self.response_ids.shape[0]


class SpecialTokens:
    """The strings a tokenizer reads as one added token (`<|im_end|>`, `<|image_pad|>`, `<think>`,
    ...): found in data text, or escaped to plain characters (see `SpecialTokenPolicy`).

    Added tokens are matched in the raw text before any BPE, wherever they occur, so a question
    holding `<|im_end|>\\n<|im_start|>assistant\\n` would close the user turn and open a fake
    assistant turn, and `<|image_pad|>` in p would break the processor's image bookkeeping.
    `<image>` is the toolkit's own placeholder (replaced before tokenising), never a token here.
    """

    def __init__(self, tokenizer: Any):
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        tokens = sorted((t for t in tokenizer.get_added_vocab() if t and t != IMAGE_PLACEHOLDER), key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def find(self, text: str) -> str | None:
        """The first special token in `text`, or None."""
        match = self.pattern.search(text) if self.pattern is not None else None
        return match[0] if match else None

    def escape(self, text: str) -> str:
        """`text` with every special token broken by ESCAPE_MARK after its first character."""
        if self.pattern is None:
            return text
        return self.pattern.sub(lambda match: match[0][0] + ESCAPE_MARK + match[0][1:], text)


class DualViewCollator:
    """Builds rollout and scoring batches from canonical `Sample`s.

    Args:
        processor: The student's processor (a tokenizer for text-only models).
        teacher_processor: The teacher's; must share the tokenizer (checked by
            `check_shared_vocab`). Defaults to the student's.
        privileged_template: Joins the privileged text and the question in privileged views
            (config key `data.privileged_template`).
        max_privileged_tokens: Longer privileged texts are cut to their first this-many tokens
            in the privileged views (0 = no limit; `data.max_privileged_tokens`). Only p is ever
            cut, never the question or the response. `truncated_privileged` counts the samples
            cut; the first is logged as a warning naming its id, later ones at debug level.
        min_pixels, max_pixels: Bounds every image is resized into before patching, the same in
            every processor call (0 = the processor's own; `data.min_pixels` / `data.max_pixels`).
        special_tokens: `escape`: the tokenizer's special tokens in a question, privileged text
            or answer are kept as plain characters (`SpecialTokens.escape`, before p is cut);
            `reject`: text is used as it is (`prompt_checks` refuses such rows at load time;
            `data.special_tokens`).
        chat_template_kwargs: Variables rendered into every chat template call (every prompt of
            every view, the padding row's; `data.chat_template_kwargs`), e.g. `enable_thinking`.
            A variable a processor's template never reads is left out for that processor (logged
            once), as transformers would warn on every call otherwise.

    Every prompt with p — training views, evaluation with p, warm-ups — is built by
    :meth:`prompt_text`. A question with one `<image>` placeholder per image gets each image at
    its placeholder; without placeholders the images come before the text.

    A batch for a vision model whose samples have no image gets one *padding row* after its
    samples: a prompt holding only `PADDING_IMAGE`, never gathered and with no response. Every
    forward of a vision model then runs its vision tower, which under ZeRO-3 is a series of
    collectives: a rank whose micro-batch is text-only must make them like the ranks whose
    micro-batches hold images (and, in the backward, reduce the vision tower's gradient, which is
    exactly zero from the padding row). Nothing downstream reads the row: responses, logit
    indices, loss, router and metrics cover the samples only.
    """

    def __init__(
        self,
        processor: Any,
        teacher_processor: Any = None,
        *,
        privileged_template: str,
        max_privileged_tokens: int,
        min_pixels: int = 0,
        max_pixels: int = 0,
        special_tokens: SpecialTokenPolicy = "reject",
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ):
        if isinstance(max_privileged_tokens, bool) or not isinstance(max_privileged_tokens, int) or max_privileged_tokens < 0:
            raise ValueError(f"max_privileged_tokens must be an integer >= 0, got {max_privileged_tokens!r}")
        self.processor = processor
        self.teacher_processor = teacher_processor or processor
        self.privileged_template = privileged_template
        self.max_privileged_tokens = max_privileged_tokens
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.special_tokens = special_tokens
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._unread_reported: set[tuple[str, str]] = set()
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the student tokenizer has no pad token; set one in its config")
        self.specials = SpecialTokens(self.tokenizer)
        self._truncated_ids: set[str] = set()

    @classmethod
    def from_config(cls, processor: Any, teacher_processor: Any = None, *, data: "DataConfig") -> "DualViewCollator":
        """The collator of a run's `data` section."""
        return cls(processor, teacher_processor, privileged_template=data.privileged_template,
                   max_privileged_tokens=data.max_privileged_tokens, min_pixels=data.min_pixels,
                   max_pixels=data.max_pixels, special_tokens=data.special_tokens,
                   chat_template_kwargs=data.chat_template_kwargs)

    def for_processor(self, processor: Any) -> "DualViewCollator":
        """The same prompts for another model's processor (e.g. scoring the teacher's own rollouts)."""
        return DualViewCollator(processor, privileged_template=self.privileged_template,
                                max_privileged_tokens=self.max_privileged_tokens, min_pixels=self.min_pixels,
                                max_pixels=self.max_pixels, special_tokens=self.special_tokens,
                                chat_template_kwargs=self.chat_template_kwargs)

    def data_text(self, text: str) -> str:
        """Text from the data as the models get it: escaped under `special_tokens="escape"`."""
        return self.specials.escape(text) if self.special_tokens == "escape" else text

    @property
    def truncated_privileged(self) -> int:
        """How many distinct samples (by id) had their privileged text truncated so far."""
        return len(self._truncated_ids)

    # -- prompts -------------------------------------------------------------------------
    def prompt_text(self, sample: Sample, privileged: bool, processor: Any = None) -> str:
        """The chat-templated prompt, ending with the assistant turn's opening."""
        return self.chat_prompt(sample.id, sample.question, sample.privileged if privileged else None,
                                len(sample.images), processor)

    def chat_prompt(self, sample_id: str, question: str, privileged: str | None, num_images: int,
                    processor: Any = None) -> str:
        """`prompt_text` of a sample given by its parts: the question, its privileged text (None for
        the plain view) and its number of images (load-time checks know these without decoding
        any image)."""
        processor = processor or self.processor
        text = self.data_text(question)
        if privileged is not None:
            text = self.privileged_template.format(privileged=self._privileged_text(sample_id, privileged), question=text)
        content: Any = text
        if num_images or IMAGE_PLACEHOLDER in question:
            content = _image_content(sample_id, question, text, num_images)
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **self.template_arguments(processor))

    def template_arguments(self, processor: Any = None) -> dict[str, Any]:
        """`chat_template_kwargs` as `processor`'s template gets them: without the variables it
        never reads (each such one logged once per template)."""
        processor = processor or self.processor
        if not self.chat_template_kwargs:
            return {}
        template = chat_template_of(processor)
        read = template_variables(template) if template is not None else None
        if read is None:  # a template jinja2 alone cannot parse: give it every argument
            return dict(self.chat_template_kwargs)
        for name in self.chat_template_kwargs.keys() - read:
            if (name, template) not in self._unread_reported:
                self._unread_reported.add((name, template))
                source = getattr(getattr(processor, "tokenizer", processor), "name_or_path", "") or "a model"
                log.warning("data.chat_template_kwargs.%s: the chat template of %s never reads it; left out for "
                            "that model", name, source)
        return {name: value for name, value in self.chat_template_kwargs.items() if name in read}

    def generation_opens_think(self, processor: Any = None) -> bool:
        """Whether the assistant turn's opening (the generation prompt) ends inside a `<think>`
        block, as Qwen3-VL-Thinking templates render it: the response then starts in its reasoning,
        and its think block is closed only if the response writes `</think>`."""
        processor = processor or self.processor
        messages = [{"role": "user", "content": "x"}]
        arguments = self.template_arguments(processor)
        turn = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **arguments)
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **arguments)
        opening = prompt.removeprefix(turn)
        return opening.rfind(THINK_OPEN) > opening.rfind(THINK_CLOSE)

    def privileged_text(self, sample: Sample) -> str:
        """`sample.privileged` as the privileged views show it: escaped if asked, cut to
        `max_privileged_tokens` tokens (see the class docstring)."""
        return self._privileged_text(sample.id, sample.privileged)

    def _privileged_text(self, sample_id: str, text: str) -> str:
        limit, text = self.max_privileged_tokens, self.data_text(text)
        if not limit or not text:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return text
        if sample_id not in self._truncated_ids:
            self._truncated_ids.add(sample_id)
            first = len(self._truncated_ids) == 1
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "sample %r: privileged text has %d tokens, truncated to the first %d "
                "(data.max_privileged_tokens)%s",
                sample_id, len(ids), limit,
                "; later truncations are counted in truncated_privileged, not logged" if first else "",
            )
        # A cut inside a multi-byte character decodes to U+FFFD; drop that partial character.
        return self.tokenizer.decode(ids[:limit]).rstrip("\ufffd")

    def _encode(self, samples: Sequence[Sample], privileged: bool | Sequence[bool], processor: Any, padding_side: str):
        flags = [privileged] * len(samples) if isinstance(privileged, bool) else list(privileged)
        texts = [self.prompt_text(s, p, processor) for s, p in zip(samples, flags)]
        images = [image for s in samples for image in s.images]
        vision = hasattr(processor, "image_processor")
        if images and not vision:
            first = next(s for s in samples if s.images)
            raise ValueError(
                f"sample {first.id!r} has {len(first.images)} image(s) but the model is text-only; "
                "use a text recipe (e.g. synthetic_text) or a vision-language checkpoint"
            )
        kwargs: dict[str, Any] = dict(return_tensors="pt", padding=True, padding_side=padding_side)
        if not vision:
            return dict(processor(texts, **kwargs))
        if not images:  # the padding row (see the class docstring)
            texts.append(padding_prompt(processor, self.template_arguments(processor)))
            images = [PADDING_IMAGE]
        with image_cache.reuse(processor):  # each distinct image is preprocessed once
            return dict(processor(text=texts, images=images, **kwargs, **self.image_size(processor)))

    def pixel_bounds(self) -> dict[str, int]:
        """The pixel bounds set by `data.min_pixels` / `data.max_pixels` (unset ones left out)."""
        return {key: value for key, value in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if value}

    def image_size(self, processor: Any) -> dict[str, Any]:
        """The processor-call argument that bounds image pixels (nothing when neither bound is set)."""
        if not (self.min_pixels or self.max_pixels):
            return {}
        own = processor.image_processor.size
        return {"size": {"shortest_edge": self.min_pixels or own["shortest_edge"],
                         "longest_edge": self.max_pixels or own["longest_edge"]}}

    def rollout_batch(self, samples: Sequence[Sample], privileged: bool = False) -> dict[str, torch.Tensor]:
        """Left-padded prompts for `generate` (all prompts end at the same column): the plain view,
        or with `privileged` the privileged view (to score a model's answers given p). Row b is
        samples[b]; a vision batch without images has the padding row after them."""
        return self._encode(samples, privileged=privileged, processor=self.processor, padding_side="left")

    # -- scoring -------------------------------------------------------------------------
    def scoring_views(
        self,
        samples: Sequence[Sample],
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        privileged_student: bool = True,
        teacher: bool = True,
        teacher_privileged: bool = True,
        padding_side: str = "right",
    ) -> ScoringViews:
        """Score views for `samples[b]` followed by response row b (see module docstring).

        `teacher_privileged=False` gives the teacher the plain view (vanilla OPD without p).
        `padding_side` only moves the padding; positions come from the attention mask, so the
        scores do not depend on it.
        """

        def view(privileged: bool, processor: Any) -> ModelView:
            return self.response_view(samples, response_ids, response_mask, privileged, processor, padding_side)

        return ScoringViews(
            response_ids=response_ids,
            response_mask=response_mask,
            student=view(False, self.processor),
            privileged_student=view(True, self.processor) if privileged_student else None,
            teacher=view(teacher_privileged, self.teacher_processor) if teacher else None,
        )

    def response_view(
        self,
        samples: Sequence[Sample],
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        privileged: bool | Sequence[bool],
        processor: Any = None,
        padding_side: str = "right",
    ) -> ModelView:
        """One view: prompt b (plain, or with p where `privileged` says so) followed by response row b."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if response_ids.shape[0] != len(samples):
            raise ValueError(f"{response_ids.shape[0]} responses for {len(samples)} samples")
        lengths = response_mask.sum(dim=1)
        if not torch.equal(response_mask, _prefix_mask(lengths, response_mask.shape[1])):
            raise ValueError("response_mask must be a prefix mask (tokens after EOS are masked)")
        prompts = self._encode(samples, privileged, processor or self.processor, padding_side="right")
        padding_rows = prompts["input_ids"].shape[0] - len(samples)
        if padding_rows:  # the padding row gets no response
            response_ids = torch.cat([response_ids, response_ids.new_zeros(padding_rows, response_ids.shape[1])])
            lengths = torch.cat([lengths, lengths.new_zeros(padding_rows)])
        view = _append_responses(prompts, response_ids, lengths, self.tokenizer.pad_token_id, padding_side)
        return ModelView(view.inputs, view.logit_index[: len(samples)])


def padding_prompt(processor: Any, template_arguments: Mapping[str, Any] | None = None) -> str:
    """The prompt of a vision batch's padding row: a user turn holding one image, rendered with the
    run's chat-template arguments like every other prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(template_arguments or {}))


def chat_template_of(processor: Any) -> str | None:
    """The chat template `apply_chat_template` renders for `processor` (a processor's own, else its
    tokenizer's; of several named templates the `default` one)."""
    template = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                       "chat_template", None)
    return template.get("default") if isinstance(template, dict) else template


@functools.lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str] | None:
    """The variables a Jinja chat template reads from its caller (`enable_thinking`, `messages`,
    ...), or None when jinja2 alone cannot parse it (a template using transformers' own tags)."""
    import jinja2
    from jinja2 import meta

    try:
        parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:
        return None
    return frozenset(meta.find_undeclared_variables(parsed))


def _image_content(sample_id: str, question: str, text: str, images: int) -> list[dict[str, str]]:
    """User-turn content: the images at the question's `<image>` placeholders (one per image),
    or, without placeholders, all images before the text."""
    placeholders = question.count(IMAGE_PLACEHOLDER)
    if not placeholders:
        return [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    if placeholders != images:
        raise ValueError(
            f"sample {sample_id!r}: the question has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"for {images} image(s); use one per image, or none to put the images first"
        )
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != images:
        raise ValueError(
            f"sample {sample_id!r}: the privileged text or data.privileged_template contains "
            f"{IMAGE_PLACEHOLDER}; only the question may hold placeholders"
        )
    content = []
    for index, piece in enumerate(pieces):
        if index:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def _prefix_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def _append_responses(
    prompts: dict[str, torch.Tensor],
    response_ids: torch.Tensor,
    lengths: torch.Tensor,
    pad_id: int,
    padding_side: str,
) -> ModelView:
    """Concatenate each right-padded prompt with its response; pad the result on `padding_side`.

    Per-sample tensors (input_ids, attention_mask, mm_token_type_ids) are rebuilt; per-image
    tensors (pixel_values, image_grid_thw) pass through unchanged. Response tokens are text,
    so mm_token_type_ids is extended with TEXT_TOKEN_TYPE.
    """
    prompt_ids, prompt_attention = prompts["input_ids"], prompts["attention_mask"].bool()
    prompt_lengths = prompt_attention.sum(dim=1)
    batch = prompt_ids.shape[0]
    total = int((prompt_lengths + lengths).max())
    input_ids = torch.full((batch, total), pad_id, dtype=prompt_ids.dtype)
    attention = torch.zeros((batch, total), dtype=prompts["attention_mask"].dtype)
    token_types = prompts.get("mm_token_type_ids")
    new_types = torch.full((batch, total), TEXT_TOKEN_TYPE, dtype=token_types.dtype) if token_types is not None else None
    offsets = (total - prompt_lengths - lengths) if padding_side == "left" else torch.zeros_like(lengths)
    for b in range(batch):
        o, p, r = int(offsets[b]), int(prompt_lengths[b]), int(lengths[b])
        input_ids[b, o : o + p] = prompt_ids[b, prompt_attention[b]]
        input_ids[b, o + p : o + p + r] = response_ids[b, :r]
        attention[b, o : o + p + r] = 1
        if new_types is not None:
            new_types[b, o : o + p] = token_types[b, prompt_attention[b]]
    inputs = {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    inputs.update(input_ids=input_ids, attention_mask=attention)
    if new_types is not None:
        inputs["mm_token_type_ids"] = new_types
    steps = torch.arange(response_ids.shape[1])[None, :]
    logit_index = (offsets[:, None] + prompt_lengths[:, None] - 1 + steps).clamp(max=total - 1)
    return ModelView(inputs=inputs, logit_index=logit_index)


def extract_responses(
    sequences: torch.Tensor, prompt_width: int, eos_token_ids: Sequence[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `generate` output into responses and a mask that ends at (and includes) the first EOS.

    Works when the pad token is also an EOS token: the first EOS is kept, everything after it
    is masked and replaced by pad. A response with no EOS (cut by max_new_tokens) keeps all
    its tokens.
    """
    responses = sequences[:, prompt_width:].clone()
    is_eos = torch.isin(responses, torch.as_tensor(list(eos_token_ids), device=responses.device))
    after_first_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    mask = ~after_first_eos
    responses[~mask] = pad_token_id
    return responses, mask


def check_shared_vocab(teacher_tokenizer: Any, student_tokenizer: Any, teacher_vocab: int, student_vocab: int) -> int:
    """Return the common vocabulary size; raise if the tokenizers really differ.

    LM heads padded to different sizes are fine (sliced to the common size); a different
    token-to-id mapping is not: the response ids would mean different tokens to the teacher.
    """
    check_same_tokenizer(teacher_tokenizer, student_tokenizer)
    student_tokenizer = getattr(student_tokenizer, "tokenizer", student_tokenizer)
    used = len(student_tokenizer)
    common = min(teacher_vocab, student_vocab)
    if used > common:
        raise InputError(f"tokenizer has {used} tokens but an LM head has only {common} rows")
    return common


def check_same_tokenizer(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Raise InputError if teacher and student map tokens to ids differently (processors or tokenizers)."""
    teacher_tokenizer = getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer)
    student_tokenizer = getattr(student_tokenizer, "tokenizer", student_tokenizer)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        t, s = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
        diff = sorted(set(t.items()) ^ set(s.items()), key=lambda kv: kv[1])[:3]
        raise InputError(
            f"teacher and student tokenizers differ (model.teacher has {len(t)} tokens, model.student "
            f"{len(s)}; first differences {diff}); DOPD needs one shared tokenizer: pick a teacher and "
            "student of the same model family and tokenizer"
        )


def reference_responses(collator: DualViewCollator, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference responses (`Sample.reference_response`) tokenised as responses ending in EOS
    (the off-policy SFT target)."""
    tok = collator.tokenizer
    rows = [tok(collator.data_text(s.reference_response), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in samples]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = True
    return ids, mask
