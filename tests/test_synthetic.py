"""The synthetic generator writes the real CUHK-SYSU / PRW layouts, reproducibly, with the
ground truth its summary claims, and people whose identity can be recognised."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dkd_ray.data.synthetic import SIZES_SIDECAR, generate, load_image_sizes, matfile
from dkd_ray.data.synthetic.scene import deal, split_total
from jobs.make_synthetic import main as make_synthetic_main


def _mat(path: Path) -> dict:
    return scipy.io.loadmat(path)  # the defaults the real readers use (squeeze_me=False)


def _fields(struct: np.ndarray) -> tuple[str, ...]:
    return struct.dtype.names


def _text(cell) -> str:
    """A MATLAB char as loadmat returns it: array(['s1.jpg'], dtype='<U6')."""
    assert isinstance(cell, np.ndarray) and cell.shape == (1,) and cell.dtype.kind == "U", repr(cell)
    return str(cell[0])


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def cuhk(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuhk") / "CUHK-SYSU"
    return root, generate(root, "cuhk_sysu", "tiny", seed=3)


@pytest.fixture(scope="module")
def prw(tmp_path_factory):
    root = tmp_path_factory.mktemp("prw") / "PRW"
    return root, generate(root, "prw", "tiny", seed=3)


# --- MAT-file writer ------------------------------------------------------------------------------


def test_matfile_encoding_equals_scipy_savemat():
    """The memoised struct writer must emit exactly scipy's bytes, incl. its vectorised path."""
    names = [f"s{i}.jpg" for i in range(300)]
    hard = [0.0, 1.0]
    size = 150  # above the small-column threshold: the numpy path
    rng = np.random.default_rng(0)
    locate = [
        np.array([[1.0, 2, 3, 4]]) if k < 3 else (matfile.EMPTY_0x0, matfile.EMPTY_1x0)[k % 2]
        for k in range(size)
    ]
    galleries = [
        matfile.struct_array(
            (1, size),
            {
                "imname": [names[i] for i in rng.choice(len(names), size, replace=False)],
                "idlocate": locate,
                "ishard": [hard[k % 2] for k in range(size)],
            },
        )
        for _ in range(3)
    ]
    query = matfile.struct_array(
        (1, 1),
        {"imname": names[0], "idlocate": np.array([[5.0, 6, 7, 8]]), "ishard": 0.0, "idname": "p12"},
    )
    variables = {
        "TestG": matfile.struct_array((1, 3), {"Query": [query] * 3, "Gallery": galleries}),
        "pool": matfile.cell_column(names[:7]),
        "box_new": np.array([[1.0, -2.5, 3, 4, 5]]),
    }
    reference = io.BytesIO()
    scipy.io.savemat(reference, variables)
    ours = matfile.encode_mat(variables, compress=False)
    assert ours[116:] == reference.getvalue()[116:]  # all but the header's text (a timestamp)
    assert ours[:116] == matfile.encode_mat({}, compress=False)[:116]  # and that text is fixed
    loaded = scipy.io.loadmat(io.BytesIO(matfile.encode_mat(variables)))  # compressed
    expected = scipy.io.loadmat(io.BytesIO(reference.getvalue()))
    gallery = loaded["TestG"][0, 2]["Gallery"]
    assert gallery.shape == (1, size)
    assert [g.shape for g in gallery["idlocate"][0][:5]] == [(1, 4)] * 3 + [(1, 0), (0, 0)]
    np.testing.assert_array_equal(gallery["imname"], expected["TestG"][0, 2]["Gallery"]["imname"])


# --- Determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["cuhk_sysu", "prw"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path, layout):
    first = generate(tmp_path / "a", layout, "tiny", seed=7)
    second = generate(tmp_path / "b", layout, "tiny", seed=7)
    generate(tmp_path / "c", layout, "tiny", seed=8)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert first.train == second.train and first.edge_cases == second.edge_cases
    mats = [name for name in a if name.endswith(".mat")]
    jpegs = [name for name in a if name.endswith(".jpg")]
    assert mats and jpegs
    assert sum(a[n] != c.get(n) for n in mats) > len(mats) // 2
    assert all(a[n] != c.get(n) for n in jpegs[:10])


@pytest.mark.parametrize("layout", ["cuhk_sysu", "prw"])
def test_annotation_only_sizes_match_the_jpegs(tmp_path, layout):
    """Annotation-only writes the same annotation files plus a size list equal to the JPEGs'."""
    pixels = generate(tmp_path / "px", layout, "tiny", seed=1)
    bare = generate(tmp_path / "ao", layout, "tiny", seed=1, annotations_only=True)
    px, ao = _files(tmp_path / "px"), _files(tmp_path / "ao")
    assert {n: v for n, v in px.items() if n.endswith((".mat", ".txt"))} == {
        n: v for n, v in ao.items() if n.endswith((".mat", ".txt"))
    }
    assert not any(n.endswith(".jpg") for n in ao)
    assert bare.image_sizes_file == tmp_path / "ao" / SIZES_SIDECAR and pixels.image_sizes_file is None
    sizes = load_image_sizes(tmp_path / "ao")
    image_dir = "Image/SSM" if layout == "cuhk_sysu" else "frames"
    jpeg_paths = sorted(n for n in px if n.startswith(image_dir))
    assert sorted(sizes) == jpeg_paths and len(sizes) == pixels.images
    for rel in jpeg_paths:
        with Image.open(tmp_path / "px" / rel) as image:
            assert image.size == sizes[rel] and image.mode == "RGB"
    assert load_image_sizes(tmp_path / "px") is None


# --- CUHK-SYSU layout -----------------------------------------------------------------------------


def test_cuhk_sysu_files_have_the_real_structure(cuhk):
    root, summary = cuhk
    img = _mat(root / "annotation/Images.mat")["Img"]
    assert img.shape == (1, summary.images)
    assert _fields(img) == ("imname", "nAppear", "box")
    boxes_of, split_boxes, zero_area = {}, {"train": 0, "test": 0}, 0
    pool = _mat(root / "annotation/pool.mat")["pool"]
    assert pool.shape == (summary.test.images, 1) and pool.dtype == object
    pool_names = {_text(c) for c in pool[:, 0]}
    for entry in img[0]:
        name = _text(entry["imname"])
        box = entry["box"]
        assert box.shape == (1, entry["nAppear"][0, 0]) and _fields(box) == ("idlocate", "ishard")
        locs = np.concatenate(box["idlocate"][0])
        assert locs.shape == (box.shape[1], 4)
        boxes_of[name] = locs
        valid = (locs[:, 2] > 0) & (locs[:, 3] > 0)
        assert valid.any(), f"{name} has no valid box"
        zero_area += int((~valid).sum())
        split_boxes["test" if name in pool_names else "train"] += int(valid.sum())
        with Image.open(root / "Image/SSM" / name) as image:  # boxes lie inside their image
            w, h = image.size
        assert (locs[:, 0] >= 0).all() and (locs[:, 0] + locs[:, 2] <= w).all()
        assert (locs[:, 1] >= 0).all() and (locs[:, 1] + locs[:, 3] <= h).all()
    assert zero_area == summary.edge_cases.zero_area_boxes > 0
    assert split_boxes == {"train": summary.train.boxes, "test": summary.test.boxes}
    assert pool_names <= set(boxes_of)
    train_names = set(boxes_of) - pool_names
    assert len(train_names) == summary.train.images

    def matches_a_box(name, loc):
        return bool((boxes_of[name] == loc.reshape(1, 4)).all(axis=1).sum() == 1)

    train = _mat(root / "annotation/test/train_test/Train.mat")["Train"]
    assert train.shape == (summary.train.identities, 1) and train.dtype == object
    labelled, idnames = 0, set()
    for cell in train[:, 0]:
        assert cell.shape == (1, 1) and _fields(cell) == ("idname", "nAppear", "scene")
        person = cell[0, 0]
        idname = _text(person["idname"])
        assert re.fullmatch(r"p\d+", idname)
        idnames.add(int(idname[1:]))
        scene = person["scene"]
        assert _fields(scene) == ("imname", "idlocate", "ishard")
        assert scene.shape == (1, person["nAppear"][0, 0]) and scene.shape[1] >= 2
        for s in scene[0]:
            assert _text(s["imname"]) in train_names and s["ishard"].shape == (1, 1)
            assert matches_a_box(_text(s["imname"]), s["idlocate"])
        labelled += scene.shape[1]
    assert labelled == summary.train.labelled_boxes
    assert idnames == set(summary.train_ids)

    empties = {"0x0": 0, "1x0": 0}
    query_sequence = None
    for size in summary.gallery_sizes:
        test = _mat(root / f"annotation/test/train_test/TestG{size}.mat")[f"TestG{size}"]
        assert test.shape == (1, summary.queries) and _fields(test) == ("Query", "Gallery")
        queries = []
        for item in test[0]:
            query = item["Query"]
            assert query.shape == (1, 1) and _fields(query) == ("imname", "idlocate", "ishard", "idname")
            q_name = _text(query[0, 0]["imname"])
            assert q_name in pool_names and matches_a_box(q_name, query[0, 0]["idlocate"])
            queries.append((q_name, _text(query[0, 0]["idname"])))
            gallery = item["Gallery"]
            assert gallery.shape == (1, size) and _fields(gallery) == ("imname", "idlocate", "ishard")
            names = [_text(g) for g in gallery["imname"][0]]
            assert q_name not in names and set(names) <= pool_names and len(set(names)) == size
            shapes = [loc.shape for loc in gallery["idlocate"][0]]
            n_pos = shapes.count((1, 4))
            assert n_pos >= 1 and shapes[:n_pos] == [(1, 4)] * n_pos  # positives first
            assert set(shapes[n_pos:]) <= {(0, 0), (1, 0)}
            empties["0x0"] += shapes.count((0, 0))
            empties["1x0"] += shapes.count((1, 0))
            for g in gallery[0, :n_pos]:
                assert matches_a_box(_text(g["imname"]), g["idlocate"])
        query_sequence = query_sequence or queries
        assert queries == query_sequence  # the same queries in every TestG file
    assert empties == summary.edge_cases.empty_idlocate and min(empties.values()) > 0
    assert {int(idname[1:]) for _, idname in query_sequence} == set(summary.test_ids)


# --- PRW layout -----------------------------------------------------------------------------------


def test_prw_files_have_the_real_structure(prw):
    root, summary = prw
    lists = {}
    for split in ("train", "test"):
        cell = _mat(root / f"frame_{split}.mat")[f"img_index_{split}"]
        assert cell.shape == (getattr(summary, split).images, 1) and cell.dtype == object
        lists[split] = [_text(c) for c in cell[:, 0]]
        assert not any(n.endswith(".jpg") for n in lists[split])
    frames = {f.name for f in (root / "frames").iterdir()}
    assert frames == {f"{n}.jpg" for n in lists["train"] + lists["test"]}
    assert {f.name for f in (root / "annotations").iterdir()} == {f"{n}.mat" for n in frames}
    cameras = {int(re.match(r"c(\d)s\d+_\d{6}\.jpg$", n).group(1)) for n in frames}
    assert cameras == set(range(1, 7))

    keys, negative, rows_of = {}, 0, {}
    counts = {s: {"boxes": 0, "labelled": 0, "pids": set()} for s in lists}
    for split, names in lists.items():
        for name in names:
            mat = _mat(root / "annotations" / f"{name}.jpg.mat")
            [key] = [k for k in mat if not k.startswith("__")]
            if key != "box_new":
                keys[f"{name}.jpg"] = key
            table = mat[key]
            assert table.dtype == np.float64 and table.ndim == 2 and table.shape[1] == 5
            pid = table[:, 0]
            assert ((pid == -2) | ((pid > 0) & (pid == np.round(pid)))).all()
            negative += int((table[:, 1:3] < 0).any(axis=1).sum())
            counts[split]["boxes"] += len(table)
            counts[split]["labelled"] += int((pid > 0).sum())
            counts[split]["pids"] |= set(pid[pid > 0].astype(int).tolist())
            rows_of[name] = table
    assert keys == summary.edge_cases.alternate_box_keys
    assert set(keys.values()) == {"anno_file", "anno_previous"}
    assert negative == summary.edge_cases.negative_coordinate_boxes > 0
    for split in lists:
        expected = getattr(summary, split)
        assert (counts[split]["boxes"], counts[split]["labelled"], len(counts[split]["pids"])) == (
            expected.boxes,
            expected.labelled_boxes,
            expected.identities,
        )

    id_train = _mat(root / "ID_train.mat")["ID_train"]
    id_test = _mat(root / "ID_test.mat")["ID_test2"]
    assert id_train.shape == (1, len(summary.train_ids)) and id_train.dtype == np.float64
    assert tuple(id_train[0].astype(int)) == summary.train_ids == tuple(sorted(summary.train_ids))
    assert tuple(id_test[0].astype(int)) == summary.test_ids
    assert counts["train"]["pids"] == set(summary.train_ids)
    gaps = set(range(1, max(summary.train_ids) + 1)) - set(summary.train_ids)
    assert gaps and gaps == set(summary.edge_cases.missing_train_ids)
    strays = counts["test"]["pids"] & set(summary.train_ids)  # "a small portion of IDs used in
    assert strays == set(summary.edge_cases.train_ids_in_test_images) != set()  # training" (README)
    for pid in summary.train_ids:  # every training identity in >= 2 training frames
        assert sum(pid in rows_of[n][:, 0] for n in lists["train"]) >= 2

    lines = (root / "query_info.txt").read_text().splitlines()
    assert len(lines) == summary.queries
    test_frames = set(lists["test"])
    for line in lines:
        pid_text, *box_text, frame = line.split()
        pid, box = int(pid_text), np.array([float(v) for v in box_text])
        assert frame in test_frames and pid in summary.test_ids
        table = rows_of[frame]
        assert ((table[:, 0] == pid) & (table[:, 1:] == box).all(axis=1)).sum() == 1
        assert sum(pid in rows_of[n][:, 0] for n in test_frames) >= 2
        assert (root / "query_box" / f"{pid}_{frame}.jpg").is_file()
    assert {int(line.split()[0]) for line in lines} == set(summary.test_ids)

    sizes = {}
    for name in frames:
        with Image.open(root / "frames" / name) as image:
            sizes.setdefault(name[1], set()).add(image.size)
    assert all(len(s) == 1 for s in sizes.values()) and sizes["6"] != sizes["1"]  # SD camera


# --- Exact counts at scale, errors, the job, the readers, learnability ---------------------------


def test_full_preset_counts_are_exact_when_scaled(tmp_path):
    """The full preset's counts are met exactly; checked on a 1/40 scale (full size: bench/)."""
    summary = generate(
        tmp_path / "c",
        "cuhk_sysu",
        "full",
        annotations_only=True,
        train_images=280,
        test_images=175,
        train_identities=138,
        test_identities=72,
        train_boxes=1382,
        test_boxes=1022,
        train_labelled=377,
        test_labelled=174,
        gallery_sizes=(50, 100, 174),
    )
    assert (
        summary.train.images,
        summary.train.boxes,
        summary.train.labelled_boxes,
        summary.train.identities,
    ) == (280, 1382, 377, 138)
    assert (
        summary.test.images,
        summary.test.boxes,
        summary.test.labelled_boxes,
        summary.test.identities,
        summary.queries,
    ) == (175, 1022, 174, 72, 72)
    test = _mat(tmp_path / "c/annotation/test/train_test/TestG174.mat")["TestG174"]
    assert test.shape == (1, 72) and test[0, 0]["Gallery"].shape == (1, 174)
    prw = generate(
        tmp_path / "p",
        "prw",
        "full",
        annotations_only=True,
        train_frames=144,
        test_frames=156,
        train_identities=40,
        test_identities=30,
        queries=137,
        train_labelled=370,
        test_labelled=480,
        train_unlabelled=80,
        test_unlabelled=140,
        alternate_key_files=2,
        negative_coordinate_boxes=5,
        unlabelled_only_frames=2,
        train_ids_in_test_frames=3,
    )
    assert (prw.train.images, prw.test.images, prw.queries, prw.query_identities) == (144, 156, 137, 30)
    assert (prw.train.labelled_boxes, prw.test.labelled_boxes, prw.train.identities) == (370, 480, 40)
    assert prw.train.boxes - prw.train.labelled_boxes >= 80
    assert len(prw.edge_cases.unlabelled_only_images) >= 4


def test_bad_arguments_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown layout 'market'"):
        generate(tmp_path / "x", "market")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        generate(tmp_path / "x", "prw", "huge")
    with pytest.raises(ValueError, match=r"unknown cuhk_sysu override\(s\) \['cameras'\]"):
        generate(tmp_path / "x", "cuhk_sysu", "tiny", cameras=3)
    with pytest.raises(ValueError, match="gallery size 16 must lie in"):
        generate(tmp_path / "x", "cuhk_sysu", "tiny", gallery_sizes=(5, 16))
    assert not (tmp_path / "x").exists()  # nothing is created when the arguments are bad
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(tmp_path / "full", "prw", "tiny")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="cannot split 5 into 3 parts of 2..4"):
        split_total(5, 3, 2, 4, np.random.default_rng(0))


def test_deal_gives_distinct_balanced_images():
    counts = np.array([3, 2, 4, 2, 3, 1])
    dealt = deal(counts, 5, np.random.default_rng(0))
    assert [len(d) for d in dealt] == counts.tolist()
    assert all(len(set(d.tolist())) == len(d) for d in dealt)
    per_image = np.bincount(np.concatenate(dealt), minlength=5)
    assert per_image.max() - per_image.min() <= 1


def test_make_synthetic_job(tmp_path, capsys):
    assert (
        make_synthetic_main(
            [
                "--layout",
                "both",
                "--root",
                str(tmp_path / "d"),
                "--preset",
                "tiny",
                "--no-edge-cases",
                "--quiet",
                "--summary-json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "cuhk_sysu: wrote" in out and "prw: wrote" in out
    assert (tmp_path / "d/CUHK-SYSU/annotation/Images.mat").is_file()
    assert (tmp_path / "d/PRW/query_info.txt").is_file()
    import json

    report = json.loads((tmp_path / "s.json").read_text())
    assert report["prw"]["edge_cases"]["alternate_box_keys"] == {}
    assert report["cuhk_sysu"]["edge_cases"]["zero_area_boxes"] == 0
    assert list(report["prw"]["train_ids"]) == list(range(1, 11))  # contiguous without edge cases
    assert (
        make_synthetic_main(
            ["--layout", "prw", "--root", str(tmp_path / "e"), "--preset", "tiny", "--set", "nonsense=1"]
        )
        == 2
    )
    assert "unknown prw override" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        make_synthetic_main(["--help"])
    assert exit_info.value.code == 0


def test_readers_load_the_generated_folders(cuhk, prw, tmp_path):
    from dkd_ray.data import load_annotations

    for (root, summary), dataset in ((cuhk, "cuhk_sysu"), (prw, "prw")):
        annotations = load_annotations(dataset, root, cache_dir=tmp_path / dataset)
        images = annotations.images
        box_split = np.repeat(images.split, np.diff(images.box_offsets))
        for split in ("train", "test"):
            expected = getattr(summary, split)
            pids = images.pids[box_split == split]
            assert ((images.split == split).sum(), len(pids), (pids >= 0).sum()) == (
                expected.images,
                expected.boxes,
                expected.labelled_boxes,
            )
        assert annotations.num_train_ids == len(summary.train_ids)
        assert len(annotations.queries) == summary.queries
        for size, protocol in annotations.galleries.items():
            # every other appearance of a test identity is a positive of its query
            assert len(protocol.positive_query) == summary.test.labelled_boxes - summary.queries
            assert protocol.image_index.shape == (summary.queries, size)


def test_identities_are_recognisable_from_pixels(tmp_path):
    """Colour features of the person crops retrieve the same identity far above chance: the
    rendering carries identity. Random features score near chance on the same protocol."""
    summary = generate(
        tmp_path / "c",
        "cuhk_sysu",
        "tiny",
        seed=5,
        test_images=40,
        test_identities=20,
        test_labelled=60,
        test_boxes=110,
        gallery_sizes=(10,),
    )
    from dkd_ray.data.cuhk_sysu import parse_cuhk_sysu

    annotations = parse_cuhk_sysu(tmp_path / "c")
    images = annotations.images
    feats, pids, owner = [], [], []
    for i in images.indices("test"):
        with Image.open(tmp_path / "c" / images.path[i]) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
        for box, pid in zip(images.boxes_of(i), images.pids_of(i)):
            if pid < 0:
                continue
            x1, y1, x2, y2 = np.round(box).astype(int)
            crop = pixels[y1:y2, x1 + (x2 - x1) // 4 : x2 - (x2 - x1) // 4]  # the body's core
            bands = np.array_split(crop, 6, axis=0)  # head .. feet
            feats.append(np.concatenate([b.reshape(-1, 3).mean(axis=0) for b in bands]))
            pids.append(pid)
            owner.append(i)
    assert len(feats) == summary.test.labelled_boxes
    feats, pids, owner = np.array(feats), np.array(pids), np.array(owner)

    def mean_ap(f: np.ndarray) -> float:
        f = f - f.mean(axis=0)
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        aps = []
        for q in range(len(f)):
            other = owner != owner[q]
            order = np.argsort(-(f[other] @ f[q]))
            hits = pids[other][order] == pids[q]
            ranks = np.flatnonzero(hits) + 1
            aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        return float(np.mean(aps))

    colour = mean_ap(feats)
    chance = mean_ap(np.random.default_rng(0).normal(size=feats.shape))
    assert chance < 0.3 and colour > 0.5 and colour > chance + 0.3, (colour, chance)
