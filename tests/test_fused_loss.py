"""The fast loss path (fused head gradients, top-K target log-probs from weight rows) against
the reference path (per-chunk checkpointing, full-vocabulary targets): same values, same gradients."""

import dataclasses

import pytest
import torch

from dopd_vlm import chunks, losses
from dopd_vlm.chunks import LossInputs
from dopd_vlm.methods import compute_loss
from dopd_vlm.scoring import LMHead, ResponseTokens, WeightHead, token_logprobs_and_lse
from helpers.method_configs import config_id, method_configs

V, H, HT_ = 40, 8, 12  # vocabulary, student and teacher hidden sizes


def _problem(seed=0, n_per_seq=(5, 7, 1, 4), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = sum(n_per_seq)
    seq_index = torch.repeat_interleave(torch.arange(len(n_per_seq)), torch.tensor(n_per_seq))
    tokens = ResponseTokens(torch.randint(0, V, (n,), generator=g), seq_index, len(n_per_seq))
    student = torch.nn.Linear(H, V + 3, bias=False).to(dtype)  # padded head, sliced to V
    teacher = torch.nn.Linear(HT_, V, bias=False).to(dtype)
    with torch.no_grad():
        student.weight.copy_(torch.randn(V + 3, H, generator=g, dtype=dtype))
        teacher.weight.copy_(torch.randn(V, HT_, generator=g, dtype=dtype) * 2)
    teacher.requires_grad_(False)
    hidden = torch.randn(n, H, generator=g, dtype=dtype)
    privileged = torch.randn(n, H, generator=g, dtype=dtype)
    teacher_hidden = torch.randn(n, HT_, generator=g, dtype=dtype)
    regimes = torch.randint(0, 4, (n,), generator=g)
    return tokens, student, teacher, hidden, privileged, teacher_hidden, regimes


def _run(cfg, fast, seed=0, chunk_size=5, upstream=1.0):
    tokens, student, teacher, hidden, privileged, teacher_hidden, regimes = _problem(seed)
    hidden = hidden.clone().requires_grad_(True)
    s_head, t_head = LMHead(student, V), LMHead(teacher, V)
    lse = {}
    if fast:
        _, lse["privileged_lse"] = token_logprobs_and_lse(privileged, s_head, tokens.token_ids, 3)
        _, lse["teacher_lse"] = token_logprobs_and_lse(teacher_hidden, t_head, tokens.token_ids, 3)
    else:  # heads that are not plain nn.Linear: no weight rows to read, full-vocabulary targets
        s_head, t_head = LMHead(torch.nn.Sequential(student), V), LMHead(torch.nn.Sequential(teacher), V)
    inputs = LossInputs(tokens, hidden, s_head, privileged, teacher_hidden, t_head, regimes, **lse)
    loss, stats = compute_loss(cfg, inputs, chunk_size, loss_path="fused" if fast else "chunked")
    (loss * upstream).backward()
    return loss.detach(), hidden.grad, student.weight.grad, stats


@pytest.mark.parametrize("cfg", list(method_configs(6, variants=True)), ids=config_id)
def test_fast_path_matches_reference_values_and_gradients(cfg):
    # float64 problem; the scoring pass's logsumexp is float32 by contract, hence ~1e-8 differences
    # where target log-probs come from it (top-K and sampled objectives at temperature 1).
    tol = dict(rtol=1e-6, atol=1e-7)
    ref = _run(cfg, fast=False, upstream=0.7)
    got = _run(cfg, fast=True, upstream=0.7)
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(got[3].loss, ref[3].loss, **tol)
    torch.testing.assert_close(got[3].entropy, ref[3].entropy, **tol)
    if got[3].kl_to_teacher is not None:  # exact, or a lower bound where only top-K was computed
        assert (got[3].kl_to_teacher <= ref[3].kl_to_teacher + 1e-6).all()
        assert (got[3].kl_to_teacher >= -1e-6).all()


@pytest.mark.parametrize("give_log_probs", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 17, 100])
def test_fused_head_loss_equals_checkpointed_weighted_sum(chunk_size, give_log_probs):
    g = torch.Generator().manual_seed(1)
    n = 17
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V + 2, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V + 2, generator=g, dtype=torch.float64)
    target = torch.randn(n, V, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64)

    def fn(logits, target_chunk):
        return torch.stack([losses.generalized_jsd(logits, target_chunk), losses.entropy(logits).detach()], -1)

    def grads(fused):
        h, wt, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        if fused:
            loss, cols = chunks.fused_head_loss(h, wt, fn, target, token_weights=w, chunk_size=chunk_size, bias=b,
                                                vocab_size=V, give_log_probs=give_log_probs)
        else:
            head = lambda x: torch.nn.functional.linear(x, wt[:V], b[:V])  # noqa: E731
            if give_log_probs:
                head = lambda x: torch.log_softmax(torch.nn.functional.linear(x, wt[:V], b[:V]), -1)  # noqa: E731
            cols = chunks.chunked_head_loss(h, head, fn, target, chunk_size=chunk_size)
            loss = (cols[:, 0] * w).sum()
        (3.0 * loss).backward()
        return loss.detach(), cols.detach(), h.grad, wt.grad, b.grad

    for a, r in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_fused_head_loss_no_grad_and_empty():
    weight = torch.randn(V, H, requires_grad=True)
    fn = lambda logits: losses.entropy(logits)  # noqa: E731
    with torch.no_grad():
        loss, cols = chunks.fused_head_loss(torch.randn(6, H), weight, fn, token_weights=torch.ones(6), chunk_size=4)
    assert cols.shape == (6,) and not loss.requires_grad
    hidden = torch.randn(0, H, requires_grad=True)
    loss, cols = chunks.fused_head_loss(hidden, weight, fn, token_weights=torch.ones(0), chunk_size=4)
    loss.backward()
    assert cols.shape == (0,) and loss.item() == 0.0 and weight.grad.abs().sum() == 0


def test_token_weights_reproduce_sequence_mean():
    tokens = ResponseTokens(torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 0, 2, 2, 3]), 4)
    x = torch.arange(6.0)
    torch.testing.assert_close((tokens.weights() * x).sum().float(), tokens.sequence_mean(x))


def test_recompute_flag_is_set_only_in_backward_recompute():
    seen = []

    def fn(logits):
        seen.append(chunks.is_recomputing())
        return losses.entropy(logits)

    weight = torch.randn(V, H, requires_grad=True)
    out = chunks.chunked_head_loss(torch.randn(4, H), WeightHead(weight), fn, chunk_size=4)
    out.sum().backward()
    assert seen == [False, True] and not chunks.is_recomputing()


def test_lmhead_exposes_plain_linear_only():
    linear = torch.nn.Linear(H, V, bias=False)
    assert LMHead(linear, V).linear[0] is linear.weight and LMHead(linear, V).is_linear
    assert LMHead(torch.nn.Sequential(linear), V).linear is None and not LMHead(torch.nn.Sequential(linear), V).is_linear
    torch.testing.assert_close(LMHead(linear, V - 3)(torch.ones(2, H)), linear(torch.ones(2, H))[:, : V - 3])
