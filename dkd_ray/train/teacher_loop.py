"""The teacher's training loop: one function of a config, run by every Ray Train worker
(or in-process by tests). P x K batches of ISA crops, cross-entropy with label smoothing plus
batch-hard triplet, Adam with warm-up; checkpoints every N iterations and at every epoch end.

With ``data.validation_fraction`` > 0 (teacher sweeps) it trains on the identities left after
the hold-out and reports the two-step validation mAP (teacher on the held-out ground truth) as
``val/mAP`` every ``train.eval_every_epochs`` epochs and at the end, instead of the test protocol.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dkd_ray.config import Config, ConfigError
from dkd_ray.data.datasets import PersonCropDataset, labelled_box_rows
from dkd_ray.data.samplers import PKBatchSampler, SkipBatches
from dkd_ray.data.splits import validation_split
from dkd_ray.train.common import (Precision, after_step_hooks, check_finite_loss, equalize_batch_norm_statistics,
                                  injected_faults, loader_generator, mean_across_workers, scaled_lr, seed_everything, unwrap,
                                  warmup_multistep, wrap_ddp)
from dkd_ray.train.session import Session, current_session
from dkd_ray.train.tracking_hooks import epoch_tracker
from dkd_ray.train.state import Progress, RunState
from dkd_ray.train.teacher_finish import build_bank_shard, evaluate_teacher_on_ground_truth
from dkd_ray.train.workdata import load_training_annotations

log = logging.getLogger(__name__)


def train_teacher(loop_config: dict[str, Any], session: Session | None = None) -> None:
    """Train the Re-ID teacher. ``loop_config``: ``{"config": Config.to_dict(), "data_root": str,
    "checkpoint_root": optional local folder for in-process runs, "build_bank": False to skip the
    knowledge bank (sweep trials)}``."""
    from dkd_ray.models.reid_losses import TeacherCriterion
    from dkd_ray.models.teacher import build_teacher

    cfg = Config.from_dict(loop_config["config"])
    tcfg = cfg.teacher
    session = session or current_session(cfg.train.use_gpu, loop_config.get("checkpoint_root"),
                                        loop_config.get("run_dir"), loop_config.get("run_uri"))
    seed_everything(cfg.train.seed + session.rank, cfg.train.deterministic)

    annotations = load_training_annotations(loop_config)
    evaluated_on, prefix = annotations, "teacher_gt/"
    if cfg.data.validation_fraction > 0:  # model selection: never look at the test set
        annotations, evaluated_on = validation_split(annotations, cfg.data.validation_fraction, cfg.train.seed)
        prefix = "val/"
    rows = labelled_box_rows(annotations, "train")
    crops = PersonCropDataset(
        annotations, rows, crop_size=(tcfg.input_height, tcfg.input_width), isa_strength=tcfg.isa_strength,
        flip_prob=0.5, random_erasing=tcfg.random_erasing, pad=tcfg.pad, seed=cfg.train.seed,
        on_unreadable="replace")  # another crop of the same identity: P x K batches stay whole
    sampler = PKBatchSampler(crops.pids, tcfg.p_identities, tcfg.k_instances, rank=session.rank,
                             world_size=session.world_size, seed=cfg.train.seed, epoch_unit=tcfg.epoch_unit)
    iters_per_epoch = len(sampler)
    if iters_per_epoch == 0:
        raise ConfigError(f"teacher.p_identities={tcfg.p_identities}: too few training identities with "
                          f"{tcfg.k_instances}+ boxes for one P x K batch on each of {session.world_size} worker(s)")

    model = build_teacher(tcfg, annotations.num_train_ids)
    criterion = TeacherCriterion(tcfg.label_smoothing, tcfg.triplet_margin)
    model = wrap_ddp(model, session.device, session.world_size, sync_buffers_each_forward=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=scaled_lr(tcfg.lr, session.world_size, tcfg.lr_scaling),
                                 weight_decay=tcfg.weight_decay)
    scheduler = warmup_multistep(optimizer, warmup_iters=tcfg.warmup_epochs * iters_per_epoch,
                                 milestones=[m * iters_per_epoch for m in tcfg.lr_steps])
    precision = Precision(session.device, cfg.train.amp)

    tracker = epoch_tracker(loop_config, session)
    run = RunState("teacher", annotations.num_train_ids, cfg, session, model, optimizer, scheduler,
                   precision.scaler, Progress())
    run.resume()
    progress = run.progress

    def add_bank_shard(directory: Path) -> None:  # every worker writes its part next to rank 0's state
        build_bank_shard(unwrap(model), annotations, cfg, session, directory,
                         metadata={"teacher_run": loop_config.get("run_name", "")})

    max_iters = cfg.train.max_iters or None
    while progress.epoch < tcfg.epochs and not (max_iters and progress.iteration >= max_iters):
        crops.set_epoch(progress.epoch)
        sampler.set_epoch(progress.epoch)
        loader = DataLoader(crops, batch_sampler=SkipBatches(sampler, progress.batches_done),
                            num_workers=cfg.data.loader_workers, pin_memory=session.device.type == "cuda",
                            generator=loader_generator(cfg.train.seed, progress.epoch, session.rank))
        model.train()
        sums: dict[str, float] = {}
        seen, started = 0, time.perf_counter()
        for images, pids, box_rows, _ in loader:
            images, pids = images.to(session.device, non_blocking=True), pids.to(session.device)
            with precision.autocast():
                outputs = model(images)
            losses = criterion({k: v.float() for k, v in outputs.items()}, pids)
            losses = injected_faults(losses, progress.iteration, session.rank)
            loss = sum(losses.values())
            check_finite_loss("teacher", losses, progress.iteration, session.device, session.world_size)
            optimizer.zero_grad(set_to_none=True)
            precision.step(loss, optimizer)
            scheduler.step()
            progress.iteration += 1
            progress.batches_done += 1
            seen += 1
            after_step_hooks(progress.iteration, session.rank, "-".join(str(int(i)) for i in box_rows[:4]))
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if session.is_main and progress.iteration % cfg.train.log_every_iters == 0:
                log.info("teacher epoch %d/%d iter %d/%d loss %.4f lr %.2e", progress.epoch + 1, tcfg.epochs,
                         progress.batches_done, iters_per_epoch, float(loss.detach()), scheduler.get_last_lr()[0])
            if max_iters and progress.iteration >= max_iters:
                break
            if progress.iteration % cfg.train.checkpoint_every_iters == 0 and progress.batches_done < iters_per_epoch:
                run.checkpoint({"phase": "teacher"})
        equalize_batch_norm_statistics(model, session.world_size)  # before any sharded evaluation
        metrics = mean_across_workers({f"train/{k}": v / max(seen, 1) for k, v in sums.items()},
                                      session.device, session.world_size)
        metrics["train/crops_per_s"] = seen * tcfg.p_identities * tcfg.k_instances * session.world_size / (
            time.perf_counter() - started)
        if progress.batches_done >= iters_per_epoch:
            progress.epoch, progress.batches_done = progress.epoch + 1, 0
        finished = progress.epoch >= tcfg.epochs or bool(max_iters and progress.iteration >= max_iters)
        every = cfg.train.eval_every_epochs
        if finished or (every and progress.epoch % every == 0 and progress.batches_done == 0):
            metrics.update(evaluate_teacher_on_ground_truth(unwrap(model).eval(), evaluated_on, cfg, session, prefix))
        bank = finished and loop_config.get("build_bank", True)
        run.checkpoint({"phase": "teacher", **metrics}, add_bank_shard if bank else None, every_rank_writes=bank)
        tracker.log_metrics(metrics, step=progress.epoch)
        if session.is_main:
            log.info("teacher epoch %d/%d done: %s", progress.epoch, tcfg.epochs,
                     {k: round(v, 4) for k, v in metrics.items()})
    tracker.close()  # sends what waited for an MLflow outage, else spools it next to the checkpoints
