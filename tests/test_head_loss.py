"""The chunk drivers of dopd_vlm.head_loss: chunked evaluation and the checkpointed head loss equal
the unchunked computation in values and gradients, and keep no logits-sized tensor for backward."""

from __future__ import annotations

import functools

import pytest
import torch

from dopd_vlm.head_loss import chunked, chunked_head_loss
from dopd_vlm.divergences import generalized_jsd, topk_reverse_kl
from dopd_vlm.scoring import LMHead, WeightHead


def random_logits(seed: int, n: int, v: int = 11, scale: float = 2.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, v, generator=generator)).to(dtype)


def test_chunked_equals_unchunked():
    student, target = random_logits(31, n=23), random_logits(32, n=23)
    fn = functools.partial(topk_reverse_kl, k=3, variant="tail")
    for chunk_size in (1, 5, 23, 100):
        assert torch.equal(chunked(fn, student, target, chunk_size=chunk_size), fn(student, target))
    empty = chunked(fn, student[:0], target[:0], chunk_size=4)
    assert empty.shape == (0,)
    with pytest.raises(ValueError):
        chunked(fn, student, target[:3])


def _head_problem(seed, n=37, hidden_size=8, vocab=13, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(n, hidden_size, generator=g, dtype=dtype)
    student_weight = torch.randn(vocab, hidden_size, generator=g, dtype=dtype)
    teacher_hidden = torch.randn(n, hidden_size + 3, generator=g, dtype=dtype)
    teacher_weight = torch.randn(vocab, hidden_size + 3, generator=g, dtype=dtype)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def _distill_chunk_fn(teacher_weight, divergence):
    """A per-chunk loss as a method would write it: target logits computed inside, no grad."""

    def per_chunk(student_logits, teacher_hidden_chunk):
        with torch.no_grad():
            teacher_logits = teacher_hidden_chunk @ teacher_weight.T
        return divergence(student_logits, teacher_logits)

    return per_chunk


@pytest.mark.parametrize(
    "divergence",
    [
        pytest.param(functools.partial(generalized_jsd, beta=0.5), id="js"),
        pytest.param(functools.partial(topk_reverse_kl, k=4), id="topk_unbiased"),
        pytest.param(functools.partial(topk_reverse_kl, k=4, variant="tail"), id="topk_tail"),
    ],
)
@pytest.mark.parametrize("checkpoint_chunks", [True, False])
def test_chunked_head_loss_equals_unchunked_values_and_gradients(divergence, checkpoint_chunks):
    student_hidden, student_weight, teacher_hidden, teacher_weight = _head_problem(33)
    per_chunk = _distill_chunk_fn(teacher_weight, divergence)

    def losses_and_grads(compute):
        hidden = student_hidden.clone().requires_grad_(True)
        weight = student_weight.clone().requires_grad_(True)
        losses = compute(hidden, weight)
        # Non-uniform upstream gradient, as a per-sequence mean would give.
        (losses * torch.linspace(0.5, 2.0, losses.shape[0], dtype=losses.dtype)).sum().backward()
        return losses.detach(), hidden.grad, weight.grad

    reference = losses_and_grads(lambda h, w: per_chunk(h @ w.T, teacher_hidden))
    for chunk_size in (1, 8, 37, 64):
        got = losses_and_grads(
            lambda h, w: chunked_head_loss(
                h, WeightHead(w), per_chunk, teacher_hidden, chunk_size=chunk_size, checkpoint_chunks=checkpoint_chunks
            )
        )
        for g, r in zip(got, reference):
            assert torch.allclose(g, r, atol=1e-12)


def test_chunked_head_loss_accepts_a_module_head_and_no_grad():
    student_hidden, student_weight, teacher_hidden, teacher_weight = _head_problem(34)
    per_chunk = _distill_chunk_fn(teacher_weight, generalized_jsd)
    module = torch.nn.Linear(student_hidden.shape[1], student_weight.shape[0], bias=True).double()
    head = LMHead(module, student_weight.shape[0])
    losses = chunked_head_loss(student_hidden, head, per_chunk, teacher_hidden, chunk_size=5)
    losses.sum().backward()
    assert module.weight.grad is not None and module.bias.grad is not None
    assert torch.allclose(losses, per_chunk(head(student_hidden), teacher_hidden), atol=1e-12)
    with torch.no_grad():
        no_grad = chunked_head_loss(student_hidden, head, per_chunk, teacher_hidden, chunk_size=5)
    assert torch.allclose(no_grad, losses.detach(), atol=1e-12)


def test_chunked_head_loss_does_not_keep_chunk_logits_for_backward():
    # What autograd saves outside the checkpointed chunks is only the chunks' inputs (hidden
    # states, head weight), never a [chunk, V] logits-sized tensor.
    student_hidden, student_weight, teacher_hidden, teacher_weight = _head_problem(35, n=64, vocab=50)
    chunk_size, vocab = 16, student_weight.shape[0]
    per_chunk = _distill_chunk_fn(teacher_weight, generalized_jsd)
    hidden, weight = student_hidden.requires_grad_(True), student_weight.requires_grad_(True)
    saved_numels = []

    def pack(tensor):
        saved_numels.append(tensor.numel())
        return tensor

    def run(checkpoint_chunks):
        saved_numels.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = chunked_head_loss(
                hidden, WeightHead(weight), per_chunk, teacher_hidden, chunk_size=chunk_size, checkpoint_chunks=checkpoint_chunks
            )
        losses.sum().backward()
        return max(saved_numels)

    assert run(checkpoint_chunks=True) < chunk_size * vocab
    assert weight.grad is not None
    assert run(checkpoint_chunks=False) >= chunk_size * vocab  # the hook does see logits otherwise
