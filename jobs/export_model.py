"""Export a student's Re-ID embedder for deployment (torch.export, a .pt2 file).

The file maps (image [3, H, W] float in [0, 1], boxes [n, 4] pixels) to L2-normalised embeddings
[n, d], for any number of boxes and the frame size given here (one export per camera resolution).
It is checked against the eager model before it is written. Load it anywhere with:
  program = torch.export.load("embedder.pt2"); embeddings = program.module()(image, boxes)
The detector stays eager (torch.export cannot trace torchvision's batched NMS); see
dkd_ray/gallery/export.py.

Example:
  python jobs/export_model.py --model models:/dkd-student-cuhk_sysu@champion --height 900 --width 1500 --out embedder.pt2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import dkd_ray  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd_ray.cli import exits_on_bad_input, quiet_libraries  # noqa: E402

TOLERANCE = 1e-4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export_model.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the student: models:/..., a run id, or a checkpoint folder")
    parser.add_argument("--height", type=int, required=True, help="frame height the export takes (pixels)")
    parser.add_argument("--width", type=int, required=True, help="frame width the export takes (pixels)")
    parser.add_argument("--out", type=Path, required=True, help="the .pt2 file to write")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow for models:/ URIs and run ids (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    return parser


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    import torch

    from dkd_ray.gallery.errors import GalleryInputError
    from dkd_ray.gallery.export import export_embedder, max_difference
    from dkd_ray.models.loading import load_model

    from dkd_ray.tracking import tracking_uri

    args = build_parser().parse_args(argv)
    quiet_libraries()
    args.tracking_uri = args.tracking_uri or tracking_uri()
    if args.height < 16 or args.width < 16:
        raise GalleryInputError(f"--height/--width must be at least 16, got {args.height}x{args.width}")
    student = load_model(args.model, role="student", uri=args.tracking_uri)
    program = export_embedder(student, args.height, args.width)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, args.out)
    reloaded = torch.export.load(args.out)
    difference = max_difference(student, reloaded, args.height, args.width)
    if difference > TOLERANCE:
        args.out.unlink()
        raise RuntimeError(f"the exported embedder differs from the eager model by {difference:.2e} "
                           f"(> {TOLERANCE:g}); nothing written")
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB): {args.height}x{args.width} frames, any "
          f"number of boxes; reloaded and checked against the eager model (max difference {difference:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
