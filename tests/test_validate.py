"""Validation finds each planted problem and names its file (and row); the job's exit status."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dkd_ray.data.validate import validate_dataset
from tests.test_readers import (
    CUHK_IMAGES,
    CUHK_QUERIES,
    PRW_FRAMES,
    PRW_QUERIES,
    write_cuhk_sysu,
    write_prw,
)

JOB = Path(__file__).resolve().parent.parent / "jobs" / "validate_dataset.py"


def load_job():
    spec = importlib.util.spec_from_file_location("validate_dataset_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find(report, severity, file, text, where=None):
    return [p for p in report.problems if p.severity == severity and p.file == file
            and text in p.message and (where is None or p.where == where)]


@pytest.fixture(scope="module")
def broken_cuhk(tmp_path_factory):
    images = dict(CUHK_IMAGES, **{"s8.jpg": (100, 80, [[200, 200, 10, 10], [10, 10, 10, 10]])})
    (q1, gallery1), second = CUHK_QUERIES
    queries = [(q1, [("s5.jpg", [100, 60, 10, 10]), *gallery1[1:]]), second]
    root = write_cuhk_sysu(tmp_path_factory.mktemp("cuhk"), images=images, queries=queries)
    ssm = root / "Image" / "SSM"
    (ssm / "s3.jpg").unlink()  # missing
    (ssm / "s4.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 20)  # corrupt
    noise = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(noise).save(ssm / "s5.jpg", quality=95)
    data = (ssm / "s5.jpg").read_bytes()
    (ssm / "s5.jpg").write_bytes(data[: len(data) // 2])  # truncated
    Image.new("L", (120, 90), 128).save(ssm / "s6.jpg")  # grayscale
    return root


def test_cuhk_planted_problems_are_all_found(broken_cuhk):
    # min_identities=1: of the fixture's training identities only p10 has two boxes
    report = validate_dataset("cuhk_sysu", broken_cuhk, workers=2, min_identities=1)
    assert find(report, "error", "Image/SSM/s3.jpg", "missing image")
    assert find(report, "error", "Image/SSM/s4.jpg", "does not decode")
    assert find(report, "error", "Image/SSM/s5.jpg", "truncated")
    assert find(report, "warning", "Image/SSM/s6.jpg", "mode is L")
    images_mat = "annotation/Images.mat"
    assert find(report, "warning", images_mat, "zero-area", where="Img(1).box(3)")
    assert find(report, "warning", images_mat, "clipped", where="Img(2).box(2)")
    assert find(report, "warning", images_mat, "outside", where="Img(8).box(1)")
    for size in (2, 3):
        assert find(report, "warning", f"annotation/test/train_test/TestG{size}.mat",
                    "gallery positive box [100.0, 60.0, 10.0, 10.0] matches no annotated box",
                    where=f"TestG{size}(1).Gallery(1)")
    assert find(report, "warning", "annotation/test/train_test/Train.mat", "matches no",
                where="Train{3}.scene(1)")
    assert len(report.errors) == 3  # exactly the three image files, nothing spurious
    assert not report.ok
    assert report.summary["train images"] == 4 and report.summary["test images"] == 4
    assert report.summary["queries"] == 2
    assert report.summary["gallery protocols"] == "TestG2, TestG3"


def test_truncated_mat_is_an_error_naming_the_file(tmp_path):
    root = write_cuhk_sysu(tmp_path, jpegs=False)
    train = root / "annotation/test/train_test/Train.mat"
    train.write_bytes(train.read_bytes()[:200])
    report = validate_dataset("cuhk_sysu", root, check_images=False)
    [problem] = [p for p in report.errors if p.file.endswith(".mat")]
    assert problem.file == "annotation/test/train_test/Train.mat" and problem.fatal
    assert "not a readable MATLAB file" in problem.message


def test_missing_field_is_named(tmp_path):
    root = write_cuhk_sysu(tmp_path, jpegs=False)
    train = root / "annotation/test/train_test/Train.mat"
    mat = scipy.io.loadmat(train)["Train"]
    for cell in mat.ravel():
        cell.dtype.names = ("idname", "nAppear", "scenes")
    scipy.io.savemat(train, {"Train": mat})
    report = validate_dataset("cuhk_sysu", root, check_images=False)
    [problem] = [p for p in report.errors if p.file.endswith(".mat")]
    assert problem.file == "annotation/test/train_test/Train.mat"
    assert "Train{1} has no field 'scene' (fields found: idname, nAppear, scenes)" in \
        problem.message


@pytest.fixture(scope="module")
def broken_prw(tmp_path_factory):
    root = write_prw(tmp_path_factory.mktemp("prw"),
                     queries=[*PRW_QUERIES, "100 1 1 5 5 c3s2_000003"])
    annotations = root / "annotations"
    _, key, rows = PRW_FRAMES["c1s1_000001.jpg"]
    scipy.io.savemat(annotations / "c1s1_000001.jpg.mat",
                     {key: np.array(rows, dtype=float), "comment": "checked"})  # unknown key
    truncated = annotations / "c6s1_000004.jpg.mat"
    truncated.write_bytes(truncated.read_bytes()[:150])
    stems = np.empty((3, 1), dtype=object)
    stems[:, 0] = ["c3s2_000003", "c6s1_000004", "c1s1_000001"]  # c1s1 is a training frame
    scipy.io.savemat(root / "frame_test.mat", {"img_index_test": stems})
    return root


def test_prw_planted_problems_are_all_found(broken_prw):
    report = validate_dataset("prw", broken_prw, workers=1)
    assert find(report, "warning", "annotations/c1s1_000001.jpg.mat", "unknown key 'comment'")
    [truncated] = find(report, "error", "annotations/c6s1_000004.jpg.mat", "not a readable")
    assert truncated.fatal
    assert find(report, "error", "frame_test.mat", "duplicate frame 'c1s1_000001.jpg'",
                where="img_index_test{3}")
    assert find(report, "warning", "query_info.txt", "matches no annotated box", where="line 3")
    assert find(report, "warning", "annotations/c2s1_000002.jpg.mat", "zero-area",
                where="anno_file row 2")
    assert find(report, "warning", "annotations/c1s1_000001.jpg.mat", "clipped",
                where="box_new row 3")
    assert len(report.errors) == 2
    assert report.summary["cameras"] == "1, 2, 3, 6"


def test_job_exit_status_and_output(broken_cuhk, tmp_path, capsys):
    job = load_job()
    assert job.main(["--dataset", "cuhk_sysu", "--data-root", str(broken_cuhk), "--quiet",
                     "--min-identities", "1"]) == 1
    out = capsys.readouterr().out
    assert "ERROR Image/SSM/s4.jpg: image does not decode" in out
    assert "WARNING annotation/Images.mat:Img(1).box(3): zero-area box" in out
    assert "FAILED: 3 errors" in out

    clean = write_prw(tmp_path / "prw")  # warnings only (a zero-area box, a clipped box)
    # --min-identities 0: the fixture's training identities have one box each
    assert job.main(["--dataset", "prw", "--data-root", str(clean), "--min-identities", "0"]) == 0
    captured = capsys.readouterr()
    assert "OK: training can start" in captured.out
    assert "train identities: 3" in captured.out and "queries: 2" in captured.out
    assert "[decoding images] 4/4" in captured.err

    with pytest.raises(SystemExit) as exit_info:
        job.main(["--help"])
    assert exit_info.value.code == 0
    assert "--data-root" in capsys.readouterr().out
