"""Check a CUHK-SYSU or PRW folder before training: every problem with its file and row.

    python jobs/validate_dataset.py --dataset cuhk_sysu --data-root /data/CUHK-SYSU

Exit status 0 when training can start (warnings only: boxes the readers drop or clip, grayscale
JPEGs they convert), 1 when there are errors (missing or undecodable images, unreadable or
incomplete annotation files, no training identity or query, ...), 2 for a bad argument (one
line ``error: ...`` on stderr). No Ray cluster is needed.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from dkd_ray.data.annotations import DATASETS  # noqa: E402
from dkd_ray.data.validate import MIN_IDENTITIES, print_progress, validate_dataset  # noqa: E402
from dkd_ray.errors import EXIT_BAD_INPUT, InputError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every bad input of the jobs
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def integer(text: str) -> int:  # its name is in argparse's "invalid integer value"
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        description="Validate a person-search dataset folder (annotations and images) and "
                    "report every problem with its file and row.")
    parser.add_argument("--dataset", required=True, choices=DATASETS,
                        help="which benchmark layout the folder has")
    parser.add_argument("--data-root", required=True, type=Path,
                        help="the dataset folder as unpacked (e.g. .../CUHK-SYSU or .../PRW)")
    parser.add_argument("--box-rule", choices=("exact", "seqnet"), default="exact",
                        help="how PRW boxes are read (data.box_rule): exact (default), or seqnet as "
                             "SeqNet/COAT read them (CUHK-SYSU: no effect)")
    parser.add_argument("--no-images", action="store_true",
                        help="skip decoding every image (annotations and image headers only)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads decoding images (default: all cores)")
    parser.add_argument("--min-identities", type=integer, default=MIN_IDENTITIES,
                        help="training identities with >= 2 boxes the teacher's P×K batch needs "
                             "(teacher.p_identities; default: %(default)s, the least for a "
                             "batch-hard triplet; 0: no check)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.quiet:  # the readers log each large file they read
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if not args.data_root.is_dir():
        print(f"error: --data-root {args.data_root} is not a folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        report = validate_dataset(args.dataset, args.data_root, check_images=not args.no_images,
                                  workers=args.workers, box_rule=args.box_rule,
                                  min_identities=args.min_identities,
                                  progress=None if args.quiet else print_progress)
    except InputError as error:  # the validator reports dataset problems; this is a last resort
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for problem in report.problems:
        print(problem)
    print(report.format_summary())
    if report.ok:
        print("OK: training can start" + (" (see the warnings above)" if report.problems else ""))
        return 0
    print(f"FAILED: {len(report.errors)} errors must be fixed before training")
    return 1


if __name__ == "__main__":
    # scipy's MAT reader can crash outright on some corrupt files: at least show where.
    faulthandler.enable()
    sys.exit(main())
