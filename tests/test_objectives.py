"""The objective math on hand-made arrays, with values computed by hand."""

import math

import pytest
import torch

from nnunet_rndpo.objectives import (
    LOSS_TYPES,
    STATISTIC_NAMES,
    disagreement_region,
    mask_log_likelihood,
    pair_log_ratios,
    pair_voxel_log_likelihoods,
    preference_loss,
    preference_statistics,
    reference_log_likelihoods,
    voxel_log_likelihood,
)


def two_class_logits(foreground_logit: torch.Tensor) -> torch.Tensor:
    """(B, 2, *spatial) logits with background logit 0, so p(fg) = sigmoid(foreground_logit)."""
    return torch.stack([torch.zeros_like(foreground_logit), foreground_logit], dim=1)


def test_voxel_log_likelihood_matches_hand_values():
    logits = two_class_logits(torch.tensor([[[0.0, math.log(3.0)]]]))  # (1, 2, 1, 2)
    labels = torch.tensor([[[[1, 1]]]])  # (1, 1, 1, 2)
    ll = voxel_log_likelihood(logits, labels)
    # p(fg) = 0.5 and 0.75
    assert torch.allclose(ll, torch.log(torch.tensor([[[0.5, 0.75]]])))
    assert torch.allclose(mask_log_likelihood(ll), torch.tensor([math.log(0.5) + math.log(0.75)]))


def test_ignore_label_contributes_nothing():
    logits = two_class_logits(torch.tensor([[[1.0, 2.0, 3.0]]]))
    labels = torch.tensor([[[[1, 5, 0]]]])
    ll = voxel_log_likelihood(logits, labels, ignore_label=5)
    assert ll[0, 0, 1] == 0
    assert torch.isclose(ll[0, 0, 0], torch.log(torch.sigmoid(torch.tensor(1.0))))
    # out-of-range labels are not checked on the host (that would synchronise); gather rejects them
    with pytest.raises(RuntimeError, match="out of bounds"):
        voxel_log_likelihood(logits, labels)


def test_region_based_is_sum_of_bernoulli_terms():
    logits = torch.tensor([[[[0.0]], [[math.log(3.0)]]]])  # (1, 2 regions, 1, 1)
    members = torch.tensor([[[[1]], [[0]]]])
    ll = voxel_log_likelihood(logits, members, region_based=True)
    assert torch.allclose(ll, torch.tensor([[[math.log(0.5) + math.log(0.25)]]]))


def test_labels_must_carry_a_channel_axis():
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        voxel_log_likelihood(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


def test_disagreement_region_and_size():
    chosen = torch.tensor([[[[0, 1, 1, 0]]]])
    rejected = torch.tensor([[[[0, 1, 0, 1]]]])
    region = disagreement_region(chosen, rejected)
    assert region.tolist() == [[[False, False, True, True]]]
    ratios = pair_log_ratios(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), chosen, rejected)
    assert ratios.disagreement_voxels.tolist() == [2.0]
    assert ratios.total_voxels.tolist() == [4.0]


def test_margin_hand_computed():
    # policy p(fg) = 0.75 everywhere, reference p(fg) = 0.5 everywhere; chosen fg on 2 voxels, rejected bg there.
    policy = two_class_logits(torch.full((1, 1, 4), math.log(3.0)))
    reference = two_class_logits(torch.zeros(1, 1, 4))
    chosen = torch.tensor([[[[1, 1, 0, 0]]]])
    rejected = torch.tensor([[[[0, 0, 0, 0]]]])
    ratios = pair_log_ratios(policy, reference, chosen, rejected)
    # chosen: 2 * (log .75 - log .5); rejected: 2 * (log .25 - log .5)
    assert torch.isclose(ratios.chosen, torch.tensor([2 * math.log(1.5)])).all()
    assert torch.isclose(ratios.rejected, torch.tensor([2 * math.log(0.5)])).all()
    assert torch.isclose(ratios.margin, torch.tensor([2 * math.log(3.0)])).all()
    beta = 0.5
    dpo = preference_loss(ratios, "dpo", beta=beta)
    assert math.isclose(dpo.loss.item(), -math.log(1 / (1 + math.exp(-beta * 2 * math.log(3.0)))), rel_tol=1e-5)
    rn = preference_loss(ratios, "rn_dpo", beta=beta)
    assert math.isclose(rn.loss.item(), -math.log(1 / (1 + math.exp(-beta * math.log(3.0)))), rel_tol=1e-5)
    mean = preference_loss(ratios, "mean", beta=beta)
    assert math.isclose(mean.loss.item(), -math.log(1 / (1 + math.exp(-beta * 2 * math.log(3.0) / 4))), rel_tol=1e-5)
    ipo = preference_loss(ratios, "ipo", beta=beta)
    assert math.isclose(ipo.loss.item(), (math.log(3.0) - 1 / (2 * beta)) ** 2, rel_tol=1e-5)


def test_label_smoothing_is_conservative_dpo():
    ratios = pair_log_ratios(
        two_class_logits(torch.full((1, 1, 2), 1.0)),
        two_class_logits(torch.zeros(1, 1, 2)),
        torch.tensor([[[[1, 1]]]]),
        torch.tensor([[[[0, 0]]]]),
    )
    h = ratios.margin.item() / 2
    eps, beta = 0.2, 1.0
    expected = -(1 - eps) * math.log(1 / (1 + math.exp(-beta * h))) - eps * math.log(1 / (1 + math.exp(beta * h)))
    result = preference_loss(ratios, "rn_dpo", beta=beta, label_smoothing=eps)
    assert math.isclose(result.loss.item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_equal_masks_give_zero_gradient_and_no_nan(loss_type):
    policy = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    reference = torch.randn(2, 3, 4, 4, 4)
    mask = torch.randint(0, 3, (2, 1, 4, 4, 4))
    result = preference_loss(pair_log_ratios(policy, reference, mask, mask.clone()), loss_type)
    result.loss.backward()
    assert result.loss.item() == 0.0
    assert torch.isfinite(policy.grad).all() and (policy.grad == 0).all()
    stats = preference_statistics(result)
    assert stats["pairs/skipped_fraction"] == 1.0
    assert all(math.isfinite(v) for v in stats.values())


def test_scaling_disagreement_scales_dpo_margin_not_rn_dpo():
    # Policy more confident in foreground than the reference, uniformly: every disagreeing voxel adds the same.
    policy = two_class_logits(torch.full((1, 8, 8), 1.5))
    reference = two_class_logits(torch.zeros(1, 8, 8))
    rejected = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    results = {}
    for k in (1, 4):
        chosen = rejected.clone()
        chosen[0, 0, 0, : 2 * k] = 1  # |D| = 2k
        ratios = pair_log_ratios(policy, reference, chosen, rejected)
        results[k] = {t: preference_loss(ratios, t, beta=0.1) for t in ("dpo", "rn_dpo")}
    dpo_margin = {k: (r["dpo"].chosen_rewards - r["dpo"].rejected_rewards).item() for k, r in results.items()}
    rn_margin = {k: (r["rn_dpo"].chosen_rewards - r["rn_dpo"].rejected_rewards).item() for k, r in results.items()}
    assert math.isclose(dpo_margin[4], 4 * dpo_margin[1], rel_tol=1e-5)
    assert math.isclose(rn_margin[4], rn_margin[1], rel_tol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_flows_only_to_disagreement_voxels(loss_type):
    torch.manual_seed(0)
    policy = torch.randn(1, 3, 6, 6, 6, requires_grad=True)
    reference = torch.randn(1, 3, 6, 6, 6)
    chosen = torch.randint(0, 3, (1, 1, 6, 6, 6))
    rejected = chosen.clone()
    rejected[0, 0, 1:3, 2:4, 0:5] = (rejected[0, 0, 1:3, 2:4, 0:5] + 1) % 3
    region = disagreement_region(chosen, rejected)[0]
    preference_loss(pair_log_ratios(policy, reference, chosen, rejected), loss_type).loss.backward()
    grad_norm = policy.grad[0].abs().sum(0)
    assert (grad_norm[~region] == 0).all()
    assert (grad_norm[region] > 0).all()


@pytest.mark.parametrize("loss_type", ("dpo", "rn_dpo", "mean"))
def test_loss_is_log2_when_policy_equals_reference(loss_type):
    logits = torch.randn(3, 2, 5, 5, 5)
    chosen = torch.randint(0, 2, (3, 1, 5, 5, 5))
    rejected = 1 - chosen
    result = preference_loss(pair_log_ratios(logits, logits.clone(), chosen, rejected), loss_type)
    assert math.isclose(result.loss.item(), math.log(2.0), rel_tol=1e-6)
    stats = preference_statistics(result)
    assert stats["rewards/margins"] == 0.0 and stats["rewards/accuracies"] == 0.0


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_inputs_give_finite_float32_results(dtype):
    policy = (torch.randn(2, 3, 8, 8, 8) * 30).to(dtype).requires_grad_()
    reference = (torch.randn(2, 3, 8, 8, 8) * 30).to(dtype)
    chosen = torch.randint(0, 3, (2, 1, 8, 8, 8))
    rejected = torch.randint(0, 3, (2, 1, 8, 8, 8))
    ll = voxel_log_likelihood(policy, chosen)
    assert ll.dtype == torch.float32
    for loss_type in LOSS_TYPES:
        result = preference_loss(pair_log_ratios(policy, reference, chosen, rejected), loss_type)
        assert torch.isfinite(result.loss)
        (grad,) = torch.autograd.grad(result.loss, policy)
        assert torch.isfinite(grad.float()).all()


def test_statistics_hand_computed():
    # two pairs with a preference (policy prefers chosen in one, rejected in the other) and one empty pair
    policy = two_class_logits(torch.tensor([[[1.0, 1.0]], [[-1.0, -1.0]], [[0.0, 0.0]]]))
    reference = two_class_logits(torch.zeros(3, 1, 2))
    chosen = torch.tensor([[[[1, 0]]], [[[1, 1]]], [[[0, 0]]]])
    rejected = torch.tensor([[[[0, 0]]], [[[0, 1]]], [[[0, 0]]]])
    result = preference_loss(pair_log_ratios(policy, reference, chosen, rejected), "rn_dpo", beta=1.0)
    stats = preference_statistics(result)
    assert set(stats) == set(STATISTIC_NAMES)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())
    stats = {k: float(v) for k, v in stats.items()}
    lr_pos = math.log(torch.sigmoid(torch.tensor(1.0)).item() / 0.5)
    lr_neg = math.log(torch.sigmoid(torch.tensor(-1.0)).item() / 0.5)
    # pair 0: chosen fg at voxel 0 under p=sig(1); pair 1: chosen fg at voxel 0 under p=sig(-1)
    assert math.isclose(stats["rewards/chosen"], (lr_pos + lr_neg) / 2, rel_tol=1e-5)
    assert math.isclose(stats["rewards/rejected"], (lr_neg + lr_pos) / 2, rel_tol=1e-5)
    assert stats["rewards/accuracies"] == 0.5
    assert stats["pairs/skipped_fraction"] == pytest.approx(1 / 3)
    assert stats["disagreement/voxels_mean"] == pytest.approx(2 / 3)
    assert stats["disagreement/voxels_median"] == 1.0
    assert stats["disagreement/fraction_mean"] == pytest.approx((0.5 + 0.5 + 0) / 3)


def test_bad_options_name_the_valid_ones():
    ratios = pair_log_ratios(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 1, 2), torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match="rn_dpo"):
        preference_loss(ratios, "kto")
    with pytest.raises(ValueError, match="disagreement"):
        preference_loss(ratios, "dpo", normalization="area")
    with pytest.raises(ValueError, match="beta"):
        preference_loss(ratios, "dpo", beta=0)


def test_bad_target_margin_is_refused():
    ratios = pair_log_ratios(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 1, 2), torch.ones(1, 1, 2))
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="target_margin"):
            preference_loss(ratios, "ipo", target_margin=bad)


def _uniform_margin_ratios(h: float, voxels: int = 3):
    """A pair whose normalised margin (rn_dpo, nats per disagreement voxel) is h, with a gradient."""
    foreground = torch.full((1, 1, voxels), h, requires_grad=True)
    policy = two_class_logits(foreground)
    chosen = torch.ones(1, 1, 1, voxels, dtype=torch.long)
    rejected = torch.zeros_like(chosen)
    return foreground, pair_log_ratios(policy, two_class_logits(torch.zeros(1, 1, voxels)), chosen, rejected)


def test_ipo_target_margin_replaces_one_over_two_beta_and_stops_the_push_there():
    # policy logit gap h per voxel against a reference gap 0: normalised margin h
    foreground, ratios = _uniform_margin_ratios(0.7)
    assert math.isclose(ratios.margin.item() / 3, 0.7, rel_tol=1e-5)
    default = preference_loss(ratios, "ipo", beta=0.5)
    assert math.isclose(default.loss.item(), (0.7 - 1.0) ** 2, rel_tol=1e-5)  # 1 / (2 beta) = 1
    targeted = preference_loss(ratios, "ipo", beta=0.5, target_margin=0.2)
    assert math.isclose(targeted.loss.item(), (0.7 - 0.2) ** 2, rel_tol=1e-5)
    foreground, at_target = _uniform_margin_ratios(0.2)
    loss = preference_loss(at_target, "ipo", beta=0.5, target_margin=0.2).loss
    assert abs(loss.item()) < 1e-10
    loss.backward()
    assert foreground.grad.abs().max().item() < 1e-5  # no push once the margin is reached


@pytest.mark.parametrize("loss_type", ("dpo", "rn_dpo", "mean"))
def test_target_margin_shifts_the_sigmoid(loss_type):
    _, ratios = _uniform_margin_ratios(0.7)
    beta, target = 2.0, 0.5
    scale = {"dpo": 1.0, "rn_dpo": 3.0, "mean": 3.0}[loss_type]  # 3 voxels, all disagreeing
    h = ratios.margin.item() / scale
    shifted = preference_loss(ratios, loss_type, beta=beta, target_margin=target)
    assert math.isclose(shifted.loss.item(), math.log1p(math.exp(-beta * (h - target))), rel_tol=1e-5)
    plain = preference_loss(ratios, loss_type, beta=beta, target_margin=None)
    assert math.isclose(plain.loss.item(), math.log1p(math.exp(-beta * h)), rel_tol=1e-5)
    # the logged rewards do not move with the target
    assert torch.equal(shifted.chosen_rewards, plain.chosen_rewards)


def test_pair_voxel_log_likelihoods_equal_log_softmax_at_both_labels():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 3, 5, 6)
    chosen = torch.randint(0, 4, (2, 1, 3, 5, 6))
    rejected = torch.randint(0, 4, (2, 1, 3, 5, 6))
    both = pair_voxel_log_likelihoods(logits, chosen, rejected)
    log_probs = torch.log_softmax(logits, 1)
    assert torch.allclose(both[:, 0], log_probs.gather(1, chosen)[:, 0], atol=1e-6)
    assert torch.allclose(both[:, 1], log_probs.gather(1, rejected)[:, 0], atol=1e-6)
    assert torch.allclose(voxel_log_likelihood(logits, chosen), both[:, 0], atol=1e-6)
    raw = pair_voxel_log_likelihoods(logits, chosen, rejected, normalized=False)
    assert torch.allclose(raw[:, 0] - raw[:, 1], both[:, 0] - both[:, 1], atol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradient_match_the_full_log_softmax_formulation(loss_type):
    """The log-normaliser outside autograd, and skipped where only the loss is needed, changes neither the
    loss nor its gradient: both equal those of sum_D [log_softmax(policy) - log_softmax(reference)]."""
    torch.manual_seed(2)
    policy = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    reference = torch.randn(2, 3, 4, 5, 6)
    chosen = torch.randint(0, 3, (2, 1, 4, 5, 6))
    rejected = torch.where(torch.rand(2, 1, 4, 5, 6) < 0.3, (chosen + 1) % 3, chosen)
    region = disagreement_region(chosen, rejected).float()
    log_policy, log_reference = torch.log_softmax(policy, 1), torch.log_softmax(reference, 1)
    expected_chosen = (
        ((log_policy.gather(1, chosen) - log_reference.gather(1, chosen))[:, 0] * region).flatten(1).sum(1)
    )
    expected_rejected = (
        ((log_policy.gather(1, rejected) - log_reference.gather(1, rejected))[:, 0] * region).flatten(1).sum(1)
    )
    expected_ratios = type(pair_log_ratios(policy, reference, chosen, rejected))(
        expected_chosen, expected_rejected, region.flatten(1).sum(1), torch.full((2,), float(region[0].numel()))
    )
    expected = preference_loss(expected_ratios, loss_type, beta=0.3)
    (expected_grad,) = torch.autograd.grad(expected.loss, policy)
    for normalized in (True, False):
        ratios = pair_log_ratios(policy, reference, chosen, rejected, normalized=normalized)
        assert torch.allclose(ratios.margin, expected_ratios.margin, atol=1e-4)
        result = preference_loss(ratios, loss_type, beta=0.3)
        assert math.isclose(result.loss.item(), expected.loss.item(), rel_tol=1e-5, abs_tol=1e-6)
        (grad,) = torch.autograd.grad(result.loss, policy)
        assert torch.allclose(grad, expected_grad, atol=1e-6)
    ratios = pair_log_ratios(policy, reference, chosen, rejected)
    assert torch.allclose(ratios.chosen, expected_chosen, atol=1e-4)  # the logged rewards are true log-ratios
    assert torch.allclose(ratios.rejected, expected_rejected, atol=1e-4)


def test_precomputed_reference_term_gives_the_same_ratios():
    torch.manual_seed(3)
    policy, reference = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    chosen, rejected = torch.randint(0, 3, (2, 1, 4, 4, 4)), torch.randint(0, 3, (2, 1, 4, 4, 4))
    direct = pair_log_ratios(policy, reference, chosen, rejected, ignore_label=2)
    with torch.inference_mode():
        term = reference_log_likelihoods(reference, chosen, rejected, ignore_label=2)
    given = pair_log_ratios(policy, None, chosen, rejected, ignore_label=2, reference_voxel_ll=term)
    assert torch.equal(direct.chosen, given.chosen) and torch.equal(direct.rejected, given.rejected)


def test_no_host_synchronisation_in_the_objective():
    """Issue 14: every function of a step runs on tensors whose values cannot be read (the meta device): a
    .item(), float(tensor) or `if tensor` (a host synchronisation on a GPU) would raise here."""
    from nnunet_rndpo.training.losses import preference_loss_over_scales

    meta = torch.device("meta")
    policy = [
        torch.randn(2, 3, 8, 8, 8, device=meta, requires_grad=True),
        torch.randn(2, 3, 4, 4, 4, device=meta, requires_grad=True),
    ]
    reference = [torch.randn(2, 3, 8, 8, 8, device=meta), torch.randn(2, 3, 4, 4, 4, device=meta)]
    targets = [
        torch.zeros(2, 2, 8, 8, 8, dtype=torch.long, device=meta),
        torch.zeros(2, 2, 4, 4, 4, dtype=torch.long, device=meta),
    ]
    chosen, rejected = targets[0][:, :1], targets[0][:, 1:]
    voxel_log_likelihood(policy[0], chosen, ignore_label=2)
    for loss_type in LOSS_TYPES:
        result = preference_loss(
            pair_log_ratios(policy[0], reference[0], chosen, rejected, ignore_label=2), loss_type, target_margin=0.1
        )
        preference_statistics(result)
        total, statistics = preference_loss_over_scales(
            policy, reference, targets, [0.6, 0.4], loss_type=loss_type, beta=0.1, ignore_label=2
        )
        assert total.device == meta and all(v.device == meta for v in statistics.values())
