"""Gallery search speed and recall (jobs/search.py's methods) on a synthetic index.

The index imitates a person gallery: ``--people`` identities, each seen ``rows/people`` times, every
detection its identity's unit vector plus noise (then renormalised); queries are new sightings of
indexed people. Measured per query for a top-``--top-k`` search: exact blocked products
(``exact``), and faiss IVF-Flat and HNSW built once (their build time apart), with their recall of
the exact top 10 and their memory.

  .venv/bin/python bench/bench_search.py --rows 1000000 --dim 256 --queries 100
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

from dkd_ray.gallery.query import exact_top_k  # noqa: E402


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_gallery(rows: int, people: int, dim: int, noise: float, queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((people, dim), dtype=np.float32))
    owner = rng.integers(0, people, rows)
    gallery = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 100_000):  # bounded memory while generating
        part = slice(start, min(rows, start + 100_000))
        gallery[part] = normalise(centres[owner[part]] + noise * rng.standard_normal((len(owner[part]), dim),
                                                                                     dtype=np.float32) / np.sqrt(dim))
    asked = rng.integers(0, people, queries)
    query = normalise(centres[asked] + noise * rng.standard_normal((queries, dim), dtype=np.float32) / np.sqrt(dim))
    return gallery, query


def timed(fn, queries: np.ndarray):
    started = time.perf_counter()
    out = fn(queries)
    return out, 1000 * (time.perf_counter() - started) / len(queries)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--people", type=int, default=50_000)
    p.add_argument("--noise", type=float, default=1.0, help="noise norm relative to the identity vector")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    p.add_argument("--hnsw", action="store_true", help="also HNSW (M=32; minutes to build at 1M rows)")
    args = p.parse_args()
    import faiss

    gallery, queries = synthetic_gallery(args.rows, args.people, args.dim, args.noise, args.queries)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, faiss {faiss.__version__}; {args.rows:,} rows x "
          f"{args.dim}, {args.people:,} people, noise {args.noise}, {args.queries} queries, top-{args.top_k}")
    exact, exact_ms = timed(lambda qs: [exact_top_k(gallery, q, args.top_k)[0] for q in qs], queries)
    truth = [set(rows[:10]) for rows in exact]
    lines = [f"| exact (blocked numpy) | {exact_ms:.1f} | 1.000 | {gallery.nbytes / 2**20:.0f} | - |"]

    def recall(found) -> float:
        return float(np.mean([len(set(r[:10]) & t) / 10 for r, t in zip(found, truth)]))

    started = time.perf_counter()
    quantiser = faiss.IndexFlatIP(args.dim)
    ivf = faiss.IndexIVFFlat(quantiser, args.dim, args.nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(gallery[np.random.default_rng(1).choice(args.rows, min(args.rows, 64 * args.nlist), replace=False)])
    ivf.add(gallery)
    build = time.perf_counter() - started
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        (_, rows), ms = timed(lambda qs: ivf.search(qs, args.top_k), queries)
        lines.append(f"| faiss IVF-Flat nlist={args.nlist} nprobe={nprobe} | {ms:.2f} | {recall(rows):.3f} | "
                     f"{gallery.nbytes / 2**20:.0f} + lists | {build:.0f} |")
    if args.hnsw:
        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(gallery)
        build = time.perf_counter() - started
        for ef in (128, 256):
            hnsw.hnsw.efSearch = ef
            (_, rows), ms = timed(lambda qs: hnsw.search(qs, args.top_k), queries)
            lines.append(f"| faiss HNSW M=32 efSearch={ef} | {ms:.2f} | {recall(rows):.3f} | "
                         f"{gallery.nbytes / 2**20:.0f} + graph ({args.rows * 32 * 2 * 4 / 2**20:.0f}) | {build:.0f} |")
    print("| method | ms per query | recall@10 | memory MiB | build s |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
