"""Bad datasets never cost a run: each test breaks a copy of the synthetic generator's output
and checks that validation says so (not OK, naming the file and row), that the readers and the
cache raise a DatasetError rather than pass bad values on or crash, and the job's exit status."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from tests.test_cache import ParseCounter
from tests.test_readers import write_jpeg
from tests.test_validate import load_job

from dkd_ray.data import (DatasetError, cache, cuhk_sysu, load_annotations, parse_cuhk_sysu,
                          parse_prw)
from dkd_ray.data.validate import validate_dataset

FOLDERS = {"cuhk_sysu": "CUHK-SYSU", "prw": "PRW"}
TRAIN_MAT = "annotation/test/train_test/Train.mat"
TESTG5 = "annotation/test/train_test/TestG5.mat"  # the tiny preset's protocols: TestG5, TestG10
TESTG10 = "annotation/test/train_test/TestG10.mat"
IS_ROOT = os.geteuid() == 0  # root ignores permission bits


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    from dkd_ray.data.synthetic import generate

    base = tmp_path_factory.mktemp("generated")
    for layout, folder in FOLDERS.items():
        generate(base / folder, layout, "tiny", seed=0)
    return base


@pytest.fixture
def copy(generated, tmp_path):
    """``copy(layout)``: a fresh copy of the generated folder, to break."""
    def make(layout: str) -> Path:
        return Path(shutil.copytree(generated / FOLDERS[layout], tmp_path / FOLDERS[layout],
                                    symlinks=True, ignore=shutil.ignore_patterns(".dkd_cache")))
    return make


def validate(layout, root, **kwargs):
    kwargs.setdefault("check_images", False)
    return validate_dataset(layout, root, workers=1, **kwargs)


def errors_at(report, file, where=None, text=""):
    return [p for p in report.errors if p.file == file and text in p.message
            and (where is None or p.where == where)]


def edit_query_lines(root: Path, edit) -> None:
    path = root / "query_info.txt"
    lines = path.read_text().splitlines()
    path.write_text("".join(edit(i, line.split()) + "\n" for i, line in enumerate(lines)))


def train_frames(root: Path) -> list[str]:
    images = parse_prw(root).images
    return list(images.name[images.split == "train"])


def edit_frame(root: Path, name: str, edit) -> None:
    """Rewrite ``annotations/<name>.mat`` under its own key: ``edit(matrix [M, 5]) -> matrix``."""
    path = root / "annotations" / f"{name}.mat"
    [(key, matrix)] = [(k, v) for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")]
    scipy.io.savemat(path, {key: edit(np.array(matrix, dtype=np.float64))})


def load_struct(path: Path, variable: str) -> np.ndarray:
    return scipy.io.loadmat(path)[variable]


def test_untouched_copies_validate(copy):
    """The baseline every other test breaks: OK with the default checks."""
    for layout in FOLDERS:
        report = validate(layout, copy(layout), check_images=True)
        assert report.ok, report.errors


# --- 1. Non-finite values are refused at the edge ------------------------------------------------

@pytest.mark.parametrize("column,value", [(1, "nan"), (3, "inf"), (0, "-inf")])
def test_non_finite_prw_query_line_is_refused(copy, column, value):
    root = copy("prw")
    edit_query_lines(root, lambda i, f: " ".join(
        value if (i == 1 and c == column) else v for c, v in enumerate(f)))
    report = validate("prw", root)
    [problem] = errors_at(report, "query_info.txt", "line 2", "non-finite")
    assert problem.fatal and not report.ok
    with pytest.raises(DatasetError, match=r"query_info\.txt: line 2: non-finite"):
        parse_prw(root)
    with pytest.raises(DatasetError, match=r"line 2: non-finite"):  # the cache neither
        load_annotations("prw", root, cache_dir=root.parent / "cache")


def test_non_finite_prw_frame_box_is_dropped(copy):
    root = copy("prw")
    frame = train_frames(root)[0]
    before = parse_prw(root)

    def nan_width(matrix):
        matrix[0, 3] = np.nan  # [pid x y w h]: w of row 1
        return matrix

    edit_frame(root, frame, nan_width)
    for box_rule in ("exact", "seqnet"):
        report = validate("prw", root, box_rule=box_rule)
        [problem] = errors_at(report, f"annotations/{frame}.mat", text="non-finite")
        assert problem.where.endswith(" row 1") and "box dropped" in problem.message
        parsed = parse_prw(root, box_rule=box_rule)
        assert np.isfinite(parsed.images.boxes).all()
    assert len(parsed.images.boxes) == len(before.images.boxes) - 1


def test_non_finite_cuhk_boxes(copy):
    root = copy("cuhk_sysu")
    images = load_struct(root / "annotation/Images.mat", "Img")
    images[0, 0]["box"][0, 1]["idlocate"][0, 2] = np.nan
    scipy.io.savemat(root / "annotation/Images.mat", {"Img": images})
    report = validate("cuhk_sysu", root)
    [problem] = errors_at(report, "annotation/Images.mat", "Img(1).box(2).idlocate", "non-finite")
    assert "box dropped" in problem.message
    assert np.isfinite(parse_cuhk_sysu(root).images.boxes).all()

    # a query box cannot be dropped (the protocols share one query list): refused
    protocol = load_struct(root / TESTG5, "TestG5")
    protocol[0, 2]["Query"][0, 0]["idlocate"][0, 3] = np.nan
    scipy.io.savemat(root / TESTG5, {"TestG5": protocol})
    report = validate("cuhk_sysu", root)
    [query] = errors_at(report, TESTG5, text="TestG5(3).Query.idlocate: non-finite")
    assert query.fatal
    with pytest.raises(DatasetError, match=r"TestG5\.mat: TestG5\(3\)\.Query\.idlocate: "
                                           "non-finite"):
        load_annotations("cuhk_sysu", root, cache_dir=root.parent / "cache")


def test_non_finite_cuhk_gallery_positive_is_ignored(copy):
    root = copy("cuhk_sysu")
    protocol = load_struct(root / TESTG10, "TestG10")
    positive = next(g for g in range(10) if protocol[0, 0]["Gallery"][0, g]["idlocate"].size)
    protocol[0, 0]["Gallery"][0, positive]["idlocate"][0, 0] = np.inf
    scipy.io.savemat(root / TESTG10, {"TestG10": protocol})
    report = validate("cuhk_sysu", root)
    [problem] = errors_at(report, TESTG10, f"TestG10(1).Gallery({positive + 1})", "non-finite")
    assert "positive ignored" in problem.message
    assert np.isfinite(parse_cuhk_sysu(root).galleries[10].positive_box).all()


# --- 2. Validation means what it says -------------------------------------------------------------

def test_no_images(copy):
    root = copy("prw")
    empty = np.empty((0, 1), dtype=object)
    for split in ("train", "test"):
        scipy.io.savemat(root / f"frame_{split}.mat", {f"img_index_{split}": empty})
    (root / "query_info.txt").write_text("")
    report = validate("prw", root)
    assert errors_at(report, "frame_train.mat", "img_index_train", "no frames listed")
    with pytest.raises(DatasetError, match=r"frame_train\.mat: img_index_train: no frames listed"):
        parse_prw(root)

    root = copy("cuhk_sysu")
    scipy.io.savemat(root / "annotation/Images.mat", {"Img": np.zeros(
        (1, 0), dtype=[("imname", object), ("nAppear", object), ("box", object)])})
    report = validate("cuhk_sysu", root)
    assert errors_at(report, "annotation/Images.mat", "Img", "no images listed")


def test_k_zero_training_identities(copy):
    root = copy("cuhk_sysu")
    scipy.io.savemat(root / TRAIN_MAT, {"Train": np.empty((0, 1), dtype=object)})
    report = validate("cuhk_sysu", root)
    [problem] = errors_at(report, TRAIN_MAT, "Train", "K = 0 training identities")
    assert report.summary["training identities (K)"] == 0

    root = copy("prw")
    for frame in train_frames(root):
        edit_frame(root, frame, lambda m: np.column_stack([np.full(len(m), -2.0), m[:, 1:]]))
    report = validate("prw", root)
    assert errors_at(report, "frame_train.mat", "img_index_train", "K = 0 training identities")


def test_empty_query_list(copy):
    root = copy("prw")
    (root / "query_info.txt").write_text("\n")
    report = validate("prw", root)
    assert errors_at(report, "query_info.txt", "", "no queries")

    root = copy("cuhk_sysu")
    for file, variable in ((TESTG5, "TestG5"), (TESTG10, "TestG10")):
        scipy.io.savemat(root / file, {variable: np.zeros(
            (1, 0), dtype=[("Query", object), ("Gallery", object)])})
    report = validate("cuhk_sysu", root)
    assert errors_at(report, TESTG5, "TestG5", "no queries")


def test_no_query_with_a_gallery_match(copy):
    root = copy("prw")  # every query names a person annotated nowhere else
    edit_query_lines(root, lambda i, f: " ".join([str(90000 + i), *f[1:]]))
    report = validate("prw", root)
    assert errors_at(report, "query_info.txt", "", "no gallery match")

    root = copy("cuhk_sysu")  # every gallery entry a negative
    for file, variable, size in ((TESTG5, "TestG5", 5), (TESTG10, "TestG10", 10)):
        protocol = load_struct(root / file, variable)
        for q in range(protocol.shape[1]):
            for g in range(size):
                protocol[0, q]["Gallery"][0, g]["idlocate"] = np.zeros((0, 0))
        scipy.io.savemat(root / file, {variable: protocol})
    report = validate("cuhk_sysu", root)
    assert errors_at(report, TESTG5, "TestG5", "none of the 8 queries has a gallery positive")
    assert errors_at(report, TESTG10, "TestG10", "gallery positive")


def test_too_few_identities_for_the_pk_batch(copy):
    root = copy("cuhk_sysu")  # 12 training identities, 2-4 boxes each
    assert validate("cuhk_sysu", root, min_identities=12).ok
    report = validate("cuhk_sysu", root, min_identities=13)
    [problem] = errors_at(report, TRAIN_MAT, "Train", "needs 13 such identities")
    assert "only 12 of the K = 12" in problem.message
    train = load_struct(root / TRAIN_MAT, "Train")
    scipy.io.savemat(root / TRAIN_MAT, {"Train": train[:1]})  # one identity left
    report = validate("cuhk_sysu", root)  # the default: two identities with two boxes
    assert errors_at(report, TRAIN_MAT, "Train", "only 1 of the K = 1 training identities")
    job = load_job()
    assert job.main(["--dataset", "cuhk_sysu", "--data-root", str(root), "--quiet",
                     "--no-images"]) == 1
    assert job.main(["--dataset", "cuhk_sysu", "--data-root", str(root), "--quiet",
                     "--no-images", "--min-identities", "0"]) == 0


# --- Folder shapes: errors naming the path, never a traceback -------------------------------------

def make_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside.txt").write_text("a folder where a file should be")


def make_file(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("a file where a folder should be")


@pytest.mark.parametrize("layout,path", [
    ("cuhk_sysu", "annotation/Images.mat"),
    ("cuhk_sysu", TESTG10),
    ("prw", "query_info.txt"),
    ("prw", "frame_test.mat"),
    ("prw", "annotations/{train}.mat"),
])
def test_folder_where_a_file_should_be(copy, layout, path):
    root = copy(layout)
    path = path.format(train=train_frames(root)[0] if layout == "prw" else "")
    make_folder(root / path)
    report = validate(layout, root)
    assert errors_at(report, path, text="a folder where a file should be"), report.errors
    # the cache hashes the sources first: a folder there must reach the readers' error
    with pytest.raises(DatasetError, match="a folder where a file should be"):
        load_annotations(layout, root, cache_dir=root.parent / "cache")


@pytest.mark.parametrize("layout,path", [
    ("cuhk_sysu", "annotation/test/train_test"),
    ("cuhk_sysu", "annotation"),
    ("cuhk_sysu", "Image/SSM"),
    ("prw", "frames"),
    ("prw", "annotations"),
])
def test_file_where_a_folder_should_be(copy, layout, path):
    root = copy(layout)
    make_file(root / path)
    report = validate(layout, root, check_images=True)
    [problem] = errors_at(report, path, text="a file where a folder should be")
    assert problem.fatal and len(report.errors) == 1, report.errors  # one line, not one per file
    with pytest.raises(DatasetError, match="a file where a folder should be"):
        load_annotations(layout, root, cache_dir=root.parent / "cache")


def test_symlink_loops(copy):
    root = copy("cuhk_sysu")
    pool = root / "annotation/pool.mat"
    pool.unlink()
    os.symlink("pool-again.mat", pool)
    os.symlink("pool.mat", root / "annotation/pool-again.mat")
    report = validate("cuhk_sysu", root)
    assert errors_at(report, "annotation/pool.mat", text="symbolic link loop")
    with pytest.raises(DatasetError, match=r"pool\.mat: a symbolic link loop"):
        load_annotations("cuhk_sysu", root, cache_dir=root.parent / "cache")

    root = copy("prw")  # a frame: the readers, the full decode and the cache key stat it
    frame = train_frames(root)[0]
    (root / "frames" / frame).unlink()
    os.symlink(f"{frame}.loop", root / "frames" / frame)
    os.symlink(frame, root / "frames" / f"{frame}.loop")
    report = validate("prw", root, check_images=True)
    [problem] = errors_at(report, f"frames/{frame}", text="symbolic link loop")
    assert len(report.errors) == 1
    annotations = load_annotations("prw", root, cache_dir=root.parent / "cache")
    assert annotations.images.width[list(annotations.images.name).index(frame)] == 0


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their permissions")
def test_permission_denied(copy):
    root = copy("cuhk_sysu")
    locked = [root / "annotation/pool.mat", root / "Image/SSM/s1.jpg"]
    try:
        for path in locked:
            path.chmod(0)
        report = validate("cuhk_sysu", root)
        assert errors_at(report, "annotation/pool.mat", text="permission denied")
        with pytest.raises(DatasetError, match=r"pool\.mat: permission denied"):
            load_annotations("cuhk_sysu", root, cache_dir=root.parent / "cache")
        locked[0].chmod(0o644)
        report = validate("cuhk_sysu", root, check_images=True)
        [problem] = errors_at(report, "Image/SSM/s1.jpg", text="permission denied")
        assert len(report.errors) == 1
    finally:
        for path in locked:
            path.chmod(0o644)


# --- 3. The cache ---------------------------------------------------------------------------------

def test_cache_kept_when_untouched_invalidated_by_a_replaced_image(copy, monkeypatch):
    root = copy("cuhk_sysu")
    cache_dir = root.parent / "cache"
    counter = ParseCounter(monkeypatch, cuhk_sysu, "parse_cuhk_sysu")
    first = load_annotations("cuhk_sysu", root, cache_dir=cache_dir)
    load_annotations("cuhk_sysu", root, cache_dir=cache_dir)
    assert counter.calls == 1  # untouched: served from the cache

    i = 0
    width, height = int(first.images.width[i]), int(first.images.height[i])
    write_jpeg(root / first.images.path[i], width + 64, height + 48)  # same name, new size
    replaced = load_annotations("cuhk_sysu", root, cache_dir=cache_dir)
    assert counter.calls == 2
    assert (replaced.images.width[i], replaced.images.height[i]) == (width + 64, height + 48)
    load_annotations("cuhk_sysu", root, cache_dir=cache_dir)
    assert counter.calls == 2  # and the new entry is kept in turn


def test_unwritable_cache_location_falls_back(copy, tmp_path, monkeypatch, caplog):
    root = copy("prw")
    # Root ignores permission bits, so a file stands where each cache folder would go (fails for
    # everyone); other users also get a read-only dataset folder and home.
    (root / ".dkd_cache").write_text("")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".cache").write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    if not IS_ROOT:
        root.chmod(0o555)
        home.chmod(0o555)
    try:
        from dkd_ray.data import prw

        counter = ParseCounter(monkeypatch, prw, "parse_prw")
        with caplog.at_level(logging.WARNING, logger="dkd_ray.data.cache"):
            load_annotations("prw", root)
            load_annotations("prw", root)
        fallbacks = [r for r in caplog.records if r.name == "dkd_ray.data.cache"]
        assert len(fallbacks) == 1 and "dkd-ray-cache" in fallbacks[0].getMessage()
        assert counter.calls == 1  # the fallback folder caches like any other
        [entry] = (tmp_path / "tmp" / "dkd-ray-cache").glob("*/prw-*")
        assert cache.default_cache_dir(root) == entry.parent
        # an explicit cache folder that cannot be made falls back the same way
        load_annotations("prw", root, cache_dir=home / ".cache" / "dkd_ray")
        assert counter.calls == 1
    finally:
        root.chmod(0o755)
        home.chmod(0o755)


# --- The job --------------------------------------------------------------------------------------

def test_job_exit_status_for_a_bad_dataset_and_a_bad_argument(copy, tmp_path, capsys):
    job = load_job()
    root = copy("prw")
    edit_query_lines(root, lambda i, f: " ".join(["nan" if c == 2 and i == 0 else v
                                                  for c, v in enumerate(f)]))
    assert job.main(["--dataset", "prw", "--data-root", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "ERROR query_info.txt:line 1: non-finite value" in out
    assert "OK: training can start" not in out and "FAILED: 1 errors" in out

    assert job.main(["--dataset", "prw", "--data-root", str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: --data-root {tmp_path / 'missing'} is not a "
                                         "folder"]
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--dataset", "prw", "--data-root", str(root), "--min-identities", "-1"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: argument --min-identities")
