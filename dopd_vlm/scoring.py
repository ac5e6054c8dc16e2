"""Scoring passes: hidden states at response positions, LM head applied in chunks.

Full-vocabulary logits for every position of three models do not fit at real scale
(V ~ 152K). A scoring pass therefore runs the model's backbone only, gathers the final hidden
states at the positions that predict response tokens, and leaves the LM head to the loss,
which applies it chunk by chunk. Hidden states are ~V/H (about 75x for a 2B model) smaller
than the logits they stand for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dopd_vlm.collate import ModelView

Head = Callable[[torch.Tensor], torch.Tensor]


def backbone(model: nn.Module) -> nn.Module:
    """The module that maps inputs to final (normed) hidden states, images included."""
    inner = getattr(model, "model", None)
    if inner is None:
        raise TypeError(f"{type(model).__name__} has no `.model` backbone; unsupported architecture")
    return inner


class LMHead:
    """A model's output layer as a callable hidden [N, H] -> logits [N, vocab_size].

    Padding rows beyond the common vocabulary are sliced off. When the layer is a plain
    ``nn.Linear`` whose weight is a whole tensor (not ZeRO-3 partitioned), :attr:`linear` exposes
    ``(weight, bias)`` so the loss can use the weight directly (fused gradients, top-K target
    logits from a few weight rows) instead of calling the module on full-vocabulary chunks.
    """

    def __init__(self, module: nn.Module, vocab_size: int):
        self.module = module
        self.vocab_size = vocab_size

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.module(hidden)[..., : self.vocab_size]

    @property
    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        module = self.module
        if type(module) is not nn.Linear or hasattr(module.weight, "ds_id"):
            return None
        return module.weight, module.bias


def output_head(model: nn.Module, vocab_size: int) -> LMHead:
    """hidden [N, H] -> logits [N, vocab_size] over the common vocabulary (padding rows sliced off)."""
    return LMHead(model.get_output_embeddings(), vocab_size)


def response_hidden_states(model: nn.Module, view: ModelView, response_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states that predict each valid response token: [N, H], row-major order."""
    output = backbone(model)(**view.inputs, use_cache=False)
    rows, steps = response_mask.nonzero(as_tuple=True)
    return output.last_hidden_state[rows, view.logit_index[rows, steps]]


@torch.no_grad()
def token_logprobs(hidden: torch.Tensor, head: Head, token_ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log p(token_ids[n]) under head(hidden[n]), in float32, chunked over tokens."""
    return token_logprobs_and_lse(hidden, head, token_ids, chunk_size)[0]


@torch.no_grad()
def token_logprobs_and_lse(
    hidden: torch.Tensor, head: Head, token_ids: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token_ids[n]), logsumexp of the logits of row n): two [N] float32 tensors.

    The log-normaliser is what a loss needs to turn a few target logits (e.g. at the student's
    top-K tokens) into exact log-probs later, without the target's full-vocabulary logits again.
    """
    logprobs, lse = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start : start + chunk_size]).float()
        ids = token_ids[start : start + chunk_size, None]
        norm = logits.logsumexp(-1)
        lse.append(norm)
        logprobs.append(logits.gather(-1, ids).squeeze(-1) - norm)
    if not logprobs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    return torch.cat(logprobs), torch.cat(lse)


@dataclass
class ResponseTokens:
    """The valid response tokens of one micro-batch, flattened to N rows (row-major)."""

    token_ids: torch.Tensor  # [N]
    seq_index: torch.Tensor  # [N] which sequence each token belongs to
    num_sequences: int

    @classmethod
    def from_mask(cls, response_ids: torch.Tensor, response_mask: torch.Tensor) -> "ResponseTokens":
        rows, _ = response_mask.nonzero(as_tuple=True)
        return cls(response_ids[response_mask], rows, response_ids.shape[0])
