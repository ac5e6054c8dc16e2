"""Verifiable-answer accuracy with greedy decoding, sharded over data-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from dopd_vlm.collate import DualViewCollator
from dopd_vlm.config import RolloutConfig
from dopd_vlm.data.answers import THINK_CLOSE, THINK_OPEN, WHOLE_RESPONSE, AnswerExtractor, after_thinking
from dopd_vlm.data.schema import Sample
from dopd_vlm.models import device_of
from dopd_vlm.rollout import sample_responses


@dataclass
class EvalResult:
    """`correct` of `total` answers; `unclosed_think` of the wrong ones left a think block open
    (a thinking model cut by the length cap, or that never ended its reasoning)."""

    correct: int
    total: int
    unclosed_think: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Response texts without special tokens (EOS, padding), but with `<think>` / `</think>` even
    where a tokenizer marks them special (Qwen3's do not): the answer is read after them."""
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} | set(tokenizer.all_special_ids)
    kept = {i for i, token in tokenizer.added_tokens_decoder.items() if token.content in (THINK_OPEN, THINK_CLOSE)}
    dropped = torch.tensor(sorted(special - kept), dtype=response_ids.dtype)
    return [
        tokenizer.decode(ids[mask & ~torch.isin(ids, dropped)].tolist()).strip()
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
    (`SampleDataset.answer_extractor` is the recipe's; the default compares whole responses),
    searching only the text after a thinking model's last `</think>`; a response whose think block
    is left open is wrong and counted in `unclosed_think` (`data.answers.after_thinking`).

    Under torch.distributed each rank decodes every world_size-th sample and the counts are
    summed, so every rank returns the same result. Ranks run the same number of generate calls
    (padding the last batch by repetition, not counted), so with `synced_gpus` (a model whose
    forwards are collectives, see `rollout.sample_responses`) they line up.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = [samples[i] for i in range(rank, len(samples), world)]
    per_rank = -(-len(samples) // world)
    rollout = RolloutConfig(num_rollouts=1, max_new_tokens=max_new_tokens)
    opened_by_prompt = collator.generation_opens_think()
    correct = total = unclosed = 0
    for start in range(0, per_rank, batch_size):
        batch = mine[start : start + batch_size]
        count = len(batch)
        fill = min(batch_size, per_rank - start) - count
        padded = batch + [samples[0]] * fill
        ids, mask = sample_responses(
            model, collator, padded, rollout, greedy=True,
            suppress_token_ids=suppress_token_ids, synced_gpus=synced_gpus, privileged=privileged,
        )
        for prediction, sample in zip(decode_responses(collator.tokenizer, ids[:count], mask[:count]), batch):
            answer_text = after_thinking(prediction, opened_by_prompt)
            unclosed += answer_text is None
            correct += answer_text is not None and extractor.is_correct(answer_text, sample.answer)
        total += count
    if world > 1:
        counts = torch.tensor([correct, total, unclosed], dtype=torch.long, device=device_of(model))
        dist.all_reduce(counts)
        correct, total, unclosed = map(int, counts.tolist())
    return EvalResult(correct, total, unclosed)
