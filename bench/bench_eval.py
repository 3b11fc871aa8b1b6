"""Speed of the evaluation protocols at the benchmarks' full sizes (a benchmark, not a test).

Random detections (10-20 per test image, ~80% scoring >= 0.5, most ground-truth people covered
by a jittered detection) and random 256-d unit embeddings, on:
- CUHK-SYSU: 18,184 images (6,978 pool), 2,900 queries, TestG50 ... TestG4000 and the full set;
- PRW: 11,816 frames (6,112 test, 6 cameras), 2,057 queries, all frames and cross-camera.

The annotations come either from annotation-only synthetic folders at full size
(``--work-dir``: ``dkd_ray.data.synthetic.generate(..., preset='full', annotations_only=True)``
then ``dkd_ray.data.load_annotations``), or, with ``--in-memory``, from numpy directly (same
sizes, no files). Prints a table and writes it, with the command, to bench/RESULTS_eval.md.

    PYTHONPATH=. .venv/bin/python bench/bench_eval.py --in-memory
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd_ray.data.annotations import Annotations, GalleryProtocol, ImageTable, QueryTable  # noqa: E402
from dkd_ray.eval import Detections, evaluate_detection, evaluate_search  # noqa: E402

DIM = 256
GALLERY_SIZES = (50, 100, 500, 1000, 2000, 4000)


# ---- full-size annotations in memory -----------------------------------------------------------
def _image_table(rng, splits, cameras, boxes_per_image_range, width=800, height=600) -> ImageTable:
    n = len(splits)
    counts = rng.integers(*boxes_per_image_range, size=n, endpoint=True)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    w = rng.uniform(20, 120, total)
    h = w * rng.uniform(1.8, 3.0, total)
    x1 = rng.uniform(0, width - w)
    y1 = rng.uniform(0, np.maximum(1, height - h))
    boxes = np.stack([x1, y1, x1 + w, np.minimum(height, y1 + h)], axis=1).astype(np.float32)
    names = np.array([f"s{i}.jpg" for i in range(n)], dtype=object)
    return ImageTable(
        name=names, path=np.array([f"frames/{x}" for x in names], dtype=object),
        split=np.asarray(splits, dtype=object), width=np.full(n, width, np.int32),
        height=np.full(n, height, np.int32), camera=np.asarray(cameras, np.int16),
        box_offsets=offsets, boxes=boxes, pids=np.full(total, -1, np.int32),
    )


def cuhk_sysu_in_memory(seed: int = 0) -> Annotations:
    rng = np.random.default_rng(seed)
    n_train, n_test, n_queries = 11_206, 6_978, 2_900
    split = np.array(["train"] * n_train + ["test"] * n_test, dtype=object)
    images = _image_table(rng, split, np.full(len(split), -1), (2, 9))
    test = np.flatnonzero(split == "test")
    box_image = images.box_image_index()
    free = np.ones(len(images.boxes), bool)

    def take_box(image: int) -> int | None:
        rows = np.arange(images.box_offsets[image], images.box_offsets[image + 1])
        rows = rows[free[rows]]
        if rows.size == 0:
            return None
        free[rows[0]] = False
        return int(rows[0])

    q_image, q_box, q_pid, pos_q, pos_img, pos_box = [], [], [], [], [], []
    for _attempt in range(10 * n_queries):  # bounded; a draw hitting a full image is retried
        if len(q_pid) == n_queries:
            break
        pid = 100_000 + len(q_pid)
        chosen = rng.choice(test, size=1 + int(rng.integers(1, 5)), replace=False)
        if any(not free[images.box_offsets[i]:images.box_offsets[i + 1]].any() for i in chosen):
            continue
        rows = [take_box(int(i)) for i in chosen]
        images.pids[rows] = pid
        q_image.append(int(chosen[0]))
        q_box.append(images.boxes[rows[0]])
        q_pid.append(pid)
        for r in rows[1:]:
            pos_q.append(len(q_pid) - 1)
            pos_img.append(int(box_image[r]))
            pos_box.append(images.boxes[r])
    nq = len(q_pid)
    pos_q, pos_img = np.array(pos_q), np.array(pos_img)
    galleries = {}
    for size in GALLERY_SIZES:
        lists = np.empty((nq, size), np.int64)
        for q in range(nq):  # positives first, then random other pool images
            positives = pos_img[pos_q == q]
            others = rng.permutation(test)
            others = others[~np.isin(others, np.append(positives, q_image[q]))]
            lists[q] = np.concatenate([positives, others[: size - len(positives)]])
        galleries[size] = GalleryProtocol(size, lists, pos_q.astype(np.int64), pos_img.astype(np.int64),
                                          np.array(pos_box, np.float32))
    queries = QueryTable(np.array(q_image, np.int64), np.array(q_box, np.float32), np.array(q_pid, np.int32))
    return Annotations("cuhk_sysu", Path("/nonexistent/CUHK-SYSU"), images, queries, galleries)


def prw_in_memory(seed: int = 0) -> Annotations:
    rng = np.random.default_rng(seed)
    n_train, n_test, n_ids, n_queries = 5_704, 6_112, 450, 2_057
    split = np.array(["train"] * n_train + ["test"] * n_test, dtype=object)
    cameras = rng.integers(1, 7, size=len(split))
    images = _image_table(rng, split, cameras, (2, 6), width=1920, height=1080)
    box_image = images.box_image_index()
    test_boxes = np.flatnonzero(split[box_image] == "test")
    # ~80% of test people labelled with one of 450 identities (at most once per frame).
    labelled = test_boxes[rng.random(len(test_boxes)) < 0.8]
    pid = rng.integers(1, n_ids + 1, size=len(labelled))
    key = box_image[labelled] * (n_ids + 1) + pid
    _, first = np.unique(key, return_index=True)
    labelled, pid = labelled[first], pid[first]
    images.pids[labelled] = pid
    queries = rng.choice(len(labelled), size=n_queries, replace=False)
    rows = labelled[queries]
    return Annotations(
        "prw", Path("/nonexistent/PRW"), images,
        QueryTable(box_image[rows].astype(np.int64), images.boxes[rows], images.pids[rows].astype(np.int32)),
    )


# ---- random detections and embeddings ----------------------------------------------------------
def random_detections(annotations: Annotations, seed: int = 0) -> Detections:
    """10-20 detections per test image: most people get a jittered box, the rest is clutter."""
    rng = np.random.default_rng(seed)
    images = annotations.images
    test = images.indices("test")
    per_image = rng.integers(10, 21, size=len(test))
    gt_count = np.diff(images.box_offsets)[test]
    image_rows, boxes = [], []
    box_image = images.box_image_index()
    gt_rows = np.flatnonzero(images.split[box_image] == "test")
    covered = gt_rows[rng.random(len(gt_rows)) < 0.9]
    gt = images.boxes[covered].astype(np.float64)
    size = np.stack([gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]] * 2, axis=1)
    boxes.append(gt + rng.normal(0, 0.08, gt.shape) * size)
    image_rows.append(box_image[covered])
    clutter = np.maximum(per_image - gt_count, 0)
    clutter_image = np.repeat(test, clutter)
    w = rng.uniform(20, 150, len(clutter_image))
    h = w * rng.uniform(1.5, 3.0, len(clutter_image))
    x1 = rng.uniform(0, images.width[clutter_image] - w)
    y1 = rng.uniform(0, np.maximum(1, images.height[clutter_image] - h))
    boxes.append(np.stack([x1, y1, x1 + w, y1 + h], axis=1))
    image_rows.append(clutter_image)
    image_index = np.concatenate(image_rows)
    n = len(image_index)
    scores = np.where(rng.random(n) < 0.8, rng.uniform(0.5, 1.0, n), rng.uniform(0.05, 0.5, n))
    return Detections.from_arrays(image_index, np.concatenate(boxes), scores, random_unit(rng, n),
                                  num_images=len(images))


def random_unit(rng, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---- runs --------------------------------------------------------------------------------------
def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def timed_with_cpu(fn):
    """Wall-clock and CPU seconds (all threads); CPU time shows the work when cores are shared."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def load_from_work_dir(work_dir: Path, dataset: str) -> Annotations:
    from dkd_ray.data import load_annotations
    from dkd_ray.data.synthetic import generate

    root = work_dir / dataset
    if not root.exists():
        print(f"generating annotation-only full-size {dataset} in {root} ...", flush=True)
        generate(root, dataset, "full", seed=0, annotations_only=True)
    return load_annotations(dataset, root)


def bench_dataset(ann: Annotations, cbgm: bool, build_s: float, run) -> None:
    dataset = ann.dataset
    dets = random_detections(ann)
    query_emb = random_unit(np.random.default_rng(1), len(ann.queries))
    n_test = int((ann.images.split == "test").sum())
    print(f"\n{dataset}: {len(ann.images)} images ({n_test} test), {len(ann.queries)} queries, "
          f"{len(dets)} detections ({int((dets.scores >= 0.5).sum())} >= 0.5); built in {build_s:.1f} s",
          flush=True)
    q = len(ann.queries)

    def search(**kw):
        return lambda: evaluate_search(ann, dets, query_emb, **kw)

    run(f"{dataset} detection (all + labelled)",
        lambda: {**evaluate_detection(ann, dets), **evaluate_detection(ann, dets, labelled_only=True)}, 0)
    if dataset == "cuhk_sysu":
        run("cuhk_sysu search g100", search(gallery_sizes=[100]), q)
        run("cuhk_sysu search g4000", search(gallery_sizes=[4000]), q)
        run("cuhk_sysu search full set", search(gallery_sizes=["full"]), q)
        run("cuhk_sysu search all 7 protocols", search(), q)
        if cbgm:
            run("cuhk_sysu search g100 + CBGM", search(gallery_sizes=[100], cbgm=True), q)
    else:
        run("prw search all frames", search(cross_camera=False), q)
        run("prw search cross-camera", search(cross_camera=True), q)
        run("prw search both", search(), q)
        if cbgm:
            run("prw search all frames + CBGM", search(cross_camera=False, cbgm=True), q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--in-memory", action="store_true", help="build full-size annotations with numpy")
    source.add_argument("--work-dir", type=Path, help="generate/read annotation-only synthetic folders here")
    parser.add_argument("--cbgm", action="store_true", help="also time CBGM re-ranking")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS_eval.md"))
    args = parser.parse_args(argv)

    rows = []

    def run(label, fn, n_queries):
        result, seconds, cpu = timed_with_cpu(fn)
        rows.append((label, n_queries, seconds, cpu, result))
        print(f"{label:<40}{n_queries:>8}{seconds:>9.2f} s{cpu:>9.2f} s   {_headline(result)}", flush=True)

    for dataset in ("cuhk_sysu", "prw"):
        (ann, build_s) = timed(lambda d=dataset: load_from_work_dir(args.work_dir, d) if args.work_dir
                               else (cuhk_sysu_in_memory() if d == "cuhk_sysu" else prw_in_memory()))
        bench_dataset(ann, args.cbgm, build_s, run)

    command = "PYTHONPATH=. .venv/bin/python bench/bench_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
    source = "in-memory numpy" if args.in_memory else f"synthetic folders in {args.work_dir}"
    _write_results(args.results, rows, command, source)
    print(f"\nwrote {args.results}")
    return 0


def _headline(result) -> str:
    metrics = result if isinstance(result, dict) else result.metrics
    shown = [f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith(("/mAP", "/ap"))]
    return ", ".join(shown[:3])


def _write_results(path: Path, rows, command: str, source: str) -> None:
    """Write this run's table as the section for its annotation source, keeping the others."""
    cpu = platform.processor() or platform.machine()
    title = f"## Annotations: {source}"
    section = [
        title,
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()}-core {cpu} CPU, no GPU; numpy {np.__version__}. Load average at the "
        f"end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (the cores are shared with other work; "
        "CPU time counts every thread's work, wall time includes waiting for a core).",
        "",
        "| run | queries | wall s | CPU s |",
        "|---|---:|---:|---:|",
    ]
    section += [f"| {label} | {n or '-'} | {seconds:.2f} | {cpu_s:.2f} |" for label, n, seconds, cpu_s, _ in rows]
    header = [
        "# Evaluation speed (bench/bench_eval.py)",
        "",
        "Full-size protocols with random detections (10-20 per test image, ~80% scoring >= 0.5, most",
        "people covered by a jittered box) and random 256-d unit embeddings. Each row is one call",
        "(`evaluate_detection` or `evaluate_search`), including building the gallery index and the",
        "protocols. Target: each protocol <= 10 s on the 2-core CPU machine. With `--work-dir` the",
        "annotation-only folders are generated once (not timed) and read by the real readers.",
    ]
    others = []
    if path.exists():
        for part in path.read_text().split("\n## ")[1:]:
            if not ("## " + part).startswith(title):
                others.append("## " + part.strip())
    path.write_text("\n".join(header) + "\n\n" + "\n\n".join(others + ["\n".join(section)]) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
