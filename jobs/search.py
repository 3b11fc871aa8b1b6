"""Find a person in a gallery index (built by jobs/index_gallery.py).

The query: one or more crops of the person (--query CROP ..., embeddings averaged), or an image
and the person's box in it (--query IMAGE --box x1 y1 x2 y2). The same model that built the
index must embed the query (an index of another model is refused). Cosine similarity, exact by
default (blocked matrix products) or with faiss (--method faiss-flat | faiss-hnsw; auto takes
HNSW above ten million rows when faiss is installed; the graph is built per search).

Writes to --output-dir: results.json (for scripts), results.html (self-contained page) and
results.png (picture sheet: query, then each hit's crop and scene with its box, similarity,
source and time). Prints the top hits.

Examples:
  python jobs/search.py --model models:/dkd-student-cuhk_sysu@champion --index idx/ --query person.jpg --top-k 20
  python jobs/search.py --model <run id> --index idx/ --query frame.jpg --box 120 40 180 210 --source 'cam1*' \\
      --time-range 60 120 --output-dir found/
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
    from dkd_ray.gallery.query import METHODS

    parser = argparse.ArgumentParser(prog="search.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="the student that built the index: models:/..., a run id, or a checkpoint folder")
    parser.add_argument("--index", required=True, help="the index folder or object-store URI")
    parser.add_argument("--query", nargs="+", required=True, metavar="IMAGE",
                        help="crop(s) of the person; with --box, one image holding the person")
    parser.add_argument("--box", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"),
                        help="the person's box in the --query image (pixels)")
    parser.add_argument("--top-k", type=int, default=10, help="hits to return (default: 10)")
    parser.add_argument("--min-score", type=float, default=0.0, help="only detections at or above this score")
    parser.add_argument("--source", default="", metavar="GLOB", help="only sources matching this glob (path or name)")
    parser.add_argument("--time-range", nargs=2, type=float, metavar=("START", "END"),
                        help="only frames with a timestamp in [START, END] seconds")
    parser.add_argument("--method", choices=METHODS, default="auto", help="search method (default: auto)")
    parser.add_argument("--output-dir", type=Path, default=Path("search-results"),
                        help="where results.json/.html/.png go (default: search-results/)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow for models:/ URIs and run ids (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    return parser


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    from dkd_ray.gallery.search_job import run_search

    from dkd_ray.tracking import tracking_uri

    args = build_parser().parse_args(argv)
    quiet_libraries()
    args.tracking_uri = args.tracking_uri or tracking_uri()
    outcome = run_search(args)
    for hit in outcome["hits"]:
        print(f"{hit['rank']:>3}  {hit['similarity']:.3f}  {hit['source']}  frame {hit['frame']}  "
              f"t={hit['timestamp']:.2f}s  box {[round(v, 1) for v in hit['box']]}  det {hit['score']:.2f}")
    print(f"{len(outcome['hits'])} hit(s) of {outcome['searched']} box(es) searched ({outcome['method']}); "
          f"results: {outcome['files']['html']} (also .json, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
