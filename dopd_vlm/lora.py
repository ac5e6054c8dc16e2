"""LoRA students through PEFT (`model.lora`): the student's weights stay frozen, PEFT's low-rank
adapters on its linear layers are trained.

    peft_student = adapt(student, cfg.model, seed)   # PEFT's LoRA layers in place; the PeftModel
    with adapters_off(model): ...                    # the base model (method.privileged_target=initial)
    linear_parts(module)                             # an output layer as base weight + low-rank update
    merged_weights(model)                            # (HF name, base + adapter): vLLM's weight sync
    save_adapter(peft_student, dir) / export_merged(dir, merged_dir, dtype)
    adapter_base(dir) / load_adapter(model, dir)     # a saved adapter back on its base (`dopd-vlm eval`)

The rest of the package keeps seeing the Hugging Face model (its backbone, `generate`,
`get_output_embeddings`), with PEFT's LoRA layers in place of the targeted `nn.Linear` modules;
only the adapters require grad. When the output layer (`lm_head`) carries an adapter too,
`linear_parts` gives the loss its base weight *and* low-rank update: the fused LM-head loss then
includes the adapter (a loss that read the base weight alone would silently ignore it).

PEFT is imported lazily: this module imports without the `lora` extra, and asking for LoRA there
is a one-line ConfigError naming the extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dopd_vlm.config import ConfigError, LoraConfig, ModelConfig
from dopd_vlm.errors import InputError, one_line
from dopd_vlm.run_folder import after_write

EXTRA_HINT = 'pip install -e ".[lora]" (make test installs it)'
OUTPUT_LAYER = "lm_head"  # the name model.lora.target_modules uses for the output layer
# PEFT keeps a LoRA layer's adapters under these sub-modules, its original layer under `base_layer`.
ADAPTER_PARTS = (".lora_A.", ".lora_B.")
BASE_PART = ".base_layer."


def require_peft() -> None:
    """Raise ConfigError (one line, naming the extra) unless PEFT can be imported here."""
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"config key 'model.lora.enabled': peft is not installed; {EXTRA_HINT}")


# -- building the LoRA student ------------------------------------------------------------------


def adapt(model: nn.Module, cfg: ModelConfig, seed: int):
    """Put PEFT's LoRA layers on `model` in place (base weights frozen); returns the PeftModel.

    The adapters' random initialisation (B = 0, so the student starts as the base model) is drawn
    from `seed`: every rank builds the same adapters. An adapted output layer is marked a ZeRO-3
    leaf module, so one call of it gathers its base weight and adapters together (the fused loss
    runs as that call, `scoring.LMHead.with_weight`).
    """
    require_peft()
    import peft

    lora = cfg.lora
    targets = target_names(model, lora, cfg.student)
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_student = peft.get_peft_model(model, config, autocast_adapter_dtype=False)  # adapters in the model's dtype
    # adapter_config.json names the base; a relative local path would not resolve from elsewhere
    base = Path(cfg.student)
    peft_student.peft_config["default"].base_model_name_or_path = str(base.resolve()) if base.is_dir() else cfg.student
    head = model.get_output_embeddings()
    if adapted(head):
        from deepspeed.utils import set_z3_leaf_module

        set_z3_leaf_module(head, True)
    return peft_student


def target_names(model: nn.Module, cfg: LoraConfig, student: str) -> list[str]:
    """Full module names of the linear layers `cfg.target_modules` names (by the last part of the
    name), in the language model and its output layer, or anywhere with `cfg.vision`.

    ConfigError (one line) for a name that matches no linear layer there, and for an adapter on an
    output layer tied to the input embeddings (merging it would change the embeddings too).
    """
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    decoder_prefix = next(name for name, module in model.named_modules() if module is decoder)
    in_scope = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if module is head:
            in_scope[name] = OUTPUT_LAYER
        elif cfg.vision or name.startswith(decoder_prefix + "."):
            in_scope[name] = name.rpartition(".")[2]
    where = "the student" if cfg.vision else "the student's language model"
    known = sorted(set(in_scope.values()))
    for target in cfg.target_modules:
        if target not in known:
            raise ConfigError(f"config key 'model.lora.target_modules': {target!r} names no linear layer of {where} "
                              f"(model.student {student}); its linear layers are named {', '.join(known)}")
    if OUTPUT_LAYER in cfg.target_modules and head.weight is model.get_input_embeddings().weight:
        raise ConfigError(f"config key 'model.lora.target_modules': {OUTPUT_LAYER} is tied to the input embeddings "
                          f"in model.student {student}; an adapter there would change the embeddings when merged "
                          f"(for the merged export and vLLM's weight sync); remove {OUTPUT_LAYER}")
    return sorted(name for name, short in in_scope.items() if short in cfg.target_modules)


# -- what a LoRA layer is, for the rest of the package ----------------------------------------------


def is_lora_layer(module: nn.Module) -> bool:
    """Whether `module` is one of PEFT's LoRA layers (any kind)."""
    peft = _loaded_peft()
    return peft is not None and isinstance(module, peft.tuners.lora.LoraLayer)


def is_adapted(model: nn.Module) -> bool:
    """Whether `model` carries PEFT LoRA layers."""
    return any(is_lora_layer(module) for module in model.modules())


def adapted(module: nn.Module) -> bool:
    """Whether `module` is a LoRA layer whose adapter is in use (not switched off, not merged)."""
    return active_adapter(module) is not None


def active_adapter(module: nn.Module) -> str | None:
    """The name of the adapter a LoRA layer applies now, or None (not a LoRA layer, adapters off, merged)."""
    if not is_lora_layer(module) or module.disable_adapters or module.merged:
        return None
    names = [name for name in module.active_adapters if name in module.lora_A]
    return names[0] if names else None


@dataclass
class LowRank:
    """A LoRA update of a linear layer as tensors: x -> scale * (x @ down.T) @ up.T, added to the
    base layer's output (PEFT's vanilla LoRA, without dropout)."""

    down: torch.Tensor  # lora_A's weight [r, in]
    up: torch.Tensor  # lora_B's weight [out, r]
    scale: float

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """scale * x @ down.T: [..., r] in float32 (float64 for float64 inputs)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.to(dtype) @ self.down.to(dtype).T) * self.scale


@dataclass
class LinearParts:
    """A linear layer as the loss reads it: the plain `nn.Linear` (a LoRA layer's base layer) and,
    when an adapter is in use and wanted, its low-rank update."""

    base: nn.Linear
    low_rank: LowRank | None

    def parameters(self) -> list[nn.Parameter]:
        extra = [] if self.low_rank is None else [self.low_rank.down, self.low_rank.up]
        return [p for p in (self.base.weight, self.base.bias) if p is not None] + extra


def linear_parts(module: nn.Module, with_adapter: bool = True) -> LinearParts | None:
    """`module` as base layer + low-rank update: a plain nn.Linear, or a PEFT LoRA layer over one
    (its adapter included when `with_adapter` and in use). None for any other module."""
    if type(module) is nn.Linear:
        return LinearParts(module, None)
    if not is_lora_layer(module) or type(module.get_base_layer()) is not nn.Linear:
        return None
    name = active_adapter(module) if with_adapter else None
    if name is None:
        return LinearParts(module.get_base_layer(), None)
    if name in module.lora_variant or module.lora_bias.get(name, False):
        raise TypeError(f"{type(module).__name__}: only vanilla LoRA adapters are supported in the output layer")
    return LinearParts(module.get_base_layer(), LowRank(module.lora_A[name].weight, module.lora_B[name].weight,
                                                        float(module.scaling[name])))


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """`model` as its base model for the block: every LoRA layer's adapters switched off (PEFT's
    `enable_adapters(False)`, which also stops their gradients), switched back on after it. No
    copy of any weight."""
    layers = [module for module in model.modules() if is_lora_layer(module) and not module.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


# -- weights out: vLLM's sync, export -----------------------------------------------------------


def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, weight) of every parameter of the merged student: a LoRA layer's base
    weight plus its adapter's delta (PEFT's `get_delta_weight`), other parameters as they are; the
    adapters themselves are left out. The weights must be readable (gathered under ZeRO-3)."""
    layers = dict(model.named_modules())
    for name, param in model.named_parameters():
        if any(part in name for part in ADAPTER_PARTS):
            continue
        if BASE_PART not in name:
            yield name, param.data
            continue
        layer_name, _, leaf = name.partition(BASE_PART)
        layer = layers[layer_name]
        adapter = active_adapter(layer)
        weight = param.data
        if leaf == "weight" and adapter is not None:
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        yield f"{layer_name}.{leaf}", weight


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(peft_student: Any, processor: Any, target: Path) -> None:
    """Write the PEFT adapter (adapter_config.json, adapter_model.safetensors) and the processor to
    `target`, replacing it atomically. The adapters must be readable (gathered under ZeRO-3)."""
    # the adapters alone: PEFT would also save an adapted lm_head's base weight (frozen, so the
    # base checkpoint's own; under ZeRO-3 an empty shard)
    write_folder(target, lambda tmp: peft_student.save_pretrained(tmp, save_embedding_layers=False),
                 processor.save_pretrained)


def export_merged(adapter_dir: Path, target: Path, dtype: torch.dtype) -> None:
    """The merged student (base + adapter, loadable by transformers alone) at `target`: the base
    checkpoint the adapter names, loaded on CPU, with the adapter merged by PEFT (`merge_and_unload`)."""
    import peft
    from transformers import AutoProcessor, AutoTokenizer

    from dopd_vlm.models import load_model

    base_path = peft.PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    merged = peft.PeftModel.from_pretrained(load_model(base_path, dtype=dtype), adapter_dir).merge_and_unload()
    try:
        processor = AutoProcessor.from_pretrained(adapter_dir)
    except (OSError, ValueError):  # a text-only student: its tokenizer is the processor
        processor = AutoTokenizer.from_pretrained(adapter_dir)
    write_folder(target, merged.save_pretrained, processor.save_pretrained)


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A folder holding a PEFT adapter and no model of its own (a LoRA run's `final/`)."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base(folder: str | os.PathLike) -> str:
    """The base checkpoint a saved adapter names (adapter_config.json's base_model_name_or_path;
    `adapt` writes it as an absolute path). InputError (one line) when there is none."""
    config = Path(folder) / ADAPTER_CONFIG
    if not config.is_file():
        raise InputError(f"adapter {folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder, as a LoRA run's "
                         "final/ is)")
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        raise InputError(f"adapter {folder}: {ADAPTER_CONFIG} is not a valid JSON object") from None
    if not isinstance(base, str) or not base:
        raise InputError(f"adapter {folder}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return base


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """`model` with the adapter saved in `folder` (`save_adapter`) in place, unmerged and in the
    model's dtype: the student as training evaluated it (base layers + PEFT's LoRA layers). InputError
    (one line) when peft is missing or the adapter does not fit the model."""
    if importlib.util.find_spec("peft") is None:
        raise InputError(f"adapter {folder}: peft is not installed; {EXTRA_HINT}")
    import peft

    try:
        peft_model = peft.PeftModel.from_pretrained(model, str(folder), autocast_adapter_dtype=False)
    except (RuntimeError, ValueError, KeyError, OSError) as err:  # shapes or names of another base
        raise InputError(f"adapter {folder}: cannot be put on its base model ({type(err).__name__}: "
                         f"{one_line(err)})") from None
    peft_model.eval()
    return peft_model.get_base_model()


def write_folder(target: Path, *writers: Callable[[Path], Any]) -> None:
    """Each writer (e.g. a `save_pretrained`) fills a temporary sibling folder, which then replaces
    `target` at once: a crash mid-export leaves no half-written `target`, and a writer that fails
    (a full disk) leaves no temporary folder either."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for write in writers:
            write(tmp)
        after_write("export", target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _loaded_peft():
    """PEFT if it was imported (a LoRA layer exists only then), else None: no import on the way."""
    import sys

    return sys.modules.get("peft")
