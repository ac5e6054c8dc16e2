"""Scoring passes: hidden states at response positions, LM head applied in chunks.

Full-vocabulary logits for every position of three models do not fit at real scale
(V ~ 152K). A scoring pass therefore runs the model's backbone only, gathers the final hidden
states at the positions that predict response tokens, and leaves the LM head to the loss,
which applies it chunk by chunk. Hidden states are ~V/H (about 75x for a 2B model) smaller
than the logits they stand for.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

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
    A ZeRO-3 partitioned ``nn.Linear`` (:attr:`partitioned_linear`) gets the same fast paths
    through :meth:`run_as_forward` (trainable head) and :meth:`gathered` (frozen head).
    """

    _gathered = False  # True on the view that :meth:`gathered` yields

    def __init__(self, module: nn.Module, vocab_size: int):
        self.module = module
        self.vocab_size = vocab_size

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._gathered:  # not through the module: its ZeRO-3 post-forward hook would release the weight
            module = self.module
            return nn.functional.linear(hidden, module.weight, module.bias)[..., : self.vocab_size]
        return self.module(hidden)[..., : self.vocab_size]

    @property
    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        module = self.module
        if type(module) is not nn.Linear or (hasattr(module.weight, "ds_id") and not self._gathered):
            return None
        return module.weight, module.bias

    @property
    def partitioned(self) -> bool:
        """True when the layer's parameters are ZeRO-3 partitioned: every call is then a collective."""
        return any(hasattr(p, "ds_id") for p in self.module.parameters())

    @property
    def partitioned_linear(self) -> bool:
        """True for a plain ``nn.Linear`` whose parameters are ZeRO-3 partitioned (see :meth:`run_as_forward`)."""
        return type(self.module) is nn.Linear and self.partitioned

    def run_as_forward(self, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
        """``fn(weight, bias, *args)`` run as the module's own forward, through ``module(*args)``.

        Under ZeRO-3 the module's hooks then gather its parameters for the call and again before
        autograd reaches the backward of ``fn``'s output (DeepSpeed's pre-backward hooks sit on the
        module's outputs), and release them after the gradient w.r.t. ``args`` is computed, so a
        custom autograd Function in ``fn`` may return a full-size gradient for the weight: it
        accumulates into the gathered parameter, and DeepSpeed reduce-scatters it as usual.
        ``fn`` must return a tensor (or a tuple of tensors) that carries the gradient; anything
        else it produces should go out through a closure. Without ZeRO-3 this is a plain call.
        """
        module = self.module
        missing = object()
        own = module.__dict__.get("forward", missing)
        module.forward = lambda *a: fn(module.weight, module.bias, *a)
        try:
            return module(*args)
        finally:
            if own is missing:
                del module.forward
            else:
                module.forward = own

    @contextlib.contextmanager
    def gathered(self) -> Iterator["LMHead"]:
        """This head with its ZeRO-3 partitioned parameters gathered for the block, as a head
        whose :attr:`linear` is available and whose calls use the gathered weight directly (a call
        through the module would release it). For frozen heads only (no gradient can reach
        DeepSpeed through the gathered weight; a trained head goes through :meth:`run_as_forward`);
        a no-op view for heads that are not partitioned. One gather for many chunks also keeps the
        number of collectives equal on every rank, whatever number of chunks each rank scores."""
        if not self.partitioned_linear:
            yield self
            return
        params = list(self.module.parameters())
        if any(p.requires_grad for p in params):
            raise ValueError("LMHead.gathered is for frozen heads; a trainable head's gradient would be lost")
        import deepspeed

        view = LMHead(self.module, self.vocab_size)
        view._gathered = True
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield view


class WeightHead:
    """A linear head given by its (gathered) weight and bias, sliced to ``vocab_size`` rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int):
        self.linear, self.vocab_size = (weight, bias), vocab_size

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear
        return nn.functional.linear(hidden, weight[: self.vocab_size], None if bias is None else bias[: self.vocab_size])


def output_head(model: nn.Module, vocab_size: int) -> LMHead:
    """hidden [N, H] -> logits [N, vocab_size] over the common vocabulary (padding rows sliced off)."""
    return LMHead(model.get_output_embeddings(), vocab_size)


class ResponseHiddenStates(nn.Module):
    """A model as DeepSpeed trains it: ``forward(view, response_mask)`` -> :func:`response_hidden_states`.

    The gradient pass must run through the DeepSpeed engine's own forward: that is where ZeRO
    advances its gradient-accumulation micro-step and hooks the outputs for the backward's
    bookkeeping. Calling the wrapped model directly trains on the last micro-batch's gradient only.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, view: ModelView, response_mask: torch.Tensor) -> torch.Tensor:
        return response_hidden_states(self.model, view, response_mask)


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
    if isinstance(head, LMHead) and head.partitioned_linear:
        # Under ZeRO-3 one gather for all chunks, not one per chunk: ranks score different numbers
        # of chunks. The trained student's head (privileged pass) is fetched by calling its module
        # once, as in the loss; a frozen head (teacher) is gathered for the block.
        if any(p.requires_grad for p in head.module.parameters()):
            def score(weight, bias, rows, ids):
                return _token_logprobs_and_lse(rows, WeightHead(weight, bias, head.vocab_size), ids, chunk_size)

            return head.run_as_forward(score, hidden, token_ids)
        with head.gathered() as gathered:
            return _token_logprobs_and_lse(hidden, gathered, token_ids, chunk_size)
    return _token_logprobs_and_lse(hidden, head, token_ids, chunk_size)


def _token_logprobs_and_lse(hidden, head, token_ids, chunk_size):
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
