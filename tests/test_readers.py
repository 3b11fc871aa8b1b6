"""CUHK-SYSU and PRW readers on small folders written here in the real layout (scipy.io.savemat).

The builders below are imported by tests/test_cache.py and tests/test_validate.py as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dkd_ray.data import DatasetError, parse_cuhk_sysu, parse_prw
from dkd_ray.data.prw import camera_of
from dkd_ray.data.validate import ValidationReport

# --- Builders: the real file formats -------------------------------------------------------------

GALLERY_FIELDS = [("imname", object), ("idlocate", object), ("ishard", object)]
QUERY_FIELDS = [("imname", object), ("idlocate", object), ("ishard", object), ("idname", object)]


def _struct_row(fields, rows) -> np.ndarray:
    """A 1×N MATLAB struct array."""
    array = np.zeros((1, len(rows)), dtype=fields)
    for i, row in enumerate(rows):
        array[0, i] = row
    return array


def _cell_column(values) -> np.ndarray:
    """An N×1 MATLAB cell array."""
    cell = np.empty((len(values), 1), dtype=object)
    for i, value in enumerate(values):
        cell[i, 0] = value
    return cell


def _box(xywh) -> np.ndarray:
    return np.array([xywh], dtype=np.float64)


def write_jpeg(path: Path, width: int, height: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (90, 120, 30), "L": 100, "CMYK": (10, 20, 30, 40)}[mode]
    Image.new(mode, (width, height), color).save(path, format="JPEG")


# CUHK-SYSU fixture: 3 training and 4 test images. Train.mat lists p20 first, then p10 (two
# sightings, one given 0.4 px off so it matches by IoU), p30 (matches nothing), p40.
CUHK_IMAGES = {
    "s1.jpg": (100, 80, [[10, 10, 20, 30], [50, 5, 20, 40], [5, 5, 0, 10]]),
    "s2.jpg": (100, 80, [[0, 0, 30, 30], [60, 20, 50, 50], [30, 30, 10, 10]]),
    "s3.jpg": (120, 90, [[20, 20, 20, 20], [40, 40, 10, 10]]),
    "s4.jpg": (120, 90, [[10, 10, 30, 40], [60, 10, 20, 20]]),
    "s5.jpg": (120, 90, [[15, 15, 30, 40], [70, 20, 20, 20]]),
    "s6.jpg": (120, 90, [[5, 5, 20, 30], [50, 50, 30, 30]]),
    "s7.jpg": (80, 60, [[-5, 10, 30, 30]]),
}
CUHK_POOL = ["s4.jpg", "s5.jpg", "s6.jpg", "s7.jpg"]
CUHK_TRAIN = [
    ("p20", [("s3.jpg", [20, 20, 20, 20])]),
    ("p10", [("s1.jpg", [10, 10, 20, 30]), ("s2.jpg", [0.4, 0, 30, 30])]),
    ("p30", [("s1.jpg", [90, 70, 5, 5])]),
    ("p40", [("s2.jpg", [30, 30, 10, 10])]),
]
# Query (image, box, idname) and, per gallery size, its gallery (image, box or None).
CUHK_QUERIES = [
    (("s4.jpg", [10, 10, 30, 40], "p9001"),
     [("s5.jpg", [15, 15, 30, 40]), ("s6.jpg", None), ("s7.jpg", None)]),
    (("s6.jpg", [5, 5, 20, 30], "p9002"),
     [("s5.jpg", [70, 20, 20, 20]), ("s7.jpg", [-5, 10, 30, 30]), ("s4.jpg", None)]),
]


def write_cuhk_sysu(root: Path, *, images=CUHK_IMAGES, pool=CUHK_POOL, train=CUHK_TRAIN,
                    queries=CUHK_QUERIES, sizes=(2, 3), jpegs: bool = True,
                    empty_shapes=((1, 0), (0, 0))) -> Path:
    """Write a CUHK-SYSU folder; protocol ``TestG<size>`` takes the first ``size`` gallery
    entries (cycled when longer), empty ``idlocate`` alternating between ``empty_shapes``."""
    annotation = root / "annotation"
    protocols = annotation / "test" / "train_test"
    protocols.mkdir(parents=True, exist_ok=True)
    img_rows = []
    for name, (width, height, boxes) in images.items():
        box_struct = np.zeros((1, len(boxes)), dtype=[("idlocate", object), ("ishard", object)])
        for j, xywh in enumerate(boxes):
            box_struct[0, j] = (_box(xywh), np.array([[0.0]]))
        img_rows.append((name, np.array([[float(len(boxes))]]), box_struct))
        if jpegs:
            write_jpeg(root / "Image" / "SSM" / name, width, height)
    scipy.io.savemat(annotation / "Images.mat",
                     {"Img": _struct_row([("imname", object), ("nAppear", object),
                                          ("box", object)], img_rows)})
    scipy.io.savemat(annotation / "pool.mat", {"pool": _cell_column(pool)})
    identities = []
    for idname, scenes in train:
        scene = _struct_row(GALLERY_FIELDS, [(n, _box(b), np.array([[0.0]])) for n, b in scenes])
        identity = np.zeros((1, 1), dtype=[("idname", object), ("nAppear", object),
                                           ("scene", object)])
        identity[0, 0] = (idname, np.array([[float(len(scenes))]]), scene)
        identities.append(identity)
    scipy.io.savemat(protocols / "Train.mat", {"Train": _cell_column(identities)})
    for size in sizes:
        rows = []
        for (qname, qbox, idname), gallery in queries:
            query = _struct_row(QUERY_FIELDS, [(qname, _box(qbox), np.array([[0.0]]), idname)])
            entries = []
            for g in range(size):
                name, box = gallery[g % len(gallery)]
                empty = np.zeros(empty_shapes[g % len(empty_shapes)])
                entries.append((name, empty if box is None or g >= len(gallery) else _box(box),
                                np.array([[0.0]])))
            rows.append((query, _struct_row(GALLERY_FIELDS, entries)))
        scipy.io.savemat(protocols / f"TestG{size}.mat",
                         {f"TestG{size}": _struct_row([("Query", object), ("Gallery", object)],
                                                      rows)})
    return root


# PRW fixture: two training and two test frames; train ids 3, 5, 932 (-> 0, 1, 2).
PRW_FRAMES = {
    "c1s1_000001.jpg": ("train", "box_new", [[5, 10, 10, 20, 30], [-2, 40, 5, 20, 30],
                                             [932, -5, 10, 20, 30]]),
    "c2s1_000002.jpg": ("train", "anno_file", [[3, 0, 0, 10, 10], [5, 20, 20, 0, 10]]),
    "c3s2_000003.jpg": ("test", "anno_previous", [[100, 10, 10, 30, 40], [-2, 50, 10, 20, 20]]),
    "c6s1_000004.jpg": ("test", "box_new", [[100, 20, 20, 30, 40], [101, 60, 5, 20, 20]]),
}
PRW_QUERIES = ["100 10 10 30 40 c3s2_000003", "101 60 5 20 20 c6s1_000004"]
PRW_SIZE = (100, 80)


def write_prw(root: Path, *, frames=PRW_FRAMES, queries=PRW_QUERIES, jpegs: bool = True) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for name, (_, key, rows) in frames.items():
        scipy.io.savemat(root / "annotations" / f"{name}.mat",
                         {key: np.array(rows, dtype=np.float64).reshape(-1, 5)})
        if jpegs:
            write_jpeg(root / "frames" / name, *PRW_SIZE)
    for split in ("train", "test"):
        stems = [n[:-4] for n, (s, _, _) in frames.items() if s == split]
        scipy.io.savemat(root / f"frame_{split}.mat", {f"img_index_{split}": _cell_column(stems)})
    (root / "query_info.txt").write_bytes("".join(q + "\r\n" for q in queries).encode())
    return root


def boxes_by_name(annotations, name):
    i = list(annotations.images.name).index(name)
    return annotations.images.boxes_of(i), annotations.images.pids_of(i)


# --- CUHK-SYSU -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuhk(tmp_path_factory):
    root = write_cuhk_sysu(tmp_path_factory.mktemp("cuhk"))
    report = ValidationReport("cuhk_sysu", root)
    return parse_cuhk_sysu(root, report=report), report


def test_cuhk_images_splits_and_sizes(cuhk):
    annotations, _ = cuhk
    images = annotations.images
    assert list(images.name) == list(CUHK_IMAGES)
    assert list(images.split) == ["train"] * 3 + ["test"] * 4
    assert images.path[0] == "Image/SSM/s1.jpg"
    assert images.width.tolist() == [w for w, _, _ in CUHK_IMAGES.values()]
    assert images.height.tolist() == [h for _, h, _ in CUHK_IMAGES.values()]
    assert (images.camera == -1).all()
    assert images.boxes.dtype == np.float32 and images.pids.dtype == np.int32


def test_cuhk_boxes_converted_zero_area_dropped_and_clipped(cuhk):
    annotations, report = cuhk
    boxes, _ = boxes_by_name(annotations, "s1.jpg")  # third box has zero width
    np.testing.assert_array_equal(boxes, [[10, 10, 30, 40], [50, 5, 70, 45]])
    boxes, _ = boxes_by_name(annotations, "s2.jpg")  # second box reaches x=110 > 100
    np.testing.assert_array_equal(boxes, [[0, 0, 30, 30], [60, 20, 100, 70], [30, 30, 40, 40]])
    boxes, _ = boxes_by_name(annotations, "s7.jpg")  # negative x
    np.testing.assert_array_equal(boxes, [[0, 10, 25, 40]])
    assert len(annotations.images.boxes) == 14  # 15 annotated, one zero-area
    messages = [(p.file, p.where, p.message) for p in report.warnings]
    assert any(f == "annotation/Images.mat" and w == "Img(1).box(3)" and "zero-area" in m
               for f, w, m in messages)
    assert any(w == "Img(2).box(2)" and "clipped" in m for _, w, m in messages)


def test_cuhk_train_ids_matched_in_train_mat_order(cuhk):
    annotations, report = cuhk
    assert annotations.num_train_ids == 3  # p30 matches no box: skipped
    assert boxes_by_name(annotations, "s3.jpg")[1].tolist() == [0, -1]  # p20, first in Train
    assert boxes_by_name(annotations, "s1.jpg")[1].tolist() == [1, -1]  # p10
    assert boxes_by_name(annotations, "s2.jpg")[1].tolist() == [1, -1, 2]  # p10 by IoU, p40
    train_pids = annotations.images.pids[np.repeat(annotations.images.split == "train",
                                                   np.diff(annotations.images.box_offsets))]
    assert sorted(set(train_pids.tolist()) - {-1}) == [0, 1, 2]
    assert any(p.file.endswith("Train.mat") and p.where == "Train{3}.scene(1)"
               and "matches no" in p.message for p in report.warnings)


def test_cuhk_test_pids_from_queries_and_gallery_positives(cuhk):
    annotations, _ = cuhk
    assert boxes_by_name(annotations, "s4.jpg")[1].tolist() == [9001, -1]
    assert boxes_by_name(annotations, "s5.jpg")[1].tolist() == [9001, 9002]
    assert boxes_by_name(annotations, "s6.jpg")[1].tolist() == [9002, -1]
    assert boxes_by_name(annotations, "s7.jpg")[1].tolist() == [9002]


def test_cuhk_queries_from_smallest_protocol(cuhk):
    annotations, _ = cuhk
    queries = annotations.queries
    names = list(annotations.images.name)
    assert queries.image_index.tolist() == [names.index("s4.jpg"), names.index("s6.jpg")]
    np.testing.assert_array_equal(queries.box, [[10, 10, 40, 50], [5, 5, 25, 35]])
    assert queries.pid.tolist() == [9001, 9002]


def test_cuhk_every_protocol_with_its_own_positives(cuhk):
    annotations, _ = cuhk
    names = list(annotations.images.name)
    row = names.index
    assert sorted(annotations.galleries) == [2, 3]
    g2, g3 = annotations.galleries[2], annotations.galleries[3]
    assert g2.size == 2 and g3.size == 3
    assert g2.image_index.tolist() == [[row("s5.jpg"), row("s6.jpg")],
                                       [row("s5.jpg"), row("s7.jpg")]]
    assert g3.image_index.tolist() == [[row("s5.jpg"), row("s6.jpg"), row("s7.jpg")],
                                       [row("s5.jpg"), row("s7.jpg"), row("s4.jpg")]]
    # Empty idlocate 1x0 (even entries) and 0x0 (odd entries) are both negatives.
    for g in (g2, g3):
        assert g.positive_query.tolist() == [0, 1, 1]
        assert g.positive_image.tolist() == [row("s5.jpg"), row("s5.jpg"), row("s7.jpg")]
        np.testing.assert_array_equal(g.positive_box, [[15, 15, 45, 55], [70, 20, 90, 40],
                                                       [0, 10, 25, 40]])
        assert g.image_index.dtype == np.int64 and g.positive_box.dtype == np.float32


def test_cuhk_testg50_defines_queries_when_present(tmp_path):
    root = write_cuhk_sysu(tmp_path, sizes=(3, 50), jpegs=False)
    _size_file(root)
    annotations = parse_cuhk_sysu(root)
    assert sorted(annotations.galleries) == [3, 50]
    assert annotations.galleries[50].image_index.shape == (2, 50)
    assert annotations.queries.pid.tolist() == [9001, 9002]


def test_cuhk_protocols_must_share_queries(tmp_path):
    root = write_cuhk_sysu(tmp_path, sizes=(2,), jpegs=False)
    _size_file(root)
    other = [((q[0], [q[1][0] + 1, *q[1][1:]], q[2]), g) for q, g in CUHK_QUERIES]
    write_cuhk_sysu(tmp_path / "other", queries=other, sizes=(3,), jpegs=False)
    (tmp_path / "other/annotation/test/train_test/TestG3.mat").rename(
        root / "annotation/test/train_test/TestG3.mat")
    with pytest.raises(DatasetError, match=r"TestG3\.mat.*query 1 differs"):
        parse_cuhk_sysu(root)


def test_cuhk_missing_field_is_named(tmp_path):
    root = write_cuhk_sysu(tmp_path, jpegs=False)
    _size_file(root)
    scipy.io.savemat(root / "annotation/pool.mat", {"gallery": _cell_column(CUHK_POOL)})
    with pytest.raises(DatasetError, match=r"pool\.mat: missing variable 'pool'.*gallery"):
        parse_cuhk_sysu(root)
    write_cuhk_sysu(root, jpegs=False)
    img = scipy.io.loadmat(root / "annotation/Images.mat")["Img"]
    renamed = img.astype([("name", object), ("nAppear", object), ("box", object)])
    scipy.io.savemat(root / "annotation/Images.mat", {"Img": renamed})
    with pytest.raises(DatasetError, match=r"Images\.mat: Img has no field 'imname'"):
        parse_cuhk_sysu(root)


def test_cuhk_protocols_streamed_equal_loadmat(tmp_path, cuhk, monkeypatch):
    """TestG files are streamed element by element; the loadmat fallback gives the same."""
    from dkd_ray.data import matlab

    root = write_cuhk_sysu(tmp_path)
    streamed = parse_cuhk_sysu(root)

    def no_streaming(path, variable):
        raise matlab._NoStreaming

    monkeypatch.setattr(matlab, "_stream_struct_array", no_streaming)
    loaded = parse_cuhk_sysu(root)
    for size in (2, 3):
        for name in ("image_index", "positive_query", "positive_image", "positive_box"):
            np.testing.assert_array_equal(getattr(streamed.galleries[size], name),
                                          getattr(loaded.galleries[size], name))
    np.testing.assert_array_equal(streamed.queries.box, loaded.queries.box)
    np.testing.assert_array_equal(streamed.images.pids, loaded.images.pids)


def test_cuhk_truncated_protocol_is_named(tmp_path):
    root = write_cuhk_sysu(tmp_path, jpegs=False)
    _size_file(root)
    protocol = root / "annotation/test/train_test/TestG3.mat"
    protocol.write_bytes(protocol.read_bytes()[:400])
    with pytest.raises(DatasetError, match=r"TestG3\.mat.*(truncated|not a readable)"):
        parse_cuhk_sysu(root)
    scipy.io.savemat(protocol, {"Protocol": np.zeros((1, 1))})
    with pytest.raises(DatasetError, match=r"TestG3\.mat.*variables found: Protocol"):
        parse_cuhk_sysu(root)


def _size_file(root: Path) -> None:
    """The size list the annotation-only generator writes instead of JPEGs."""
    import json

    sizes = {name: [w, h] for name, (w, h, _) in CUHK_IMAGES.items()}
    (root / "synthetic_image_sizes.json").write_text(json.dumps(sizes))


def test_sizes_json_used_only_for_absent_images(tmp_path):
    root = write_cuhk_sysu(tmp_path, jpegs=False)
    import json

    sizes = {name: [w + 1000, h + 1000] for name, (w, h, _) in CUHK_IMAGES.items()}
    (root / "synthetic_image_sizes.json").write_text(json.dumps(sizes))
    write_jpeg(root / "Image/SSM/s1.jpg", 100, 80)
    annotations = parse_cuhk_sysu(root)
    assert annotations.images.width[0] == 100  # from the JPEG
    assert annotations.images.width[1] == 1100  # from the list
    np.testing.assert_array_equal(boxes_by_name(annotations, "s2.jpg")[0][1], [60, 20, 110, 70])


# --- PRW -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prw(tmp_path_factory):
    root = write_prw(tmp_path_factory.mktemp("prw"))
    report = ValidationReport("prw", root)
    return parse_prw(root, report=report), report


def test_prw_frames_splits_cameras(prw):
    annotations, _ = prw
    images = annotations.images
    assert list(images.name) == list(PRW_FRAMES)
    assert list(images.split) == ["train", "train", "test", "test"]
    assert images.camera.tolist() == [1, 2, 3, 6]
    assert images.path[0] == "frames/c1s1_000001.jpg"
    assert (images.width == 100).all() and (images.height == 80).all()
    assert camera_of("c5s3_012345.jpg") == 5


def test_prw_boxes_keys_pids_and_clipping(prw):
    annotations, report = prw
    boxes, pids = boxes_by_name(annotations, "c1s1_000001.jpg")  # box_new
    np.testing.assert_array_equal(boxes, [[10, 10, 30, 40], [40, 5, 60, 35], [0, 10, 15, 40]])
    assert pids.tolist() == [1, -1, 2]  # 5 -> 1, -2 -> -1, 932 -> 2
    boxes, pids = boxes_by_name(annotations, "c2s1_000002.jpg")  # anno_file, zero-area dropped
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 10]])
    assert pids.tolist() == [0]  # 3 -> 0
    _, pids = boxes_by_name(annotations, "c3s2_000003.jpg")  # anno_previous, test ids kept
    assert pids.tolist() == [100, -1]
    assert boxes_by_name(annotations, "c6s1_000004.jpg")[1].tolist() == [100, 101]
    assert annotations.num_train_ids == 3
    assert any(p.file == "annotations/c2s1_000002.jpg.mat" and p.where == "anno_file row 2"
               and "zero-area" in p.message for p in report.warnings)


def test_prw_queries(prw):
    annotations, report = prw
    queries = annotations.queries
    assert queries.image_index.tolist() == [2, 3]
    np.testing.assert_array_equal(queries.box, [[10, 10, 40, 50], [60, 5, 80, 25]])
    assert queries.pid.tolist() == [100, 101]
    assert annotations.galleries == {}
    assert not any("query" in p.message for p in report.problems)


def test_prw_without_box_key_is_a_clear_error(tmp_path):
    root = write_prw(tmp_path, jpegs=False)
    scipy.io.savemat(root / "annotations/c2s1_000002.jpg.mat", {"boxes": np.zeros((1, 5))})
    with pytest.raises(DatasetError, match=r"c2s1_000002\.jpg\.mat.*box_new.*keys found: boxes"):
        parse_prw(root)


def test_prw_query_matching_no_box_is_reported(tmp_path):
    root = write_prw(tmp_path, queries=[*PRW_QUERIES, "101 1 1 5 5 c3s2_000003"], jpegs=False)
    report = ValidationReport("prw", root)
    annotations = parse_prw(root, report=report)
    assert len(annotations.queries) == 3
    [problem] = [p for p in report.problems if "matches no annotated box" in p.message]
    assert problem.file == "query_info.txt" and problem.where == "line 3"


# --- Integration with the synthetic generator -------------------------------------------------

@pytest.mark.parametrize("layout", ["cuhk_sysu", "prw"])
@pytest.mark.parametrize("annotations_only", [True, False])
def test_generated_folders_match_the_generator_summary(tmp_path, layout, annotations_only):
    from dkd_ray.data import load_annotations
    from dkd_ray.data.synthetic import generate

    summary = generate(tmp_path / layout, layout, "tiny", seed=0,
                       annotations_only=annotations_only)
    report = ValidationReport(layout, tmp_path / layout)
    parse = parse_cuhk_sysu if layout == "cuhk_sysu" else parse_prw
    annotations = parse(tmp_path / layout, report=report)
    assert not report.errors, report.errors
    images = annotations.images
    box_split = np.repeat(images.split, np.diff(images.box_offsets))
    for split, expected in [("train", summary.train), ("test", summary.test)]:
        pids = images.pids[box_split == split]
        assert (images.split == split).sum() == expected.images
        assert len(pids) == expected.boxes
        assert (pids >= 0).sum() == expected.labelled_boxes
        assert len(np.unique(pids[pids >= 0])) == expected.identities
    assert (images.width > 0).all() and (images.height > 0).all()
    assert annotations.num_train_ids == len(summary.train_ids)
    assert len(annotations.queries) == summary.queries
    assert sorted(set(annotations.queries.pid.tolist())) == sorted(summary.test_ids)
    assert tuple(sorted(annotations.galleries)) == tuple(summary.gallery_sizes)
    cached = load_annotations(layout, tmp_path / layout, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(cached.images.boxes, images.boxes)
