"""Files an evaluation writes: metrics.json, per-query results, PNG plots; and jobs/evaluate.py."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dkd_ray.data.annotations import GalleryProtocol
from dkd_ray.eval import evaluate_arrays, save_query_embeddings
from dkd_ray.eval.results import format_metrics_table, read_query_results, write_query_results
from tests.eval_fixtures import QUERY, cuhk_case

REPO = Path(__file__).resolve().parents[1]


def write_images(ann, root: Path) -> None:
    rng = np.random.default_rng(0)
    for rel in ann.images.path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(path, format="JPEG")


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100
        img.verify()


def test_evaluate_arrays_writes_metrics_results_and_plots(tmp_path):
    ann, dets = cuhk_case()
    g3 = ann.galleries[3]
    # TestG4 adds pool image d (N at 0.85) for the gallery-size curve: AP (1 + 2/5)/2 = 0.7.
    ann.galleries[4] = GalleryProtocol(4, np.array([[1, 2, 3, 4]]), g3.positive_query, g3.positive_image,
                                       g3.positive_box)
    ann.root = tmp_path / "CUHK-SYSU"
    write_images(ann, ann.root)
    out = tmp_path / "eval"
    report = evaluate_arrays(ann, dets, QUERY[None], cbgm=True, output_dir=out)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cuhk_sysu/g3/mAP"] == pytest.approx(0.75)
    assert metrics["cuhk_sysu/g4/mAP"] == pytest.approx(0.7)
    assert metrics["cuhk_sysu/full/mAP"] == pytest.approx(0.7)
    assert "cuhk_sysu/cbgm/g3/mAP" in metrics and "det/ap" in metrics and "det/labelled/recall" in metrics

    records = read_query_results(out / "results.jsonl")
    assert {r["protocol"] for r in records} == {"cuhk_sysu/g3", "cuhk_sysu/g4", "cuhk_sysu/full",
                                                 "cuhk_sysu/cbgm/g3", "cuhk_sysu/cbgm/g4", "cuhk_sysu/cbgm/full"}
    g3 = next(r for r in records if r["protocol"] == "cuhk_sysu/g3")
    # 0.9 P (a), 0.8 N (c), 0.7 N (b), 0.6 P (b), 0.3 N (a)
    assert [t["image"] for t in g3["top"]] == ["a", "c", "b", "b", "a"]
    assert [t["correct"] for t in g3["top"]] == [True, False, False, True, False]
    assert g3["top"][0]["box"] == [10.0, 10.0, 60.0, 110.0]
    assert g3["top"][0]["score"] == pytest.approx(0.9, abs=1e-6)
    assert (g3["query_image"], g3["ap"], g3["count_gt"], g3["first_rank"]) == ("q", pytest.approx(0.75), 2, 0)

    for name in ("cmc.png", "gallery_size.png"):
        assert_png(out / name)
    pictures = sorted((out / "queries").glob("query_*.png"))
    assert len(pictures) == 1
    assert_png(pictures[0])
    assert set(report.files) >= {out / "metrics.json", out / "results.jsonl", out / "cmc.png", pictures[0]}


def test_annotation_only_data_skips_query_pictures_with_a_message(tmp_path, caplog):
    ann, dets = cuhk_case()
    ann.root = tmp_path / "no-images"
    with caplog.at_level(logging.WARNING):
        report = evaluate_arrays(ann, dets, QUERY[None], output_dir=tmp_path / "eval")
    assert not (tmp_path / "eval" / "queries").exists()
    assert "not found" in caplog.text and "annotation-only" in caplog.text
    assert_png(tmp_path / "eval" / "cmc.png")
    assert tmp_path / "eval" / "cmc.png" in report.files


def test_parquet_results_file(tmp_path):
    ann, dets = cuhk_case()
    report = evaluate_arrays(ann, dets, QUERY[None])
    path = write_query_results(tmp_path / "r.parquet", report.searches, ann, dets)
    records = read_query_results(path)
    assert len(records) == 2  # one query, two protocols
    assert records[0]["top"][0]["correct"] is True


def test_metrics_table_lists_protocols_and_detection():
    table = format_metrics_table({"cuhk_sysu/g100/mAP": 0.9412, "cuhk_sysu/g100/top1": 0.95,
                                  "cuhk_sysu/g100/top5": 0.98, "cuhk_sysu/g100/top10": 0.99,
                                  "cuhk_sysu/g100/num_queries": 2900.0, "det/ap": 0.8, "det/recall": 0.9})
    assert "cuhk_sysu/g100" in table and "94.12%" in table and "2900" in table
    assert "detection (all people)" in table and "80.00%" in table


# ---- jobs/evaluate.py -----------------------------------------------------------------------------
def load_job():
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_job().main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--detections" in out and "--cbgm" in out and "--output-dir" in out


def test_job_evaluates_saved_arrays(tmp_path, monkeypatch, capsys):
    import dkd_ray.data

    ann, dets = cuhk_case()
    loaded = []
    monkeypatch.setattr(dkd_ray.data, "load_annotations",
                        lambda dataset, root, **kw: loaded.append((dataset, root)) or ann, raising=False)
    names = ann.images.name
    dets_path = dets.save(tmp_path / "gallery.parquet", image_names=names)
    queries_path = save_query_embeddings(tmp_path / "queries.npz", QUERY[None], names[ann.queries.image_index])
    out = tmp_path / "eval"
    code = load_job().main(["--dataset", "cuhk_sysu", "--data-root", str(tmp_path / "CUHK-SYSU"),
                            "--detections", str(dets_path), "--queries", str(queries_path),
                            "--cbgm", "--gallery-sizes", "3", "--output-dir", str(out), "--no-plots"])
    assert code == 0
    assert loaded == [("cuhk_sysu", tmp_path / "CUHK-SYSU")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cuhk_sysu/g3/mAP"] == pytest.approx(0.75)
    assert "cuhk_sysu/full/mAP" not in metrics and "cuhk_sysu/cbgm/g3/mAP" in metrics
    assert "cuhk_sysu/g3" in capsys.readouterr().out
    assert (out / "results.jsonl").is_file() and not (out / "cmc.png").exists()


def test_job_reports_a_bad_file_clearly(tmp_path, monkeypatch, capsys):
    import dkd_ray.data

    ann, _ = cuhk_case()
    monkeypatch.setattr(dkd_ray.data, "load_annotations", lambda dataset, root, **kw: ann, raising=False)
    code = load_job().main(["--dataset", "cuhk_sysu", "--data-root", str(tmp_path),
                            "--detections", str(tmp_path / "missing.npz"), "--queries", str(tmp_path / "q.npz")])
    assert code == 2
    assert "missing.npz" in capsys.readouterr().err
