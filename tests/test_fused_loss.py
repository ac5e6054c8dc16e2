"""The fast loss path (fused head gradients, top-K target log-probs from weight rows) against
the reference path (per-chunk checkpointing, full-vocabulary targets): same values, same gradients."""

import dataclasses

import pytest
import torch

from dopd_vlm import divergences, head_loss
from dopd_vlm.methods import LossInputs, compute_loss
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
        return torch.stack([divergences.generalized_jsd(logits, target_chunk), divergences.entropy(logits).detach()], -1)

    def grads(fused):
        h, wt, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        if fused:
            loss, cols = head_loss.fused_head_loss(h, wt, fn, target, token_weights=w, chunk_size=chunk_size, bias=b,
                                                vocab_size=V, give_log_probs=give_log_probs)
        else:
            head = lambda x: torch.nn.functional.linear(x, wt[:V], b[:V])  # noqa: E731
            if give_log_probs:
                head = lambda x: torch.log_softmax(torch.nn.functional.linear(x, wt[:V], b[:V]), -1)  # noqa: E731
            cols = head_loss.chunked_head_loss(h, head, fn, target, chunk_size=chunk_size)
            loss = (cols[:, 0] * w).sum()
        (3.0 * loss).backward()
        return loss.detach(), cols.detach(), h.grad, wt.grad, b.grad

    for a, r in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_fused_head_loss_no_grad_and_empty():
    weight = torch.randn(V, H, requires_grad=True)
    fn = lambda logits: divergences.entropy(logits)  # noqa: E731
    with torch.no_grad():
        loss, cols = head_loss.fused_head_loss(torch.randn(6, H), weight, fn, token_weights=torch.ones(6), chunk_size=4)
    assert cols.shape == (6,) and not loss.requires_grad
    hidden = torch.randn(0, H, requires_grad=True)
    loss, cols = head_loss.fused_head_loss(hidden, weight, fn, token_weights=torch.ones(0), chunk_size=4)
    loss.backward()
    assert cols.shape == (0,) and loss.item() == 0.0 and weight.grad.abs().sum() == 0


def test_token_weights_reproduce_sequence_mean():
    tokens = ResponseTokens(torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 0, 2, 2, 3]), 4)
    x = torch.arange(6.0)
    torch.testing.assert_close((tokens.weights() * x).sum().float(), tokens.sequence_mean(x))


def test_recompute_flag_is_set_only_in_backward_recompute():
    seen = []

    def fn(logits):
        seen.append(head_loss.is_recomputing())
        return divergences.entropy(logits)

    weight = torch.randn(V, H, requires_grad=True)
    out = head_loss.chunked_head_loss(torch.randn(4, H), WeightHead(weight), fn, chunk_size=4)
    out.sum().backward()
    assert seen == [False, True] and not head_loss.is_recomputing()


def test_lmhead_exposes_plain_linear_only():
    linear = torch.nn.Linear(H, V, bias=False)
    assert LMHead(linear, V).linear[0] is linear.weight and LMHead(linear, V).is_linear
    assert LMHead(torch.nn.Sequential(linear), V).linear is None and not LMHead(torch.nn.Sequential(linear), V).is_linear
    torch.testing.assert_close(LMHead(linear, V - 3)(torch.ones(2, H)), linear(torch.ones(2, H))[:, : V - 3])


def _bf16_problem(n=256, vocab=64, hidden_size=32, seed=3):
    """bf16 hidden states and heads whose logits reach 16-32, where bf16 rounds in steps of 0.125."""
    g = torch.Generator().manual_seed(seed)
    tokens = ResponseTokens(torch.randint(0, vocab, (n,), generator=g), torch.arange(n) // 8, n // 8)
    student = (torch.randn(vocab, hidden_size, generator=g) * 0.9).bfloat16()
    teacher = (torch.randn(vocab, hidden_size, generator=g) * 0.9).bfloat16()
    hidden, privileged, teacher_hidden = ((torch.randn(n, hidden_size, generator=g) * 0.9).bfloat16() for _ in range(3))
    return tokens, student, teacher, hidden, privileged, teacher_hidden


def _dopd_loss_and_head_grad(dtype, chunk_size):
    tokens, student, teacher, hidden, privileged, teacher_hidden = _bf16_problem()
    student, teacher, hidden, privileged, teacher_hidden = (t.to(dtype) for t in (student, teacher, hidden, privileged, teacher_hidden))
    student.requires_grad_(True)
    s_head, t_head = WeightHead(student), WeightHead(teacher)
    lp, lp_lse = token_logprobs_and_lse(privileged, s_head, tokens.token_ids, chunk_size)
    lt, lt_lse = token_logprobs_and_lse(teacher_hidden, t_head, tokens.token_ids, chunk_size)
    from dopd_vlm.router import route

    regimes = route(lt, lp, torch.ones_like(lt, dtype=torch.bool)).regimes
    inputs = LossInputs(tokens, hidden, s_head, privileged, teacher_hidden, t_head, regimes,
                        privileged_lse=lp_lse, teacher_lse=lt_lse)
    from dopd_vlm.config import MethodConfig

    loss, _ = compute_loss(MethodConfig(top_k=8), inputs, chunk_size, loss_path="fused")
    loss.backward()
    return lt, lp, loss.detach(), student.grad


def test_bf16_heads_give_float32_logits_and_a_float32_accumulated_head_gradient():
    # bf16 weights and hidden states as on a GPU; the reference computes in float64 from the same values
    lt, lp, loss, grad = _dopd_loss_and_head_grad(torch.bfloat16, chunk_size=1)  # 256 chunks to accumulate
    ref_lt, ref_lp, ref_loss, ref_grad = _dopd_loss_and_head_grad(torch.float64, chunk_size=1)
    assert lt.dtype == torch.float32 and ref_lt.abs().max() > 10  # log-probs where bf16 logits round by 0.1 nat
    assert (lt.double() - ref_lt).abs().max() < 1e-4 and (lp.double() - ref_lp).abs().max() < 1e-4
    assert abs(loss.item() - ref_loss.item()) < 1e-4 * abs(ref_loss.item()) + 1e-5
    # one final bf16 rounding (relative 2^-9 per element), not one per chunk
    error = (grad.double() - ref_grad).norm() / ref_grad.norm()
    assert grad.dtype == torch.bfloat16 and error < 4e-3, error


@pytest.mark.parametrize("loss_path", ["fused", "chunked"])
def test_a_tied_head_gets_the_gradient_of_both_its_uses(tmp_path, loss_path):
    # Qwen3-VL-2B, Qwen2-VL-2B, Qwen3-1.7B tie lm_head to embed_tokens: the shared weight's gradient
    # is the embedding's plus the loss's, whichever loss path produced the latter.
    import dataclasses

    from dopd_vlm.config import MethodConfig
    from dopd_vlm.models import load_model
    from dopd_vlm.scoring import backbone, output_head
    from dopd_vlm.lab.tiny import STUDENT_SIZE, make_tiny_pair

    path = make_tiny_pair("qwen3", tmp_path, student=dataclasses.replace(STUDENT_SIZE, tie_word_embeddings=True))["student"]
    model = load_model(path, dtype=torch.float64)
    weight = model.get_output_embeddings().weight
    assert weight is model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 480, (3, 9), generator=g)
    targets = torch.randint(0, 480, (3, 9), generator=g)
    tokens = ResponseTokens(targets.reshape(-1), torch.arange(3).repeat_interleave(9), 3)
    hidden = backbone(model)(input_ids=input_ids).last_hidden_state.reshape(-1, weight.shape[1])
    inputs = LossInputs(tokens, hidden, output_head(model, weight.shape[0]))
    loss, _ = compute_loss(MethodConfig(name="sft"), inputs, chunk_size=4, loss_path=loss_path)
    loss.backward()
    got = weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=input_ids).logits  # plain autograd through the tied model
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    reference.backward()  # equal sequence lengths: the sequence mean is the token mean
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, weight.grad, rtol=1e-9, atol=1e-12)


def test_a_low_precision_head_wider_than_one_upcast_block_gives_the_float32_product():
    # matmul_float32 upcasts a wide bf16 head block by block on CPU (no head-sized float32 copy)
    from dopd_vlm.scoring import UPCAST_COLUMNS, linear_float32

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3 * UPCAST_COLUMNS + 17, 48, generator=generator).to(torch.bfloat16)
    hidden = torch.randn(5, 48, generator=generator).to(torch.bfloat16)
    logits = linear_float32(hidden, weight)
    assert logits.dtype == torch.float32 and logits.shape == (5, weight.shape[0])
    torch.testing.assert_close(logits, hidden.float() @ weight.float().T, rtol=1e-6, atol=1e-5)
    # with a gradient to carry, the plain product (one autograd node)
    hidden.requires_grad_(True)
    linear_float32(hidden, weight).sum().backward()
    assert hidden.grad is not None and hidden.grad.shape == hidden.shape
