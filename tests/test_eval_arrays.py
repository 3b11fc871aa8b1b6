"""The Detections container: construction, selection, files (npz, Parquet), name remapping."""

from __future__ import annotations

import numpy as np
import pytest

from dkd_ray.eval import Detections, load_query_embeddings, save_query_embeddings


def sample(num_images=4):
    # Images 2, 0, 2 given out of order; image 1 and 3 have no detection.
    return Detections.from_lists(
        [2, 0],
        [np.array([[0, 0, 10, 10], [5, 5, 20, 20]]), np.array([[1, 1, 2, 2]])],
        [np.array([0.9, 0.4]), np.array([0.7])],
        [np.array([[1, 0, 0], [0, 1, 0]]), np.array([[0, 0, 1]])],
        num_images=num_images,
    )


def test_from_lists_sorts_by_image_with_csr_offsets():
    d = sample()
    np.testing.assert_array_equal(d.image_index, [0, 2, 2])
    np.testing.assert_array_equal(d.offsets, [0, 1, 1, 3, 3])
    np.testing.assert_allclose(d.scores[d.rows_of(2)], [0.9, 0.4])
    assert d.embeddings.dtype == np.float32 and d.dim == 3 and len(d) == 3


def test_above_and_with_embeddings():
    d = sample()
    kept = d.above(0.5)
    np.testing.assert_array_equal(kept.image_index, [0, 2])
    np.testing.assert_array_equal(kept.offsets, [0, 1, 1, 2, 2])
    other = d.with_embeddings(np.ones((3, 5)))
    assert other.dim == 5 and other.boxes is d.boxes
    with pytest.raises(ValueError, match=r"\[3, d\]"):
        d.with_embeddings(np.ones((2, 5)))


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError, match="outside"):
        Detections.from_arrays([5], np.zeros((1, 4)), [1.0], np.zeros((1, 2)), num_images=3)
    with pytest.raises(ValueError, match="sorted"):
        Detections(np.array([1, 0]), np.zeros((2, 4), np.float32), np.zeros(2, np.float32),
                   np.zeros((2, 2), np.float32), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="dim="):
        Detections.from_lists([], [], [], [], num_images=2)


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_file_round_trip_and_remap_by_name(tmp_path, suffix):
    d = sample()
    names = np.array(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], dtype=object)
    path = d.save(tmp_path / f"dets{suffix}", image_names=names)
    back = Detections.load(path)
    for field in ("image_index", "boxes", "scores", "embeddings", "offsets"):
        np.testing.assert_array_equal(getattr(back, field), getattr(d, field))
    # The same file against a table in another order: rows follow the names.
    reordered = np.array(["c.jpg", "x.jpg", "a.jpg", "b.jpg", "d.jpg"], dtype=object)
    moved = Detections.load(path, image_names=reordered)
    np.testing.assert_array_equal(moved.image_index, [0, 0, 2])
    np.testing.assert_allclose(moved.scores, [0.9, 0.4, 0.7])
    with pytest.raises(ValueError, match="'c.jpg'"):
        Detections.load(path, image_names=np.array(["a.jpg", "b.jpg"], dtype=object))


def test_empty_detections_round_trip(tmp_path):
    d = Detections.from_lists([], [], [], [], num_images=3, dim=8)
    for suffix in (".npz", ".parquet"):
        back = Detections.load(d.save(tmp_path / f"e{suffix}"))
        assert len(back) == 0 and back.num_images == 3 and back.dim == 8


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        Detections.load(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="unsupported"):
        Detections.load(tmp_path / "x.pt")
    np.savez(tmp_path / "bad.npz", boxes=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="bad.npz.*missing"):
        Detections.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_query_embeddings_round_trip_and_order_check(tmp_path, suffix):
    emb = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    names = np.array(["q1.jpg", "q2.jpg", "q1.jpg"])
    path = save_query_embeddings(tmp_path / f"q{suffix}", emb, names)
    np.testing.assert_array_equal(load_query_embeddings(path, names), emb)
    with pytest.raises(ValueError, match="query 1"):
        load_query_embeddings(path, np.array(["q1.jpg", "q3.jpg", "q1.jpg"]))
    with pytest.raises(ValueError, match="3 query embeddings"):
        load_query_embeddings(path, names[:2])
