"""The validation split: identity-disjoint, deterministic, and searchable like the test protocol."""

from __future__ import annotations

import numpy as np
import pytest

from dkd_ray.data import load_annotations
from dkd_ray.data.splits import validation_split
from dkd_ray.eval.arrays import Detections
from dkd_ray.eval.search import evaluate_search


@pytest.fixture(scope="module")
def tiny_prw(tmp_path_factory):
    from dkd_ray.data.synthetic import generate

    root = tmp_path_factory.mktemp("prw") / "PRW"
    generate(root, "prw", "tiny", seed=0)
    return root


def _ground_truth_search(view, exact: bool):
    """Search the validation view with ground-truth boxes as detections and identity-coded
    embeddings (one-hot per identity when ``exact``, else random)."""
    images = view.images
    rows = images.indices("test")
    rng = np.random.default_rng(0)
    dim = int(images.pids.max()) + 2

    def embed(pids):
        if not exact:
            x = rng.standard_normal((len(pids), dim)).astype(np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)
        out = np.zeros((len(pids), dim), np.float32)
        out[np.arange(len(pids)), np.where(pids >= 0, pids, dim - 1)] = 1
        return out

    gallery = Detections.from_lists(list(rows), [images.boxes_of(r) for r in rows],
                                    [np.ones(len(images.boxes_of(r)), np.float32) for r in rows],
                                    [embed(images.pids_of(r)) for r in rows], num_images=len(images), dim=dim)
    sizes = list(view.galleries) or None
    return evaluate_search(view, gallery, embed(view.queries.pid), score_threshold=0.0, gallery_sizes=sizes).metrics


@pytest.mark.parametrize("layout", ["cuhk_sysu", "prw"])
def test_validation_split_is_identity_disjoint_and_searchable(layout, tiny_cuhk, tiny_prw):
    annotations = load_annotations(layout, tiny_cuhk if layout == "cuhk_sysu" else tiny_prw)
    training, validation = validation_split(annotations, 0.3, seed=1)
    images = annotations.images
    box_image = images.box_image_index()

    queried = set(validation.queries.pid.tolist())
    assert queried, "some held-out identity must be queryable"
    trained_rows = training.images.indices("train")
    trained_ids = set(images.pids[np.isin(box_image, trained_rows) & (images.pids >= 0)].tolist())
    assert not queried & trained_ids  # no validation query person is ever trained on
    val_rows = validation.images.indices("test")
    assert set(val_rows) == set(training.images.indices("val"))
    assert set(val_rows).isdisjoint(annotations.images.indices("test"))  # never the test set
    assert len(trained_rows) + len(val_rows) == len(annotations.images.indices("train"))
    # Box rows and identity numbers are unchanged: the knowledge bank still fits.
    assert training.images.boxes is images.boxes and training.num_train_ids == annotations.num_train_ids

    again = validation_split(annotations, 0.3, seed=1)[1]
    assert np.array_equal(again.queries.pid, validation.queries.pid)
    assert not np.array_equal(validation_split(annotations, 0.3, seed=2)[1].queries.pid, validation.queries.pid) \
        or len(validation.queries) <= 1

    perfect = _ground_truth_search(validation, exact=True)
    maps = {k: v for k, v in perfect.items() if k.endswith("/mAP")}
    assert maps and all(v == pytest.approx(1.0) for v in maps.values()), perfect
    random = _ground_truth_search(validation, exact=False)
    assert all(random[k] < 0.9 for k in maps)


def test_validation_fraction_is_checked(tiny_cuhk):
    with pytest.raises(ValueError, match="fraction"):
        validation_split(load_annotations("cuhk_sysu", tiny_cuhk), 1.0)
