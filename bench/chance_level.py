#!/usr/bin/env python
"""Chance level of a student's search numbers: the same detections with random unit embeddings.

A student's mAP means little without it (most candidates are negatives, so chance mAP is far
below 1 / gallery size). Reads the evaluation arrays a student run stores with its final
checkpoint (``<checkpoint>/evaluation``).

  .venv/bin/python bench/chance_level.py --checkpoint runs/student-<stamp>/<final> --data-root <CUHK-SYSU folder>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="a student checkpoint folder holding evaluation/")
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--dataset", default="cuhk_sysu", choices=("cuhk_sysu", "prw"), help="layout of --data-root")
    p.add_argument("--draws", type=int, default=5, help="random embedding draws to average")
    args = p.parse_args(argv)
    from dkd_ray.data import load_annotations
    from dkd_ray.eval.results import format_metrics_table
    from dkd_ray.eval.search import evaluate_search
    from dkd_ray.train.evaluation import EvaluationArrays

    arrays = EvaluationArrays.load(args.checkpoint / "evaluation")
    annotations = load_annotations(args.dataset, args.data_root)
    rng = np.random.default_rng(0)

    def unit(shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    draws = [evaluate_search(annotations, arrays.gallery.with_embeddings(unit(arrays.gallery.embeddings.shape)),
                             unit(arrays.query_embeddings.shape)).metrics for _ in range(args.draws)]
    chance = {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}
    model = evaluate_search(annotations, arrays.gallery, arrays.query_embeddings).metrics
    print(f"chance (same detections, random embeddings, mean of {args.draws} draws):")
    print(format_metrics_table(chance))
    print("the model:")
    print(format_metrics_table(model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
