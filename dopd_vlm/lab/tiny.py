"""Tiny offline teacher/student pairs of the real architectures, for tests, CI and demos.

A teacher and a smaller student of a real family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3) with
random weights from hand-written small configs, and a byte-level BPE tokenizer trained locally
with Qwen's special tokens and chat template. Everything is built offline and deterministically
from a seed, so nothing needs the Hub. All tiny models of a seed share one tokenizer (it does not
depend on the weight seed), so any tiny teacher can be distilled into any tiny student.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import GenerationConfig, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from dopd_vlm.families import family_info
from dopd_vlm.models import VISION_SPECIAL_TOKENS

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# Qwen2-VL's special tokens, in Qwen's order; they are appended after the BPE vocabulary, as in
# the real tokenizers.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    *VISION_SPECIAL_TOKENS,
)
# BPE entries (256 byte symbols + merges) before the special tokens. 486 + 14 = 500 tokens: not
# a multiple of 64 on purpose, so a `vocab_multiple` of 64 really pads the LM head.
TINY_BPE_VOCAB_SIZE = 486
# The tokenizer every tiny pair uses, whatever the weight seed (see module docstring).
TINY_TOKENIZER_SEED = 0

# Qwen's ChatML layout, written for this project: `<|im_start|>role\n...<|im_end|>\n`, images as
# `<|vision_start|><|image_pad|><|vision_end|>` (the processor expands `<|image_pad|>` to one
# token per merged patch). Content may be a string or a list of {"type": "image"|"video"|"text"}
# items. Unlike Qwen2-VL's template no default system prompt is inserted: prompts stay short,
# which matters on CPU.
QWEN_CHAT_TEMPLATE = """\
{#- ChatML as in Qwen: every tag trims the whitespace around it; only {{ }} emits text. -#}
{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif item['type'] == 'video' or 'video' in item -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in item -%}
                {{- item['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""

# Templates that behave like the published ones, written for this project, for tests of chat-
# template arguments and thinking models (`TinyChat`; `make_tiny_pair(chat=...)`).
#
# Qwen3's: string content only (list content renders empty, as in Qwen3's template), no default
# system turn, earlier assistant turns without their reasoning; `enable_thinking=false` puts an
# empty, closed think block in the generation prompt, otherwise the model opens its own.
QWEN3_CHAT_TEMPLATE = """\
{%- for message in messages -%}
    {%- if message['content'] is string -%}
        {%- set content = message['content'] -%}
    {%- else -%}
        {%- set content = '' -%}
    {%- endif -%}
    {%- if message['role'] == 'assistant' and '</think>' in content -%}
        {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\\n\\n</think>\\n\\n' -}}
    {%- endif -%}
{%- endif -%}
"""


def _edited(template: str, *changes: tuple[str, str]) -> str:
    """`template` with each (old, new) replaced; every old text must occur exactly once."""
    for old, new in changes:
        if template.count(old) != 1:
            raise ValueError(f"{old!r} occurs {template.count(old)} times in the template")
        template = template.replace(old, new)
    return template


# Qwen2-VL's and Qwen2.5-VL's: the ChatML above with a default system turn when the conversation
# has none, and `add_vision_id=true` numbering the images and videos ("Picture 1: ").
QWEN2_VL_CHAT_TEMPLATE = _edited(
    QWEN_CHAT_TEMPLATE,
    ("{%- for message in messages -%}\n",
     "{%- set image_count = namespace(value=0) -%}\n{%- set video_count = namespace(value=0) -%}\n"
     "{%- for message in messages -%}\n"
     "    {%- if loop.first and message['role'] != 'system' -%}\n"
     "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}\n"
     "    {%- endif -%}\n"),
    ("{{- '<|vision_start|><|image_pad|>",
     "{%- set image_count.value = image_count.value + 1 -%}"
     "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}"
     "{{- '<|vision_start|><|image_pad|>"),
    ("{{- '<|vision_start|><|video_pad|>",
     "{%- set video_count.value = video_count.value + 1 -%}"
     "{%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}"
     "{{- '<|vision_start|><|video_pad|>"),
)

# Qwen3-VL-Thinking's: the ChatML above, but the generation prompt opens the think block
# (`<|im_start|>assistant\n<think>\n`): the response starts in its reasoning.
QWEN3_VL_THINKING_CHAT_TEMPLATE = _edited(
    QWEN_CHAT_TEMPLATE, ("{{- '<|im_start|>assistant\\n' -}}", "{{- '<|im_start|>assistant\\n<think>\\n' -}}"))

# Qwen3's reasoning delimiters, added after the special tokens as Qwen3's tokenizer has them:
# added tokens that are *not* special (decoding with skip_special_tokens keeps them).
THINK_TOKENS = ("<think>", "</think>")


@dataclass(frozen=True)
class TinyChat:
    """The chat template of a tiny pair's processor and the tokens added to its tokenizer (as plain,
    non-special added tokens, after the special ones)."""

    template: str = QWEN_CHAT_TEMPLATE
    added_tokens: tuple[str, ...] = ()


CHATML = TinyChat()  # the default: every tiny pair and the shipped ones
QWEN3_CHAT = TinyChat(QWEN3_CHAT_TEMPLATE, THINK_TOKENS)
QWEN2_VL_CHAT = TinyChat(QWEN2_VL_CHAT_TEMPLATE)
QWEN3_VL_THINKING_CHAT = TinyChat(QWEN3_VL_THINKING_CHAT_TEMPLATE, THINK_TOKENS)

_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "gray", "pink")
_SHAPES = ("circle", "square", "triangle", "rectangle", "star", "diamond", "ellipse", "hexagon")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PLACES = ("left", "right", "top", "bottom", "middle", "center", "corner", "edge")
_SUPERLATIVES = ("leftmost", "rightmost", "topmost", "largest", "smallest", "biggest", "lowest")


def _box(rng: random.Random) -> str:
    x1, y1 = rng.randrange(0, 90), rng.randrange(0, 90)
    return f"[{x1}, {y1}, {x1 + rng.randrange(8, 40)}, {y1 + rng.randrange(8, 40)}]"


def _corpus_line(rng: random.Random) -> str:
    c, s, n = rng.choice(_COLOURS), rng.choice(_SHAPES), rng.randrange(0, 11)
    c2, s2 = rng.choice(_COLOURS), rng.choice(_SHAPES)
    lines = (
        f"How many shapes are there in the image? Answer: {n}",
        f"How many {c} shapes are there? There are {_NUMBER_WORDS[n]} {c} shapes.",
        f"How many {s}s can you see? I can see {n} {s}s.",
        f"What colour is the {s}? The {s} is {c}.",
        f"What color is the {rng.choice(_SUPERLATIVES)} shape? It is {c}.",
        f"Which shape is {c}? The {c} shape is a {s}.",
        f"Is there a {c} {s} in the picture? {rng.choice(('Yes', 'No'))}, there is {'a' if n else 'no'} {c} {s}.",
        f"Where is the {c} {s}? It is at the {rng.choice(_PLACES)} of the image, above the {c2} {s2}.",
        f"What is the {rng.choice(_SUPERLATIVES)} shape? The {c} {s}.",
        f"Objects: {c} {s} {_box(rng)}; {c2} {s2} {_box(rng)}",
        f"{c} {s} {_box(rng)}, {c2} {s2} {_box(rng)}",
        f"The {c} {s} is below the {c2} {s2} and next to the {rng.choice(_PLACES)} edge.",
        "Answer with a single word. Answer with a number. Describe the image in one sentence.",
        f"Let me think step by step. First I count the {s}s, then the {c} ones, so the answer is {n}.",
        "You are a helpful assistant. The user asks a question about the picture and you answer it.",
        f"Count the objects: {', '.join(_NUMBER_WORDS[: n + 1])}. Total {n} ({_NUMBER_WORDS[n]}).",
    )
    return rng.choice(lines)


def _tokenizer_corpus(seed: int, num_lines: int = 3000) -> list[str]:
    """Question/answer text about coloured shapes, counts and bounding boxes.

    It shapes which merges the BPE learns, so the tiny vocabulary spends its ~230 merges on the
    words the synthetic tasks use ("Ġred", "Ġcircle", ...); any other text still encodes, byte
    by byte.
    """
    rng = random.Random(seed)
    return [_corpus_line(rng) for _ in range(num_lines)]


def _train_bpe(seed: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with Qwen's pre-tokenizer; returns (vocab, merges)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no <unk>
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_tiny_tokenizer(seed: int = TINY_TOKENIZER_SEED, chat: TinyChat = CHATML) -> PreTrainedTokenizerBase:
    """A Qwen2Tokenizer (~500 tokens) trained locally: byte-level BPE, Qwen special tokens, ChatML
    (or `chat`'s template, with its added tokens after the special ones).

    eos = <|im_end|> (ends an assistant turn, as in Qwen instruct models), pad = <|endoftext|>.
    The same seed gives byte-identical tokenizer files.
    """
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = _train_bpe(seed)
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=32768,
    )
    if chat.added_tokens:
        tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in chat.added_tokens])
    tokenizer.chat_template = chat.template
    return tokenizer


# --------------------------------------------------------------------------------------------
# Tiny sizes and configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySize:
    """Sizes of one tiny model. The defaults are the student's.

    `vocab_multiple` rounds the embedding/LM-head rows up to a multiple (real Qwen checkpoints pad
    their vocab, and differently per size); 1 means exactly the tokenizer's length.
    `tie_word_embeddings` shares one weight between the input embedding and the LM head, as the
    small real checkpoints do (Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B, Qwen3-1.7B).
    Text head_dim is hidden_size // num_heads; vision head_dim is vision_hidden_size //
    vision_num_heads and must be a multiple of 4 (2-D rotary embedding).
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vision_num_heads: int = 2
    vision_intermediate_size: int = 64
    vision_num_position_embeddings: int = 64  # Qwen3-VL only: a perfect square (8x8 grid)
    vocab_multiple: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append("hidden_size must be divisible by num_heads")
        elif self.head_dim % 2 or self.head_dim < 6:
            problems.append("head_dim (hidden_size // num_heads) must be even and >= 6 (3-D M-RoPE)")
        if self.num_heads % self.num_kv_heads:
            problems.append("num_heads must be divisible by num_kv_heads")
        if self.vision_hidden_size % self.vision_num_heads or (self.vision_hidden_size // self.vision_num_heads) % 4:
            problems.append("vision_hidden_size // vision_num_heads must be a multiple of 4")
        if self.vision_intermediate_size % self.vision_hidden_size:
            problems.append("vision_intermediate_size must be a multiple of vision_hidden_size (Qwen2-VL mlp_ratio)")
        if round(self.vision_num_position_embeddings**0.5) ** 2 != self.vision_num_position_embeddings:
            problems.append("vision_num_position_embeddings must be a perfect square")
        if min(self.num_layers, self.vision_depth, self.vocab_multiple) < 1:
            problems.append("num_layers, vision_depth and vocab_multiple must be >= 1")
        if problems:
            raise ValueError(f"Invalid TinySize {self}: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def padded_vocab_size(self, num_tokens: int) -> int:
        """Embedding rows for a tokenizer of `num_tokens` tokens."""
        return -(-num_tokens // self.vocab_multiple) * self.vocab_multiple


STUDENT_SIZE = TinySize()
TEACHER_SIZE = TinySize(
    hidden_size=96,
    num_layers=3,
    num_heads=3,
    num_kv_heads=1,
    intermediate_size=192,
    vision_hidden_size=48,
    vision_depth=2,
    vision_num_heads=2,
    vision_intermediate_size=96,
    vocab_multiple=64,
)

# Image processing. Qwen2/2.5-VL: 14-px patches merged 2x2, so one image token per 28x28 pixels;
# Qwen3-VL: 16-px patches, one token per 32x32. A 112x112 image gives a 4x4 token grid (16 tokens)
# in every family; the pixel bounds keep any image between 4 and 64 tokens.
_MERGE_SIZE = 2
MIN_IMAGE_TOKENS = 4
MAX_IMAGE_TOKENS = 64


def _mrope_section(head_dim: int, family: str) -> list[int]:
    """Split the head_dim/2 rotary frequencies over (time, height, width).

    Mirrors the real proportions: Qwen2/2.5-VL use [16, 24, 24] of 64 (height/width 3/8 each),
    Qwen3-VL [24, 20, 20] (5/16 each); the sum must be head_dim/2.
    """
    half = head_dim // 2
    spatial = round(half * (5 / 16 if family == "qwen3_vl" else 3 / 8))
    spatial = min(max(spatial, 1), (half - 1) // 2)  # every axis keeps at least one frequency
    return [half - 2 * spatial, spatial, spatial]


def _text_config(size: TinySize, vocab_size: int, tokens: dict[str, int]) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokens["bos"],
        eos_token_id=tokens["eos"],
        pad_token_id=tokens["pad"],
        tie_word_embeddings=size.tie_word_embeddings,
    )


def _vision_token_ids(tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _special_ids(tokenizer) -> dict[str, int]:
    """bos/eos/pad ids for the configs. Qwen has no BOS token: like the real checkpoints, the
    configs name <|endoftext|> (also the pad token) as bos."""
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return {"bos": endoftext, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}


def build_tiny_config(family: str, size: TinySize, tokenizer) -> PreTrainedConfig:
    """A small config of the family's real architecture, its token ids read from `tokenizer`."""
    config_cls = getattr(transformers, family_info(family).config)
    tokens = _special_ids(tokenizer)
    text = _text_config(size, size.padded_vocab_size(len(tokenizer)), tokens)
    if family == "qwen3":
        rope = {"rope_type": "default", "rope_theta": 1_000_000.0}
        return config_cls(**text, head_dim=size.head_dim, rope_parameters=rope, dtype="float32")

    rope = {"rope_type": "default", "mrope_section": _mrope_section(size.head_dim, family)}
    vision = dict(
        depth=size.vision_depth,
        num_heads=size.vision_num_heads,
        patch_size=family_info(family).patch_size,
        spatial_merge_size=_MERGE_SIZE,
        temporal_patch_size=2,
        in_channels=3,
    )
    if family == "qwen2_vl":
        rope["rope_theta"] = 1_000_000.0
        vision.update(
            embed_dim=size.vision_hidden_size,
            hidden_size=size.hidden_size,  # Qwen2-VL's name for the merger's output width
            mlp_ratio=size.vision_intermediate_size // size.vision_hidden_size,
        )
    elif family == "qwen2_5_vl":
        rope["rope_theta"] = 1_000_000.0
        vision.update(
            hidden_size=size.vision_hidden_size,
            intermediate_size=size.vision_intermediate_size,
            out_hidden_size=size.hidden_size,
            window_size=family_info(family).patch_size * _MERGE_SIZE * 4,  # 4x4 merged patches, like 112 px
            fullatt_block_indexes=[size.vision_depth - 1],  # last block attends globally
        )
    else:  # qwen3_vl
        rope.update(rope_theta=5_000_000.0, mrope_interleaved=True)
        text["head_dim"] = size.head_dim
        vision.update(
            hidden_size=size.vision_hidden_size,
            intermediate_size=size.vision_intermediate_size,
            out_hidden_size=size.hidden_size,
            num_position_embeddings=size.vision_num_position_embeddings,
            # Feature taps feeding the first LM layers; must be < depth (real model: [8, 16, 24]).
            deepstack_visual_indexes=list(range(max(1, size.vision_depth - 1)))[:3],
        )
    text["rope_parameters"] = rope
    return config_cls(
        text_config=text,
        vision_config=vision,
        **_vision_token_ids(tokenizer),
        tie_word_embeddings=size.tie_word_embeddings,
        dtype="float32",
    )


def _generation_config(tokenizer) -> GenerationConfig:
    """Greedy by default; stop on <|im_end|> or <|endoftext|>, as Qwen instruct checkpoints do."""
    tokens = _special_ids(tokenizer)
    return GenerationConfig(
        bos_token_id=tokens["bos"],
        eos_token_id=[tokens["eos"], tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokens["pad"],
    )


def build_tiny_processor(family: str, tokenizer, chat_template: str = QWEN_CHAT_TEMPLATE):
    """The family's real processor class around `tokenizer`, sized for tiny images."""
    classes = family_info(family)
    if not classes.vision:
        return tokenizer
    factor = family_info(family).patch_size * _MERGE_SIZE  # pixels per image token, per side
    pixels = {"shortest_edge": MIN_IMAGE_TOKENS * factor**2, "longest_edge": MAX_IMAGE_TOKENS * factor**2}
    # Qwen3-VL normalises with mean = std = 0.5 (SigLIP), Qwen2/2.5-VL with CLIP statistics.
    norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family == "qwen3_vl" else {}
    common = dict(patch_size=family_info(family).patch_size, merge_size=_MERGE_SIZE, temporal_patch_size=2, **norm)
    image_processor = transformers.Qwen2VLImageProcessor(size=dict(pixels), **common)
    video_pixels = {k: v * 2 for k, v in pixels.items()}  # video bounds count 2 frames
    video_cls = getattr(transformers, classes.video_processor)
    video_processor = video_cls(size=video_pixels, cap_pixels_per_frame=True, **common)
    processor_cls = getattr(transformers, classes.processor)
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def build_tiny_model(family: str, size: TinySize, tokenizer, *, seed: int,
                     dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Random-init model; weights depend only on (family, size, tokenizer, seed, dtype).

    The global torch RNG is forked so building a model does not disturb the caller's RNG stream.
    `dtype` other than float32 builds the weights in that dtype directly (a 2B-shaped model in
    bfloat16, as real checkpoints are stored, without a float32 copy first).
    """
    config = build_tiny_config(family, size, tokenizer)
    model_cls = getattr(transformers, family_info(family).model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config) if dtype == torch.float32 else model_cls._from_config(config, dtype=dtype)
    model.generation_config = _generation_config(tokenizer)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tiny pairs on disk
# --------------------------------------------------------------------------------------------

SPEC_FILENAME = "tiny_spec.json"
BUILDER_VERSION = 1  # bump when the tiny configs change, so cached pairs get rebuilt


def _pair_spec(family: str, seed: int, teacher: TinySize, student: TinySize, chat: TinyChat,
               dtype: torch.dtype) -> dict[str, Any]:
    spec = {
        "builder_version": BUILDER_VERSION,
        "family": family,
        "seed": seed,
        "tokenizer_seed": TINY_TOKENIZER_SEED,
        "teacher": asdict(teacher),
        "student": asdict(student),
    }
    if chat != CHATML:  # the default pairs' specs (and the shipped pairs' files) stay as they were
        spec["chat"] = {"template_sha256": hashlib.sha256(chat.template.encode()).hexdigest(),
                        "added_tokens": list(chat.added_tokens)}
    if dtype != torch.float32:  # likewise for float32 pairs
        spec["dtype"] = str(dtype).removeprefix("torch.")
    return spec


def _role_seed(seed: int, family: str, role: str) -> int:
    """Distinct, stable torch seed per (seed, family, role); crc32 is stable across processes."""
    return zlib.crc32(f"{seed}:{family}:{role}".encode())


def _read_spec(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def exclusive_lock(lock_path: Path):
    """Serialise processes that write one place (e.g. several ranks calling make_tiny_pair at once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _save_tiny(family: str, size: TinySize, tokenizer, out: Path, *, seed: int, dtype: torch.dtype) -> None:
    build_tiny_model(family, size, tokenizer, seed=seed, dtype=dtype).save_pretrained(out)
    build_tiny_processor(family, tokenizer, tokenizer.chat_template).save_pretrained(out)


def make_tiny_pair(
    family: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    teacher: TinySize = TEACHER_SIZE,
    student: TinySize = STUDENT_SIZE,
    overwrite: bool = False,
    chat: TinyChat = CHATML,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """Write a tiny teacher and student of `family` to out_dir/teacher and out_dir/student.

    Each directory holds a `save_pretrained` model plus its processor (the tokenizer alone for
    text-only qwen3); both share the same tokenizer, and the weights are stored in `dtype`. A spec
    file is written last: a later call with the same spec returns at once, a different spec raises
    unless `overwrite=True`. `chat` gives both another chat template (and added tokens): e.g.
    `QWEN3_CHAT`, a Qwen3-like thinking template. Returns {"teacher": path, "student": path}.
    """
    family_info(family)  # an unknown family: the one clear error
    out_dir = Path(out_dir)
    paths = {"teacher": out_dir / "teacher", "student": out_dir / "student"}
    spec = _pair_spec(family, seed, teacher, student, chat, dtype)
    spec_path = out_dir / SPEC_FILENAME
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out_dir / ".make_tiny.lock"):
        existing = _read_spec(spec_path)
        complete = all((path / "config.json").is_file() for path in paths.values())
        if existing == spec and complete and not overwrite:
            return paths
        if existing not in (None, spec) and not overwrite:
            raise FileExistsError(
                f"{out_dir} holds a tiny pair built with a different spec ({spec_path}); "
                "pass overwrite=True (--overwrite) or choose another directory."
            )
        spec_path.unlink(missing_ok=True)
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)
        tokenizer = build_tiny_tokenizer(chat=chat)
        for role, size in (("teacher", teacher), ("student", student)):
            _save_tiny(family, size, tokenizer, paths[role], seed=_role_seed(seed, family, role), dtype=dtype)
        spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return paths
