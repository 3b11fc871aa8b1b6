"""The student's training loop: one function of a config, run by every Ray Train worker, every
Tune trial (through its trainer) and, in-process, by tests.

Scenes are sharded across workers (DistributedSampler), the end-to-end student is trained with
its detection + OIM losses plus the three KD terms, whose teacher side comes from the knowledge
bank (one gather per batch) or from an online teacher. OIM's lookup table and queue are updated
from all workers' features (see ``dkd_ray.models.oim``), so they stay identical everywhere.
Checkpoints every ``train.checkpoint_every_iters`` iterations and at each epoch end; evaluation
(sharded inference, metrics on rank 0) every ``train.eval_every_epochs`` epochs and at the end.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader

from dkd_ray.config import Config, ConfigError
from dkd_ray.data.datasets import SceneDataset, collate_scenes, labelled_box_rows
from dkd_ray.data.samplers import SkipBatches, scene_sampler
from dkd_ray.data.splits import validation_split
from dkd_ray.models.student import labelled_ground_truth
from dkd_ray.train.common import (Precision, after_step_hooks, check_finite_loss, equalize_batch_norm_statistics,
                                  injected_faults, loader_generator, mean_across_workers, scaled_lr, seed_everything,
                                  targets_to, warmup_multistep, wrap_ddp)
from dkd_ray.train.session import Session, current_session
from dkd_ray.train.tracking_hooks import epoch_tracker
from dkd_ray.train.state import Progress, RunState
from dkd_ray.train.workdata import load_training_annotations

log = logging.getLogger(__name__)


def build_teacher_knowledge(cfg: Config, loop_config: dict[str, Any], device: torch.device, annotations=None):
    """A callable ``(images, targets) -> (teacher_emb, teacher_logits)`` over the batch's labelled
    boxes (in the order the student's gt dict uses), or None when distillation is off.

    ``annotations``: what the student trains on (a validation view included); the bank must have
    been built on the same table (fingerprint) and over its ``num_train_ids`` classes. The online
    teacher (``teacher_ref``: checkpoint folder, MLflow URI or run id, resolved against the run's
    MLflow) gets crops of its own stored input size, not this run's ``teacher.input_*``."""
    if not cfg.distill.active:
        return None, None
    num_classes = annotations.num_train_ids if annotations is not None else None
    if cfg.distill.use_bank:
        from dkd_ray.distill.bank import KnowledgeBank

        bank = KnowledgeBank.load(loop_config["bank_path"], device=device, num_classes=num_classes,
                                  annotations_fingerprint=None if annotations is None else annotations.images.fingerprint())

        def from_bank(images, targets):
            keys = labelled_ground_truth(targets)
            return bank.lookup(keys["box_index"], keys["flipped"])

        if cfg.distill.contrast == "prototypes" and annotations is not None:  # keys of the triplet-wise term
            train_boxes = torch.zeros(len(annotations.images.pids), dtype=torch.bool)
            train_boxes[torch.from_numpy(labelled_box_rows(annotations, "train"))] = True
            box_pids = torch.from_numpy(annotations.images.pids.astype("int64")).where(train_boxes, -1)
            from_bank.prototypes = bank.identity_prototypes(box_pids, annotations.num_train_ids)
        return from_bank, bank.embedding_dim
    from dkd_ray.distill.online import OnlineTeacher
    from dkd_ray.models.loading import load_model, teacher_input_size

    ref = loop_config.get("teacher_ref") or ""
    if not ref:
        raise ConfigError("distill.use_bank=false (online teacher) needs a teacher: loop_config['teacher_ref'] "
                         "(a checkpoint folder, an MLflow model URI or a run id) is empty")
    uri = (loop_config.get("mlflow") or {}).get("uri") or loop_config.get("tracking_uri")
    teacher = load_model(ref, role="teacher", map_location=device, uri=uri).to(device).eval()
    if num_classes is not None and int(teacher.num_classes) != int(num_classes):
        raise ConfigError(f"teacher {ref!r} has {teacher.num_classes} classes, but the student trains on "
                         f"{num_classes} identities: use a teacher trained on this dataset")
    online = OnlineTeacher(teacher, teacher_input_size(teacher))

    def from_teacher(images, targets):
        return online(images, labelled_ground_truth(targets)["boxes"])

    return from_teacher, teacher.embedding_dim


def train_student(loop_config: dict[str, Any], session: Session | None = None) -> dict[str, float]:
    """Train the distilled student. ``loop_config``: ``{"config": Config.to_dict(), "data_root",
    "bank_path" (knowledge bank, when distillation uses it), "teacher_ref" (online teacher),
    "checkpoint_root" (in-process runs)}``. Returns the final evaluation metrics (rank 0)."""
    from dkd_ray.distill.losses import DistillationLoss
    from dkd_ray.distill.model import DistilledStudent
    from dkd_ray.models.student import build_student
    from dkd_ray.train.evaluation import evaluate_student

    cfg = Config.from_dict(loop_config["config"])
    scfg = cfg.student
    session = session or current_session(cfg.train.use_gpu, loop_config.get("checkpoint_root"),
                                        loop_config.get("run_dir"), loop_config.get("run_uri"))
    seed_everything(cfg.train.seed + session.rank, cfg.train.deterministic)
    annotations = load_training_annotations(loop_config)
    evaluated_on, prefix = annotations, ""
    if cfg.data.validation_fraction > 0:  # model selection (Tune): never look at the test set
        annotations, evaluated_on = validation_split(annotations, cfg.data.validation_fraction, cfg.train.seed)
        prefix = "val/"

    scenes = SceneDataset(annotations, split="train", short_side=cfg.data.short_side, max_side=cfg.data.max_side,
                          flip_prob=cfg.data.flip_prob, seed=cfg.train.seed)
    sampler = scene_sampler(scenes, rank=session.rank, world_size=session.world_size, seed=cfg.train.seed)
    batches = BatchSampler(sampler, scfg.batch_size, drop_last=False)
    iters_per_epoch = len(batches)

    knowledge, teacher_dim = build_teacher_knowledge(cfg, loop_config, session.device, annotations)
    student = build_student(cfg, annotations.num_train_ids)
    distill = DistillationLoss(cfg.distill, scfg.embedding_dim, teacher_dim) if knowledge else None
    if distill is not None and cfg.distill.contrast == "prototypes":
        distill.set_prototypes(knowledge.prototypes)
    kd_ramp_iters = round(cfg.distill.ramp_epochs * iters_per_epoch)
    model = wrap_ddp(DistilledStudent(student, distill), session.device, session.world_size,
                     sync_buffers_each_forward=False)  # OIM buffers stay identical by their own all-gather
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=scaled_lr(scfg.lr, session.world_size), momentum=scfg.momentum,
                                weight_decay=scfg.weight_decay)
    scheduler = warmup_multistep(optimizer, warmup_iters=round(scfg.warmup_epochs * iters_per_epoch),
                                 warmup_factor=scfg.warmup_factor,
                                 milestones=[m * iters_per_epoch for m in scfg.lr_steps], gamma=scfg.lr_gamma)
    precision = Precision(session.device, cfg.train.amp)

    tracker = epoch_tracker(loop_config, session)
    run = RunState("student", annotations.num_train_ids, cfg, session, model, optimizer, scheduler,
                   precision.scaler, Progress())
    run.resume()
    progress = run.progress

    final: dict[str, float] = {}
    max_iters = cfg.train.max_iters or None
    while progress.epoch < scfg.epochs and not (max_iters and progress.iteration >= max_iters):
        scenes.set_epoch(progress.epoch)
        sampler.set_epoch(progress.epoch)
        loader = DataLoader(scenes, batch_sampler=SkipBatches(batches, progress.batches_done),
                            num_workers=cfg.data.loader_workers, collate_fn=collate_scenes,
                            pin_memory=session.device.type == "cuda",
                            generator=loader_generator(cfg.train.seed, progress.epoch, session.rank))
        model.train()
        sums: dict[str, float] = {}
        seen, images_seen, started = 0, 0, time.perf_counter()
        for images, targets in loader:
            images = [im.to(session.device, non_blocking=True) for im in images]
            targets = targets_to(targets, session.device)
            teacher_emb = teacher_logits = None
            if knowledge is not None:
                teacher_emb, teacher_logits = knowledge(images, targets)
            with precision.autocast():
                losses = model(images, targets, teacher_emb, teacher_logits)
            if kd_ramp_iters and progress.iteration < kd_ramp_iters:  # KD weights ramp up from 0
                ramp = (progress.iteration + 1) / kd_ramp_iters
                losses = {k: v * ramp if k.startswith("loss_kd") else v for k, v in losses.items()}
            losses = injected_faults(losses, progress.iteration, session.rank)
            loss = sum(losses.values())
            check_finite_loss("student", losses, progress.iteration, session.device, session.world_size)
            optimizer.zero_grad(set_to_none=True)
            precision.step(loss, optimizer, max_grad_norm=10.0)
            scheduler.step()
            progress.iteration += 1
            progress.batches_done += 1
            seen += 1
            images_seen += len(images)
            after_step_hooks(progress.iteration, session.rank, "-".join(str(t["image_index"]) for t in targets))
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if session.is_main and progress.iteration % cfg.train.log_every_iters == 0:
                log.info("student epoch %d/%d iter %d/%d loss %.4f lr %.2e", progress.epoch + 1, scfg.epochs,
                         progress.batches_done, iters_per_epoch, float(loss.detach()), scheduler.get_last_lr()[0])
            if max_iters and progress.iteration >= max_iters:
                break
            if progress.iteration % cfg.train.checkpoint_every_iters == 0 and progress.batches_done < iters_per_epoch:
                run.checkpoint({"phase": "student"})
        equalize_batch_norm_statistics(model, session.world_size)  # before any sharded evaluation
        metrics = mean_across_workers({f"train/{k}": v / max(seen, 1) for k, v in sums.items()},
                                      session.device, session.world_size)
        metrics["train/images_per_s"] = images_seen * session.world_size / (time.perf_counter() - started)
        if progress.batches_done >= iters_per_epoch:
            progress.epoch, progress.batches_done = progress.epoch + 1, 0
        finished = progress.epoch >= scfg.epochs or bool(max_iters and progress.iteration >= max_iters)
        every = cfg.train.eval_every_epochs
        arrays = None
        if finished or (every and progress.epoch % every == 0 and progress.batches_done == 0):
            evaluation, arrays = evaluate_student(model, evaluated_on, cfg, session, prefix=prefix)
            metrics.update(evaluation)
            final = evaluation
        # The final evaluation's inputs travel with the checkpoint (the job writes results from them).
        run.checkpoint({"phase": "student", **metrics}, (lambda d: arrays.save(d / "evaluation")) if arrays is not None else None)
        tracker.log_metrics(metrics, step=progress.epoch)
        if session.is_main:
            log.info("student epoch %d/%d done: %s", progress.epoch, scfg.epochs,
                     {k: round(v, 4) for k, v in metrics.items()})
    tracker.close()  # sends what waited for an MLflow outage, else spools it next to the checkpoints
    return final
