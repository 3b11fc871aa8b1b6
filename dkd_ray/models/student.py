"""The student: an end-to-end person search network (docs/METHOD.md, "The student"), OIM/SeqNet design.

Built from torchvision's detection pieces, read top to bottom:

    images -> SceneTransform (normalise, batch)            GeneralizedRCNNTransform
           -> ResNet conv1..layer3 (C4, stride 16)          backbone
           -> RegionProposalNetwork                         AnchorGenerator + RPNHead
           -> MultiScaleRoIAlign (14x14 on C4 by default)   RoI pooling
           -> layer4 (res5) + global average pool           box head
           -> FastRCNNPredictor (person/background, box)    RoIHeads' sampling, box coding, NMS
           -> EmbeddingHead (d-dim, L2-normalised)          Re-ID head, trained with OIM

Training adds FSA (feature-level spatial-invariant augmentation): each labelled ground-truth box
is also pooled at ``fsa_num`` jittered copies (``dkd_ray.distill.jitter.jitter_boxes``, strength
``fsa_strength``) whose embeddings enter the OIM loss with the box's identity. It also returns,
for distillation, the embeddings of the labelled ground-truth boxes themselves (``gt`` dict).

Image size: the dataset is authoritative. ``SceneDataset`` resizes scenes to
``data.short_side``/``data.max_side``; the transform is built with the same sizes and leaves an
image alone when it is already at that size (within rounding), so it only normalises and pads.
Images of another size (raw frames at inference) are resized by it, and outputs are mapped back
to the coordinates of the images given to ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    resize_boxes,
)
from torchvision.ops import MultiScaleRoIAlign

from dkd_ray.config import Config
from dkd_ray.distill.jitter import jitter_boxes
from dkd_ray.models.backbone import (
    ResNetC4,
    ResNetRes5Head,
    build_resnet,
    detection_norm_layer,
    freeze_stem,
    is_pretrained,
)
from dkd_ray.models.oim import OIMLoss
from dkd_ray.models.reid_head import EmbeddingHead
from dkd_ray.models.teacher import IMAGENET_MEAN, IMAGENET_STD

# Faster R-CNN constants of the OIM/SeqNet recipe (not tuned here, so not in the config).
ANCHOR_ASPECT_RATIOS = (0.5, 1.0, 2.0)
RPN_FG_IOU, RPN_BG_IOU, RPN_BATCH_PER_IMAGE, RPN_POSITIVE_FRACTION, RPN_NMS_THRESH = 0.7, 0.3, 256, 0.5, 0.7
BOX_FG_IOU, BOX_BG_IOU, BOX_POSITIVE_FRACTION = 0.5, 0.5, 0.5
ROI_SAMPLING_RATIO = 2
FEATURE = "feat_res4"


class SceneTransform(GeneralizedRCNNTransform):
    """Normalise and batch; resize only images not already at ``min_size``/``max_size``."""

    def resize(self, image, target=None):
        height, width = image.shape[-2:]
        scale = min(self.min_size[-1] / min(height, width), self.max_size / max(height, width))
        if abs(scale - 1) * max(height, width) < 2:  # the dataset already resized it (rounding aside)
            return image, target
        return super().resize(image, target)


class FloatRPNHead(RPNHead):
    """RPNHead whose outputs are float32: under autocast, anchors would otherwise be decoded in
    float16 (about 1 px resolution at 1500 px)."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class FloatAnchorGenerator(AnchorGenerator):
    """AnchorGenerator that makes float32 anchors whatever the feature map's dtype: with trainable
    BatchNorm under autocast the C4 map is bf16/fp16, and anchors in bf16 are off by up to 4 px
    at 1500 px (8 bits of mantissa). Only the maps' shapes and device are read, so zero-stride
    float32 stand-ins (one element each) replace them."""

    def forward(self, image_list, feature_maps):
        stand_ins = [torch.empty_strided(f.shape, (0,) * f.dim(), dtype=torch.float32, device=f.device)
                     for f in feature_maps]
        return super().forward(image_list, stand_ins)


def labelled_ground_truth(targets: list[dict]) -> dict:
    """The labelled ground-truth boxes of a batch, in the order every ``gt`` tensor uses: images in
    batch order, boxes in target order. A training loop calls this before the forward to fetch
    the matching teacher outputs (``KnowledgeBank.lookup(box_index, flipped)`` or an online
    teacher on ``boxes``).

    Returns ``boxes`` (list per image of ``[m_i, 4]``, the coordinates of the input images),
    ``pids`` ``[M]``, ``box_index`` ``[M]``, ``flipped`` ``[M]`` bool, ``image_index`` ``[M]``
    (position of the box's image in the batch).
    """
    boxes, pids, box_index, flipped, image_index = [], [], [], [], []
    for i, t in enumerate(targets):
        labelled = t["pids"] >= 0
        m = int(labelled.sum())
        boxes.append(t["boxes"][labelled])
        pids.append(t["pids"][labelled])
        box_index.append(t["box_index"][labelled])
        flipped.append(torch.full((m,), bool(t.get("flipped", False)), dtype=torch.bool, device=t["pids"].device))
        image_index.append(torch.full((m,), i, dtype=torch.long, device=t["pids"].device))
    return {"boxes": boxes, "pids": torch.cat(pids), "box_index": torch.cat(box_index),
            "flipped": torch.cat(flipped), "image_index": torch.cat(image_index)}


class PersonSearchRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` (proposal sampling, box coding, detection post-processing) plus
    the Re-ID head, the OIM loss and FSA."""

    def __init__(self, box_roi_pool: MultiScaleRoIAlign, box_head: nn.Module, box_predictor: nn.Module,
                 reid_head: EmbeddingHead, oim: OIMLoss, *, fsa_num: int, fsa_strength: float,
                 batch_size_per_image: int, score_thresh: float, nms_thresh: float, detections_per_img: int):
        super().__init__(box_roi_pool, box_head, box_predictor, BOX_FG_IOU, BOX_BG_IOU, batch_size_per_image,
                         BOX_POSITIVE_FRACTION, None, score_thresh, nms_thresh, detections_per_img)
        self.reid_head = reid_head
        self.oim = oim
        self.fsa_num = fsa_num if fsa_strength > 0 else 0
        self.fsa_strength = fsa_strength

    def forward(self, features, proposals, image_shapes, targets=None):
        """Train: ``(losses, gt outputs)`` (``forward_train``); eval: detections (``forward_eval``)."""
        if self.training:
            return self.forward_train(features, proposals, image_shapes, targets)
        return self.forward_eval(features, proposals, image_shapes)

    def _box_features(self, features, boxes, image_shapes):
        return self.box_head(self.box_roi_pool(features, boxes, image_shapes))

    def forward_train(self, features, proposals, image_shapes, targets):
        """``(losses, outputs)`` for one batch; ``targets`` hold transformed ``boxes``, ``labels``
        (all 1: person) and ``pids``. ``outputs``: ``embeddings`` and ``oim_logits`` of the exact
        labelled gt boxes (``[M, d]``, ``[M, K]``), and the same for every Re-ID row of a labelled
        person (``matched_embeddings``, ``matched_oim_logits``: the gt boxes, the foreground
        proposals matched to a labelled box and the FSA copies) with ``matched_rows`` ``[R]``,
        the gt row (0..M-1) each belongs to."""
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)

        # Extra RoIs per image: the exact labelled gt boxes (for distillation), then their FSA copies.
        extra_boxes, extra_kind, fsa_pids = [], [], []
        for target, shape in zip(targets, image_shapes):
            labelled = target["pids"] >= 0
            gt_boxes = target["boxes"][labelled]
            fsa = jitter_boxes(gt_boxes, shape, self.fsa_strength, self.fsa_num).reshape(-1, 4).to(gt_boxes.dtype)
            extra_boxes.append(torch.cat([gt_boxes, fsa]))
            extra_kind.append(torch.cat([torch.ones(len(gt_boxes), dtype=torch.bool, device=gt_boxes.device),
                                         torch.zeros(len(fsa), dtype=torch.bool, device=gt_boxes.device)]))
            fsa_pids.append(target["pids"][labelled].repeat_interleave(self.fsa_num))
        rois = [torch.cat([p, e]) for p, e in zip(proposals, extra_boxes)]
        is_proposal = torch.cat([torch.arange(len(r), device=r.device) < len(p) for r, p in zip(rois, proposals)])
        box_features = self._box_features(features, rois, image_shapes)
        proposal_features, extra_features = box_features[is_proposal], box_features[~is_proposal]
        is_exact_gt = torch.cat(extra_kind)

        class_logits, box_regression = self.box_predictor(proposal_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits.float(), box_regression.float(),
                                                      labels, regression_targets)

        # Re-ID samples: foreground proposals (identity of their matched gt box) and FSA copies.
        foreground = torch.cat(labels) > 0
        proposal_pids = torch.cat([t["pids"][m] if len(t["pids"]) else torch.full_like(m, -1)  # no people: all bg
                                   for t, m in zip(targets, matched_idxs)])[foreground]
        # The gt row (labelled_ground_truth order) of each proposal's matched box, -1 if unlabelled.
        gt_row_of_box, offset = [], 0
        for t in targets:
            labelled = t["pids"] >= 0
            rows = torch.full_like(t["pids"], -1)
            rows[labelled] = torch.arange(int(labelled.sum()), device=rows.device) + offset
            offset += int(labelled.sum())
            gt_row_of_box.append(rows)
        proposal_rows = torch.cat([r[m] if len(r) else torch.full_like(m, -1)
                                   for r, m in zip(gt_row_of_box, matched_idxs)])[foreground]
        embeddings = self.reid_head(torch.cat([proposal_features[foreground], extra_features]))
        n_fg = int(foreground.sum())
        proposal_emb, extra_emb = embeddings[:n_fg], embeddings[n_fg:]
        gt_emb = extra_emb[is_exact_gt]
        fsa_rows = torch.arange(len(gt_emb), device=gt_emb.device).repeat_interleave(self.fsa_num)
        labelled_proposals = proposal_rows >= 0
        matched_emb = torch.cat([gt_emb, proposal_emb[labelled_proposals], extra_emb[~is_exact_gt]])
        matched_rows = torch.cat([torch.arange(len(gt_emb), device=gt_emb.device),
                                  proposal_rows[labelled_proposals], fsa_rows])
        matched_logits = self.oim.labelled_logits(matched_emb)  # before the OIM step updates the table
        loss_oim = self.oim(torch.cat([proposal_emb, extra_emb[~is_exact_gt]]),
                            torch.cat([proposal_pids, torch.cat(fsa_pids)]))
        losses = {"loss_box_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_oim": loss_oim}
        m = len(gt_emb)
        return losses, {"embeddings": gt_emb, "oim_logits": matched_logits[:m], "matched_embeddings": matched_emb,
                        "matched_oim_logits": matched_logits, "matched_rows": matched_rows}

    def forward_eval(self, features, proposals, image_shapes, embed: bool = True) -> list[dict[str, torch.Tensor]]:
        class_logits, box_regression = self.box_predictor(self._box_features(features, proposals, image_shapes))
        boxes, scores, _ = self.postprocess_detections(class_logits.float(), box_regression.float(),
                                                       proposals, image_shapes)
        if not embed:
            return [{"boxes": b, "scores": s} for b, s in zip(boxes, scores)]
        # Embed the final (regressed) boxes, so a detection's embedding matches its box exactly,
        # the same way a query's ground-truth box is embedded.
        embeddings = self.embed(features, boxes, image_shapes)
        return [{"boxes": b, "scores": s, "embeddings": e} for b, s, e in zip(boxes, scores, embeddings)]

    def embed(self, features, boxes: list[torch.Tensor], image_shapes) -> list[torch.Tensor]:
        """L2-normalised embeddings ``[n_i, d]`` of the given (transformed-coordinate) boxes."""
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            empty = features[FEATURE].new_zeros(0, self.reid_head.embedding_dim, dtype=torch.float32)
            return [empty for _ in boxes]
        boxes = [b.float() for b in boxes]
        return list(self.reid_head(self._box_features(features, boxes, image_shapes)).float().split(counts))


class PersonSearchNet(nn.Module):
    """The end-to-end student.

    - train: ``forward(images, targets) -> (losses, gt)``. ``targets[i]`` holds ``boxes`` [n,4]
      float (coordinates of ``images[i]``), ``pids`` [n] int64 (-1 unlabelled), ``box_index`` [n]
      int64, ``flipped`` bool. ``losses``: loss_rpn_objectness, loss_rpn_box_reg,
      loss_box_classifier, loss_box_reg, loss_oim (FSA included). ``gt``: the labelled gt boxes in
      ``labelled_ground_truth`` order: ``embeddings`` [M,d], ``oim_logits`` [M,K], ``pids``,
      ``box_index``, ``flipped``, ``image_index`` [M] and ``boxes`` (list per image).
    - eval: ``forward(images) -> [{"boxes" [n,4], "scores" [n], "embeddings" [n,d]}]``, boxes in
      the coordinates of the input images, embeddings L2-normalised.
    - ``embed_boxes(images, boxes)``: embeddings of given boxes (queries, ground truth).
    - ``detect(images)``: boxes and scores only (the detector of a two-step reference).
    """

    def __init__(self, transform: SceneTransform, backbone: nn.Module, rpn: RegionProposalNetwork,
                 roi_heads: PersonSearchRoIHeads) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.embedding_dim = roi_heads.reid_head.embedding_dim
        self.num_train_ids = roi_heads.oim.num_labelled

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        if not self.training:
            return self._forward_eval(images)
        if targets is None:
            raise ValueError("the student needs targets in training mode (call .eval() for inference)")
        return self._forward_train(images, targets)

    def _features(self, images: list[torch.Tensor], targets=None):
        image_list, targets = self.transform(images, targets)
        return image_list, {FEATURE: self.backbone(image_list.tensors)}, targets

    def _forward_train(self, images, targets):
        self._check_targets(images, targets)
        gt = labelled_ground_truth(targets)
        internal = [{"boxes": t["boxes"].float(), "pids": t["pids"],
                     "labels": torch.ones(len(t["boxes"]), dtype=torch.int64, device=t["boxes"].device)}
                    for t in targets]
        image_list, features, internal = self._features(images, internal)
        proposals, rpn_losses = self.rpn(image_list, features, internal)
        roi_losses, gt_outputs = self.roi_heads(features, proposals, image_list.image_sizes, internal)
        losses = {"loss_rpn_objectness": rpn_losses["loss_objectness"],
                  "loss_rpn_box_reg": rpn_losses["loss_rpn_box_reg"], **roi_losses}
        gt.update(gt_outputs)
        return losses, gt

    def _forward_eval(self, images, embed: bool = True):
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, features, _ = self._features(images)
        proposals, _ = self.rpn(image_list, features)
        detections = self.roi_heads.forward_eval(features, proposals, image_list.image_sizes, embed=embed)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    @torch.no_grad()
    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections only (``boxes``, ``scores``), no Re-ID pass: the detector of a two-step
        pipeline (teacher on the detected crops). Uses the module's mode: call ``.eval()`` first."""
        return self._forward_eval(images, embed=False)

    def embed_boxes(self, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        """L2-normalised embeddings ``[n_i, d]`` of ``boxes[i]`` (coordinates of ``images[i]``).
        Uses the module's mode as it is: call ``.eval()`` first for inference."""
        if len(images) != len(boxes):
            raise ValueError(f"embed_boxes got {len(images)} images but {len(boxes)} box lists")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, features, _ = self._features(images)
        scaled = [resize_boxes(b.float().reshape(-1, 4), o, n)
                  for b, o, n in zip(boxes, original_sizes, image_list.image_sizes)]
        return self.roi_heads.embed(features, scaled, image_list.image_sizes)

    def _check_targets(self, images, targets) -> None:
        if len(images) != len(targets):
            raise ValueError(f"student got {len(images)} images but {len(targets)} targets")
        for i, t in enumerate(targets):
            for key in ("boxes", "pids", "box_index"):
                if key not in t:
                    raise ValueError(f"target {i} has no {key!r} (keys: {sorted(t)})")
            boxes, pids = t["boxes"], t["pids"]
            if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
                raise ValueError(f"target {i}: boxes must be float [n, 4], got {boxes.dtype} {tuple(boxes.shape)}")
            if pids.shape != boxes.shape[:1] or t["box_index"].shape != boxes.shape[:1] or pids.dtype != torch.int64:
                raise ValueError(f"target {i}: pids (int64) and box_index must be [{len(boxes)}], got "
                                 f"{pids.dtype} {tuple(pids.shape)} and {tuple(t['box_index'].shape)}")
            if len(boxes) and bool((boxes[:, 2:] <= boxes[:, :2]).any()):
                bad = boxes[(boxes[:, 2:] <= boxes[:, :2]).any(dim=1)][0].tolist()
                raise ValueError(f"target {i}: box {bad} has no area (x2 <= x1 or y2 <= y1)")
            if len(pids) and (int(pids.max()) >= self.num_train_ids or int(pids.min()) < -1):
                raise ValueError(f"target {i}: pids must be -1 or in [0, {self.num_train_ids}), "
                                 f"got range [{int(pids.min())}, {int(pids.max())}]")


def build_student(cfg: Config, num_train_ids: int) -> PersonSearchNet:
    """The student of ``cfg.student`` over ``num_train_ids`` labelled identities; the transform
    uses ``cfg.data.short_side``/``max_side`` (the dataset's sizes, so it does not resize again)."""
    s = cfg.student
    trunk = build_resnet(s.backbone, s.backbone_weights, detection_norm_layer(s.backbone_weights, s.norm))
    if is_pretrained(s.backbone_weights):
        freeze_stem(trunk)
    backbone, box_head = ResNetC4(trunk), ResNetRes5Head(trunk)

    anchors = FloatAnchorGenerator(sizes=(tuple(s.anchor_sizes),), aspect_ratios=(ANCHOR_ASPECT_RATIOS,))
    rpn = RegionProposalNetwork(
        anchors, FloatRPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
        RPN_FG_IOU, RPN_BG_IOU, RPN_BATCH_PER_IMAGE, RPN_POSITIVE_FRACTION,
        pre_nms_top_n={"training": s.rpn_pre_nms_top_n_train, "testing": s.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": s.rpn_post_nms_top_n_train, "testing": s.rpn_post_nms_top_n_test},
        nms_thresh=RPN_NMS_THRESH)
    roi_heads = PersonSearchRoIHeads(
        MultiScaleRoIAlign([FEATURE], s.roi_output_size, ROI_SAMPLING_RATIO), box_head,
        FastRCNNPredictor(box_head.out_channels, 2), EmbeddingHead(box_head.out_channels, s.embedding_dim),
        OIMLoss(s.embedding_dim, num_train_ids, s.oim_queue_size, s.oim_scalar, s.oim_momentum, s.oim_update),
        fsa_num=s.fsa_num, fsa_strength=s.fsa_strength, batch_size_per_image=s.box_batch_size_per_image,
        score_thresh=s.box_score_thresh, nms_thresh=s.box_nms_thresh, detections_per_img=s.detections_per_img)
    transform = SceneTransform(cfg.data.short_side, cfg.data.max_side, list(IMAGENET_MEAN), list(IMAGENET_STD))
    return PersonSearchNet(transform, backbone, rpn, roi_heads)
