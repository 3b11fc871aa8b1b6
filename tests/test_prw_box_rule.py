"""``data.box_rule``: PRW boxes read exactly (default) or as SeqNet/COAT read them (``seqnet``).

SeqNet's ``datasets/prw.py``: annotated boxes ``clip(xywh, 0) -> x2 = x + w, y2 = y + h ->
astype(int32)``, zero-area boxes kept, no clipping to the frame; queries ``astype(int32)`` of
``[x, y, x + w, y + h]`` first, then ``clip(0)``. Expected values below are worked out by hand.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from tests.test_cache import assert_same_annotations
from tests.test_readers import boxes_by_name, write_prw

from dkd_ray.config import Config, ConfigError
from dkd_ray.data import load_annotations, parse_prw
from dkd_ray.data.validate import ValidationReport, validate_dataset

# Frames are 100x80 (tests.test_readers.PRW_SIZE).
FRAMES = {
    "c1s1_000001.jpg": ("train", "box_new", [
        [5, -3.6, 10.2, 20.5, 40.7],  # starts left of the frame
        [-2, 60, -5.5, 20.9, 30.2],  # starts above the frame
        [-2, 30, 30, 0.4, 10],  # 0.4 wide: a box in exact, zero-area once truncated (seqnet)
        [7, 50, 20, 0, 10],  # zero-area as annotated
        [7, 10, 10, 20, 30],
    ]),
    "c2s1_000002.jpg": ("test", "anno_file", [
        [100, -3.6, 10.2, 20.5, 40.7],
        [-2, 40, 20, 0, 15],  # zero-area
        [101, 90.5, 60.2, 20, 30],  # runs past the right and bottom edges
    ]),
    "c3s1_000003.jpg": ("test", "anno_previous", [[101, 20, 20, 30, 40]]),
}
QUERIES = ["100 -3.6 10.2 20.5 40.7 c2s1_000002", "101 90.5 60.2 20 30 c2s1_000002"]


@pytest.fixture
def root(tmp_path):
    return write_prw(tmp_path / "PRW", frames=FRAMES, queries=QUERIES)


def parsed(root, box_rule):
    report = ValidationReport("prw", root)
    return parse_prw(root, report=report, box_rule=box_rule), report


def test_exact_is_the_default_reading(root):
    default, _ = parsed(root, "exact")
    assert_same_annotations(default, parse_prw(root))
    boxes, pids = boxes_by_name(default, "c1s1_000001.jpg")
    # convert, then clip to the 100x80 frame; the 0-wide box is dropped
    np.testing.assert_allclose(boxes, [[0, 10.2, 16.9, 50.9], [60, 0, 80.9, 24.7],
                                       [30, 30, 30.4, 40], [10, 10, 30, 40]], atol=1e-4)
    assert pids.tolist() == [0, -1, -1, 1]  # 5 -> 0, 7 -> 1
    boxes, pids = boxes_by_name(default, "c2s1_000002.jpg")
    np.testing.assert_allclose(boxes, [[0, 10.2, 16.9, 50.9], [90.5, 60.2, 100, 80]], atol=1e-4)
    assert pids.tolist() == [100, 101]


def test_seqnet_clamps_then_adds_then_truncates(root):
    annotations, report = parsed(root, "seqnet")
    boxes, pids = boxes_by_name(annotations, "c1s1_000001.jpg")
    # [-3.6 10.2 20.5 40.7] -> clamp [0 10.2 20.5 40.7] -> add [0 10.2 20.5 50.9] -> int
    # [60 -5.5 20.9 30.2] -> [60 0 20.9 30.2] -> [60 0 80.9 30.2] -> int (h not shortened)
    # the 0.4-wide box becomes [30 30 30 40]: zero-area, dropped from the training split
    np.testing.assert_array_equal(boxes, [[0, 10, 20, 50], [60, 0, 80, 30], [10, 10, 30, 40]])
    assert boxes.dtype == np.float32
    assert pids.tolist() == [0, -1, 1]  # -2 (SeqNet's 5555) is unlabelled, as in exact
    assert annotations.num_train_ids == 2
    dropped = [p for p in report.warnings if "dropped from the training split" in p.message]
    assert [(p.file, p.where) for p in dropped] == [
        ("annotations/c1s1_000001.jpg.mat", "box_new row 3"),
        ("annotations/c1s1_000001.jpg.mat", "box_new row 4")]


def test_seqnet_keeps_zero_area_and_out_of_frame_test_boxes(root):
    exact, _ = parsed(root, "exact")
    seqnet, report = parsed(root, "seqnet")
    assert len(boxes_by_name(exact, "c2s1_000002.jpg")[0]) == 2  # zero-area dropped
    boxes, pids = boxes_by_name(seqnet, "c2s1_000002.jpg")
    # the zero-area box stays; the last one is not clipped to the 100x80 frame
    np.testing.assert_array_equal(boxes, [[0, 10, 20, 50], [40, 20, 40, 35], [90, 60, 110, 90]])
    assert pids.tolist() == [100, -1, 101]
    assert any(p.where == "anno_file row 2" and "kept: box_rule=seqnet" in p.message
               for p in report.warnings)
    assert any(p.where == "anno_file row 3" and "not clipped to the frame" in p.message
               for p in report.warnings)


def test_queries_in_both_rules(root):
    exact, exact_report = parsed(root, "exact")
    seqnet, seqnet_report = parsed(root, "seqnet")
    # exact: [-3.6 10.2 16.9 50.9] clipped to the frame
    np.testing.assert_allclose(exact.queries.box, [[0, 10.2, 16.9, 50.9], [90.5, 60.2, 100, 80]],
                               atol=1e-4)
    # seqnet: int([-3.6 10.2 16.9 50.9]) = [-3 10 16 50] (toward zero), then clamped at 0, so
    # x2 = 16 where the same person's gallery box has x2 = 20; [90.5 60.2 110.5 90.2] -> int
    np.testing.assert_array_equal(seqnet.queries.box, [[0, 10, 16, 50], [90, 60, 110, 90]])
    assert not np.signbit(seqnet.queries.box).any()
    for annotations in (exact, seqnet):
        assert annotations.queries.pid.tolist() == [100, 101]
        assert annotations.queries.image_index.tolist() == [1, 1]
    for report in (exact_report, seqnet_report):  # matched to the annotated boxes either way
        assert not any("query" in p.message for p in report.problems)


def test_cache_keys_on_the_rule(root, tmp_path):
    cache_dir = tmp_path / "cache"
    exact = load_annotations("prw", root, cache_dir=cache_dir)
    seqnet = load_annotations("prw", root, cache_dir=cache_dir, box_rule="seqnet")
    entries = sorted(p for p in cache_dir.iterdir() if p.is_dir() and p.name.startswith("prw-"))
    assert len(entries) == 2
    assert sorted((e / "meta.json").read_text().count('"seqnet"') for e in entries) == [0, 1]
    assert not np.array_equal(exact.queries.box, seqnet.queries.box)
    # served from the cache, each rule gets its own table back
    assert_same_annotations(load_annotations("prw", root, cache_dir=cache_dir), parse_prw(root))
    assert_same_annotations(load_annotations("prw", root, cache_dir=cache_dir, box_rule="seqnet"),
                            parse_prw(root, box_rule="seqnet"))
    with pytest.raises(ValueError, match="box_rule"):
        load_annotations("prw", root, cache_dir=cache_dir, box_rule="coat")


def test_config_field_and_validate_job(root):
    assert Config().data.box_rule == "exact"
    assert Config().apply_overrides(["data.box_rule=seqnet"]).data.box_rule == "seqnet"
    with pytest.raises(ConfigError, match="data.box_rule"):
        Config().apply_overrides(["data.box_rule=coat"])
    report = validate_dataset("prw", root, check_images=False, box_rule="seqnet",
                              min_identities=0)  # the fixture's identities have one box each
    assert report.ok
    assert sum("dropped from the training split" in p.message for p in report.warnings) == 2


def test_evaluate_job_passes_the_rule(tmp_path, monkeypatch):
    import dkd_ray.data

    spec = importlib.util.spec_from_file_location(
        "evaluate_job", Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    seen = []

    def fake_load(dataset, root, **kwargs):
        seen.append(kwargs.get("box_rule"))
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(dkd_ray.data, "load_annotations", fake_load)
    common = ["--dataset", "prw", "--data-root", str(tmp_path), "--detections", "d.npz",
              "--queries", "q.npz"]
    assert job.main([*common, "--box-rule", "seqnet"]) == 2
    assert job.main(common) == 2
    assert seen == ["seqnet", "exact"]
