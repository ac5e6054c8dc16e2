"""Supervised warm-up: teach a tiny random-init model the task before it is distilled.

Random-init tiny models answer uniformly at random, so distillation needs a teacher that was
trained first, and a student that at least knows the answer format. `warm_up` is plain
supervised learning on reference answers, written with the project's own pieces: the
`DualViewCollator` builds the prompt+answer batch (the same prompts, with or without p, as
training and evaluation), `scoring.response_hidden_states` and `scoring.output_head` give the
logits at answer positions, `divergences.token_cross_entropy` and `ResponseTokens.sequence_mean` give
the loss (the same reduction the distillation methods use), `train.warmup_cosine` the schedule.

Each sample is shown *with* the privileged text (the bounding boxes) with probability
`privileged_prob`, otherwise plain. Training on both views makes one model good at both: the
teacher must answer well from the image alone (its plain-view accuracy is the gap the student
should close) and with the boxes (the view it is distilled from); a student trained on both can
also read the boxes, which the privileged-student pass of DOPD and OPSD relies on.

`plain_samples` (optional, row for row the same problems as `samples`) gives the plain view
other references than the privileged view: the shared-rule testbed's student learns the usual
meaning of `-` when it is shown plain and the rule's when p states it (`dopd_vlm.lab.testbeds`), a
student that can follow a stated rule but has not internalised it.

Everything is a pure function of the model's initial weights and `WarmupConfig.seed`: batch
order and view choices come from a seeded `random.Random`, dropout is off, so one machine with
one torch build and thread count reproduces a warm-up bit for bit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from dopd_vlm import divergences
from dopd_vlm.collate import DualViewCollator, reference_responses
from dopd_vlm.data.schema import Sample
from dopd_vlm.models import device_of
from dopd_vlm.scoring import ResponseTokens, output_head, response_hidden_states
from dopd_vlm.train import warmup_cosine


@dataclass(frozen=True)
class WarmupConfig:
    """One supervised warm-up.

    Attributes:
        steps: Optimizer steps.
        batch_size: Samples per step.
        lr: Peak AdamW learning rate (linear warm-up, then cosine to lr * min_lr_ratio).
        privileged_prob: Probability that a sample is shown with its privileged text.
        warmup_steps: Linear learning-rate warm-up length.
        min_lr_ratio: Final learning rate as a fraction of lr.
        weight_decay: AdamW weight decay.
        grad_clip: Max global gradient norm (0 = off).
        seed: Seed of the batch order and of the plain/privileged choices.
    """

    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    privileged_prob: float = 0.5
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0.0 <= self.privileged_prob <= 1.0:
            raise ValueError("privileged_prob must be in [0, 1]")


def supervised_loss(model: nn.Module, collator: DualViewCollator, samples: Sequence[Sample],
                    privileged: bool | Sequence[bool] = False) -> torch.Tensor:
    """Cross-entropy on the answer tokens (and EOS) of `samples`, each shown plain or with p.

    Per-sequence token mean, then mean over sequences (ResponseTokens.sequence_mean).
    """
    ids, mask = reference_responses(collator, samples)
    device = device_of(model)
    view = collator.response_view(samples, ids, mask, privileged).to(device)
    tokens = ResponseTokens.from_mask(ids, mask).to(device)
    hidden = response_hidden_states(model, view, mask.to(device))
    logits = output_head(model, len(collator.tokenizer))(hidden)
    return tokens.sequence_mean(divergences.token_cross_entropy(logits, tokens.token_ids))


def warm_up(
    model: nn.Module,
    collator: DualViewCollator,
    samples: Sequence[Sample],
    cfg: WarmupConfig,
    *,
    plain_samples: Sequence[Sample] | None = None,
    desc: str = "warm-up",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `model` in place for cfg.steps supervised steps; returns the loss of every step.

    `on_step(step, loss)` is called after every step (step counts from 1), e.g. to evaluate.
    A sample shown plain is taken from `plain_samples` (same length, same order) when given.
    """
    from tqdm.auto import tqdm

    if plain_samples is not None and len(plain_samples) != len(samples):
        raise ValueError(f"plain_samples has {len(plain_samples)} rows, samples {len(samples)}: they must be the same problems")
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
    order: list[int] = []
    history = []
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", disable=not progress, leave=False, mininterval=0.5)
    for step in bar:
        batch, shown_p = [], []
        for _ in range(cfg.batch_size):
            if not order:  # epoch-wise shuffles
                order = list(range(len(samples)))
                rng.shuffle(order)
            index = order.pop()
            shown_p.append(rng.random() < cfg.privileged_prob)
            batch.append(samples[index] if shown_p[-1] or plain_samples is None else plain_samples[index])
        loss = supervised_loss(model, collator, batch, shown_p)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{history[-1]:.3f}")
        if on_step is not None:
            on_step(step + 1, history[-1])
    model.eval()
    return history
