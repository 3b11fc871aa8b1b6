"""Index people in your own images and video with a trained student (Ray Data).

Inputs: image files, folders (searched recursively) or globs; video files (decoded with PyAV:
every --every-nth frame, or --fps frames per second); or a dataset split (--dataset/--data-root
/--split). Frames are decoded in parallel Ray Data tasks and the student runs on an actor pool
(--actors; one GPU each with --use-gpu). The index is Parquet under --index (a folder or
s3://...): source file, frame, timestamp, box, detection score, embedding, image size, and an
index.json naming the model (its weights' digest and the reference it was loaded from).

Running it again on a grown folder indexes only the new files (by content hash); an index built
by another model is refused. Search it with jobs/search.py.

Examples:
  python jobs/index_gallery.py --model models:/dkd-student-cuhk_sysu@champion --input footage/ --index idx/
  python jobs/index_gallery.py --model runs/demo/student/student_e007_i0000600 --input cam1.mp4 --fps 2 --index idx/
  python jobs/index_gallery.py --model <run id> --dataset cuhk_sysu --data-root data/CUHK-SYSU --split test --index idx/
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="index_gallery.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="the student: models:/<name>/<version> or @alias, a run id, or a checkpoint folder")
    parser.add_argument("--index", required=True, help="the index folder or object-store URI (created if missing)")
    what = parser.add_argument_group("what to index (--input, or a dataset split)")
    what.add_argument("--input", nargs="+", default=[], metavar="PATH",
                      help="image/video files, folders (recursive) or globs")
    what.add_argument("--every-nth", type=int, default=1, help="video: keep every n-th frame (default: 1)")
    what.add_argument("--fps", type=float, default=0.0, help="video: keep this many frames per second (overrides "
                                                              "--every-nth)")
    what.add_argument("--dataset", choices=["cuhk_sysu", "prw", "synthetic"], help="index a benchmark split")
    what.add_argument("--data-root", type=Path, help="the dataset folder (with --dataset)")
    what.add_argument("--split", default="test", choices=["train", "test"], help="dataset split (default: test)")
    what.add_argument("--skip-unreadable", action="store_true",
                      help="skip unreadable files (counted) instead of refusing the job")
    run = parser.add_argument_group("run")
    run.add_argument("--actors", type=int, default=1, help="student actors (default: 1)")
    run.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    run.add_argument("--batch-size", type=int, default=4, help="frames per actor call (default: 4)")
    run.add_argument("--score-threshold", type=float,
                     help="keep detections at or above this score (default: the model's own)")
    run.add_argument("--tracking-uri", default=None,
                     help="MLflow for models:/ URIs, run ids and the index run (default: $MLFLOW_TRACKING_URI, "
                          "else ./mlflow.db)")
    run.add_argument("--no-mlflow", action="store_true", help="do not log the index run to MLflow")
    return parser


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    from dkd_ray.gallery.errors import GalleryInputError
    from dkd_ray.gallery.index import build_index
    from dkd_ray.gallery.sources import dataset_sources, list_sources
    from dkd_ray.models.loading import check_model_ref

    from dkd_ray.tracking import tracking_uri

    args = build_parser().parse_args(argv)
    quiet_libraries()
    args.tracking_uri = args.tracking_uri or tracking_uri()
    if bool(args.input) == bool(args.dataset):
        raise GalleryInputError("give either --input PATH... or --dataset/--data-root (one of them)")
    if args.actors < 1 or args.batch_size < 1:
        raise GalleryInputError(f"--actors and --batch-size must be >= 1, got {args.actors}, {args.batch_size}")
    check_model_ref(args.model, "student", uri=args.tracking_uri)  # before Ray: a bad reference fails at once
    if args.dataset:
        from dkd_ray.data import load_annotations

        if args.data_root is None:
            raise GalleryInputError("--dataset needs --data-root")
        layout = "cuhk_sysu" if args.dataset == "synthetic" else args.dataset
        sources, skipped = dataset_sources(load_annotations(layout, args.data_root), args.split), []
    else:
        sources, skipped = list_sources(args.input, every_nth=args.every_nth, fps=args.fps,
                                        skip_unreadable=args.skip_unreadable)
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    print(f"indexing {len(sources)} file(s) with {args.model} into {args.index}", flush=True)
    summary = build_index(args.model, sources, args.index, tracking_uri=args.tracking_uri,
                          score_threshold=args.score_threshold, actors=args.actors, use_gpu=args.use_gpu,
                          batch_size=args.batch_size)
    print(summary.line() + (f"; {len(skipped)} unreadable file(s) skipped" if skipped else ""))
    if not args.no_mlflow and summary.files_indexed:
        from dkd_ray.gallery.tracking import log_index_run
        from dkd_ray.tracking import redact_uri

        run_id = log_index_run(args.tracking_uri, summary, args.model, args.index)
        if run_id:
            print(f"MLflow run {run_id} (experiment dkd-ray/gallery) at {redact_uri(args.tracking_uri)}: counts, "
                  "index.json and a sample search picture")
    print(f"search it: python jobs/search.py --model {args.model} --index {args.index} --query CROP.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
