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


def output_head(model: nn.Module, vocab_size: int) -> Head:
    """hidden [N, H] -> logits [N, vocab_size] over the common vocabulary (padding rows sliced off)."""
    head = model.get_output_embeddings()

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        return head(hidden)[..., :vocab_size]

    return apply


def response_hidden_states(model: nn.Module, view: ModelView, response_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states that predict each valid response token: [N, H], row-major order."""
    output = backbone(model)(**view.inputs, use_cache=False)
    rows, steps = response_mask.nonzero(as_tuple=True)
    return output.last_hidden_state[rows, view.logit_index[rows, steps]]


@torch.no_grad()
def token_logprobs(hidden: torch.Tensor, head: Head, token_ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log p(token_ids[n]) under head(hidden[n]), in float32, chunked over tokens."""
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start : start + chunk_size]).float()
        ids = token_ids[start : start + chunk_size, None]
        out.append((logits.gather(-1, ids) - logits.logsumexp(-1, keepdim=True)).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


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
