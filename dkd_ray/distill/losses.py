r"""The three diverse-knowledge-distillation terms (docs/METHOD.md, "The three distillation terms").

The student learns from the frozen teacher on the ``M`` labelled boxes of a batch. For box ``i``:
``f^s_i`` is the student's Re-ID embedding, ``z^s_i`` its identity logits over the ``K`` training
identities, ``f^t_i`` and ``z^t_i`` the teacher's, ``y_i`` the identity. ``cos`` is cosine
similarity (both sides L2-normalised inside the losses, so callers may pass raw features).

Probability-aware KD, softmax at temperature ``T``, scaled by ``T^2`` so its gradient keeps the
same size as ``T`` changes (Hinton et al.)::

    p^t_i = softmax(z^t_i / T),   p^s_i = softmax(z^s_i / T)
    L_prob = T^2 / M * sum_i KL(p^t_i || p^s_i)

Pair-wise relation-aware KD: the student's box-to-box similarity matrix mimics the teacher's.
Only relations are compared, so the 256-d student and the 2048-d teacher need no projection::

    S^s_ij = cos(f^s_i, f^s_j),   S^t_ij = cos(f^t_i, f^t_j)
    L_pair = 1 / (M (M - 1)) * sum_{i != j} (S^s_ij - S^t_ij)^2

The diagonal is left out: it is 1 in both matrices, and counting it would only shrink the loss
by a batch-size-dependent factor. ``L_pair = 0`` when ``M < 2``.

Triplet-wise relation-aware KD, a cross-model contrastive (supervised-contrastive) term: a
training-only projection ``g_i = phi(f^s_i)`` maps the student embedding into the teacher's
space; the teacher embeddings of the anchor's identity (its own box's included) are positives,
all other teacher embeddings of the batch negatives::

    P(i) = {p : y_p = y_i}
    L_tri = 1 / M * sum_i  -1 / |P(i)| * sum_{p in P(i)}
            log( exp(cos(g_i, f^t_p) / tau) / sum_{a=1..M} exp(cos(g_i, f^t_a) / tau) )

Feature mimicry (this project's option, off by default): the projected student embedding of each
distilled row points where the teacher's embedding of its box points::

    L_feat = 1 / M * sum_i (1 - cos(g_i, f^t_i))

Total student loss: detection + OIM + lambda_prob L_prob + lambda_pair L_pair + lambda_tri L_tri
(+ lambda_feat L_feat).
The default values of ``T``, ``tau`` and the ``lambda``s in ``DistillConfig`` are this project's
defaults, explored by Tune; they are not the paper's published constants.

Every teacher tensor is detached: gradients reach only the student (and the projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkd_ray.config import DistillConfig


def probability_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``L_prob``: ``T^2`` times the batch-mean ``KL(p_teacher^T || p_student^T)``.

    Args:
        student_logits: ``[M, K]`` student identity logits.
        teacher_logits: ``[M, K]`` teacher identity logits over the same ``K`` identities.
        temperature: ``T > 0``.
    """
    _check_rows("probability_kd", student_logits, teacher_logits)
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(f"probability_kd: student has {student_logits.shape[1]} identity logits, "
                         f"teacher {teacher_logits.shape[1]}; both must score the same training identities")
    if temperature <= 0:
        raise ValueError(f"probability_kd: temperature must be > 0, got {temperature}")
    if student_logits.shape[0] == 0:
        return _zero_like(student_logits)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def pairwise_relation_kd(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """``L_pair``: mean squared difference of the off-diagonal cosine similarities.

    Args:
        student_emb: ``[M, ds]``; teacher_emb: ``[M, dt]`` (``ds`` and ``dt`` may differ).
    """
    _check_rows("pairwise_relation_kd", student_emb, teacher_emb)
    m = student_emb.shape[0]
    if m < 2:
        return _zero_like(student_emb)
    student = F.normalize(student_emb.float(), dim=1)
    teacher = F.normalize(teacher_emb.detach().float(), dim=1)
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=student.device)
    return F.mse_loss((student @ student.T)[off_diagonal], (teacher @ teacher.T)[off_diagonal])


def triplet_relation_kd(student_proj: Tensor, teacher_emb: Tensor, pids: Tensor, tau: float,
                        key_pids: Tensor | None = None) -> Tensor:
    """``L_tri``: cross-model supervised-contrastive loss, student anchors against teacher keys.

    Args:
        student_proj: ``[M, dp]`` projected student embeddings ``g_i``.
        teacher_emb: ``[M, dt]`` teacher embeddings (the keys), ``dt == dp``; with ``key_pids``
            any number ``[N, dt]`` of keys (e.g. identity prototypes), each anchor's identity
            among them.
        pids: ``[M]`` identities of the anchors (all >= 0; unlabelled boxes are not passed).
        tau: contrastive temperature ``> 0``.
        key_pids: ``[N]`` identities of the keys; default ``pids`` (anchor ``i``'s key is box ``i``).
    """
    if key_pids is None:
        _check_rows("triplet_relation_kd", student_proj, teacher_emb)
        key_pids = pids
    if student_proj.shape[1] != teacher_emb.shape[1]:
        raise ValueError(f"triplet_relation_kd: projected student dim {student_proj.shape[1]} != teacher dim "
                         f"{teacher_emb.shape[1]}; project the student embedding first")
    if pids.shape != (student_proj.shape[0],):
        raise ValueError(f"triplet_relation_kd: pids has shape {tuple(pids.shape)}, "
                         f"expected ({student_proj.shape[0]},)")
    if tau <= 0:
        raise ValueError(f"triplet_relation_kd: tau must be > 0, got {tau}")
    if student_proj.shape[0] == 0:
        return _zero_like(student_proj)
    anchors = F.normalize(student_proj.float(), dim=1)
    keys = F.normalize(teacher_emb.detach().float(), dim=1)
    log_prob = F.log_softmax(anchors @ keys.T / tau, dim=1)  # [M anchors, N teacher keys]
    positives = (pids[:, None] == key_pids[None, :]).float()
    counts = positives.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError(f"triplet_relation_kd: anchor identities {pids[counts == 0].unique()[:10].tolist()} "
                         f"have no key of their identity")
    return (-(log_prob * positives).sum(dim=1) / counts).mean()


def feature_mimicry(student_proj: Tensor, teacher_emb: Tensor) -> Tensor:
    """``L_feat``: mean cosine distance between each projected student row and its teacher row.

    The relational terms stop pulling once the student ranks a batch's few boxes the teacher's
    way; this one keeps pulling every row towards the teacher's view of its box.

    Args:
        student_proj: ``[M, d]`` projected student embeddings ``g_i``; teacher_emb: ``[M, d]``.
    """
    _check_rows("feature_mimicry", student_proj, teacher_emb)
    if student_proj.shape[1] != teacher_emb.shape[1]:
        raise ValueError(f"feature_mimicry: projected student dim {student_proj.shape[1]} != teacher dim "
                         f"{teacher_emb.shape[1]}; project the student embedding first")
    if student_proj.shape[0] == 0:
        return _zero_like(student_proj)
    cos = F.cosine_similarity(student_proj.float(), teacher_emb.detach().float(), dim=1)
    return (1.0 - cos).mean()


class DistillationLoss(nn.Module):
    """The weighted KD terms of one student step, plus the training-only projection ``phi``.

    ``phi`` is one ``nn.Linear(student_dim, teacher_dim)``. Linear on purpose: a deeper head could
    learn the teacher's relations itself and spare the student embedding (which is what inference
    uses) from learning them; a linear map can only expose structure the embedding already has.
    Feature mimicry (``feat_weight > 0``) uses the same ``phi``.
    No BatchNorm: a step can hold a single labelled box, where training-mode BN fails. ``phi`` is
    created only when ``tri_weight > 0`` or ``feat_weight > 0``, and it is run on every call (even with no labelled box)
    so that DDP sees all of its parameters used. Make this module a submodule of the DDP-wrapped
    student (or wrap it too) so that ``phi``'s gradients are averaged across workers; it is not
    needed at inference.

    ``forward`` takes only the labelled boxes (``pids >= 0``): filter unlabelled ones first.
    FSA copies of a box may be passed as extra rows with the teacher outputs of their exact box.
    It computes in float32, with autocast disabled, whatever the caller's autocast state.
    """

    def __init__(self, cfg: DistillConfig, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        uses_phi = cfg.enabled and max(cfg.tri_weight, cfg.feat_weight) > 0
        self.projection = nn.Linear(student_dim, teacher_dim) if uses_phi else None
        # contrast="prototypes": the teacher's identity means [K, dt] (set_prototypes); not saved
        # with the model (the bank rebuilds them), not a parameter.
        self.register_buffer("prototypes", torch.zeros(0, teacher_dim), persistent=False)

    def set_prototypes(self, prototypes: Tensor) -> None:
        self.prototypes = F.normalize(prototypes.detach().float(), dim=1).to(self.prototypes.device)

    def forward(
        self,
        student_emb: Tensor,
        student_logits: Tensor | None,
        teacher_emb: Tensor,
        teacher_logits: Tensor | None,
        pids: Tensor,
        keys: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Return ``{"loss_kd_prob", "loss_kd_pair", "loss_kd_tri", "loss_kd_feat"}``, each times its lambda.

        Args:
            student_emb: ``[M, ds]`` student Re-ID embeddings of the labelled boxes.
            student_logits: ``[M, K]`` student identity logits (e.g. the OIM's scores against the
                labelled-identity lookup table, without the unlabelled queue); may be ``None``
                when ``prob_weight == 0``.
            teacher_emb: ``[M, dt]``; teacher_logits: ``[M, K]`` (``None`` if ``prob_weight == 0``).
            pids: ``[M]`` training identities, all ``>= 0``.
            keys: ``(teacher keys [N, dt], their identities [N])`` of the triplet-wise term
                (default: ``teacher_emb`` and ``pids``; with ``contrast="prototypes"`` the
                identity prototypes).

        A term whose weight is 0 (or all, if ``cfg.enabled`` is False) is absent from the dict.
        """
        cfg, losses = self.cfg, {}
        if not cfg.enabled:
            return losses
        with torch.autocast(device_type=student_emb.device.type, enabled=False):
            student_emb = student_emb.float()
            if cfg.prob_weight > 0:
                if student_logits is None or teacher_logits is None:
                    raise ValueError("DistillationLoss: prob_weight > 0 needs student_logits and teacher_logits")
                losses["loss_kd_prob"] = cfg.prob_weight * probability_kd(
                    student_logits, teacher_logits, cfg.temperature)
            if cfg.pair_weight > 0:
                losses["loss_kd_pair"] = cfg.pair_weight * pairwise_relation_kd(student_emb, teacher_emb)
            if self.projection is not None:
                projected = self.projection(student_emb)
                if cfg.feat_weight > 0:
                    losses["loss_kd_feat"] = cfg.feat_weight * feature_mimicry(projected, teacher_emb)
            if self.projection is not None and cfg.tri_weight > 0:
                if cfg.contrast == "prototypes":
                    if len(self.prototypes) == 0:
                        raise ValueError("DistillationLoss: contrast=prototypes needs set_prototypes() first")
                    keys = (self.prototypes, torch.arange(len(self.prototypes), device=pids.device))
                key_emb, key_pids = keys if keys is not None else (teacher_emb, None)
                losses["loss_kd_tri"] = cfg.tri_weight * triplet_relation_kd(
                    projected, key_emb, pids, cfg.contrastive_temperature, key_pids)
        return losses


def _check_rows(name: str, student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{name}: expected [M, d] student and teacher tensors with the same M, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")


def _zero_like(student: Tensor) -> Tensor:
    """A float32 zero still connected to the student's graph (empty batches keep backward valid)."""
    return student.float().sum() * 0.0
