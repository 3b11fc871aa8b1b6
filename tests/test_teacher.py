"""The teacher Re-ID network, its losses, and backbone weight loading."""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch

from dkd_ray.config import preset
from dkd_ray.models.backbone import BackboneWeightsError, build_resnet
from dkd_ray.models.reid_losses import (
    BatchHardTripletLoss,
    LabelSmoothingCrossEntropy,
    TeacherCriterion,
)
from dkd_ray.models.teacher import build_teacher, teacher_embedding_dim

CROP = (64, 32)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads per process
    cost several times more CPU than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_teacher(num_classes: int = 4, **overrides):
    cfg = preset("cpu-small", {f"teacher.{k}": v for k, v in overrides.items()})
    torch.manual_seed(0)
    return build_teacher(cfg.teacher, num_classes)


def test_train_mode_outputs_and_backward():
    teacher = small_teacher().train()
    crops = torch.rand(6, 3, *CROP)
    out = teacher(crops)
    assert set(out) == {"features", "embedding", "logits"}
    assert out["features"].shape == out["embedding"].shape == (6, teacher.embedding_dim)
    assert out["logits"].shape == (6, teacher.num_classes) == (6, 4)
    assert teacher.embedding_dim == teacher_embedding_dim(preset("cpu-small").teacher) == 512
    loss = TeacherCriterion()(out, torch.tensor([0, 0, 1, 1, 2, 3]))
    sum(loss.values()).backward()
    assert teacher.trunk[0].weight.grad is not None and teacher.trunk[0].weight.grad.abs().sum() > 0
    assert not teacher.bnneck.bias.requires_grad  # BN-neck bias is frozen
    assert teacher.classifier.bias is None


def test_eval_mode_unit_norm_and_logits_match():
    teacher = small_teacher().eval()
    crops = torch.rand(3, 3, *CROP)
    with torch.no_grad():
        emb = teacher(crops)
        emb2, logits = teacher.forward_with_logits(crops)
    assert emb.shape == (3, teacher.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(emb, emb2)
    assert logits.shape == (3, 4)


def test_last_stride_one_doubles_the_final_map():
    crops = torch.rand(1, 3, *CROP)
    sizes = {}
    for stride in (1, 2):
        teacher = small_teacher(last_stride=stride).eval()
        with torch.no_grad():
            sizes[stride] = tuple(teacher.trunk(crops).shape[-2:])
    assert sizes[2] == (2, 1) and sizes[1] == (4, 2)


def test_teacher_learns_identities_of_coloured_crops():
    """A few Adam steps on 4 identities (upper/lower colours, each colour shared by two
    identities, heavy noise) cut both losses clearly."""
    torch.manual_seed(1)
    colours = torch.eye(3)
    upper, lower = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 2, 2, 0])
    pids = torch.arange(4).repeat_interleave(4)
    crops = torch.rand(16, 3, *CROP)
    half = CROP[0] // 2
    crops[:, :, :half] += 0.8 * colours[upper[pids]][:, :, None, None]
    crops[:, :, half:] += 0.8 * colours[lower[pids]][:, :, None, None]
    crops = (crops / 1.8).clamp(0, 1)
    teacher = small_teacher()
    criterion = TeacherCriterion(label_smoothing=0.1, triplet_margin=0.3)
    opt = torch.optim.Adam([p for p in teacher.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(12):
        losses = criterion(teacher.train()(crops), pids)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[0]["loss_triplet"] > 0.1  # not trivially solved at init
    assert history[-1]["loss_id"] < 0.7 * history[0]["loss_id"]
    assert history[-1]["loss_triplet"] < history[0]["loss_triplet"]


def test_label_smoothing_cross_entropy_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    eps = 0.1
    log_p = [2 - math.log(math.exp(2) + 2), -math.log(math.exp(2) + 2), -math.log(math.exp(2) + 2)]
    q = [1 - eps + eps / 3, eps / 3, eps / 3]
    expected = -sum(qi * lp for qi, lp in zip(q, log_p))
    got = LabelSmoothingCrossEntropy(eps)(logits, torch.tensor([0]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_batch_hard_triplet_hand_computed():
    # Points on a line (as 2-d features): ids 0,0,1,1 at x = 0, 1, 3, 5.
    # anchor x=0: hardest pos 1, nearest neg 3 -> relu(1-3+.3) = 0
    # anchor x=1: pos 1, neg 2 -> 0 ; anchor x=3: pos 2, neg 2 -> 0.3 ; anchor x=5: pos 2, neg 4 -> 0
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [5.0, 0.0]], requires_grad=True)
    loss = BatchHardTripletLoss(margin=0.3)(x, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(0.3 / 4, abs=1e-5)
    loss.backward()
    # Only anchor x=3 is active: descent moves it right (to its positive x=5, away from the
    # negative x=1), moves x=5 left and x=1 left; the others get no gradient.
    torch.testing.assert_close(x.grad[:, 0], torch.tensor([0.0, 0.25, -0.5, 0.25]))


def test_triplet_skips_anchors_without_positive():
    x = torch.tensor([[0.0], [1.0], [1.1]])
    # anchor 0: relu(1 - 1.1 + .3) = .2 ; anchor 1: relu(1 - .1 + .3) = 1.2 ; anchor 2 (alone): skipped
    assert BatchHardTripletLoss(0.3)(x, torch.tensor([0, 0, 1])).item() == pytest.approx(0.7, abs=1e-5)
    assert BatchHardTripletLoss(0.3)(x, torch.tensor([0, 1, 2])).item() == 0.0  # no anchor has a positive


def test_backbone_weights_from_path_round_trip(tmp_path):
    torch.manual_seed(3)
    source = build_resnet("resnet18", "none")
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}  # fc is optional
    path = tmp_path / "r18.pt"
    torch.save(state, path)
    loaded = build_resnet("resnet18", str(path))
    torch.testing.assert_close(loaded.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    with pytest.raises(BackboneWeightsError, match="do not fit|do not match"):
        build_resnet("resnet50", str(path))
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        build_resnet("resnet18", str(tmp_path / "missing.pt"))


def test_imagenet_weights_without_network_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(BackboneWeightsError, match="backbone_weights=none"):
        build_resnet("resnet18", "imagenet")


def test_bad_teacher_settings_are_named():
    with pytest.raises(ValueError, match="last_stride"):
        small_teacher(last_stride=3)
    cfg = preset("cpu-small")
    with pytest.raises(ValueError, match="num_classes"):
        build_teacher(cfg.teacher, 0)
    with pytest.raises(ValueError, match="crops"):
        small_teacher().eval()(torch.rand(3, 32, 16))
