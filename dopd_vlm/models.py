"""Loading teacher/student models and processors of the supported families.

The rest of the package never names a concrete model class: real checkpoints and the tiny
offline ones (`dopd_vlm.lab.tiny`) go through `load_model` / `load_processor`. The families are the
table in `dopd_vlm.families`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
)

from dopd_vlm.errors import InputError, one_line
from dopd_vlm.families import FAMILIES, is_vision_family, unsupported

# Qwen's vision placeholder/marker tokens, in Qwen's order.
VISION_SPECIAL_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def model_family(model_or_config: PreTrainedModel | PreTrainedConfig | str | os.PathLike) -> str:
    """The dopd_vlm family (= `config.model_type`) of a model, a config or a checkpoint path.

    Raises InputError naming the model_type and the supported families otherwise, so a wrong
    checkpoint fails at load time instead of deep inside a forward pass; for a path, also when
    its config cannot be read (one line naming the path).
    """
    obj = model_or_config
    checkpoint = None
    if isinstance(obj, (str, os.PathLike)):
        checkpoint = os.fspath(obj)
        obj = _read_config(obj)
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise unsupported(model_type, checkpoint)
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
                raise InputError(f"checkpoint {path}: config.json is not a valid JSON object") from None
            if model_type not in FAMILIES:  # e.g. an architecture this transformers does not know
                raise unsupported(model_type, os.fspath(checkpoint)) from None
        elif path.is_dir():
            raise InputError(f"checkpoint {path}: no config.json in this folder") from None
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        where = "no such local folder, and not loadable as a Hub id" if not path.exists() else "cannot read its config"
        raise InputError(f"checkpoint {os.fspath(checkpoint)}: {where} ({first_line})") from None


def check_weight_files(checkpoint: str | os.PathLike) -> None:
    """Raise InputError naming the file if a local checkpoint's safetensors weights are incomplete.

    Only the headers are read (milliseconds): a truncated or damaged file fails here, before any
    model loads, instead of inside `from_pretrained` with safetensors' own message, which names
    no file. A sharded checkpoint's index must name shards that exist. Hub ids are left to
    transformers, which verifies what it downloads.
    """
    from safetensors import safe_open

    folder = Path(checkpoint)
    if not folder.is_dir():
        return
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"checkpoint {folder}: {index.name} is not a valid safetensors index") from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise InputError(f"checkpoint {folder}: {missing[0]}, listed in {index.name}, is missing")
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001  (SafetensorError, OSError: an unusable file either way)
            raise InputError(
                f"checkpoint {folder}: {weights.name} is damaged or truncated ({one_line(error)}); re-download or re-export it"
            ) from None


def load_model(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
               attn_implementation: str | None = None) -> PreTrainedModel:
    """Load a supported checkpoint through the Auto classes (works for real and tiny models).

    Vision-language configs go through AutoModelForImageTextToText, text-only ones through
    AutoModelForCausalLM. `dtype=None` keeps the dtype stored in the checkpoint;
    `attn_implementation=None` transformers' default attention (`model.attn_implementation`).
    """
    family = model_family(path)  # a missing or unsupported checkpoint: one clear line
    check_weight_files(path)
    config = AutoConfig.from_pretrained(path)
    auto_cls = AutoModelForImageTextToText if is_vision_family(family) else AutoModelForCausalLM
    kwargs = {} if dtype is None else {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = auto_cls.from_pretrained(path, config=config, **kwargs)
    except OSError as error:  # no weight file, an unreadable one: transformers' message, on one line
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"checkpoint {os.fspath(path)}: cannot load its weights ({first_line})") from None
    except (ValueError, ImportError) as error:
        if not attn_implementation or (isinstance(error, ValueError) and "attn_implementation" not in str(error)):
            raise
        # an unknown kernel (ValueError) or one whose package is missing here (ImportError)
        raise InputError(f"config key 'model.attn_implementation': {attn_implementation!r} cannot be used "
                         f"({one_line(error)})") from None
    # `generate` hands the output layer the last position of every row, a [B, 1, H] view that is not
    # contiguous; on CPU a bf16 linear layer then takes a batched-matmul path that copies the whole
    # weight once per row (12.6 s for 2 rows at a 151,936-row head, BENCHMARKS.md "A DOPD step at
    # the 2B shape"). A contiguous copy of the B x H input costs nothing.
    model.get_output_embeddings().register_forward_pre_hook(contiguous_input)
    return model


def contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """A forward pre-hook: the module's first input made contiguous."""
    return (args[0].contiguous(), *args[1:])


def context_length(path: str | os.PathLike) -> int | None:
    """The longest sequence (prompt + response tokens) the checkpoint's language model is built for
    (`max_position_embeddings` of its text config), or None when the config does not say."""
    config = AutoConfig.from_pretrained(path)
    text_config = getattr(config, "text_config", None) or config
    return getattr(text_config, "max_position_embeddings", None)


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


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a model's (first) parameter lives: where its inputs must go."""
    return next(model.parameters()).device


def head_rows(model: torch.nn.Module) -> int:
    """Rows of a model's (possibly ZeRO-3 partitioned) LM-head weight: its padded vocabulary."""
    weight = model.get_output_embeddings().weight
    return weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
