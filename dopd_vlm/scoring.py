"""Scoring passes: hidden states at response positions, LM head applied in chunks.

Full-vocabulary logits for every position of three models do not fit at real scale
(V ~ 152K). A scoring pass therefore runs the model's backbone only, gathers the final hidden
states at the positions that predict response tokens, and leaves the LM head to the loss,
which applies it chunk by chunk. Hidden states are ~V/H (about 75x for a 2B model) smaller
than the logits they stand for.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dopd_vlm.collate import ModelView
from dopd_vlm.lora import LinearParts, LowRank, linear_parts


def matmul_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 accumulation and a float32 result, whatever the inputs' precision.

    bf16 logits of 16-32 are rounded in steps of 0.125 (up to 0.1 nat in a log-prob), and a sum
    of chunk gradients kept in bf16 loses its small terms: the loss computes in float32 from
    low-precision weights and hidden states. On CUDA the product runs in the inputs' precision
    with a float32 output (`torch.mm(..., out_dtype=)`); elsewhere the operands are upcast.
    """
    dtype = at_least_float32(torch.promote_types(a.dtype, b.dtype))
    if a.dtype == b.dtype == dtype:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype and _mm_out_dtype_supported(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    if b.shape[1] > UPCAST_COLUMNS and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return _upcast_by_columns(a.to(dtype), b, dtype)
    return a.to(dtype) @ b.to(dtype)


# Columns of `b` upcast at a time by `matmul_float32` (H x 4096 floats: 32 MiB at H = 2,048).
UPCAST_COLUMNS = 4096


def _upcast_by_columns(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b.to(dtype) with `b` upcast a block of columns at a time. Upcasting a bf16 LM head of
    151,936 x 2,048 at once writes a 1.2 GiB temporary on every call: 0.8-3 s on one CPU core, most
    of it the new pages, against 0.2 s block by block (BENCHMARKS.md, "A DOPD step at the 2B shape")."""
    out = a.new_empty((a.shape[0], b.shape[1]))
    block = torch.empty_like(b[:, :UPCAST_COLUMNS], dtype=dtype)  # b's strides: a transposed head copies row by row
    for start in range(0, b.shape[1], UPCAST_COLUMNS):
        stop = min(start + UPCAST_COLUMNS, b.shape[1])
        upcast = block[:, : stop - start]
        upcast.copy_(b[:, start:stop])
        torch.mm(a, upcast, out=out[:, start:stop])
    return out


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision floats; float32 and float64 stay as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def linear_float32(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [..., H] @ weight.T (+ bias) -> [..., V] in float32 or float64 (see `matmul_float32`)."""
    out = matmul_float32(hidden.reshape(-1, hidden.shape[-1]), weight.T).reshape(*hidden.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias.to(out.dtype)


@functools.cache
def _mm_out_dtype_supported(device: torch.device) -> bool:
    try:
        probe = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        torch.mm(probe, probe, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def backbone(model: nn.Module) -> nn.Module:
    """The module that maps inputs to final (normed) hidden states, images included."""
    inner = getattr(model, "model", None)
    if inner is None:
        raise TypeError(f"{type(model).__name__} has no `.model` backbone; unsupported architecture")
    return inner


class Head:
    """An output layer as a callable hidden [N, H] -> float32 logits [N, vocab_size] over the common
    vocabulary (linear layers compute them with float32 accumulation, `linear_float32`).

    Two kinds: :class:`LMHead` (a model's own output module) and :class:`WeightHead` (a weight
    tensor, optionally with a LoRA update). The loss takes its fast paths through these members
    rather than by type tests:

    - :attr:`linear` is ``(weight, bias)`` when the logits are those of that weight alone and it
      can be read directly (not ZeRO-3 partitioned, or gathered): top-K target logits then come
      from K weight rows;
    - :attr:`is_linear` says the layer is a linear map at all (a LoRA adapter on it included), so
      the fused loss can take its gradient chunk by chunk through :meth:`with_weight`;
    - :attr:`partitioned`: every call is a ZeRO-3 collective; :meth:`gathered` makes a frozen
      partitioned head one gather for a whole block of calls.
    """

    vocab_size: int
    linear: tuple[torch.Tensor, torch.Tensor | None] | None = None
    is_linear = False
    partitioned = False

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def with_weight(self, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
        """``fn(full, *args)`` with ``full`` the layer as a :class:`WeightHead` on its full weights;
        for linear heads only."""
        raise TypeError(f"{type(self).__name__} is not a linear layer")

    @contextlib.contextmanager
    def gathered(self) -> Iterator["Head"]:
        yield self


class WeightHead(Head):
    """A linear head given by its weight [V', H] (and bias), sliced to the first ``vocab_size`` rows;
    with ``low_rank``, plus that LoRA update (``lora.LowRank``: scale * (h @ down.T) @ up.T)."""

    is_linear = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, vocab_size: int | None = None,
                 low_rank: LowRank | None = None):
        self.weight, self.bias, self.low_rank = weight, bias, low_rank
        self.linear = (weight, bias) if low_rank is None else None
        self.vocab_size = weight.shape[0] if vocab_size is None else vocab_size

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        v = self.vocab_size
        logits = linear_float32(hidden, self.weight[:v], None if self.bias is None else self.bias[:v])
        if self.low_rank is not None:
            logits = logits + matmul_float32(self.low_rank.project(hidden), self.low_rank.up[:v].T)
        return logits

    def with_weight(self, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
        return fn(self, *args)


class LMHead(Head):
    """A model's output module as a :class:`Head`; padding rows beyond the common vocabulary are
    sliced off. A plain ``nn.Linear``, or PEFT's LoRA layer over one, is :attr:`is_linear`: its
    adapter, when in use and ``with_adapter``, is part of every logit (``lora.linear_parts``). A
    ZeRO-3 partitioned layer is reached through :meth:`with_weight` (trainable) and
    :meth:`gathered` (frozen)."""

    def __init__(self, module: nn.Module, vocab_size: int, with_adapter: bool = True):
        self.module = module
        self.vocab_size = vocab_size
        self.with_adapter = with_adapter

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        if linear is not None:
            weight, bias = linear
            return linear_float32(hidden, weight[: self.vocab_size], None if bias is None else bias[: self.vocab_size])
        if self.is_linear:
            return self.with_weight(WeightHead.__call__, hidden)
        logits = self.module(hidden)[..., : self.vocab_size]
        return logits.to(at_least_float32(logits.dtype))

    @property
    def parts(self) -> LinearParts | None:
        """The layer's base ``nn.Linear`` and its adapter's update now (None: not a linear layer)."""
        return linear_parts(self.module, self.with_adapter)

    @property
    def is_linear(self) -> bool:
        return self.parts is not None

    @property
    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        parts = self.parts
        if parts is None or parts.low_rank is not None or self.partitioned:
            return None
        return parts.base.weight, parts.base.bias

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the logits read (all of the module's for a layer that is not linear)."""
        parts = self.parts
        return list(self.module.parameters()) if parts is None else parts.parameters()

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    @property
    def partitioned(self) -> bool:
        """True when the layer's parameters are ZeRO-3 partitioned: every call is then a collective."""
        return any(hasattr(p, "ds_id") for p in self.parameters())

    def full(self) -> WeightHead:
        """The layer as a :class:`WeightHead` on its current (readable or gathered) weights."""
        parts = self.parts
        return WeightHead(parts.base.weight, parts.base.bias, self.vocab_size, parts.low_rank)

    def with_weight(self, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
        """``fn(full, *args)`` run as the module's own forward, through ``module(*args)``, with ``full``
        the layer on its full weights (:meth:`full`).

        Under ZeRO-3 the module's hooks then gather its parameters for the call and again before
        autograd reaches the backward of ``fn``'s output (DeepSpeed's pre-backward hooks sit on the
        module's outputs), and release them after the gradient w.r.t. ``args`` is computed, so a
        custom autograd Function in ``fn`` may return full-size gradients for the weights: they
        accumulate into the gathered parameters, and DeepSpeed reduce-scatters them as usual (an
        adapted layer is a ZeRO-3 leaf module, `lora.adapt`: its base layer and adapters are
        gathered together). ``fn`` must return one tensor that carries the gradient (a second
        output would get DeepSpeed's backward hooks too). Without ZeRO-3 this is a plain call.
        """
        if not self.is_linear:
            return super().with_weight(fn, *args)
        module = self.module
        missing = object()
        own = module.__dict__.get("forward", missing)
        module.forward = lambda *a: fn(self.full(), *a)
        try:
            return module(*args)
        finally:
            if own is missing:
                del module.forward
            else:
                module.forward = own

    @contextlib.contextmanager
    def gathered(self) -> Iterator[Head]:
        """For frozen heads: a :class:`WeightHead` on the ZeRO-3 gathered weights for the block (one
        gather for many chunks, which also keeps the collectives equal on every rank, whatever number
        of chunks each rank scores); this head itself when it is not partitioned."""
        if not (self.is_linear and self.partitioned):
            yield self
            return
        if self.trainable:
            raise ValueError("LMHead.gathered is for frozen heads; a trainable head's gradient would be lost")
        import deepspeed

        with deepspeed.zero.GatheredParameters(self.parameters(), modifier_rank=None):
            yield self.full()


def output_head(model: nn.Module, vocab_size: int, with_adapter: bool = True) -> LMHead:
    """hidden [N, H] -> logits [N, vocab_size] over the common vocabulary (padding rows sliced off);
    without its LoRA adapter, if it has one, unless ``with_adapter``."""
    return LMHead(model.get_output_embeddings(), vocab_size, with_adapter)


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
    if not (head.partitioned and head.is_linear):
        return _token_logprobs_and_lse(hidden, head, token_ids, chunk_size)
    # Under ZeRO-3 one gather for all chunks, not one per chunk: ranks score different numbers of
    # chunks. The trained student's head (privileged pass) is fetched by one call of its module, as
    # in the loss; a frozen head (teacher) is gathered for the block.
    if head.trainable:
        def score(full, rows, ids):
            return _token_logprobs_and_lse(rows, full, ids, chunk_size)

        return head.with_weight(score, hidden, token_ids)
    with head.gathered() as gathered:
        return _token_logprobs_and_lse(hidden, gathered, token_ids, chunk_size)


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

    def to(self, device: torch.device) -> "ResponseTokens":
        return ResponseTokens(self.token_ids.to(device), self.seq_index.to(device), self.num_sequences)

    def sequence_mean(self, token_values: torch.Tensor) -> torch.Tensor:
        """The paper's reduction: mean over each sequence's tokens, then over all its sequences."""
        b = self.num_sequences
        sums = token_values.new_zeros(b).index_add(0, self.seq_index, token_values)
        counts = torch.bincount(self.seq_index, minlength=b).clamp(min=1).to(token_values.dtype)
        return (sums / counts).sum() / b

    def weights(self) -> torch.Tensor:
        """[N] float64 w with ``sequence_mean(x) == (w * x).sum()`` (the fused loss needs them up front)."""
        b = self.num_sequences
        counts = torch.bincount(self.seq_index, minlength=b).clamp(min=1).to(torch.float64)
        return 1.0 / (counts[self.seq_index] * b)
