"""Verifiable-answer accuracy with greedy decoding, sharded over data-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from dopd_vlm.collate import DualViewCollator
from dopd_vlm.config import RolloutConfig
from dopd_vlm.data.answers import WHOLE_RESPONSE, AnswerExtractor
from dopd_vlm.data.schema import Sample
from dopd_vlm.models import device_of
from dopd_vlm.rollout import sample_responses


@dataclass
class EvalResult:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    return [
        tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True).strip()
        for ids, mask in zip(response_ids, response_mask)
    ]


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    collator: DualViewCollator,
    samples: Sequence[Sample],
    *,
    max_new_tokens: int,
    batch_size: int,
    privileged: bool = False,
    suppress_token_ids: Sequence[int] = (),
    synced_gpus: bool = False,
    extractor: AnswerExtractor = WHOLE_RESPONSE,
) -> EvalResult:
    """Greedy-decode every sample (plain view, or privileged view for a teacher-with-p score).

    A prediction is correct when `extractor` finds an answer in it that matches the sample's
    (`SampleDataset.answer_extractor` is the recipe's; the default compares whole responses).

    Under torch.distributed each rank decodes every world_size-th sample and the counts are
    summed, so every rank returns the same result. Ranks run the same number of generate calls
    (padding the last batch by repetition, not counted), so with `synced_gpus` (a model whose
    forwards are collectives, see `rollout.sample_responses`) they line up.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = [samples[i] for i in range(rank, len(samples), world)]
    per_rank = -(-len(samples) // world)
    rollout = RolloutConfig(num_rollouts=1, max_new_tokens=max_new_tokens)
    correct = total = 0
    for start in range(0, per_rank, batch_size):
        batch = mine[start : start + batch_size]
        count = len(batch)
        fill = min(batch_size, per_rank - start) - count
        padded = batch + [samples[0]] * fill
        ids, mask = sample_responses(
            model, collator, padded, rollout, greedy=True,
            suppress_token_ids=suppress_token_ids, synced_gpus=synced_gpus, privileged=privileged,
        )
        predictions = decode_responses(collator.tokenizer, ids[:count], mask[:count])
        correct += sum(extractor.is_correct(p, s.answer) for p, s in zip(predictions, batch))
        total += count
    if world > 1:
        counts = torch.tensor([correct, total], dtype=torch.long, device=device_of(model))
        dist.all_reduce(counts)
        correct, total = int(counts[0]), int(counts[1])
    return EvalResult(correct, total)
