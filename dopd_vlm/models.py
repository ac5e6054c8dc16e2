"""Load teacher/student models and processors, and build tiny offline Qwen(-VL) pairs.

Two jobs live here:

* **Loading** (`load_model`, `load_processor`, `model_family`, `vision_special_token_ids`): the rest
  of the package never names a concrete model class, so real checkpoints and the tiny ones below
  go through the same two calls.
* **Tiny pairs** (`make_tiny_pair`, `build_tiny_tokenizer`): a teacher and a smaller student of
  the *real* architectures (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3), with random weights from
  hand-written small configs and a byte-level BPE tokenizer trained locally. Everything is built
  offline and deterministically from a seed, so tests, CI and the demo never need the Hub.

All tiny models of a seed share one tokenizer (the tokenizer does not depend on the weight seed),
so any tiny teacher can be distilled into any tiny student.
"""

from __future__ import annotations

import contextlib
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
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3")
VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class _FamilyClasses:
    """transformers class names of one family, resolved lazily through `transformers` so that
    importing this module does not import every modeling file."""

    config: str
    model: str
    processor: str | None = None  # None: text-only, the tokenizer is the processor
    video_processor: str | None = None


_FAMILY_CLASSES = {
    "qwen2_vl": _FamilyClasses(
        "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor"
    ),
    "qwen2_5_vl": _FamilyClasses(
        "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"
    ),
    "qwen3_vl": _FamilyClasses(
        "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"
    ),
    "qwen3": _FamilyClasses("Qwen3Config", "Qwen3ForCausalLM"),
}


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


def _unsupported(model_type: object, checkpoint: object = None) -> ValueError:
    where = "" if checkpoint is None else f"checkpoint {os.fspath(checkpoint)}: "
    return ValueError(
        f"{where}Unsupported model family {model_type!r}: dopd_vlm supports {', '.join(FAMILIES)} "
        "(config.model_type of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and text-only Qwen3 checkpoints)."
    )


def check_family(family: str) -> str:
    """Return `family` unchanged, or raise the same clear error `model_family` raises."""
    if family not in FAMILIES:
        raise _unsupported(family)
    return family


def model_family(model_or_config: PreTrainedModel | PreTrainedConfig | str | os.PathLike) -> str:
    """The dopd_vlm family (= `config.model_type`) of a model, a config or a checkpoint path.

    Raises ValueError naming the model_type and the supported families otherwise, so a wrong
    checkpoint fails at load time instead of deep inside a forward pass; for a path, also when
    its config cannot be read (one line naming the path).
    """
    obj = model_or_config
    checkpoint = None
    if isinstance(obj, (str, os.PathLike)):
        checkpoint = obj
        obj = _read_config(obj)
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise _unsupported(model_type, checkpoint)
    return model_type


def _read_config(checkpoint: str | os.PathLike) -> PreTrainedConfig:
    """AutoConfig of a local folder or Hub id; transformers' multi-line errors become one line."""
    try:
        return AutoConfig.from_pretrained(checkpoint)
    except Exception as error:  # OSError, ValueError, JSON errors: all mean "unusable checkpoint"
        path = Path(checkpoint)
        config_file = path / "config.json"
        if config_file.is_file():
            try:
                model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
            except (ValueError, AttributeError):
                raise ValueError(f"checkpoint {path}: config.json is not a valid JSON object") from None
            if model_type not in FAMILIES:  # e.g. an architecture this transformers does not know
                raise _unsupported(model_type, checkpoint) from None
        elif path.is_dir():
            raise ValueError(f"checkpoint {path}: no config.json in this folder") from None
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        where = "no such local folder, and not loadable as a Hub id" if not path.exists() else "cannot read its config"
        raise ValueError(f"checkpoint {os.fspath(checkpoint)}: {where} ({first_line})") from None


def is_vision_family(family: str) -> bool:
    return check_family(family) in VISION_FAMILIES


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """Load a supported checkpoint through the Auto classes (works for real and tiny models).

    Vision-language configs go through AutoModelForImageTextToText, text-only ones through
    AutoModelForCausalLM. `dtype=None` keeps the dtype stored in the checkpoint.
    """
    family = model_family(path)  # a missing or unsupported checkpoint: one clear line
    config = AutoConfig.from_pretrained(path)
    auto_cls = AutoModelForImageTextToText if is_vision_family(family) else AutoModelForCausalLM
    kwargs = {} if dtype is None else {"dtype": dtype}
    return auto_cls.from_pretrained(path, config=config, **kwargs)


def load_processor(path: str | os.PathLike):
    """AutoProcessor for vision-language checkpoints, AutoTokenizer for text-only ones."""
    if is_vision_family(model_family(path)):
        return AutoProcessor.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def vision_special_token_ids(tokenizer) -> list[int]:
    """Ids of the vision placeholder/marker tokens present in the vocabulary, sorted.

    A student that samples one of these during rollout produces a sequence whose image
    placeholders no longer match its image features, and re-scoring it fails; pass these as
    `suppress_tokens` / bad words to `generate`. Accepts a tokenizer or a processor.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    vocab = tokenizer.get_vocab()
    return sorted(vocab[token] for token in VISION_SPECIAL_TOKENS if token in vocab)


# --------------------------------------------------------------------------------------------
# Tiny tokenizer
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
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
VISION_SPECIAL_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
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


def build_tiny_tokenizer(seed: int = TINY_TOKENIZER_SEED) -> PreTrainedTokenizerBase:
    """A Qwen2Tokenizer (~500 tokens) trained locally: byte-level BPE, Qwen special tokens, ChatML.

    eos = <|im_end|> (ends an assistant turn, as in Qwen instruct models), pad = <|endoftext|>.
    The same seed gives byte-identical tokenizer files.
    """
    from transformers import Qwen2Tokenizer

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
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------------
# Tiny sizes and configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySize:
    """Sizes of one tiny model. The defaults are the student's.

    `vocab_multiple` rounds the embedding/LM-head rows up to a multiple (real Qwen checkpoints pad
    their vocab, and differently per size); 1 means exactly the tokenizer's length.
    Text head_dim is hidden_size // num_heads; vision head_dim is vision_hidden_size //
    vision_num_heads and must be a multiple of 4 (2-D rotary embedding). The default pairs have
    text head_dim 32, the smallest vLLM's CPU attention accepts (rollout.engine=vllm).
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
_PATCH_SIZE = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}
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
        tie_word_embeddings=False,
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
    check_family(family)
    config_cls = getattr(transformers, _FAMILY_CLASSES[family].config)
    tokens = _special_ids(tokenizer)
    text = _text_config(size, size.padded_vocab_size(len(tokenizer)), tokens)
    if family == "qwen3":
        rope = {"rope_type": "default", "rope_theta": 1_000_000.0}
        return config_cls(**text, head_dim=size.head_dim, rope_parameters=rope, dtype="float32")

    rope = {"rope_type": "default", "mrope_section": _mrope_section(size.head_dim, family)}
    vision = dict(
        depth=size.vision_depth,
        num_heads=size.vision_num_heads,
        patch_size=_PATCH_SIZE[family],
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
            window_size=_PATCH_SIZE[family] * _MERGE_SIZE * 4,  # 4x4 merged patches, like 112 px
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
        tie_word_embeddings=False,
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


def build_tiny_processor(family: str, tokenizer):
    """The family's real processor class around `tokenizer`, sized for tiny images."""
    check_family(family)
    if family == "qwen3":
        return tokenizer
    classes = _FAMILY_CLASSES[family]
    factor = _PATCH_SIZE[family] * _MERGE_SIZE  # pixels per image token, per side
    pixels = {"shortest_edge": MIN_IMAGE_TOKENS * factor**2, "longest_edge": MAX_IMAGE_TOKENS * factor**2}
    # Qwen3-VL normalises with mean = std = 0.5 (SigLIP), Qwen2/2.5-VL with CLIP statistics.
    norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family == "qwen3_vl" else {}
    common = dict(patch_size=_PATCH_SIZE[family], merge_size=_MERGE_SIZE, temporal_patch_size=2, **norm)
    image_processor = transformers.Qwen2VLImageProcessor(size=dict(pixels), **common)
    video_pixels = {k: v * 2 for k, v in pixels.items()}  # video bounds count 2 frames
    video_cls = getattr(transformers, classes.video_processor)
    video_processor = video_cls(size=video_pixels, cap_pixels_per_frame=True, **common)
    processor_cls = getattr(transformers, classes.processor)
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def build_tiny_model(family: str, size: TinySize, tokenizer, *, seed: int) -> PreTrainedModel:
    """Random-init model; weights depend only on (family, size, tokenizer, seed).

    The global torch RNG is forked so building a model does not disturb the caller's RNG stream.
    """
    config = build_tiny_config(family, size, tokenizer)
    model_cls = getattr(transformers, _FAMILY_CLASSES[family].model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config = _generation_config(tokenizer)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tiny pairs on disk
# --------------------------------------------------------------------------------------------

SPEC_FILENAME = "tiny_spec.json"
_BUILDER_VERSION = 1  # bump when the tiny configs change, so cached pairs get rebuilt


def _pair_spec(family: str, seed: int, teacher: TinySize, student: TinySize) -> dict[str, Any]:
    return {
        "builder_version": _BUILDER_VERSION,
        "family": family,
        "seed": seed,
        "tokenizer_seed": TINY_TOKENIZER_SEED,
        "teacher": asdict(teacher),
        "student": asdict(student),
    }


def _role_seed(seed: int, family: str, role: str) -> int:
    """Distinct, stable torch seed per (seed, family, role); crc32 is stable across processes."""
    return zlib.crc32(f"{seed}:{family}:{role}".encode())


def _read_spec(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Serialise builders of one directory (e.g. several ranks calling make_tiny_pair at once)."""
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


def _save_tiny(family: str, size: TinySize, tokenizer, out: Path, *, seed: int) -> None:
    build_tiny_model(family, size, tokenizer, seed=seed).save_pretrained(out)
    build_tiny_processor(family, tokenizer).save_pretrained(out)


def make_tiny_pair(
    family: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    teacher: TinySize = TEACHER_SIZE,
    student: TinySize = STUDENT_SIZE,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a tiny teacher and student of `family` to out_dir/teacher and out_dir/student.

    Each directory holds a `save_pretrained` model plus its processor (the tokenizer alone for
    text-only qwen3); both share the same tokenizer. A spec file is written last: a later call
    with the same spec returns at once, a different spec raises unless `overwrite=True`.
    Returns {"teacher": path, "student": path}.
    """
    check_family(family)
    out_dir = Path(out_dir)
    paths = {"teacher": out_dir / "teacher", "student": out_dir / "student"}
    spec = _pair_spec(family, seed, teacher, student)
    spec_path = out_dir / SPEC_FILENAME
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir / ".make_tiny.lock"):
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
        tokenizer = build_tiny_tokenizer()
        for role, size in (("teacher", teacher), ("student", student)):
            _save_tiny(family, size, tokenizer, paths[role], seed=_role_seed(seed, family, role))
        spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return paths


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "FAMILIES",
    "VISION_FAMILIES",
    "TinySize",
    "TEACHER_SIZE",
    "STUDENT_SIZE",
    "build_tiny_tokenizer",
    "build_tiny_config",
    "build_tiny_processor",
    "build_tiny_model",
    "make_tiny_pair",
    "load_model",
    "load_processor",
    "model_family",
    "check_family",
    "is_vision_family",
    "vision_special_token_ids",
    "count_parameters",
]
