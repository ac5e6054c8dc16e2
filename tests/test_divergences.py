"""Math tests for dopd_vlm.divergences: values, limits, analytic gradients, brute-force references."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dopd_vlm.divergences import (
    TOPK_VARIANTS,
    entropy,
    generalized_jsd,
    log_probs_at,
    sampled_token_reverse_kl,
    token_cross_entropy,
    topk_reverse_kl,
)

N, V = 6, 11


def random_logits(seed: int, n: int = N, v: int = V, scale: float = 2.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, v, generator=generator)).to(dtype)


def probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=-1)


def forward_kl_ref(student_logits, teacher_logits):
    """KL(P_T || P_S) per row, with explicit loops over the vocabulary."""
    p_s, p_t = probs(student_logits).tolist(), probs(teacher_logits).tolist()
    return torch.tensor(
        [sum(t * math.log(t / s) for s, t in zip(rs, rt)) for rs, rt in zip(p_s, p_t)], dtype=torch.float64
    )


def reverse_kl_ref(student_logits, teacher_logits):
    return forward_kl_ref(teacher_logits, student_logits)


def kl_lists(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def topk_ref(student_logits, target_logits, k, variant):
    """Brute force: top-K support by sorting Python lists, then the variant's formula in loops."""
    out = []
    for row_s, row_t in zip(probs(student_logits).tolist(), probs(target_logits).tolist()):
        support = sorted(range(len(row_s)), key=lambda v: -row_s[v])[: min(k, len(row_s))]
        s_k, t_k = [row_s[v] for v in support], [row_t[v] for v in support]
        if variant == "unbiased":
            out.append(sum(s * math.log(s / t) for s, t in zip(s_k, t_k)))
        elif variant == "renormalized":
            out.append(kl_lists([s / sum(s_k) for s in s_k], [t / sum(t_k) for t in t_k]))
        else:
            rest = [v for v in range(len(row_s)) if v not in support]
            tail_s, tail_t = sum(row_s[v] for v in rest), sum(row_t[v] for v in rest)
            out.append(kl_lists(s_k + [tail_s], t_k + [tail_t]) if rest else kl_lists(s_k, t_k))
    return torch.tensor(out, dtype=torch.float64)


def grad_wrt_student(loss_fn, student_logits, *args, **kwargs):
    student = student_logits.clone().requires_grad_(True)
    loss_fn(student, *args, **kwargs).sum().backward()
    return student.grad


def softmax_chain(student_logits, grad_wrt_probs):
    """∂/∂z given ∂/∂P_S (per row): P_S ⊙ (g − <P_S, g>)."""
    p_s = probs(student_logits)
    return p_s * (grad_wrt_probs - (p_s * grad_wrt_probs).sum(-1, keepdim=True))


ALL_DIVERGENCES = [
    pytest.param(functools.partial(generalized_jsd, beta=b), id=f"jsd_beta{b}") for b in (0.0, 0.3, 0.5, 1.0)
] + [pytest.param(functools.partial(topk_reverse_kl, k=4, variant=v), id=f"topk_{v}") for v in TOPK_VARIANTS]


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_zero_on_identical_distributions(divergence):
    logits = random_logits(0)
    assert torch.allclose(divergence(logits, logits.clone()), torch.zeros(N, dtype=torch.float64), atol=1e-12)


def test_sampled_token_estimator_zero_when_logprobs_agree():
    logprobs = -torch.rand(N, dtype=torch.float64)
    assert torch.equal(sampled_token_reverse_kl(logprobs, logprobs.clone()), torch.zeros(N, dtype=torch.float64))


@pytest.mark.parametrize(
    "divergence",
    [p for p in ALL_DIVERGENCES if "unbiased" not in p.id],  # the unbiased top-K value is a surrogate
)
def test_non_negative(divergence):
    for seed in range(3):
        assert (divergence(random_logits(seed), random_logits(seed + 100)) >= -1e-12).all()


def test_unbiased_topk_value_can_be_negative():
    # Documented: a partial KL sum is not a divergence. Target puts more mass on the support.
    student = torch.tensor([[2.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([[5.0, 4.0, -5.0, -5.0]], dtype=torch.float64)
    assert topk_reverse_kl(student, target, k=2).item() < 0


def test_js_is_symmetric_at_half():
    a, b = random_logits(1), random_logits(2)
    assert torch.allclose(generalized_jsd(a, b, beta=0.5), generalized_jsd(b, a, beta=0.5), atol=1e-12)


def test_jsd_endpoints_are_exact_kls():
    student, teacher = random_logits(3), random_logits(4)
    assert torch.allclose(generalized_jsd(student, teacher, beta=0.0), forward_kl_ref(student, teacher), atol=1e-12)
    assert torch.allclose(generalized_jsd(student, teacher, beta=1.0), reverse_kl_ref(student, teacher), atol=1e-12)


def test_jsd_near_endpoints_approaches_scaled_kls():
    student, teacher = random_logits(5), random_logits(6)
    eps = 1e-6
    near_zero = generalized_jsd(student, teacher, beta=eps) / eps
    near_one = generalized_jsd(student, teacher, beta=1 - eps) / eps
    assert torch.allclose(near_zero, forward_kl_ref(student, teacher), rtol=1e-4, atol=1e-6)
    assert torch.allclose(near_one, reverse_kl_ref(student, teacher), rtol=1e-4, atol=1e-6)


def test_closed_form_two_token_example():
    # P_S = (1/2, 1/2), P_T = (3/4, 1/4), JS mixture M = (5/8, 3/8).
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    forward = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    reverse = 0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)
    js = 0.5 * (0.75 * math.log(6 / 5) + 0.25 * math.log(2 / 3)) + 0.5 * (
        0.5 * math.log(4 / 5) + 0.5 * math.log(4 / 3)
    )
    assert generalized_jsd(student, teacher, beta=0.0).item() == pytest.approx(forward, abs=1e-14)
    assert generalized_jsd(student, teacher, beta=1.0).item() == pytest.approx(reverse, abs=1e-14)
    assert generalized_jsd(student, teacher, beta=0.5).item() == pytest.approx(js, abs=1e-14)
    for variant in TOPK_VARIANTS:  # K = V: every variant is the reverse KL
        assert topk_reverse_kl(student, teacher, k=2, variant=variant).item() == pytest.approx(reverse, abs=1e-14)


def test_closed_form_top1_example():
    # P_S = (3/4, 1/4), P_T = (1/2, 1/2), support = {token 0}.
    student = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    target = torch.zeros(1, 2, dtype=torch.float64)
    expected = {
        "unbiased": 0.75 * math.log(1.5),  # one term of the reverse KL
        "renormalized": 0.0,  # both renormalise to (1)
        "tail": 0.75 * math.log(1.5) + 0.25 * math.log(0.5),  # buckets (3/4 | 1/4) vs (1/2 | 1/2)
    }
    for variant, value in expected.items():
        assert topk_reverse_kl(student, target, k=1, variant=variant).item() == pytest.approx(value, abs=1e-14)


@pytest.mark.parametrize("variant", TOPK_VARIANTS)
@pytest.mark.parametrize("k", [1, 3, V, V + 50])
def test_topk_matches_brute_force(variant, k):
    student, target = random_logits(7), random_logits(8)
    expected = topk_ref(student, target, k, variant)
    assert torch.allclose(topk_reverse_kl(student, target, k=k, variant=variant), expected, atol=1e-12)


@pytest.mark.parametrize("variant", TOPK_VARIANTS)
def test_topk_with_full_support_is_reverse_kl(variant):
    student, target = random_logits(9), random_logits(10)
    full = reverse_kl_ref(student, target)
    assert torch.allclose(topk_reverse_kl(student, target, k=V, variant=variant), full, atol=1e-12)
    assert torch.allclose(topk_reverse_kl(student, target, k=10 * V, variant=variant), full, atol=1e-12)


def test_topk_rejects_bad_arguments():
    logits = random_logits(0)
    with pytest.raises(ValueError):
        topk_reverse_kl(logits, logits, variant="nope")
    with pytest.raises(ValueError):
        topk_reverse_kl(logits, logits, k=0)
    with pytest.raises(ValueError):
        generalized_jsd(logits, logits, beta=1.5)


def test_temperature_divides_both_logits():
    student, teacher, temperature = random_logits(11), random_logits(12), 2.5
    scaled = (student / temperature, teacher / temperature)
    assert torch.allclose(
        generalized_jsd(student, teacher, beta=0.3, temperature=temperature),
        generalized_jsd(*scaled, beta=0.3),
        atol=1e-12,
    )
    for variant in TOPK_VARIANTS:
        assert torch.allclose(
            topk_reverse_kl(student, teacher, k=4, variant=variant, temperature=temperature),
            topk_reverse_kl(*scaled, k=4, variant=variant),
            atol=1e-12,
        )
    ids = torch.arange(N) % V
    assert torch.allclose(log_probs_at(student, ids, temperature), log_probs_at(scaled[0], ids), atol=1e-12)
    assert torch.allclose(entropy(student, temperature), entropy(scaled[0]), atol=1e-12)


@pytest.mark.parametrize(
    "divergence", ALL_DIVERGENCES + [pytest.param(entropy, id="entropy")]
)
def test_bf16_inputs_give_float32_results(divergence):
    student, teacher = random_logits(13, dtype=torch.float32), random_logits(14, dtype=torch.float32)
    args = (student.bfloat16(),) if divergence is entropy else (student.bfloat16(), teacher.bfloat16())
    result = divergence(*args)
    assert result.dtype == torch.float32
    # Exactly the float32 computation on the bf16-rounded logits, and close to the fp32 inputs'.
    upcast = divergence(*(a.float() for a in args))
    assert torch.equal(result, upcast)
    reference = divergence(student) if divergence is entropy else divergence(student, teacher)
    assert torch.allclose(result, reference, atol=5e-2, rtol=5e-2)


# --------------------------------------------------------------------------- token helpers


def test_log_probs_at_entropy_cross_entropy():
    logits = random_logits(15, scale=30.0)  # large logits: the stable forms must not overflow
    ids = torch.tensor([0, 3, 10, 5, 5, 1])
    log_p = torch.log_softmax(logits, -1)
    assert torch.allclose(log_probs_at(logits, ids), log_p[torch.arange(N), ids], atol=1e-12)
    assert torch.allclose(entropy(logits), -(log_p.exp() * log_p).sum(-1), atol=1e-12)
    expected = torch.nn.functional.cross_entropy(logits, ids, reduction="none")
    assert torch.allclose(token_cross_entropy(logits, ids), expected, atol=1e-12)
    ignored = ids.clone()
    ignored[2] = -100
    ce = token_cross_entropy(logits, ignored)
    assert ce[2].item() == 0.0 and torch.allclose(ce[[0, 1, 3, 4, 5]], expected[[0, 1, 3, 4, 5]])
    assert torch.isfinite(log_probs_at(logits.float() * 100, ids)).all()


# --------------------------------------------------------------------------- gradients


def test_reverse_kl_gradient_is_analytic():
    student, teacher = random_logits(16), random_logits(17)
    p_s = probs(student)
    log_ratio = torch.log_softmax(student, -1) - torch.log_softmax(teacher, -1)
    kl = (p_s * log_ratio).sum(-1, keepdim=True)
    analytic = p_s * (log_ratio - kl)
    assert torch.allclose(grad_wrt_student(generalized_jsd, student, teacher, beta=1.0), analytic, atol=1e-12)


def test_forward_kl_gradient_is_analytic():
    student, teacher = random_logits(18), random_logits(19)
    analytic = probs(student) - probs(teacher)
    assert torch.allclose(grad_wrt_student(generalized_jsd, student, teacher, beta=0.0), analytic, atol=1e-12)


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.8])
def test_jsd_gradient_is_analytic(beta):
    # ∂/∂P_S [β KL(P_T‖M) + (1−β) KL(P_S‖M)] = (1−β) log(P_S / M), then the softmax chain rule.
    student, teacher = random_logits(20), random_logits(21)
    p_s, p_t = probs(student), probs(teacher)
    mixture = beta * p_t + (1 - beta) * p_s
    analytic = softmax_chain(student, (1 - beta) * torch.log(p_s / mixture))
    assert torch.allclose(grad_wrt_student(generalized_jsd, student, teacher, beta=beta), analytic, atol=1e-12)


def test_unbiased_topk_gradient_with_full_support_is_reverse_kl_gradient():
    student, target = random_logits(22), random_logits(23)
    full = grad_wrt_student(generalized_jsd, student, target, beta=1.0)
    assert torch.allclose(grad_wrt_student(topk_reverse_kl, student, target, k=V), full, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_unbiased_topk_gradient_is_restricted_reverse_kl_gradient(k):
    # d/dz_j Σ_{v∈S} P_S(v) c_v with c fixed = P_S(j) (1[j∈S] c_j − Σ_{v∈S} P_S(v) c_v),
    # c_v = log P_S(v) − log P_T(v): the full formula P_S ⊙ (c − KL) with both sums cut to S.
    student, target = random_logits(24), random_logits(25)
    p_s = probs(student)
    log_ratio = torch.log_softmax(student, -1) - torch.log_softmax(target, -1)
    in_support = torch.zeros_like(p_s, dtype=torch.bool).scatter(-1, p_s.topk(k, -1).indices, True)
    restricted_ratio = log_ratio * in_support
    partial_kl = (p_s * restricted_ratio).sum(-1, keepdim=True)
    analytic = p_s * (restricted_ratio - partial_kl)
    assert torch.allclose(grad_wrt_student(topk_reverse_kl, student, target, k=k), analytic, atol=1e-12)


def _topk_torch_reference(student, target, k, variant):
    """Differentiable loop-style reference (per row, explicit support lists) for gradients."""
    rows = []
    for row_s, row_t in zip(torch.log_softmax(student, -1), torch.log_softmax(target, -1)):
        support = sorted(range(V), key=lambda v: -row_s[v].item())[:k]
        rest = [v for v in range(V) if v not in support]
        s_k, t_k = row_s[support], row_t[support]
        if variant == "renormalized":
            s_k, t_k = s_k - s_k.logsumexp(0), t_k - t_k.logsumexp(0)
        elif rest:
            s_k = torch.cat([s_k, row_s[rest].logsumexp(0, keepdim=True)])
            t_k = torch.cat([t_k, row_t[rest].logsumexp(0, keepdim=True)])
        rows.append(sum(s_k[i].exp() * (s_k[i] - t_k[i]) for i in range(len(s_k))))
    return torch.stack(rows)


@pytest.mark.parametrize("variant", ["renormalized", "tail"])
def test_exact_topk_variants_gradients_match_reference(variant):
    student, target = random_logits(26), random_logits(27)
    expected = grad_wrt_student(_topk_torch_reference, student, target, 4, variant)
    got = grad_wrt_student(topk_reverse_kl, student, target, k=4, variant=variant)
    assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_gradient_reaches_student_only(divergence):
    student = random_logits(28).requires_grad_(True)
    teacher = random_logits(29).requires_grad_(True)
    divergence(student, teacher).sum().backward()
    assert student.grad is not None and teacher.grad is None


def test_sampled_token_estimator_gradient():
    logits = random_logits(30).requires_grad_(True)
    ids = torch.tensor([1, 2, 3, 4, 5, 6])
    teacher_logprobs = -torch.rand(N, dtype=torch.float64)
    student_logprobs = log_probs_at(logits, ids)
    loss = sampled_token_reverse_kl(student_logprobs, teacher_logprobs)
    advantage = (teacher_logprobs - student_logprobs).detach()
    assert torch.allclose(loss, -advantage * student_logprobs.detach())
    loss.sum().backward()
    # ∇_z log P_S(y) = onehot(y) − P_S, so the gradient is −A (onehot − P_S).
    onehot = torch.nn.functional.one_hot(ids, V).double()
    expected = -advantage[:, None] * (onehot - probs(logits.detach()))
    assert torch.allclose(logits.grad, expected, atol=1e-12)
