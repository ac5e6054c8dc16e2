"""On-policy rollouts: the student samples responses from the plain (non-privileged) view."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import GenerationConfig

from dopd_vlm.collate import DualViewCollator, extract_responses
from dopd_vlm.config import RolloutConfig
from dopd_vlm.data.schema import Sample
from dopd_vlm.models import device_of


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends a response: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the generation config nor the tokenizer defines an EOS token")
    return ids


@contextlib.contextmanager
def plain_generation_defaults(model: nn.Module) -> Iterator[None]:
    """Within the block, `generate` fills the settings a call leaves unset from transformers'
    neutral defaults, not from the checkpoint's `generation_config.json`: real checkpoints set
    `top_k`, `top_p`, `repetition_penalty`, ..., which would silently turn on-policy sampling into
    something else. Only the special-token ids are kept."""
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id
    )
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    collator: DualViewCollator,
    samples: Sequence[Sample],
    cfg: RolloutConfig,
    *,
    suppress_token_ids: Sequence[int] = (),
    greedy: bool = False,
    synced_gpus: bool = False,
    privileged: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate one response per sample (repeat samples for several rollouts per prompt).

    The prompts are the plain view (on-policy rollouts), or with `privileged` the privileged view
    (a model's answers given p, for evaluation).

    Returns (response_ids [B, R], response_mask [B, R]); the mask ends at the first EOS,
    inclusive. Sampling is plain: `cfg`'s temperature and top-p, no top-k cut, nothing from the
    checkpoint's generation config (`plain_generation_defaults`). `synced_gpus` must be True when
    the model's forwards are collectives (ZeRO-3 without `engine.gathered_for_generation` on several
    ranks): ranks that stop early keep joining the others' forwards, or the run deadlocks.
    Vision special tokens are suppressed: a sampled <|image_pad|> has no image features to
    match and breaks re-scoring.
    """
    tokenizer = collator.tokenizer
    device = device_of(model)
    batch = {k: v.to(device) for k, v in collator.rollout_batch(samples, privileged).items()}
    eos_ids = eos_token_ids(model, tokenizer)
    generation = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=not greedy,
        temperature=cfg.temperature if not greedy else None,
        top_p=cfg.top_p if not greedy else None,
        top_k=0 if not greedy else None,  # plain on-policy sampling, no hidden top-50 cut
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=list(suppress_token_ids) or None,
    )
    was_training = model.training
    model.eval()
    with plain_generation_defaults(model):
        sequences = model.generate(**batch, generation_config=generation, synced_gpus=synced_gpus)
    model.train(was_training)
    sequences = sequences[: len(samples)].cpu()  # without the collator's padding row, if any
    return extract_responses(sequences, batch["input_ids"].shape[1], eos_ids, tokenizer.pad_token_id)
