"""Write synthetic CUHK-SYSU and/or PRW folders in the real benchmarks' exact layout.

Examples:
  python jobs/make_synthetic.py --layout both --root data/synthetic --preset small
  python jobs/make_synthetic.py --layout cuhk_sysu --root data/CUHK-SYSU --preset full --annotations-only
  python jobs/make_synthetic.py --layout prw --root data/PRW --preset tiny --set train_identities=20

With --layout both, ROOT gets the two folders ROOT/CUHK-SYSU and ROOT/PRW; otherwise ROOT is
the dataset folder itself. The same arguments always write byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd_ray.data.synthetic import LAYOUTS, PRESETS, generate, override_names  # noqa: E402

FOLDER_NAMES = {"cuhk_sysu": "CUHK-SYSU", "prw": "PRW"}


def build_parser() -> argparse.ArgumentParser:
    overrides = "; ".join(f"{layout}: {', '.join(override_names(layout))}" for layout in LAYOUTS)
    parser = argparse.ArgumentParser(
        prog="make_synthetic.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Override names (--set NAME=VALUE, tuples as 'a,b'): {overrides}",
    )
    parser.add_argument(
        "--layout", choices=[*LAYOUTS, "both"], required=True, help="which benchmark layout to write"
    )
    parser.add_argument(
        "--root",
        type=Path,
        required=True,
        help="dataset folder to create (with --layout both: the parent of CUHK-SYSU/ and PRW/)",
    )
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="small",
        help="tiny: unit tests; small: CPU demo (default); full: the real benchmarks' counts",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--annotations-only",
        action="store_true",
        help="write annotation files only (no JPEGs); sizes go to synthetic_image_sizes.json",
    )
    parser.add_argument(
        "--no-edge-cases",
        action="store_true",
        help="do not plant the real data's irregularities (zero-area boxes, alternate keys, ...)",
    )
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a preset field, e.g. --set train_images=100 (repeatable)",
    )
    parser.add_argument(
        "--summary-json",
        type=Path,
        help="also write the ground-truth summary (JSON) here, outside the dataset folder",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def parse_overrides(items: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--set expects NAME=VALUE, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides, parser)
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    if len(layouts) > 1 and overrides:
        parser.error("--set overrides name one layout's fields: use --layout cuhk_sysu or prw")

    started = time.perf_counter()
    summaries = {}
    for layout in layouts:
        root = args.root / FOLDER_NAMES[layout] if args.layout == "both" else args.root
        report = (
            None
            if args.quiet
            else (lambda line: print(f"[{time.perf_counter() - started:7.1f}s] {line}", flush=True))
        )
        try:
            summary = generate(
                root,
                layout,
                args.preset,
                seed=args.seed,
                annotations_only=args.annotations_only,
                edge_cases=not args.no_edge_cases,
                overwrite=args.overwrite,
                progress=report,
                **overrides,
            )
        except (ValueError, OSError) as err:  # bad override, existing or unwritable folder
            print(f"error: {err}", file=sys.stderr)
            return 2
        summaries[layout] = summary
        t, v = summary.train, summary.test
        print(
            f"{layout}: wrote {summary.files_written} files to {root} in {summary.seconds:.1f}s\n"
            f"  train: {t.images} images, {t.boxes} boxes ({t.labelled_boxes} labelled), "
            f"{t.identities} identities\n"
            f"  test:  {v.images} images, {v.boxes} boxes ({v.labelled_boxes} labelled), "
            f"{v.identities} identities\n"
            f"  queries: {summary.queries} ({summary.query_identities} identities)"
            + (f", gallery sizes {list(summary.gallery_sizes)}" if summary.gallery_sizes else "")
            + f"\n  planted: {_edge_case_line(summary)}",
            flush=True,
        )
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(
            json.dumps({k: s.to_dict() for k, s in summaries.items()}, indent=1)
        )
        print(f"summary: {args.summary_json}")
    return 0


def _edge_case_line(summary) -> str:
    e = summary.edge_cases
    parts = [f"{e.zero_area_boxes} zero-area boxes"]
    if summary.layout == "cuhk_sysu":
        parts.append(f"empty gallery idlocate {e.empty_idlocate}")
    else:
        parts += [
            f"{e.negative_coordinate_boxes} boxes with negative coordinates",
            f"{len(e.alternate_box_keys)} files with alternate keys",
            f"{len(e.train_ids_in_test_images)} training ids in test frames",
            f"{len(e.missing_train_ids)} gaps in training ids",
        ]
    parts.append(f"{len(e.unlabelled_only_images)} images without labelled people")
    return "; ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
