"""Bad input never costs a run: jobs/evaluate.py refuses a broken array file, flag or model
reference with one line ``error: ...`` naming the file and the array, exit status 2 and nothing
written; the evaluator refuses embeddings whose similarities would not be finite."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dkd_ray.errors import InputError
from dkd_ray.eval import CBGMConfig, evaluate_search, query_context_from_detections, save_query_embeddings
from dkd_ray.eval.arrays import ArraysError, Detections
from tests.eval_fixtures import QUERY, cuhk_case
from tests.test_eval_outputs import REPO, load_job

# cuhk_case's gallery, in row order: q (rows 0, 1), a (2, 3), b (4, 5), c (6), d (7), t (8, train);
# 6 images, 4-d embeddings, one query (in image q).
NUM_DETS, NUM_IMAGES = 9, 6


@pytest.fixture(scope="module")
def job():
    return load_job()


@pytest.fixture
def case(tmp_path, monkeypatch):
    """Valid arrays of ``cuhk_case`` on disk; the job reads its annotations."""
    import dkd_ray.data

    ann, dets = cuhk_case()
    monkeypatch.setattr(dkd_ray.data, "load_annotations", lambda dataset, root, **kw: ann, raising=False)
    names = ann.images.name
    return SimpleNamespace(
        ann=ann, dets=dets, tmp=tmp_path, out=tmp_path / "eval",
        gallery=dets.save(tmp_path / "gallery.npz", image_names=names),
        gallery_parquet=dets.save(tmp_path / "gallery.parquet", image_names=names),
        queries=save_query_embeddings(tmp_path / "queries.npz", QUERY[None], names[ann.queries.image_index]),
    )


def run(job, capsys, case, *extra: str, detections=None, queries=None) -> tuple[int, str]:
    argv = ["--dataset", "cuhk_sysu", "--data-root", str(case.tmp / "CUHK-SYSU"),
            "--detections", str(detections or case.gallery), "--queries", str(queries or case.queries),
            "--output-dir", str(case.out), "--no-plots", *extra]
    code = job.main(argv)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, case, *fragments: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not case.out.exists()  # no metrics, no results: nothing of a run that did not happen


def rewrite_npz(path: Path, **changes) -> Path:
    """The archive at ``path`` with arrays replaced (``None``: removed)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def edited(dets: Detections, field: str, row, value, dtype=None):
    array = getattr(dets, field).astype(dtype or getattr(dets, field).dtype)  # a copy
    array[row] = value
    return array


def test_the_unbroken_arrays_evaluate(job, capsys, case):
    """The baseline every refusal below breaks one way."""
    code, err = run(job, capsys, case)
    assert code == 0, err
    assert (case.out / "metrics.json").is_file()


# ---- the gallery detections file ----------------------------------------------------------------
GALLERY_BREAKAGES = {
    "missing array": (lambda d: dict(scores=None), ["missing", "'scores'"]),
    "boxes not [N, 4]": (lambda d: dict(boxes=d.boxes[:, :3]), ["array 'boxes'", "[N, 4]", "(9, 3)"]),
    "scores one row short": (lambda d: dict(scores=d.scores[:-1]), ["array 'scores'", "8 rows", "has 9"]),
    "embeddings one row short": (lambda d: dict(embeddings=d.embeddings[1:]), ["array 'embeddings'", "8 rows"]),
    "image index past the last image": (lambda d: dict(image_index=edited(d, "image_index", 3, NUM_IMAGES)),
                                        ["array 'image_index'", "row 3", "is 6", "outside 0..5"]),
    "negative image index": (lambda d: dict(image_index=edited(d, "image_index", 0, -1)),
                             ["array 'image_index'", "row 0", "is -1"]),
    "float image index": (lambda d: dict(image_index=d.image_index.astype(np.float64)),
                          ["array 'image_index'", "integers", "float64"]),
    "scores as strings": (lambda d: dict(scores=d.scores.astype(str)), ["array 'scores'", "numeric", "<U"]),
    "NaN embedding": (lambda d: dict(embeddings=edited(d, "embeddings", (4, 1), np.nan)),
                      ["array 'embeddings'", "not finite in row 4", "nan"]),
    "infinite score": (lambda d: dict(scores=edited(d, "scores", 7, np.inf)), ["array 'scores'", "row 7", "inf"]),
    "NaN box": (lambda d: dict(boxes=edited(d, "boxes", (2, 0), np.nan)), ["array 'boxes'", "row 2"]),
    "box beyond float32": (lambda d: dict(boxes=edited(d, "boxes", (6, 2), 1e300, np.float64)),
                           ["array 'boxes'", "exceeds float32 in row 6", "1e+300"]),
    "inverted box (x2 < x1)": (lambda d: dict(boxes=edited(d, "boxes", 5, [60, 10, 10, 110])),
                               ["array 'boxes'", "row 5", "[60.0, 10.0, 10.0, 110.0]", "x2 >= x1"]),
    "inverted box (y2 < y1)": (lambda d: dict(boxes=edited(d, "boxes", 1, [10, 110, 60, 10])),
                               ["array 'boxes'", "row 1", "y2 >= y1"]),
    "num_images not a number": (lambda d: dict(num_images=np.array("six")), ["array 'num_images'"]),
    "image_names one short": (lambda d: dict(image_names=np.array(["q", "a", "b", "c", "d"])),
                              ["array 'image_names'", "6 strings"]),
}


@pytest.mark.parametrize("breakage", list(GALLERY_BREAKAGES))
def test_a_broken_gallery_array_is_one_line_naming_file_array_and_row(job, capsys, case, breakage):
    change, fragments = GALLERY_BREAKAGES[breakage]
    rewrite_npz(case.gallery, **change(case.dets))
    assert_refused(*run(job, capsys, case), case, str(case.gallery), *fragments)


@pytest.mark.parametrize("content", [b"", b"not an archive at all", "half"])
def test_a_truncated_or_foreign_npz_is_one_line(job, capsys, case, content):
    raw = case.gallery.read_bytes()
    case.gallery.write_bytes(raw[: len(raw) // 2] if content == "half" else content)
    assert_refused(*run(job, capsys, case), case, str(case.gallery), "not a readable .npz")


def test_a_lone_npy_array_under_an_npz_name_is_one_line(job, capsys, case):
    with case.gallery.open("wb") as f:
        np.save(f, np.zeros(3))
    assert_refused(*run(job, capsys, case), case, str(case.gallery), "single .npy array")


def test_a_missing_file_is_one_line_naming_it(job, capsys, case):
    code, err = run(job, capsys, case, detections=case.tmp / "nope.npz")
    assert_refused(code, err, case, "nope.npz", "not found")


# ---- Parquet ------------------------------------------------------------------------------------
def rewrite_column(path: Path, name: str, values: pa.Array) -> Path:
    table = pq.read_table(path)
    table = table.set_column(table.column_names.index(name), name, values)
    pq.write_table(table, path)
    return path


def test_a_truncated_parquet_file_is_one_line(job, capsys, case):
    raw = case.gallery_parquet.read_bytes()
    case.gallery_parquet.write_bytes(raw[: len(raw) // 2])
    code, err = run(job, capsys, case, detections=case.gallery_parquet)
    assert_refused(code, err, case, str(case.gallery_parquet), "not a readable Parquet")


@pytest.mark.parametrize("column, values, fragments", [
    ("box", pa.array([[0, 0, 1, 1]] * 8 + [[9, 9, 1, 1]], pa.list_(pa.float32(), 4)),
     ["column 'box'", "row 8", "x2 >= x1"]),
    ("box", pa.array([[0, 0, 1, 1]] * 3 + [[0, 0, None, 1]] + [[0, 0, 1, 1]] * 5, pa.list_(pa.float32(), 4)),
     ["column 'box'", "null value in row 3"]),
    ("score", pa.array([0.9] * 4 + [None] + [0.9] * 4, pa.float32()), ["column 'score'", "null in row 4"]),
    ("image_index", pa.array(["0"] * 9), ["column 'image_index'", "numeric", "string"]),
    ("embedding", pa.array([[1.0, 0.0, 0.0]] * 9, pa.list_(pa.float32(), 3)), None),  # fine by itself
])
def test_a_broken_parquet_column_is_one_line(job, capsys, case, column, values, fragments):
    rewrite_column(case.gallery_parquet, column, values)
    code, err = run(job, capsys, case, detections=case.gallery_parquet)
    if fragments is None:  # 3-d gallery embeddings: the 4-d queries are then the file refused
        fragments = [str(case.queries), "3-d", "4-d"]
    assert_refused(code, err, case, *fragments)


# ---- the queries and query-context files --------------------------------------------------------
@pytest.mark.parametrize("embeddings, fragments", [
    (np.array([[np.nan, 0, 0, 0]], np.float32), ["array 'embeddings'", "not finite in row 0"]),
    (np.ones((1, 3), np.float32), ["array 'embeddings'", "3-d", "4-d"]),
    (np.ones(4, np.float32), ["array 'embeddings'", "[Q, d]"]),
    (np.array([["a", "b", "c", "d"]]), ["array 'embeddings'", "numeric"]),
    (np.ones((2, 4), np.float32), ["2 query embeddings", "1 queries"]),
])
def test_broken_query_embeddings_are_one_line(job, capsys, case, embeddings, fragments):
    rewrite_npz(case.queries, embeddings=embeddings, query_image_names=None)
    assert_refused(*run(job, capsys, case), case, str(case.queries), *fragments)


def test_query_image_names_of_another_length_are_one_line(job, capsys, case):
    rewrite_npz(case.queries, query_image_names=np.array(["q", "q"]))
    assert_refused(*run(job, capsys, case), case, str(case.queries), "array 'query_image_names'")


def test_a_query_context_that_does_not_fit_is_one_line(job, capsys, case):
    context = query_context_from_detections(case.ann, case.dets, QUERY[None])
    wrong_dim = context.with_embeddings(np.ones((len(context), 3), np.float32)).save(case.tmp / "context.npz")
    code, err = run(job, capsys, case, "--cbgm", "--query-context", str(wrong_dim))
    assert_refused(code, err, case, str(wrong_dim), "3-d", str(case.gallery), "4-d")

    by_image = case.dets.save(case.tmp / "by_image.npz")  # image rows, not query rows
    code, err = run(job, capsys, case, "--cbgm", "--query-context", str(by_image))
    assert_refused(code, err, case, str(by_image), "6 rows", "1 queries")


# ---- flags and model references -----------------------------------------------------------------
@pytest.mark.parametrize("extra, fragments", [
    (["--gallery-sizes", "3", "many"], ["--gallery-sizes", "'many'"]),
    (["--cbgm", "--cbgm-k1", "0"], ["--cbgm-k1", "at least 1"]),
    (["--score-threshold", "nan"], ["--score-threshold", "finite"]),
    (["--example-queries", "-1"], ["--example-queries"]),
    (["--gallery-sizes", "7"], ["TestG7"]),  # known only once the annotations are read
    (["--teacher", "no/such/teacher"], ["--teacher", "'no/such/teacher'", "no such file"]),
])
def test_a_bad_flag_is_one_line_before_anything_runs(job, capsys, case, extra, fragments):
    assert_refused(*run(job, capsys, case, *extra), case, *fragments)


def test_no_arrays_and_no_model_is_one_line(job, capsys, case):
    code = job.main(["--dataset", "cuhk_sysu", "--data-root", str(case.tmp), "--detections", str(case.gallery),
                     "--output-dir", str(case.out)])
    assert_refused(code, capsys.readouterr().err, case, "--model", "--queries")


@pytest.mark.parametrize("ref", ["no/such/checkpoint", "models:x not a uri", "1234"])
def test_a_model_reference_naming_nothing_is_one_line_before_ray(job, capsys, case, ref):
    code = job.main(["--dataset", "cuhk_sysu", "--data-root", str(case.tmp), "--model", ref,
                     "--output-dir", str(case.out)])
    assert_refused(code, capsys.readouterr().err, case, "--model", repr(ref))


def test_a_folder_holding_no_model_is_one_line_before_ray(job, capsys, case, monkeypatch):
    import dkd_ray.train.runner

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a model reference that names no model")

    monkeypatch.setattr(dkd_ray.train.runner, "init_ray", no_ray)
    empty = case.tmp / "empty-folder"
    empty.mkdir()
    code = job.main(["--dataset", "cuhk_sysu", "--data-root", str(case.tmp), "--model", str(empty),
                     "--output-dir", str(case.out)])
    assert_refused(code, capsys.readouterr().err, case, str(empty), "holds no model")


def test_the_job_as_a_process_writes_only_the_error_line_to_stderr(tiny_cuhk, tmp_path):
    """Really run: logging (the annotations' own warnings too) must not reach stderr."""
    from dkd_ray.data import load_annotations

    ann = load_annotations("cuhk_sysu", tiny_cuhk)
    names = ann.images.name
    test_rows = ann.images.indices("test")
    rng = np.random.default_rng(0)
    offsets = ann.images.box_offsets
    boxes = [ann.images.boxes[offsets[i]:offsets[i + 1]] for i in test_rows]  # detected = annotated
    embeddings = [rng.standard_normal((len(b), 8)).astype(np.float32) for b in boxes]
    embeddings[next(k for k, b in enumerate(boxes) if len(b))][0, 3] = np.nan
    gallery = Detections.from_lists(list(test_rows), boxes, [np.full(len(b), 0.9) for b in boxes], embeddings,
                                    num_images=len(names), dim=8)
    gallery_path = gallery.save(tmp_path / "gallery.npz", image_names=names)
    queries_path = save_query_embeddings(tmp_path / "queries.npz", np.ones((len(ann.queries), 8), np.float32),
                                         names[ann.queries.image_index])
    out = tmp_path / "eval"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--dataset", "cuhk_sysu", "--data-root", str(tiny_cuhk),
         "--detections", str(gallery_path), "--queries", str(queries_path), "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert str(gallery_path) in result.stderr and "array 'embeddings'" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists()


# ---- the evaluator ------------------------------------------------------------------------------
def test_arrays_error_is_bad_input_a_value_error_and_pickles():
    error = ArraysError("x.npz: array 'boxes' row 3 ...")
    assert isinstance(error, InputError) and isinstance(error, ValueError)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is ArraysError and str(back) == str(error)


def test_the_evaluator_refuses_a_nan_similarity():
    ann, dets = cuhk_case()
    broken = dets.with_embeddings(edited(dets, "embeddings", (4, 0), np.nan))
    # Without the check this NaN reaches the search as a similarity.
    assert np.isnan(broken.embeddings @ QUERY).sum() == 1
    with pytest.raises(ArraysError, match=r"gallery embeddings .*gallery row 4 \(image row 2\) is not finite"):
        evaluate_search(ann, broken, QUERY[None])
    with pytest.raises(ArraysError, match="query embeddings: query 0 is not finite"):
        evaluate_search(ann, dets, np.array([[np.inf, 0, 0, 0]], np.float32))


def test_the_evaluator_refuses_similarities_that_overflow_float32():
    ann, dets = cuhk_case()
    huge = dets.with_embeddings(dets.embeddings * np.float32(1e20))
    query = QUERY[None] * np.float32(1e20)
    with np.errstate(over="ignore"):
        assert not np.isfinite(huge.embeddings @ query[0]).all()  # finite inputs, inf similarities
    with pytest.raises(ArraysError, match="overflow"):
        evaluate_search(ann, huge, query)


def test_only_compared_embeddings_must_be_finite_and_metrics_stay_finite():
    ann, dets = cuhk_case()
    # Row 8 is in a training image, never searched: its NaN changes nothing.
    broken = dets.with_embeddings(edited(dets, "embeddings", 8, np.nan))
    metrics = evaluate_search(ann, broken, QUERY[None]).metrics
    assert metrics == evaluate_search(ann, dets, QUERY[None]).metrics
    assert all(np.isfinite(v) for v in metrics.values())


def test_the_evaluator_refuses_a_nan_query_context():
    ann, dets = cuhk_case()
    context = query_context_from_detections(ann, dets, QUERY[None])
    broken = context.with_embeddings(edited(context, "embeddings", (0, 2), np.nan))
    with pytest.raises(ArraysError, match=r"query context embeddings: context row 0 \(query 0\)"):
        evaluate_search(ann, dets, QUERY[None], cbgm=CBGMConfig(2, 2), query_context=broken)
