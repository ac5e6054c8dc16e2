"""Methods on random tensors: which target each token gets, weights, reduction, gradients."""

import dataclasses

import pytest
import torch
from torch import nn

from dopd_vlm import divergences, reference
from dopd_vlm.choices import METHOD_NAMES
from dopd_vlm.config import ConfigError, MethodConfig, load_config
from dopd_vlm.errors import InputError
from dopd_vlm.head_loss import check_heads, use_fused
from dopd_vlm.methods import METHODS, LossInputs, check_config, compute_loss, summarize
from dopd_vlm.router import HS, HT, LH, LL, route
from dopd_vlm.scoring import Head, LMHead, ResponseTokens, WeightHead
from helpers.method_configs import config_id, method_configs

TOPK_VARIANT = MethodConfig().topk_variant  # the configured default, which compute_loss uses

V, H = 40, 8


def make_inputs(regimes=None, n_per_seq=(3, 5, 1), seed=0, k_heads=True):
    g = torch.Generator().manual_seed(seed)
    n = sum(n_per_seq)
    seq_index = torch.repeat_interleave(torch.arange(len(n_per_seq)), torch.tensor(n_per_seq))
    tokens = ResponseTokens(torch.randint(0, V, (n,), generator=g), seq_index, len(n_per_seq))
    student_w = torch.randn(V + 3, H, generator=g).requires_grad_()  # padded head, sliced to V
    teacher_w = torch.randn(V, H, generator=g) * 2
    hidden = torch.randn(n, H, generator=g).requires_grad_()
    return LossInputs(
        tokens=tokens,
        student_hidden=hidden,
        student_head=WeightHead(student_w, vocab_size=V),
        privileged_hidden=torch.randn(n, H, generator=g),
        teacher_hidden=torch.randn(n, H, generator=g),
        teacher_head=WeightHead(teacher_w),
        regimes=regimes if regimes is not None else torch.randint(0, 4, (n,), generator=g),
    ), student_w


@pytest.mark.parametrize("loss_path", ["fused", "chunked"])
@pytest.mark.parametrize("cfg", list(method_configs(8)), ids=config_id)
def test_every_method_is_finite_and_trains_only_the_student(cfg, loss_path):
    inputs, student_w = make_inputs()
    loss, stats = compute_loss(cfg, inputs, chunk_size=4, loss_path=loss_path)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert inputs.student_hidden.grad is not None and inputs.student_hidden.grad.abs().sum() > 0
    assert student_w.grad is not None
    assert student_w.grad[V:].abs().sum() == 0  # padding rows of the head never matter
    assert not inputs.teacher_hidden.requires_grad and not inputs.privileged_hidden.requires_grad
    assert stats.loss.shape == inputs.tokens.token_ids.shape and not stats.loss.requires_grad
    summary = summarize([stats])
    assert all(isinstance(v, float) for v in summary.values())


def test_dopd_regime_targets_and_weights_match_the_table():
    n_per_seq = (4, 4)
    regimes = torch.tensor([LH, LL, HT, HS, HS, HT, LL, LH])
    inputs, _ = make_inputs(regimes, n_per_seq)
    cfg = MethodConfig(top_k=8, beta_l=0.6, beta_w=0.3, ht_weight=1.0)
    _, stats = compute_loss(cfg, inputs, chunk_size=3)
    with torch.no_grad():
        s = inputs.student_head(inputs.student_hidden)
        t = inputs.teacher_head(inputs.teacher_hidden)
        p = inputs.student_head(inputs.privileged_hidden)
        expected = torch.empty(8)
        for i, r in enumerate(regimes.tolist()):
            if r == LH:
                expected[i] = 0.6 * divergences.topk_reverse_kl(s[i : i + 1], t[i : i + 1], 8, TOPK_VARIANT)[0]
            elif r == LL:
                expected[i] = 0.3 * divergences.topk_reverse_kl(s[i : i + 1], p[i : i + 1], 8, TOPK_VARIANT)[0]
            elif r == HT:
                expected[i] = 1.0 * divergences.generalized_jsd(s[i : i + 1], t[i : i + 1], 0.5)[0]
            else:
                expected[i] = 0.6 * divergences.topk_reverse_kl(s[i : i + 1], p[i : i + 1], 8, TOPK_VARIANT)[0]
        torch.testing.assert_close(reference.token_losses(s, p, t, regimes, cfg), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["module-heads-fused", "weight-heads-chunked"])
def test_a_frozen_privileged_head_is_the_target_of_the_privileged_regimes(fused):
    # method.privileged_target=initial: LL/HS (and OPSD) read a separate frozen head, not the student's
    regimes = torch.tensor([LL, HS, LH, HT, LL, HS])
    inputs, student_w = make_inputs(regimes, (6,))
    frozen_w = torch.randn(V, H, generator=torch.Generator().manual_seed(7))
    if fused:
        student = nn.Linear(H, V + 3, bias=False)
        student.weight.data.copy_(student_w.detach())
        inputs.student_head = LMHead(student, V)
        frozen = nn.Linear(H, V, bias=False).requires_grad_(False)
        frozen.weight.data.copy_(frozen_w)
        inputs.privileged_head = LMHead(frozen, V)
    else:
        inputs.privileged_head = WeightHead(frozen_w)
    path = "fused" if fused else "chunked"
    _, stats = compute_loss(MethodConfig(top_k=8), inputs, chunk_size=4, loss_path=path)
    _, opsd_stats = compute_loss(MethodConfig(name="opsd"), inputs, chunk_size=4, loss_path=path)
    with torch.no_grad():
        s = inputs.student_hidden @ student_w[:V].T
        p = inputs.privileged_hidden @ frozen_w.T
        for i in (0, 1, 4, 5):
            weight = 0.3 if regimes[i] == LL else 0.6
            expected = weight * divergences.topk_reverse_kl(s[i : i + 1], p[i : i + 1], 8, TOPK_VARIANT)[0]
            torch.testing.assert_close(stats.loss[i], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opsd_stats.loss, divergences.generalized_jsd(s, p, 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options,teacher_regimes",
    [({"ablation": "no_teacher"}, set()), ({"ablation": "no_student"}, {LH, LL, HT, HS}),
     ({"divergence": "topk_rkl"}, {LH, HT})],
)
def test_dopd_ablations_swap_sources_or_objective(options, teacher_regimes):
    regimes = torch.tensor([LH, LL, HT, HS])
    inputs, _ = make_inputs(regimes, (4,))
    cfg = MethodConfig(top_k=8, **options)
    _, stats = compute_loss(cfg, inputs, chunk_size=8)
    expected_teacher_rows = torch.tensor([r in teacher_regimes for r in regimes.tolist()])
    assert torch.equal(reference.teacher_rows(regimes, cfg.ablation), expected_teacher_rows)
    with torch.no_grad():
        s = inputs.student_head(inputs.student_hidden)
        t = inputs.teacher_head(inputs.teacher_hidden)
        p = inputs.student_head(inputs.privileged_hidden)
        expected = reference.token_losses(s, p, t, regimes, cfg)
    torch.testing.assert_close(stats.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_path", ["fused", "chunked"])
@pytest.mark.parametrize("regime_weights", ["paper", "equal", "ht_only"])
@pytest.mark.parametrize("divergence", ["routed", "js", "reverse_kl"])
def test_dopd_regime_weights_and_divergences_match_brute_force(regime_weights, divergence, loss_path):
    # the paper's Table 6 (equal weighting, HT tokens alone) and Table 7 (the divergence per regime)
    regimes = torch.tensor([LH, LL, HT, HS, HT, LL])
    inputs, _ = make_inputs(regimes, (4, 2))
    cfg = MethodConfig(top_k=8, regime_weights=regime_weights, divergence=divergence)
    _, stats = compute_loss(cfg, inputs, chunk_size=4, loss_path=loss_path)
    weights = {"paper": {LH: 0.6, LL: 0.3, HT: 1.0, HS: 0.6}, "equal": dict.fromkeys((LH, LL, HT, HS), 1.0),
               "ht_only": {LH: 0.0, LL: 0.0, HT: 1.0, HS: 0.0}}[regime_weights]
    expected_weights = torch.tensor([weights[r] for r in regimes.tolist()], dtype=torch.float64)
    assert torch.equal(reference.regime_weights(regimes, cfg), expected_weights)
    with torch.no_grad():
        s = inputs.student_head(inputs.student_hidden)
        t = inputs.teacher_head(inputs.teacher_hidden)
        p = inputs.student_head(inputs.privileged_hidden)
        expected = reference.token_losses(s, p, t, regimes, cfg)
    torch.testing.assert_close(stats.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_path", ["fused", "chunked"])
def test_dropped_tokens_get_no_loss_and_no_gradient(loss_path):
    # method.token_drop (the paper's Fig. 4): the step marks the dropped tokens; the loss skips them
    inputs, student_w = make_inputs(n_per_seq=(5, 4))
    kept = torch.tensor([True, False, True, True, False, True, True, False, True])
    cfg = MethodConfig(name="vanilla_opd", top_k=8)
    full, full_stats = compute_loss(cfg, inputs, chunk_size=4, loss_path=loss_path)
    inputs.kept = kept
    loss, stats = compute_loss(cfg, inputs, chunk_size=4, loss_path=loss_path)
    assert (stats.loss[~kept] == 0).all()
    torch.testing.assert_close(stats.loss[kept], full_stats.loss[kept])
    inputs.student_hidden.grad = None
    loss.backward()
    assert (inputs.student_hidden.grad[~kept] == 0).all() and (inputs.student_hidden.grad[kept] != 0).any()


def test_sequence_mean_is_mean_of_per_sequence_means():
    token_loss = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0])
    tokens = ResponseTokens(torch.zeros(5, dtype=torch.long), torch.tensor([0, 0, 0, 1, 2]), 3)
    assert tokens.sequence_mean(token_loss).item() == pytest.approx((2.0 + 10.0 + 4.0) / 3)


def test_loss_does_not_depend_on_chunk_size():
    inputs, student_w = make_inputs()
    cfg = MethodConfig(top_k=8)
    results = []
    for chunk in (1, 4, 1000):
        inputs.student_hidden.grad = None
        student_w.grad = None
        loss, _ = compute_loss(cfg, inputs, chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), inputs.student_hidden.grad.clone(), student_w.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dopd_loss_is_zero_when_all_three_passes_agree():
    inputs, student_w = make_inputs()
    same = inputs.student_hidden.detach()
    inputs = dataclasses.replace(
        inputs, privileged_hidden=same, teacher_hidden=same, teacher_head=WeightHead(student_w.detach(), vocab_size=V)
    )
    loss, stats = compute_loss(MethodConfig(top_k=V), inputs, chunk_size=5)
    assert loss.abs().item() < 1e-6
    assert stats.kl_to_teacher.abs().max().item() < 1e-6


def test_missing_pass_is_a_clear_error():
    inputs, _ = make_inputs()
    with pytest.raises(ValueError, match="teacher pass"):
        compute_loss(MethodConfig(name="gkd"), dataclasses.replace(inputs, teacher_hidden=None), 8)
    with pytest.raises(ValueError, match="privileged-student"):
        compute_loss(MethodConfig(name="opsd"), dataclasses.replace(inputs, privileged_hidden=None), 8)


def test_router_output_feeds_dopd_and_shares_sum_to_one():
    inputs, _ = make_inputs(regimes=torch.zeros(9, dtype=torch.long))
    g = torch.Generator().manual_seed(3)
    lt, lp = -torch.rand(9, generator=g) * 3, -torch.rand(9, generator=g) * 3
    routing = route(lt, lp, torch.ones(9, dtype=torch.bool))
    inputs = dataclasses.replace(inputs, regimes=routing.regimes)
    _, stats = compute_loss(MethodConfig(top_k=8), inputs, chunk_size=4)
    summary = summarize([stats])
    assert sum(summary[f"share/{r}"] for r in ("LH", "LL", "HT", "HS")) == pytest.approx(1.0)


def test_a_partitioned_head_that_is_not_linear_is_refused_on_several_ranks():
    # its per-chunk calls would be collectives in numbers that differ between ranks (a hang)
    class PartitionedNonLinearHead(Head):
        partitioned, vocab_size, module = True, V, nn.Sequential()

    inputs, _ = make_inputs()
    inputs.student_head = PartitionedNonLinearHead()
    heads = inputs.student_head, inputs.teacher_head, inputs.privileged_head
    check_heads(*heads, fused=False, world_size=1)  # one rank: no collectives to match
    with pytest.raises(InputError, match="student.s output layer .* ZeRO-3 partitioned across 2 ranks"):
        check_heads(*heads, fused=False, world_size=2)


def test_the_chunked_loss_path_is_refused_for_a_partitioned_linear_head_on_several_ranks():
    # a config problem, found by train.setup before the first step (InputError: one line, exit 2)
    class PartitionedLinearHead(Head):
        partitioned, is_linear, vocab_size, module = True, True, V, nn.Linear(H, V)

    head = PartitionedLinearHead()
    check_heads(head, None, None, fused=True, world_size=2)
    with pytest.raises(InputError, match="train.loss_path=chunked: the student's output layer is ZeRO-3 partitioned "
                                         "across 2 ranks.*use train.loss_path=auto or fused"):
        check_heads(head, None, None, fused=False, world_size=2)


def test_loss_path_auto_fuses_linear_heads_and_fused_needs_one():
    linear, other = LMHead(nn.Linear(H, V, bias=False), V), LMHead(nn.Sequential(nn.Linear(H, V)), V)
    assert use_fused("auto", linear) and use_fused("fused", WeightHead(torch.ones(V, H)))
    assert not use_fused("auto", other) and not use_fused("chunked", linear)
    with pytest.raises(InputError, match="loss_path=fused needs a linear output layer; this student's is Sequential"):
        use_fused("fused", other)


def test_the_config_accepts_exactly_the_rows_of_the_method_table():
    # config.MethodConfig.name is the Literal choices.MethodName: a new row needs its name there too
    assert METHOD_NAMES == tuple(METHODS)


def test_config_checks_that_need_the_method_table_are_one_line_config_errors():
    # the config imports no algorithm; train.setup runs these before anything loads (exit 2, one line)
    check_config(load_config(None, ["model.student=s", "model.teacher=t"]))
    check_config(load_config(None, ["model.student=s", "method.name=opsd"]))  # no teacher needed
    cases = {
        ("method.name=gkd",): "config key 'model.teacher': is required (method gkd distils from a teacher)",
        ("method.name=opsd", "method.token_drop=random"):
            "config key 'method.token_drop': needs a method with a teacher (the gap is |lT - lP|); opsd has none",
    }
    for overrides, message in cases.items():
        cfg = load_config(None, ["model.student=s", *overrides])
        with pytest.raises(ConfigError) as err:
            check_config(cfg)
        assert str(err.value) == message
