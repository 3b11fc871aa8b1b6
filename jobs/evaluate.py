"""Evaluate person search (CUHK-SYSU, PRW) from saved detections and embeddings.

Reads the dataset's annotations, the gallery detections (boxes, scores, one embedding each, as
written by ``dkd_ray.eval.Detections.save``) and the queries' embeddings (one per query, in the
dataset's query order), then runs detection and search evaluation exactly as the published
protocols do. Prints a metrics table and writes to --output-dir:
  metrics.json      flat metrics, e.g. cuhk_sysu/g100/mAP, prw/all/top1, det/ap
  results.jsonl     per query and protocol: its top-10 (image, box, score, correct)
  cmc.png, gallery_size.png (CUHK-SYSU), queries/query_*.png (when image files exist)

Two-step evaluation (a separate Re-ID model's embeddings of the detector's boxes) is the same
command with those embeddings saved in the detections and queries files.

With --model (a registered model, run or checkpoint) the model first runs over the test split on
Ray Train workers (--num-workers, --use-gpu; the job's cluster under `ray job submit`, else a
local one) and its arrays are saved to --output-dir; --teacher adds the two-step reference.

Bad input (a flag value, a missing or malformed array file, a model reference that names no
model, a dataset folder that cannot be read) ends in one line `error: <message>` on stderr and
exit status 2, before anything is written (and, with --model, before Ray starts where it can).

Examples:
  python jobs/evaluate.py --dataset cuhk_sysu --data-root data/CUHK-SYSU \\
      --model models:/dkd-student-cuhk_sysu@champion --teacher models:/dkd-teacher-cuhk_sysu@champion --cbgm
  python jobs/evaluate.py --dataset cuhk_sysu --data-root data/CUHK-SYSU \\
      --detections runs/x/gallery.npz --queries runs/x/queries.npz --cbgm --output-dir runs/x/eval
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

try:
    import dkd_ray  # noqa: F401
except ImportError:  # run from a checkout without installing: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd_ray.errors import EXIT_BAD_INPUT, InputError  # noqa: E402
from dkd_ray.eval.pipeline import EvaluationReport, evaluate_arrays  # noqa: E402

log = logging.getLogger("evaluate")
# What bad input raises: our InputErrors, a path that is missing or not a readable file, and the
# evaluator's consistency checks (ValueError: e.g. a TestG size the annotations lack).
BAD_INPUT = (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError)


class ArgumentError(InputError, ValueError):
    """A flag value argparse cannot check by itself; the message names the flag."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", required=True, choices=["cuhk_sysu", "prw", "synthetic"],
                      help="benchmark layout (synthetic: the CUHK-SYSU layout of jobs/make_synthetic.py)")
    data.add_argument("--data-root", required=True, type=Path,
                      help="the dataset folder as unpacked (CUHK-SYSU/ or PRW/)")
    data.add_argument("--box-rule", choices=("exact", "seqnet"),
                      help="how PRW boxes are read (data.box_rule): exact, or seqnet as SeqNet/COAT "
                           "read them, to compare with their published PRW tables (default: the "
                           "model's config with --model, else exact; CUHK-SYSU: no effect)")

    arrays = parser.add_argument_group("saved arrays (what to evaluate)")
    arrays.add_argument("--detections", type=Path,
                        help="gallery detections with embeddings, .npz or .parquet")
    arrays.add_argument("--queries", type=Path,
                        help="query embeddings [Q, d] in the dataset's query order, .npz or .parquet")
    arrays.add_argument("--query-context", type=Path,
                        help="CBGM context per query (query box first), .npz/.parquet indexed by "
                             "query row; default: built from --detections on the query images")

    model = parser.add_argument_group("a model (instead of saved arrays)")
    model.add_argument("--model", help="student to evaluate: models:/dkd-student-<dataset>/<version> or @alias, "
                                       "a run id, or a checkpoint folder; its arrays are saved to --output-dir")
    model.add_argument("--teacher", help="also report the two-step reference: this teacher on the student's detections")
    model.add_argument("--num-workers", type=int, default=1, help="Ray Train workers sharing the inference (default 1)")
    model.add_argument("--use-gpu", choices=("auto", "true", "false"), default="auto",
                       help="one GPU per worker when the cluster has them (default: auto)")
    model.add_argument("--storage-path", default="runs", help="where the evaluation run's arrays go (default: runs)")
    model.add_argument("--short-side", type=int, help="scene resize (default: the model's training config)")
    model.add_argument("--max-side", type=int, help="scene resize long-side cap (default: the model's config)")
    model.add_argument("--experiment", default="", help="log metrics and files to this MLflow experiment "
                                                       "(default with --model: dkd-ray/<dataset>; '-' disables)")

    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--score-threshold", type=float, default=0.5,
                          help="drop gallery detections scoring below this before search (default 0.5)")
    protocol.add_argument("--det-score-threshold", type=float, default=0.5,
                          help="detection evaluation's score threshold (default 0.5; SeqNet/COAT use 0.01)")
    protocol.add_argument("--gallery-sizes", nargs="+", metavar="SIZE",
                          help="CUHK-SYSU: TestG sizes and/or 'full' (default: all present + full)")
    protocol.add_argument("--cbgm", action="store_true",
                          help="also report search re-ranked by context bipartite graph matching")
    protocol.add_argument("--cbgm-k1", type=int, help="CBGM top-k1 gallery detections (default 10 CUHK-SYSU, 30 PRW)")
    protocol.add_argument("--cbgm-k2", type=int, help="CBGM query context size (default 3 CUHK-SYSU, 4 PRW)")

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", type=Path, default=Path("runs/evaluate"),
                        help="where metrics.json, results.jsonl and plots go (default runs/evaluate)")
    output.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    output.add_argument("--example-queries", type=int, default=4, help="query pictures to draw (default 4)")
    return parser


def _gallery_sizes(values: list[str] | None) -> list[int | str] | None:
    if values is None:
        return None
    out: list[int | str] = []
    for value in values:
        if value == "full":
            out.append("full")
        elif value.isdigit():
            out.append(int(value))
        else:
            raise ArgumentError(f"--gallery-sizes: {value!r} is neither a number nor 'full'")
    return out


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse flag values that would fail (or mislead) only late in the run."""
    if args.model is None and (args.detections is None or args.queries is None):
        raise ArgumentError("give --model, or --detections and --queries (the saved arrays to evaluate)")
    _gallery_sizes(args.gallery_sizes)
    for flag in ("score_threshold", "det_score_threshold"):
        if not math.isfinite(getattr(args, flag)):
            raise ArgumentError(f"--{flag.replace('_', '-')} must be a finite number, got {getattr(args, flag)}")
    for flag, low in (("cbgm_k1", 1), ("cbgm_k2", 1), ("num_workers", 1), ("short_side", 1),
                      ("max_side", 1), ("example_queries", 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise ArgumentError(f"--{flag.replace('_', '-')} must be at least {low}, got {value}")
    for flag in ("model", "teacher"):
        if getattr(args, flag):
            check_model_reference(f"--{flag}", getattr(args, flag))


def check_model_reference(flag: str, ref: str) -> None:
    """A reference that names no model is refused now, not after Ray started or the student's
    whole evaluation ran (--teacher is loaded last): a local folder or file is loaded (an empty or
    corrupt one fails), an MLflow reference is looked up (without a download)."""
    from dkd_ray.models.loading import check_model_ref
    from dkd_ray.tracking.errors import ModelNotFoundError

    try:
        check_model_ref(ref, "teacher" if flag == "--teacher" else "student")
    except ModelNotFoundError as error:
        raise ModelNotFoundError(f"{flag} {error}") from None


def _layout(dataset: str) -> str:
    return "cuhk_sysu" if dataset == "synthetic" else dataset


def save_model_arrays(args: argparse.Namespace) -> None:
    """Run ``--model`` over the test split on Ray Train workers (sharded inference; the job's
    cluster under ``ray job submit``, else a local one) and save the arrays the protocols take."""
    import time

    from dkd_ray.cli import setup_logging, storage_of
    from dkd_ray.config import Config
    from dkd_ray.data import load_annotations
    from dkd_ray.eval.arrays import save_query_embeddings
    from dkd_ray.models.loading import load_model
    from dkd_ray.stages import evaluate_model_stage, evaluation_folder
    from dkd_ray.train.evaluation import EvaluationArrays
    from dkd_ray.train.runner import init_ray

    setup_logging()
    spec = load_model(args.model, role="student").spec  # the model's own recipe: input sizes, detector
    cfg = Config.from_dict(spec["config"])
    overrides = {"data.dataset": args.dataset, "data.root": str(args.data_root.resolve()),
                 "eval.score_threshold": args.score_threshold, "train.num_workers": args.num_workers,
                 "train.use_gpu": args.use_gpu}
    overrides.update({k: v for k, v in (("data.short_side", args.short_side), ("data.max_side", args.max_side),
                                        ("data.box_rule", args.box_rule)) if v})
    cfg.apply_overrides(overrides)
    args.box_rule = cfg.data.box_rule  # the saved arrays' queries are this rule's boxes
    # Read before Ray starts: an unreadable dataset folder fails here, in one line.
    annotations = load_annotations(_layout(args.dataset), args.data_root, box_rule=args.box_rule)
    init_ray()
    storage = storage_of(args)
    log.info("evaluating %s on the test split with %d worker(s)", args.model, cfg.train.num_workers)
    _, checkpoint = evaluate_model_stage(cfg, args.data_root, args.model, "student", storage_path=storage,
                                         run_name=f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}")
    arrays = EvaluationArrays.load(evaluation_folder(checkpoint))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    args.detections, args.queries = args.output_dir / "gallery.npz", args.output_dir / "queries.npz"
    arrays.gallery.save(args.detections, image_names=annotations.images.name)
    save_query_embeddings(args.queries, arrays.query_embeddings,
                          query_image_names=annotations.images.name[annotations.queries.image_index])


def log_to_mlflow(args: argparse.Namespace, report: EvaluationReport) -> None:
    from dkd_ray.tracking import Tracker

    if args.experiment == "-":
        return
    tracker = Tracker(args.dataset, "evaluate", experiment=args.experiment or None,
                      tags={"model": args.model or "", "teacher": args.teacher or ""})
    tracker.start()
    tracker.log_params({"model": args.model, "teacher": args.teacher, "cbgm": args.cbgm,
                        "score_threshold": args.score_threshold, "box_rule": args.box_rule or "exact"})
    tracker.log_metrics(report.metrics)
    tracker.log_artifacts(args.output_dir, "evaluation")
    tracker.end()
    if tracker.run_id:
        print(f"MLflow run {tracker.run_id} in experiment {tracker.experiment}")


def evaluate_saved_arrays(args: argparse.Namespace) -> EvaluationReport:
    from dkd_ray.data import load_annotations
    from dkd_ray.eval.arrays import ArraysError, Detections, load_query_embeddings
    from dkd_ray.eval.cbgm import CBGMConfig

    log.info("loading %s annotations from %s", args.dataset, args.data_root)
    annotations = load_annotations(_layout(args.dataset), args.data_root, box_rule=args.box_rule or "exact")
    names = annotations.images.name
    gallery = Detections.load(args.detections, image_names=names)
    query_embeddings = load_query_embeddings(
        args.queries, expected_image_names=names[annotations.queries.image_index], expected_dim=gallery.dim
    )
    query_context = None
    if args.query_context is not None:
        query_context = Detections.load(args.query_context)
        num_queries = len(annotations.queries)
        if query_context.num_images != num_queries:  # its rows are query rows, not image rows
            raise ArraysError(f"{args.query_context}: indexes {query_context.num_images} rows (num_images) "
                              f"but the dataset has {num_queries} queries")
        if len(query_context) and query_context.dim != gallery.dim:
            raise ArraysError(f"{args.query_context}: array 'embeddings' are {query_context.dim}-d but "
                              f"{args.detections}'s are {gallery.dim}-d")
    cbgm: CBGMConfig | bool = bool(args.cbgm)
    if args.cbgm and (args.cbgm_k1 or args.cbgm_k2):
        default = CBGMConfig.for_dataset(args.dataset)
        cbgm = CBGMConfig(args.cbgm_k1 or default.k1, args.cbgm_k2 or default.k2)
    log.info("%d gallery detections on %d images, %d queries", len(gallery), len(names), len(query_embeddings))
    report = evaluate_arrays(
        annotations, gallery, query_embeddings,
        score_threshold=args.score_threshold,
        det_score_threshold=args.det_score_threshold,
        gallery_sizes=_gallery_sizes(args.gallery_sizes),
        cbgm=cbgm,
        query_context=query_context,
        output_dir=args.output_dir,
        plots=not args.no_plots,
        example_queries=args.example_queries,
    )
    if args.teacher:
        from dkd_ray.config import Config
        from dkd_ray.models.loading import load_model
        from dkd_ray.stages import two_step_reference
        from dkd_ray.train.evaluation import EvaluationArrays

        teacher_cfg = Config.from_dict(load_model(args.teacher, role="teacher").spec["config"])
        teacher_cfg.eval.score_threshold = args.score_threshold
        report.metrics.update(two_step_reference(teacher_cfg, annotations, EvaluationArrays(gallery, query_embeddings),
                                                 args.teacher))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Progress goes to stdout (as dkd_ray.cli.setup_logging's), so stderr holds only an error.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    from dkd_ray.eval.results import format_metrics_table

    try:
        check_arguments(args)
        if args.model:
            save_model_arrays(args)
        report = evaluate_saved_arrays(args)
    except BAD_INPUT as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(format_metrics_table(report.metrics))
    for path in report.files:
        print(f"wrote {path}")
    if args.model or args.experiment not in ("", "-"):
        log_to_mlflow(args, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
