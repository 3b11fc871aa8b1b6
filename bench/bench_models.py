"""Model cost: (a) inference per frame, end-to-end student vs a two-step pipeline; (b) what
distillation from the knowledge bank adds to a student training step.

(a) End-to-end: ``student(images)`` (detection + Re-ID embeddings of the detections). Two-step:
the same student's detector (``student.detect``) + the teacher on the detected crops (roi_align
at the teacher's input size, ``OnlineTeacher.crops``). Same machine, image size and detections:
the detector keeps exactly ``--detections`` boxes per frame (score threshold 0), since an
untrained network's scores would make the count arbitrary. Target: ratio <= 0.6.

(c) ``--part flops``: floating-point operations per frame of the same two pipelines, counted by
``torch.utils.flop_counter`` (convolutions and matrix products; RoIAlign and NMS are not
counted), split into backbone, RPN and RoI head. The count does not depend on the machine, so it
says on a CPU what ratio a GPU can at best reach for a preset (a GPU runs these layers near its
peak, so times follow FLOPs more closely there than on a CPU, where small layers cost more).

(b) One student training step (forward, backward, optimiser step) on the same batch, with all
three KD terms (teacher outputs from a ``KnowledgeBank.lookup``) and with KD off, alternated,
medians. Target: ratio <= 1.10.

Random weights and random images: the cost does not depend on them. Sizes come from a preset
plus ``--set section.key=value`` overrides, e.g.::

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_models.py                  # cpu-small
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_models.py --part inference \\
        --set student.backbone=resnet50 teacher.backbone=resnet50 student.roi_output_size=14 \\
        teacher.input_height=256 teacher.input_width=128 data.short_side=300 data.max_side=500
    PYTHONPATH=. python bench/bench_models.py --device cuda --amp --preset cuhk_sysu     # GPU, 900x1500
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_models.py --part flops --preset cuhk_sysu
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dkd_ray.config import Config, preset
from dkd_ray.distill.bank import KnowledgeBank
from dkd_ray.distill.losses import DistillationLoss
from dkd_ray.distill.model import DistilledStudent
from dkd_ray.distill.online import OnlineTeacher
from dkd_ray.models.student import build_student, labelled_ground_truth
from dkd_ray.models.teacher import build_teacher


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-small", help="config preset (default cpu-small)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="autocast float16 (+ GradScaler) on CUDA")
    parser.add_argument("--part", choices=("inference", "train", "flops", "all"), default="all",
                        help="all = inference + train; flops (c) is asked for on its own")
    parser.add_argument("--detections", type=int, nargs="+", default=[6, 16],
                        help="detections per frame (a), one row each (CUHK-SYSU has ~5.3 people per image)")
    parser.add_argument("--num-ids", type=int, default=5532, help="training identities K (CUHK-SYSU: 5532)")
    parser.add_argument("--batch", type=int, default=0, help="images per training step (default: student.batch_size)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per variant")
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


class Clock:
    """Wall time of a callable, synchronising CUDA so queued kernels are counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def random_scenes(cfg: Config, count: int, gen: torch.Generator, num_ids: int, labelled: int = 4,
                  unlabelled: int = 2):
    """``count`` random images at the dataset size, each with ``labelled`` + ``unlabelled`` people."""
    height, width = cfg.data.short_side, cfg.data.max_side
    images, targets, next_box = [], [], 0
    for i in range(count):
        n = labelled + unlabelled
        w = (0.08 + 0.1 * torch.rand(n, generator=gen)) * width
        h = torch.minimum(w * 2.5, torch.full_like(w, height * 0.9))
        x1 = torch.rand(n, generator=gen) * (width - w)
        y1 = torch.rand(n, generator=gen) * (height - h)
        boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
        pids = torch.cat([torch.randint(0, num_ids, (labelled,), generator=gen), torch.full((unlabelled,), -1)])
        images.append(torch.rand(3, height, width, generator=gen))
        targets.append({"boxes": boxes, "pids": pids, "box_index": torch.arange(next_box, next_box + n),
                        "flipped": bool(i % 2)})
        next_box += n
    return images, targets


def calibrate_batch_norm(student, images, targets) -> None:
    """Random-init BatchNorm2d layers have running statistics (0, 1) that let activations grow
    through a deep trunk until the RPN proposes nothing: set them from one training batch so the
    untrained network behaves like a trained one in eval mode (same cost, sane outputs)."""
    for module in student.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: after one batch, exactly its statistics
    student.train()
    with torch.no_grad():
        student(images, targets)
    student.eval()


def _to(target: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in target.items()}


def timed_pairs(clock: Clock, first, second, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Alternate the two callables so both see the same machine load; return their times."""
    for _ in range(warmup):
        first(), second()
    a, b = [], []
    for _ in range(repeats):
        a.append(clock(first))
        b.append(clock(second))
    return a, b


def two_pipelines(cfg: Config, args, device: torch.device):
    """``(student, teacher, cropper, frame)`` for (a) and (c): the student's detector keeps every
    box (score threshold 0; the callers set how many), its BatchNorm calibrated on two scenes."""
    cfg.student.box_score_thresh = 0.0
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    student = build_student(cfg, args.num_ids).to(device).eval()
    teacher = build_teacher(cfg.teacher, args.num_ids).to(device).eval()
    cropper = OnlineTeacher(teacher, (cfg.teacher.input_height, cfg.teacher.input_width))
    images, targets = random_scenes(cfg, 2, gen, args.num_ids)
    calibrate_batch_norm(student, [im.to(device) for im in images], [_to(t, device) for t in targets])
    return student, teacher, cropper, [images[0].to(device)]


def bench_inference(cfg: Config, args, device: torch.device, clock: Clock) -> list[str]:
    student, teacher, cropper, frame = two_pipelines(cfg, args, device)
    counts = []

    @torch.no_grad()
    def end_to_end():
        with autocast(device, args.amp):
            counts.append(len(student(frame)[0]["boxes"]))

    @torch.no_grad()
    def two_step():
        with autocast(device, args.amp):
            boxes = [d["boxes"] for d in student.detect(frame)]
            teacher(cropper.crops(frame, boxes))

    @torch.no_grad()
    def detector_only():
        with autocast(device, args.amp):
            student.detect(frame)

    rows = []
    for detections in args.detections:
        student.roi_heads.detections_per_img = detections
        counts.clear()
        e2e, two = timed_pairs(clock, end_to_end, two_step, args.repeats, args.warmup)
        det, _ = timed_pairs(clock, detector_only, lambda: None, max(3, args.repeats // 2), 1)
        e2e_ms, two_ms, det_ms = (1000 * statistics.median(t) for t in (e2e, two, det))
        s, t = cfg.student, cfg.teacher
        setting = (f"student {s.backbone} {cfg.data.short_side}x{cfg.data.max_side}, {s.rpn_post_nms_top_n_test} "
                   f"proposals, RoI {s.roi_output_size}; teacher {t.backbone} {t.input_height}x{t.input_width}; "
                   f"{statistics.mean(counts):.0f} detections/frame")
        rows.append(f"| (a) inference per frame | {setting} | end-to-end {e2e_ms:.1f} ms | two-step {two_ms:.1f} ms "
                    f"(detector alone {det_ms:.1f}) | **{e2e_ms / two_ms:.2f}** (target <= 0.6) |")
    return rows


def count_flops(fn, depth: int = 2) -> FlopCounterMode:
    with torch.no_grad(), FlopCounterMode(display=False, depth=depth) as counter:
        fn()
    return counter


def module_gflops(counter: FlopCounterMode, *modules: torch.nn.Module) -> float:
    """GFLOPs of ``modules``, found by the top-level names the counter gives them (their class
    names: the student's methods call its parts directly, not through one top-level forward)."""
    counts = counter.get_flop_counts()
    return sum(sum(counts.get(type(m).__name__, {}).values()) for m in modules) / 1e9


def bench_flops(cfg: Config, args, device: torch.device) -> list[str]:
    """GFLOPs per frame, end-to-end vs two-step, with the detector's parts (see (c) above)."""
    student, teacher, cropper, frame = two_pipelines(cfg, args, device)
    rows = []
    for detections in args.detections:
        student.roi_heads.detections_per_img = detections
        detector = count_flops(lambda: student.detect(frame))
        boxes = [d["boxes"] for d in student.detect(frame)]
        end_to_end = count_flops(lambda: student(frame))
        crops = cropper.crops(frame, boxes)
        on_crops = count_flops(lambda: teacher(crops))
        det, e2e, reid = (c.get_total_flops() / 1e9 for c in (detector, end_to_end, on_crops))
        heads = student.roi_heads
        parts = (f"backbone {module_gflops(detector, student.backbone):.1f}, "
                 f"RPN {module_gflops(detector, student.rpn):.1f}, "
                 f"RoI head {module_gflops(detector, heads.box_head, heads.box_predictor):.1f}")
        s, t = cfg.student, cfg.teacher
        setting = (f"student {s.backbone} {cfg.data.short_side}x{cfg.data.max_side}, {s.rpn_post_nms_top_n_test} "
                   f"proposals, RoI {s.roi_output_size}; teacher {t.backbone} {t.input_height}x{t.input_width}; "
                   f"{len(boxes[0])} detections/frame")
        rows.append(f"| (c) GFLOPs per frame | {setting} | end-to-end {e2e:.1f} | two-step {det + reid:.1f} "
                    f"(detector {det:.1f}: {parts}; teacher {reid / max(len(boxes[0]), 1):.1f} per crop) | "
                    f"**{e2e / (det + reid):.2f}** (target <= 0.6) |")
    return rows


def bench_training(cfg: Config, args, device: torch.device, clock: Clock) -> list[str]:
    batch = args.batch or cfg.student.batch_size
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    images, targets = random_scenes(cfg, batch, gen, args.num_ids)
    images = [im.to(device) for im in images]
    targets = [_to(t, device) for t in targets]

    teacher_dim = 2048 if cfg.teacher.backbone == "resnet50" else 512
    student = build_student(cfg, args.num_ids).to(device).train()
    kd_cfg = cfg.distill
    kd_cfg.enabled, kd_cfg.prob_weight, kd_cfg.pair_weight, kd_cfg.tri_weight = True, 1.0, 1.0, 1.0
    with_kd = DistilledStudent(student, DistillationLoss(kd_cfg, student.embedding_dim, teacher_dim)).to(device)
    without_kd = DistilledStudent(student, None)

    # A bank holding this batch's labelled boxes (both flips) among 30,000 rows, as for CUHK-SYSU.
    keys = labelled_ground_truth(targets)
    rows = 15_000
    box_index = torch.arange(rows).repeat(2)  # the batch's boxes are rows 0.. of the annotation table
    bank = KnowledgeBank(
        image_index=torch.zeros(2 * rows, dtype=torch.long), box_index=box_index,
        flipped=torch.arange(2 * rows) >= rows,
        embedding=torch.nn.functional.normalize(torch.randn(2 * rows, teacher_dim), dim=1),
        logits=torch.randn(2 * rows, args.num_ids), metadata={})
    bank = KnowledgeBank(bank.image_index.to(device), bank.box_index.to(device), bank.flipped.to(device),
                         bank.embedding.to(device), bank.logits.to(device), {})

    params = [p for p in with_kd.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")

    def step(model, distill: bool):
        def run():
            with autocast(device, args.amp):
                if distill:
                    keys = labelled_ground_truth(targets)
                    teacher_emb, teacher_logits = bank.lookup(keys["box_index"], keys["flipped"])
                    losses = model(images, targets, teacher_emb, teacher_logits)
                else:
                    losses = model(images, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(sum(losses.values())).backward()
            scaler.step(optimizer)
            scaler.update()
        return run

    kd, plain = timed_pairs(clock, step(with_kd, True), step(without_kd, False), args.repeats, args.warmup)
    kd_s, plain_s = statistics.median(kd), statistics.median(plain)
    s = cfg.student
    setting = (f"student {s.backbone} {cfg.data.short_side}x{cfg.data.max_side}, batch {batch}, K={args.num_ids}, "
               f"FSA {s.fsa_num}x, teacher dim {teacher_dim}, M={len(keys['pids'])} labelled boxes")
    row = (f"| (b) training step | {setting} | KD on (bank) {1000 * kd_s:.0f} ms ({batch / kd_s:.2f} img/s) | "
           f"KD off {1000 * plain_s:.0f} ms ({batch / plain_s:.2f} img/s) | **{kd_s / plain_s:.3f}** (target <= 1.10) |")
    return [row]


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cfg = preset(args.preset, args.set)
    cfg.student.backbone_weights = cfg.teacher.backbone_weights = "none"  # no downloads; cost is the same
    clock = Clock(device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)")
    print(f"# bench_models: preset {args.preset} {' '.join(args.set)}, device {machine}, amp {args.amp}, "
          f"repeats {args.repeats} (medians)")
    print("| part | setting | with | reference | ratio |\n| --- | --- | --- | --- | --- |")
    if args.part in ("inference", "all"):
        print("\n".join(bench_inference(cfg.copy(), args, device, clock)), flush=True)
    if args.part in ("train", "all"):
        print("\n".join(bench_training(cfg.copy(), args, device, clock)), flush=True)
    if args.part == "flops":
        print("\n".join(bench_flops(cfg.copy(), args, device)), flush=True)


if __name__ == "__main__":
    main()
