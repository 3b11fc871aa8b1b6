"""The three KD terms and DistillationLoss: hand-computed values, invariances, gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dkd_ray.config import DistillConfig
from dkd_ray.distill.losses import (
    DistillationLoss,
    feature_mimicry,
    pairwise_relation_kd,
    probability_kd,
    triplet_relation_kd,
)


def _teacher(*shape: int, seed: int) -> torch.Tensor:
    """A teacher tensor that *could* take gradients: the losses must not give it any."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).requires_grad_(True)


def _orthonormal_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    """[rows, cols] with orthonormal rows (rows <= cols): an isometry into a larger space."""
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()


# ------------------------------------------------------------------------------ probability-aware KD
def test_probability_kd_hand_computed():
    # Student uniform over K=2 for both boxes. Teacher box 0: logits (2 ln 3, 0) at T=2 soften to
    # (ln 3, 0) -> p = (3/4, 1/4); teacher box 1 uniform.
    # KL_0 = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 0.75 ln 1.5 - 0.25 ln 2; KL_1 = 0.
    # Loss = T^2 * (KL_0 + KL_1) / 2 = 4 * KL_0 / 2.
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [0.0, 0.0]])
    kl0 = 0.75 * math.log(1.5) - 0.25 * math.log(2.0)
    assert probability_kd(student, teacher, temperature=2.0).item() == pytest.approx(2 * kl0, rel=1e-6)


def test_probability_kd_is_t_squared_times_softened_kl():
    student, teacher = torch.randn(5, 7), torch.randn(5, 7) * 3
    t = 3.0
    p_teacher = torch.softmax(teacher / t, dim=1)
    p_student = torch.softmax(student / t, dim=1)
    manual = (p_teacher * (p_teacher.log() - p_student.log())).sum(dim=1).mean() * t**2
    assert probability_kd(student, teacher, t).item() == pytest.approx(manual.item(), rel=1e-5)


def test_probability_kd_scaling_logits_is_a_temperature_change():
    # softmax(a z / T) = softmax(z / (T / a)), so L(a zs, a zt, T) = T^2 KL_{T/a} = a^2 L(zs, zt, T/a).
    student, teacher, t, a = torch.randn(4, 6), torch.randn(4, 6), 4.0, 2.5
    scaled = probability_kd(a * student, a * teacher, t)
    assert scaled.item() == pytest.approx(a**2 * probability_kd(student, teacher, t / a).item(), rel=1e-5)
    assert scaled.item() != pytest.approx(probability_kd(student, teacher, t).item(), rel=1e-2)


def test_probability_kd_zero_when_equal_and_positive_otherwise():
    logits = torch.randn(6, 9)
    assert probability_kd(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert probability_kd(logits, torch.randn(6, 9), 4.0).item() > 1e-3


def test_probability_kd_gradient_reaches_only_the_student():
    student = torch.randn(3, 5, requires_grad=True)
    teacher = _teacher(3, 5, seed=1)
    probability_kd(student, teacher, 2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_probability_kd_rejects_mismatched_classes():
    with pytest.raises(ValueError, match="identity logits"):
        probability_kd(torch.randn(2, 5), torch.randn(2, 6), 1.0)


# ---------------------------------------------------------------------------- pair-wise relation KD
def test_pairwise_hand_computed():
    # Student (2-d): boxes 0 and 2 identical, 1 orthogonal -> S^s_01 = 0, S^s_02 = 1, S^s_12 = 0.
    # Teacher (3-d): boxes 1 and 2 identical, 0 orthogonal -> S^t_01 = 0, S^t_02 = 0, S^t_12 = 1.
    # Off-diagonal squared differences: (01) 0, (02) 1, (12) 1, each twice -> 4 / 6 entries = 2/3.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert pairwise_relation_kd(student, teacher).item() == pytest.approx(2 / 3, rel=1e-6)


def test_pairwise_ignores_dimension_and_scale():
    student = torch.randn(6, 8)
    isometry = _orthonormal_rows(8, 32, seed=2)  # 8-d -> 32-d, preserves every cosine
    teacher = (student @ isometry) * 7.0
    assert pairwise_relation_kd(student * 0.01, teacher).item() == pytest.approx(0.0, abs=1e-10)
    other = torch.randn(6, 32)
    assert pairwise_relation_kd(student, other).item() == pytest.approx(
        pairwise_relation_kd(student * 5.0, other * 0.2).item(), rel=1e-5)
    assert pairwise_relation_kd(student, other).item() > 1e-3


def test_pairwise_zero_below_two_boxes_and_gradient_only_to_student():
    assert pairwise_relation_kd(torch.randn(1, 4), torch.randn(1, 9)).item() == 0.0
    student = torch.randn(4, 4, requires_grad=True)
    teacher = _teacher(4, 9, seed=3)
    pairwise_relation_kd(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


# -------------------------------------------------------------------------- triplet-wise relation KD
def test_triplet_hand_computed():
    # tau = 1, anchors g_0 = (1, 0), g_1 = (0, 1); teacher keys t_0 = (1, 0), t_1 = (0, 1).
    # Each anchor's logits: (1, 0) for its own key first -> softmax (e/(e+1), 1/(e+1)).
    # Different identities: only the own key is positive: -log(e/(e+1)) = log(1 + e^-1) per anchor.
    # Same identity: both keys positive: mean(log(1 + e^-1), log(1 + e)) per anchor.
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    own = math.log(1 + math.exp(-1))
    other = math.log(1 + math.exp(1))
    assert triplet_relation_kd(g, t, torch.tensor([0, 1]), tau=1.0).item() == pytest.approx(own, rel=1e-6)
    assert triplet_relation_kd(g, t, torch.tensor([3, 3]), tau=1.0).item() == pytest.approx(
        (own + other) / 2, rel=1e-6)


def test_triplet_near_zero_when_student_equals_teacher_with_distinct_identities():
    keys = _orthonormal_rows(4, 16, seed=4)  # four orthogonal identities
    # Each anchor: own key at cos 1, the others at 0 -> loss = log(1 + 3 e^{-1/tau}).
    loss = triplet_relation_kd(keys.clone(), keys, torch.arange(4), tau=0.05)
    assert loss.item() == pytest.approx(math.log(1 + 3 * math.exp(-20)), abs=1e-7)
    assert loss.item() < triplet_relation_kd(torch.randn(4, 16), keys, torch.arange(4), tau=0.05).item()


def test_triplet_moving_towards_identity_lowers_loss():
    generator = torch.Generator().manual_seed(5)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    teacher = torch.randn(6, 16, generator=generator)
    student = torch.randn(6, 16, generator=generator)
    target = F.normalize(teacher[pids == 0], dim=1).mean(dim=0)  # identity 0's teacher embeddings
    losses = []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        moved = student.clone()
        moved[0] = (1 - alpha) * F.normalize(student[0], dim=0) + alpha * target
        losses.append(triplet_relation_kd(moved, teacher, pids, tau=0.1).item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses


def test_triplet_gradient_only_to_student_and_dimension_check():
    student = torch.randn(4, 8, requires_grad=True)
    teacher = _teacher(4, 8, seed=6)
    triplet_relation_kd(student, teacher, torch.tensor([0, 1, 0, 2]), tau=0.1).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    with pytest.raises(ValueError, match="project"):
        triplet_relation_kd(torch.randn(4, 8), torch.randn(4, 12), torch.arange(4), tau=0.1)


# ---------------------------------------------------------------------------------- DistillationLoss
def _inputs(m: int = 6, ds: int = 8, dt: int = 16, k: int = 5, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    student_emb = torch.randn(m, ds, generator=generator).requires_grad_(True)
    student_logits = torch.randn(m, k, generator=generator).requires_grad_(True)
    teacher_emb = torch.randn(m, dt, generator=generator).requires_grad_(True)
    teacher_logits = torch.randn(m, k, generator=generator).requires_grad_(True)
    pids = torch.tensor([0, 0, 1, 1, 2, 3])[:m]
    return student_emb, student_logits, teacher_emb, teacher_logits, pids


def _loss(weights: tuple[float, float, float], **kwargs) -> DistillationLoss:
    cfg = DistillConfig(prob_weight=weights[0], pair_weight=weights[1], tri_weight=weights[2], **kwargs)
    torch.manual_seed(0)  # same projection init for every instance
    return DistillationLoss(cfg, student_dim=8, teacher_dim=16)


def test_distillation_loss_terms_match_the_functions_and_scale_with_weights():
    inputs = _inputs()
    unit = _loss((1.0, 1.0, 1.0))(*inputs)
    assert set(unit) == {"loss_kd_prob", "loss_kd_pair", "loss_kd_tri"}
    student_emb, student_logits, teacher_emb, teacher_logits, pids = inputs
    cfg = DistillConfig()
    assert unit["loss_kd_prob"].item() == pytest.approx(
        probability_kd(student_logits, teacher_logits, cfg.temperature).item(), rel=1e-6)
    assert unit["loss_kd_pair"].item() == pytest.approx(pairwise_relation_kd(student_emb, teacher_emb).item(), rel=1e-6)
    weighted = _loss((2.0, 3.0, 0.5))(*inputs)
    for key, weight in (("loss_kd_prob", 2.0), ("loss_kd_pair", 3.0), ("loss_kd_tri", 0.5)):
        assert weighted[key].item() == pytest.approx(weight * unit[key].item(), rel=1e-6)


def test_distillation_loss_zero_weight_removes_the_term():
    loss = _loss((0.0, 1.0, 0.0))
    assert loss.projection is None  # no unused parameters for DDP to trip on
    student_emb, _, teacher_emb, _, pids = _inputs()
    assert set(loss(student_emb, None, teacher_emb, None, pids)) == {"loss_kd_pair"}
    assert _loss((1.0, 1.0, 1.0), enabled=False)(*_inputs()) == {}


def test_distillation_loss_gradients_reach_student_and_projection_only():
    loss = _loss((1.0, 1.0, 1.0))
    student_emb, student_logits, teacher_emb, teacher_logits, pids = _inputs()
    sum(loss(student_emb, student_logits, teacher_emb, teacher_logits, pids).values()).backward()
    assert loss.projection.weight.grad is not None and loss.projection.weight.grad.abs().sum() > 0
    assert student_emb.grad.abs().sum() > 0 and student_logits.grad.abs().sum() > 0
    assert teacher_emb.grad is None and teacher_logits.grad is None


def test_distillation_loss_empty_batch_keeps_projection_in_graph():
    loss = _loss((1.0, 1.0, 1.0))
    empty = (torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 5), torch.zeros(0, 16), torch.zeros(0, 5),
             torch.zeros(0, dtype=torch.long))
    out = loss(*empty)
    assert all(v.item() == 0.0 for v in out.values())
    sum(out.values()).backward()
    assert loss.projection.weight.grad is not None  # zero, but present: DDP sees the parameter used


def test_distillation_loss_is_float32_under_autocast():
    loss = _loss((1.0, 1.0, 1.0))
    half_inputs = [x.detach().bfloat16() if x.is_floating_point() else x for x in _inputs()]
    # Reference: the same bfloat16-rounded values, computed in float32 without autocast.
    reference = loss(*[x.float() if x.is_floating_point() else x for x in half_inputs])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(*half_inputs)
    for key, value in under_autocast.items():
        assert value.dtype == torch.float32
        # A bfloat16 projection under autocast would be off by ~1e-3 relative here.
        assert value.item() == pytest.approx(reference[key].item(), rel=1e-6)


def test_triplet_with_separate_keys_hand_computed():
    # Three keys (identity prototypes) (1,0), (0,1), (-1,0) with identities 0, 1, 2; tau = 1.
    # Anchor (1,0) of identity 0: logits (1, 0, -1), loss -log(e / (e + 1 + 1/e)).
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    anchor = torch.tensor([[1.0, 0.0]])
    expected = -math.log(math.e / (math.e + 1 + 1 / math.e))
    loss = triplet_relation_kd(anchor, keys, torch.tensor([0]), 1.0, key_pids=torch.tensor([0, 1, 2]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="no key of their identity"):
        triplet_relation_kd(anchor, keys, torch.tensor([5]), 1.0, key_pids=torch.tensor([0, 1, 2]))


def test_distillation_loss_prototype_keys():
    cfg = DistillConfig(prob_weight=0, pair_weight=0, contrast="prototypes", contrastive_temperature=1.0)
    loss = DistillationLoss(cfg, 2, 2)
    with pytest.raises(ValueError, match="set_prototypes"):
        loss(torch.randn(1, 2), None, torch.randn(1, 2), None, torch.tensor([0]))
    loss.set_prototypes(torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]))  # normalised on the way in
    with torch.no_grad():
        loss.projection.weight.copy_(torch.eye(2))
        loss.projection.bias.zero_()
    out = loss(torch.tensor([[1.0, 0.0]]), None, torch.randn(1, 2), None, torch.tensor([0]))
    assert out["loss_kd_tri"].item() == pytest.approx(-math.log(math.e / (math.e + 1 + 1 / math.e)), rel=1e-6)
    assert "prototypes" not in loss.state_dict()  # rebuilt from the bank, never saved with the model


# ------------------------------------------------------------------------------ feature mimicry (ours)
def test_feature_mimicry_hand_computed():
    # Row 0 points the teacher's way (cos 1, distance 0), row 1 at 90 degrees (cos 0, distance 1),
    # row 2 the opposite way (cos -1, distance 2); scale does not matter. Mean: (0 + 1 + 2) / 3.
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [5.0, 0.0], [1.0, 0.0]])
    assert feature_mimicry(student, teacher).item() == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="project the student embedding first"):
        feature_mimicry(torch.randn(2, 3), torch.randn(2, 4))


def test_feature_mimicry_keeps_pulling_where_the_triplet_term_has_saturated():
    # Two identities, student already ranks them the teacher's way (triplet loss ~0 at tau=0.1),
    # but each row is 60 degrees off its teacher row: mimicry still has a gradient.
    angle = math.pi / 3
    teacher = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    student = torch.tensor([[math.cos(angle), math.sin(angle), 0.0],
                            [-math.cos(angle), 0.0, math.sin(angle)]], requires_grad=True)
    pids = torch.tensor([0, 1])
    assert triplet_relation_kd(student, teacher, pids, 0.1).item() < 1e-3
    loss = feature_mimicry(student, teacher)
    assert loss.item() == pytest.approx(0.5, rel=1e-6)
    loss.backward()
    assert student.grad.abs().sum() > 0.1


def test_distillation_loss_feature_mimicry_uses_the_projection_and_is_off_by_default():
    student_emb, _, teacher_emb, _, pids = _inputs()
    assert "loss_kd_feat" not in _loss((1.0, 1.0, 1.0))(*_inputs())
    cfg = DistillConfig(prob_weight=0, pair_weight=0, tri_weight=0, feat_weight=2.0)
    assert cfg.active and not DistillConfig(prob_weight=0, pair_weight=0, tri_weight=0).active
    torch.manual_seed(0)
    loss = DistillationLoss(cfg, student_dim=8, teacher_dim=16)
    out = loss(student_emb, None, teacher_emb, None, pids)
    assert set(out) == {"loss_kd_feat"}
    expected = 2.0 * feature_mimicry(loss.projection(student_emb), teacher_emb)
    assert out["loss_kd_feat"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss_kd_feat"].backward()
    assert loss.projection.weight.grad.abs().sum() > 0 and teacher_emb.grad is None
