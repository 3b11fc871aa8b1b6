"""What distillation adds to one student step: bank lookup + the three KD losses, against an
online teacher forward; plus knowledge-bank write and load throughput.

Sizes default to a CUHK-SYSU-like setup: K=5532 training identities, a 2048-d teacher, a 256-d
student, about 15k labelled boxes (x2 flips) in the bank, M labelled boxes (with FSA copies) per
step. Random values: the cost does not depend on them.

    PYTHONPATH=. .venv/bin/python bench/bench_distill.py            # CPU
    PYTHONPATH=. .venv/bin/python bench/bench_distill.py --online   # + ResNet-50 teacher on M crops
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dkd_ray.config import DistillConfig
from dkd_ray.distill.bank import KnowledgeBank, build_knowledge_bank
from dkd_ray.distill.losses import DistillationLoss
from dkd_ray.distill.online import OnlineTeacher


class RandomTeacher(nn.Module):
    """Returns fixed random outputs at once: measures the bank's own write cost, not a network."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.embedding_dim, self.num_classes = dim, classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward_with_logits(self, crops):
        n = len(crops)
        return F.normalize(torch.randn(n, self.embedding_dim), dim=1), torch.randn(n, self.num_classes)


class ResNetTeacher(nn.Module):
    """ResNet-50 (random init, last stride 1) + BN-neck + classifier: the online teacher's cost."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        net.layer4[0].conv2.stride, net.layer4[0].downsample[0].stride = (1, 1), (1, 1)
        self.body = nn.Sequential(*list(net.children())[:-2])
        self.neck = nn.BatchNorm1d(2048)
        self.classifier = nn.Linear(2048, classes, bias=False)
        self.embedding_dim, self.num_classes = 2048, classes

    def forward_with_logits(self, crops):
        features = self.neck(self.body(crops).mean(dim=(2, 3)))
        return F.normalize(features, dim=1), self.classifier(features)


def _time(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=15000, help="labelled boxes in the bank (x2 flips)")
    parser.add_argument("--classes", type=int, default=5532, help="training identities K")
    parser.add_argument("--teacher-dim", type=int, default=2048)
    parser.add_argument("--student-dim", type=int, default=256)
    parser.add_argument("--per-step", type=int, default=60, help="labelled boxes (incl. FSA copies) per step")
    parser.add_argument("--write-boxes", type=int, default=2000, help="boxes for the Parquet write/load figure")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--online", action="store_true", help="also time a ResNet-50 online teacher")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    m, dt, k = args.per_step, args.teacher_dim, args.classes

    rows = 2 * args.boxes
    bank = KnowledgeBank(
        image_index=torch.arange(rows, device=device) // 2 // 4,
        box_index=torch.arange(rows, device=device) // 2,
        flipped=(torch.arange(rows, device=device) % 2).bool(),
        embedding=F.normalize(torch.randn(rows, dt, device=device), dim=1),
        logits=torch.randn(rows, k, device=device),
        metadata={},
    )
    box_index = torch.randint(0, args.boxes, (m,), device=device)
    flipped = torch.rand(m, device=device) < 0.5
    lookup_ms = _time(lambda: bank.lookup(box_index, flipped), args.repeats, device)

    loss = DistillationLoss(DistillConfig(), args.student_dim, dt).to(device)
    student_emb = torch.randn(m, args.student_dim, device=device, requires_grad=True)
    student_logits = torch.randn(m, k, device=device, requires_grad=True)
    teacher_emb, teacher_logits = bank.lookup(box_index, flipped)
    pids = torch.randint(0, 20, (m,), device=device)

    def losses_step():
        sum(loss(student_emb, student_logits, teacher_emb, teacher_logits, pids).values()).backward()

    loss_ms = _time(losses_step, args.repeats, device)
    print(f"device={device} M={m} K={k} dt={dt} ds={args.student_dim} bank_rows={rows}")
    print(f"bank lookup:                 {lookup_ms:8.3f} ms/step")
    print(f"3 KD losses forward+backward: {loss_ms:8.3f} ms/step")

    with tempfile.TemporaryDirectory() as folder:
        n = args.write_boxes
        crops = torch.zeros(n, 3, 8, 4)
        batches = [(crops[i:i + 256], torch.arange(i, min(i + 256, n)), torch.arange(i, min(i + 256, n)))
                   for i in range(0, n, 256)]
        path = Path(folder) / "bank.parquet"
        start = time.perf_counter()
        build_knowledge_bank(RandomTeacher(dt, k), batches, path, progress=False)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        KnowledgeBank.load(path, device=device)
        load_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
        print(f"bank write ({2 * n} rows, {size_mb:.0f} MB): {2 * n / write_s:8.0f} rows/s")
        print(f"bank load  ({2 * n} rows):          {2 * n / load_s:8.0f} rows/s ({size_mb / load_s:.0f} MB/s)")

    if args.online:
        teacher = ResNetTeacher(k).to(device)
        online = OnlineTeacher(teacher, crop_size=(256, 128))
        images = [torch.rand(3, 900, 1500, device=device) for _ in range(5)]
        xy = torch.rand(m, 2, device=device) * torch.tensor([1300.0, 600.0], device=device)
        boxes_all = torch.cat([xy, xy + torch.tensor([100.0, 250.0], device=device)], dim=1)
        boxes = list(boxes_all.chunk(5))
        online_ms = _time(lambda: online(images, boxes), max(args.repeats // 5, 2), device)
        print(f"online teacher (ResNet-50, {m} crops 256x128): {online_ms:8.1f} ms/step")


if __name__ == "__main__":
    main()
