"""The end-to-end student: train/eval outputs, FSA, embed_boxes, the distillation wrapper, and a
short learning run on two drawn scenes."""

from __future__ import annotations

import pytest
import torch

from dkd_ray.config import preset
from dkd_ray.distill.model import DistilledStudent, build_distilled_student
from dkd_ray.models.student import SceneTransform, build_student, labelled_ground_truth

H, W = 128, 192


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads per process
    cost several times more CPU than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
NUM_IDS = 3
STUDENT_LOSSES = {"loss_rpn_objectness", "loss_rpn_box_reg", "loss_box_classifier", "loss_box_reg", "loss_oim"}
# Each identity: (upper colour, lower colour); colours are shared so no single one identifies a person.
COLOURS = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0], [1.0, 0, 1.0], [0, 1.0, 1.0]])
CLOTHES = {0: (0, 1), 1: (2, 3), 2: (4, 5), -1: (3, 0)}


def draw_scene(boxes, pids, seed, flipped=False):
    """A noisy grey scene with each person drawn as a two-colour rectangle."""
    gen = torch.Generator().manual_seed(seed)
    image = 0.4 + 0.2 * torch.rand(3, H, W, generator=gen)
    for (x1, y1, x2, y2), pid in zip(boxes, pids):
        upper, lower = CLOTHES[pid]
        middle = (y1 + y2) // 2
        image[:, y1:middle, x1:x2] = COLOURS[upper][:, None, None] * 0.8 + 0.1
        image[:, middle:y2, x1:x2] = COLOURS[lower][:, None, None] * 0.8 + 0.1
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "pids": torch.tensor(pids),
              "box_index": torch.arange(len(pids)) + 10 * seed, "flipped": flipped}
    return image, target


def two_scenes():
    a = draw_scene([(10, 10, 60, 120), (70, 5, 125, 125), (135, 20, 185, 115)], [0, 1, -1], seed=0)
    b = draw_scene([(5, 15, 60, 125), (65, 5, 120, 110), (130, 10, 185, 120)], [2, 0, 1], seed=1, flipped=True)
    return [a[0], b[0]], [a[1], b[1]]


def small_config(**overrides):
    base = {"data.short_side": H, "data.max_side": W, "student.oim_queue_size": 20,
            "student.box_batch_size_per_image": 16, "student.roi_output_size": 4}  # 4: cheap res5 on CPU
    return preset("cpu-small", {**base, **overrides})


def small_student(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_student(small_config(**overrides), NUM_IDS)


def test_train_forward_returns_every_loss_and_the_gt_dict():
    # The transform resizes here (data size 96x144 < images), so gt boxes must come back unscaled.
    model = small_student(**{"data.short_side": 96, "data.max_side": 144}).train()
    images, targets = two_scenes()
    model(images, targets)  # fills the OIM memories: against all-zero memories OIM has no gradient
    losses, gt = model(images, targets)
    assert set(losses) == STUDENT_LOSSES
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())

    assert gt["pids"].tolist() == [0, 1, 2, 0, 1]  # labelled boxes, images in order, boxes in order
    assert gt["box_index"].tolist() == [0, 1, 10, 11, 12]
    assert gt["flipped"].tolist() == [False, False, True, True, True]
    assert gt["image_index"].tolist() == [0, 0, 1, 1, 1]
    torch.testing.assert_close(gt["boxes"][0], targets[0]["boxes"][:2])
    torch.testing.assert_close(gt["boxes"][1], targets[1]["boxes"])
    assert gt["embeddings"].shape == (5, model.embedding_dim) == (5, 128)
    torch.testing.assert_close(gt["embeddings"].norm(dim=1), torch.ones(5))
    assert gt["oim_logits"].shape == (5, NUM_IDS)
    assert set(gt) == {"boxes", "pids", "box_index", "flipped", "image_index", "embeddings", "oim_logits",
                       "matched_embeddings", "matched_oim_logits", "matched_rows"}
    assert labelled_ground_truth(targets)["box_index"].tolist() == gt["box_index"].tolist()

    sum(losses.values()).backward()
    for name, param in [("backbone", model.backbone[0].weight), ("rpn", model.rpn.head.cls_logits.weight),
                        ("box", model.roi_heads.box_predictor.bbox_pred.weight),
                        ("reid", model.roi_heads.reid_head.projection.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def _oim_rows(model, images, targets, fsa_num):
    """Re-ID samples (rows, pids) the OIM loss receives in one step with ``fsa_num`` copies."""
    seen = []
    hook = model.roi_heads.oim.register_forward_hook(lambda m, args, out: seen.append(args))
    model.roi_heads.fsa_num = fsa_num
    torch.manual_seed(7)  # same proposal sampling in both runs
    model(images, targets)
    hook.remove()
    features, pids = seen[0]
    return features.shape[0], pids


def test_fsa_adds_jittered_copies_of_labelled_boxes():
    model = small_student().train()
    images, targets = two_scenes()
    rows_without, pids_without = _oim_rows(model, images, targets, 0)
    rows_with, pids_with = _oim_rows(model, images, targets, 3)
    assert rows_with - rows_without == 3 * 5  # 3 copies of each of the 5 labelled boxes
    assert pids_with[:rows_without].tolist() == pids_without.tolist()
    assert pids_with[rows_without:].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1]
    assert small_student(**{"student.fsa_strength": 0.0}).roi_heads.fsa_num == 0  # strength 0: FSA off


def test_eval_outputs_and_embed_boxes_agree():
    model = small_student(**{"student.box_score_thresh": 0.0}).eval()
    images, targets = two_scenes()
    images[1] = images[1][:, :, :160]  # a narrower second image: padding in the batch
    with torch.no_grad():
        detections = model(images)
        assert len(detections) == 2
        for det, image in zip(detections, images):
            n = len(det["boxes"])
            assert n > 0 and det["boxes"].shape == (n, 4) and det["scores"].shape == (n,)
            assert det["embeddings"].shape == (n, 128)
            torch.testing.assert_close(det["embeddings"].norm(dim=1), torch.ones(n))
            assert det["boxes"][:, 2].max() <= image.shape[2] and det["boxes"][:, 3].max() <= image.shape[1]
        for det, plain in zip(detections, model.detect(images)):  # the two-step reference's detector
            assert set(plain) == {"boxes", "scores"} and torch.equal(plain["boxes"], det["boxes"])
        embedded = model.embed_boxes(images, [d["boxes"] for d in detections])
        for det, emb in zip(detections, embedded):
            torch.testing.assert_close(emb, det["embeddings"], atol=1e-4, rtol=1e-4)
        queries = model.embed_boxes(images, [targets[0]["boxes"][:1], torch.zeros(0, 4)])
    assert queries[0].shape == (1, 128) and queries[1].shape == (0, 128)


def test_transform_leaves_dataset_sized_images_alone():
    transform = SceneTransform(H, W, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]).eval()
    image = torch.rand(3, H, W)
    batch, _ = transform([image, torch.rand(3, H - 1, W)])
    assert batch.image_sizes == [(H, W), (H - 1, W)]  # within rounding: not resized
    assert torch.equal(batch.tensors[0, :, :H, :W], image)
    batch, _ = transform([torch.rand(3, H // 2, W // 2)])
    assert batch.image_sizes == [(H, W)]  # other sizes are resized


def test_scenes_without_people_or_labels_still_train():
    model = small_student().train()
    images, targets = two_scenes()
    targets[0]["pids"][:] = -1  # only unlabelled people
    targets[1] = {"boxes": torch.zeros(0, 4), "pids": torch.zeros(0, dtype=torch.long),
                  "box_index": torch.zeros(0, dtype=torch.long), "flipped": False}  # nobody at all
    losses, gt = model(images, targets)
    assert set(losses) == STUDENT_LOSSES and all(torch.isfinite(v) for v in losses.values())
    assert gt["embeddings"].shape == (0, 128) and gt["oim_logits"].shape == (0, NUM_IDS)
    assert [len(b) for b in gt["boxes"]] == [0, 0]
    sum(losses.values()).backward()
    assert model.roi_heads.oim.queue.abs().sum() > 0  # the unlabelled people went into the queue


def test_bad_targets_are_named():
    model = small_student().train()
    images, targets = two_scenes()
    targets[1]["boxes"][0] = torch.tensor([50.0, 50.0, 40.0, 90.0])
    with pytest.raises(ValueError, match="target 1: box .* no area"):
        model(images, targets)
    images, targets = two_scenes()
    targets[0]["pids"][0] = NUM_IDS
    with pytest.raises(ValueError, match="pids must be -1 or in"):
        model(images, targets)


def test_cpu_autocast_step_keeps_oim_in_float32():
    model = small_student().train()
    images, targets = two_scenes()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, gt = model(images, targets)
    assert losses["loss_oim"].dtype == torch.float32 and gt["oim_logits"].dtype == torch.float32
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_distilled_student_adds_kd_terms_and_checks_teacher_rows():
    images, targets = two_scenes()
    torch.manual_seed(0)
    model = build_distilled_student(small_config(), NUM_IDS)
    assert model.distill_loss is not None
    teacher_emb = torch.nn.functional.normalize(torch.randn(5, 512), dim=1)  # cpu-small teacher: resnet18
    teacher_logits = torch.randn(5, NUM_IDS)
    losses = model.train()(images, targets, teacher_emb, teacher_logits)
    assert set(losses) == STUDENT_LOSSES | {"loss_kd_prob", "loss_kd_pair", "loss_kd_tri"}
    sum(losses.values()).backward()
    assert model.distill_loss.projection.weight.grad is not None
    with pytest.raises(ValueError, match="5 labelled boxes"):
        model(images, targets, teacher_emb[:4], teacher_logits[:4])

    plain = build_distilled_student(small_config(**{"distill.enabled": False}), NUM_IDS)
    assert plain.distill_loss is None and set(plain.train()(images, targets)) == STUDENT_LOSSES
    assert isinstance(plain, DistilledStudent)
    assert "roi_heads.oim.lut" in plain.student.state_dict()  # the OIM memories travel with the student


def test_a_few_steps_on_two_drawn_scenes_drive_every_loss_down():
    model = small_student(seed=0).train()
    images, targets = two_scenes()
    # Adam: from random init, SGD needs far more than 25 steps before box regression (a linear map
    # of pooled res5 features) starts to learn; Adam moves every head within a few steps.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    history = {name: [] for name in STUDENT_LOSSES}
    for _ in range(25):
        losses, _ = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        for name, value in losses.items():
            history[name].append(value.item())
    # Proposal sampling makes single steps noisy: compare the means of the first and last 5 steps.
    first = {name: sum(v[:5]) / 5 for name, v in history.items()}
    last = {name: sum(v[-5:]) / 5 for name, v in history.items()}
    for name, values in history.items():
        assert last[name] < first[name], f"{name} did not go down: {[round(v, 3) for v in values]}"
    assert last["loss_rpn_objectness"] < 0.3  # from log(2) = 0.69 at init
    assert last["loss_box_classifier"] < 0.6 * first["loss_box_classifier"]
    assert last["loss_box_reg"] < 0.75 * first["loss_box_reg"]
    assert last["loss_oim"] < 0.5 * first["loss_oim"]


def test_anchors_and_boxes_stay_float32_under_bf16_autocast_with_trainable_batch_norm():
    """Trainable BatchNorm keeps the C4 map in bf16 under autocast; anchors (and so proposals and
    the decoded boxes) must still be float32, or pixels go missing at 1500 px."""
    model = small_student().eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    seen = {}

    def record(name, dtype):  # a hook must return None, or it replaces the module's output
        seen.setdefault(name, dtype)

    model.backbone.register_forward_hook(lambda m, i, out: record("features", out.dtype))
    model.rpn.anchor_generator.register_forward_hook(lambda m, i, out: record("anchors", out[0].dtype))
    images, _ = two_scenes()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model(images)
    assert seen["features"] == torch.bfloat16  # else this test would prove nothing
    assert seen["anchors"] == torch.float32
    assert all(d["boxes"].dtype == torch.float32 for d in detections)


def test_student_norm_option_on_pretrained_and_random_trunks(tmp_path):
    """SeqNet's choice (trainable BN, stem frozen) by default on pretrained weights; the frozen
    variant as an option; from a random init BN is always trained."""
    from torchvision.models import resnet18
    from torchvision.ops.misc import FrozenBatchNorm2d

    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), weights)

    def norms(**overrides):
        model = small_student(**{"student.backbone_weights": str(weights), **overrides})
        kinds = {type(m) for m in model.backbone.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))}
        return model, kinds

    model, kinds = norms()
    assert kinds == {torch.nn.BatchNorm2d}
    assert not model.backbone[0].weight.requires_grad and not model.backbone[1].weight.requires_grad  # stem
    assert model.backbone[4][0].bn1.weight.requires_grad  # layer1 onwards trains
    _, kinds = norms(**{"student.norm": "frozen"})
    assert kinds == {FrozenBatchNorm2d}
    _, kinds = norms(**{"student.norm": "frozen", "student.backbone_weights": "none"})
    assert kinds == {torch.nn.BatchNorm2d}


def test_matched_rows_are_every_reid_row_of_a_labelled_person_with_its_gt_row():
    """distill.rows=matched: the exact gt boxes, each foreground proposal matched to a labelled
    box (IoU >= 0.5 with that box) and the FSA copies, each tagged with its box's gt row."""
    from torchvision.ops import box_iou

    model = small_student(**{"student.fsa_num": 2}).train()
    images, targets = two_scenes()
    captured = {}
    select = model.roi_heads.select_training_samples

    def capture(proposals, internal):
        out = select(proposals, internal)
        captured["proposals"], captured["labels"] = out[0], out[2]
        return out

    model.roi_heads.select_training_samples = capture
    _, gt = model(images, targets)
    m = len(gt["pids"])
    rows, emb = gt["matched_rows"], gt["matched_embeddings"]
    assert m == 5 and torch.equal(rows[:m], torch.arange(m))
    assert torch.equal(rows[-2 * m:], torch.arange(m).repeat_interleave(2))  # FSA copies
    torch.testing.assert_close(emb[:m], gt["embeddings"])
    assert gt["matched_oim_logits"].shape == (len(rows), NUM_IDS)
    # The proposals in between: foreground ones matched to a labelled person, in batch order.
    gt_boxes = torch.cat(gt["boxes"])
    proposal_rows = rows[m:-2 * m]
    fg = [p[l > 0] for p, l in zip(captured["proposals"], captured["labels"])]
    image_of_row = gt["image_index"][proposal_rows]
    assert len(proposal_rows) > 0 and bool((image_of_row[1:] >= image_of_row[:-1]).all())
    fg_boxes = torch.cat(fg)
    labelled = [box_iou(b, gt_boxes[gt["image_index"] == i]).max(dim=1).values >= 0.5 if len(b) else b[:, 0] > 0
                for i, b in enumerate(fg)]
    matched_boxes = fg_boxes[torch.cat(labelled)]
    iou = box_iou(matched_boxes, gt_boxes)[torch.arange(len(proposal_rows)), proposal_rows]
    assert len(matched_boxes) == len(proposal_rows) and bool((iou >= 0.5 - 1e-6).all())


def test_distilled_student_on_matched_rows_with_prototype_keys():
    images, targets = two_scenes()
    torch.manual_seed(0)
    model = build_distilled_student(small_config(**{"distill.rows": "matched", "distill.contrast": "prototypes"}),
                                    NUM_IDS).train()
    teacher_emb = torch.nn.functional.normalize(torch.randn(5, 512), dim=1)
    model.distill_loss.set_prototypes(torch.randn(NUM_IDS, 512))
    losses = model(images, targets, teacher_emb, torch.randn(5, NUM_IDS))
    assert {"loss_kd_prob", "loss_kd_pair", "loss_kd_tri"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.distill_loss.projection.weight.grad is not None


def test_distilled_student_feature_mimicry_on_matched_rows():
    images, targets = two_scenes()
    torch.manual_seed(0)
    model = build_distilled_student(small_config(**{"distill.rows": "matched", "distill.feat_weight": 10.0,
                                                    "distill.tri_weight": 0.0}), NUM_IDS).train()
    losses = model(images, targets, torch.nn.functional.normalize(torch.randn(5, 512), dim=1),
                   torch.randn(5, NUM_IDS))
    assert "loss_kd_feat" in losses and "loss_kd_tri" not in losses
    # The mean cosine distance over rows lies in [0, 2]; times the weight.
    assert 0.0 < losses["loss_kd_feat"].item() <= 20.0
    sum(losses.values()).backward()
    assert model.distill_loss.projection.weight.grad.abs().sum() > 0
