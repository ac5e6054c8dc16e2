"""Both loss paths against the reference (dopd_vlm/reference.py: DOPD's loss from the full logits of
the three passes), in float64. The tokens are routed as the step routes them (the scoring pass's
log-probs, `router.compute_thresholds` / `assign_regimes`), then `methods.compute_loss` runs the
fused or the chunked path: same regimes, same loss, same gradients as the reference."""

import pytest
import torch
from torch import nn

from dopd_vlm import reference
from dopd_vlm.config import MethodConfig
from dopd_vlm.divergences import log_probs_at
from dopd_vlm.methods import LossInputs, compute_loss
from dopd_vlm.router import HS, HT, LH, LL, assign_regimes, compute_thresholds
from dopd_vlm.scoring import LMHead, ResponseTokens, token_logprobs_and_lse

V, H, H_TEACHER = 40, 8, 12  # vocabulary, student and teacher hidden sizes

# The default config and every option on the walk from the step to a divergence (top-K from K
# weight rows for unbiased / renormalized; full target rows for tail and at temperature != 1; full
# JS in HT), the paper's diagnostics (sources, weights, divergences) and the router's options.
CONFIGS = {
    "default": {},
    "unbiased": {"topk_variant": "unbiased"},
    "renormalized": {"topk_variant": "renormalized"},
    "temperature_2": {"temperature": 2.0},
    "top_k_above_vocabulary": {"top_k": 128},
    "no_routing": {"ablation": "no_routing"},
    "no_teacher": {"ablation": "no_teacher"},
    "no_student": {"ablation": "no_student"},
    "equal_weights": {"regime_weights": "equal"},
    "ht_only": {"regime_weights": "ht_only"},
    "topk_rkl_everywhere": {"divergence": "topk_rkl"},
    "js_everywhere": {"divergence": "js"},
    "reverse_kl_everywhere": {"divergence": "reverse_kl"},
    "minmax": {"normalize": "minmax"},
    "zscore": {"normalize": "zscore", "trim": 0.2},
    "untrimmed": {"trim": 0.0},
}
PATHS = {  # (train.loss_path, heads): linear heads read top-K targets from weight rows; others do not
    "fused": ("fused", "linear"),
    "chunked": ("chunked", "linear"),
    "chunked_any_head": ("chunked", "module"),
}


def problem(seed: int, n_per_seq=(5, 7, 1, 4, 9)):
    g = torch.Generator().manual_seed(seed)
    n = sum(n_per_seq)
    seq_index = torch.repeat_interleave(torch.arange(len(n_per_seq)), torch.tensor(n_per_seq))
    tokens = ResponseTokens(torch.randint(0, V, (n,), generator=g), seq_index, len(n_per_seq))
    student = nn.Linear(H, V + 3, bias=False).double()  # padded head, sliced to V
    teacher = nn.Linear(H_TEACHER, V, bias=False).double().requires_grad_(False)
    frozen = nn.Linear(H, V, bias=False).double().requires_grad_(False)  # method.privileged_target=initial
    with torch.no_grad():
        for layer, scale in ((student, 1.0), (teacher, 2.0), (frozen, 1.5)):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64) * scale)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64).requires_grad_(True)
    privileged_hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(n, H_TEACHER, generator=g, dtype=torch.float64)
    return tokens, student, teacher, frozen, hidden, privileged_hidden, teacher_hidden


def head(layer: nn.Linear, kind: str, vocab: int = V) -> LMHead:
    return LMHead(layer if kind == "linear" else nn.Sequential(layer), vocab)


def trainer_loss(cfg, path, seed, frozen_target):
    """The step's routing and `compute_loss`: (loss, regimes, grad of the hidden states, of the head)."""
    tokens, student, teacher, frozen, hidden, privileged_hidden, teacher_hidden = problem(seed)
    loss_path, kind = PATHS[path]
    student_head, teacher_head = head(student, kind), head(teacher, kind)
    privileged_head = head(frozen, kind) if frozen_target else None
    lp, lp_lse = token_logprobs_and_lse(privileged_hidden, privileged_head or student_head, tokens.token_ids, 4)
    lt, lt_lse = token_logprobs_and_lse(teacher_hidden, teacher_head, tokens.token_ids, 4)
    valid = torch.ones_like(lt, dtype=torch.bool)
    thresholds = compute_thresholds([lt], [lp], [valid], trim=cfg.trim, normalize=cfg.normalize)
    regimes = assign_regimes(lt, lp, valid, thresholds)
    inputs = LossInputs(tokens=tokens, student_hidden=hidden, student_head=student_head,
                        privileged_hidden=privileged_hidden, privileged_head=privileged_head,
                        teacher_hidden=teacher_hidden, teacher_head=teacher_head, regimes=regimes,
                        privileged_lse=lp_lse, teacher_lse=lt_lse)
    loss, _ = compute_loss(cfg, inputs, chunk_size=5, loss_path=loss_path)
    loss.backward()
    return loss.detach(), regimes, hidden.grad, student.weight.grad


def reference_loss(cfg, seed, frozen_target):
    """`reference.dopd_loss` on the full logits of the same problem, and the same results."""
    tokens, student, teacher, frozen, hidden, privileged_hidden, teacher_hidden = problem(seed)
    student_logits = hidden @ student.weight[:V].T
    privileged_logits = privileged_hidden @ (frozen.weight if frozen_target else student.weight[:V]).T
    teacher_logits = teacher_hidden @ teacher.weight.T
    loss = reference.dopd_loss(student_logits, privileged_logits.detach(), teacher_logits, tokens.token_ids,
                               tokens.seq_index, cfg)
    loss.backward()
    ids = tokens.token_ids
    regimes = reference.route(log_probs_at(teacher_logits, ids), log_probs_at(privileged_logits, ids), cfg.trim,
                              cfg.normalize)
    return loss.detach(), regimes, hidden.grad, student.weight.grad


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_both_loss_paths_equal_the_reference(options, path):
    cfg = MethodConfig(**{"top_k": 8, **options})
    for seed, frozen_target in ((4, False), (5, True)):  # seeds whose batches hold every regime
        loss, regimes, grad_hidden, grad_head = trainer_loss(cfg, path, seed, frozen_target)
        ref_loss, ref_regimes, ref_grad_hidden, ref_grad_head = reference_loss(cfg, seed, frozen_target)
        assert torch.equal(regimes, ref_regimes)
        assert set(regimes.tolist()) == {LH, LL, HT, HS}  # every regime is exercised
        # float64 throughout, but the scoring pass's log-probs and logsumexp are float32 by contract
        tol = dict(rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(loss, ref_loss, **tol)
        torch.testing.assert_close(grad_hidden, ref_grad_hidden, **tol)
        torch.testing.assert_close(grad_head[:V], ref_grad_head[:V], **tol)
        assert not grad_head[V:].any()  # the head's padding rows never matter


def test_the_reference_averages_tokens_per_sequence_then_sequences():
    # three sequences of 1, 2 and 3 tokens whose three passes agree except on one token each
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, V, generator=g, dtype=torch.float64)
    student = logits.clone()
    student[[0, 2, 5]] += torch.randn(3, V, generator=g, dtype=torch.float64)
    seq_index = torch.tensor([0, 1, 1, 2, 2, 2])
    cfg = MethodConfig(regime_weights="equal", divergence="reverse_kl")
    per_token = reference.token_losses(student, logits, logits, torch.zeros(6, dtype=torch.long), cfg)
    expected = (per_token[0] + per_token[2] / 2 + per_token[5] / 3) / 3
    ids = torch.zeros(6, dtype=torch.long)
    torch.testing.assert_close(reference.dopd_loss(student, logits, logits, ids, seq_index, cfg), expected)
    assert (per_token[[1, 3, 4]] == 0).all() and (per_token[[0, 2, 5]] > 0).all()


def test_the_reference_router_uses_trimmed_means_of_the_batch():
    lt = torch.log(torch.tensor([0.9, 0.8, 0.1, 0.05, 0.5, 0.3], dtype=torch.float64))
    lp = torch.log(torch.tensor([0.85, 0.2, 0.6, 0.04, 0.5, 0.9], dtype=torch.float64))
    gap = (lt - lp).abs()
    assert reference.trimmed_mean(gap, 0.2) == gap.sort().values[:5].mean()  # floor(0.2 * 6) = 1 dropped
    valid = torch.ones(6, dtype=torch.bool)
    routed = reference.route(lt, lp, trim=0.2)
    assert torch.equal(routed, assign_regimes(lt, lp, valid, compute_thresholds(lt, lp, valid, trim=0.2)))
    assert set(routed.tolist()) == {LH, LL, HT, HS}
