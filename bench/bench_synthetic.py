"""Time the synthetic generator: each layout at each preset, one fresh process per case.

Usage:
  python bench/bench_synthetic.py [--cases cuhk_sysu:small,prw:full-ao,...] [--out DIR] [--keep]

A case is LAYOUT:PRESET, with '-ao' for annotations only (full size is always run that way).
Prints one Markdown table row per case: wall time, CPU time, peak memory, files, bytes written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASES = "cuhk_sysu:tiny,prw:tiny,cuhk_sysu:small,prw:small,prw:full-ao,cuhk_sysu:full-ao"

_CHILD = """
import json, sys, time
from dkd_ray.data.synthetic import generate
layout, preset, ao, root = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
t = time.perf_counter()
def say(line):
    print(f"  [{time.perf_counter() - t:6.1f}s] {line}", file=sys.stderr, flush=True)
s = generate(root, layout, preset, seed=0, annotations_only=ao, progress=say)
print(json.dumps({"seconds": s.seconds, "files": s.files_written, "images": s.images, "boxes": s.boxes}))
"""


def run_case(case: str, out: Path, keep: bool) -> dict:
    layout, preset = case.split(":")
    ao = preset.endswith("-ao")
    preset = preset.removesuffix("-ao")
    root = out / f"{layout}-{preset}{'-ao' if ao else ''}"
    shutil.rmtree(root, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, layout, preset, "1" if ao else "0", str(root)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "case": case,
        "wall_s": wall,
        "generate_s": stats["seconds"],
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_gb": after.ru_maxrss / 1e6,
        "files": stats["files"],
        "images": stats["images"],
        "boxes": stats["boxes"],
        "mb": size / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases", default=DEFAULT_CASES, help=f"comma-separated (default {DEFAULT_CASES})"
    )
    parser.add_argument(
        "--out", type=Path, help="where to write the folders (default: a temporary folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_synthetic_"))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    )
    print("| case | images | boxes | files | MB | wall s | CPU s | peak RSS GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        r = run_case(case, out, args.keep)
        print(
            f"| {r['case']} | {r['images']} | {r['boxes']} | {r['files']} | {r['mb']:.1f} | "
            f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_gb']:.2f} |",
            flush=True,
        )
    print(f"# load average {os.getloadavg()[0]:.1f} at end")
    if not args.out and not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
