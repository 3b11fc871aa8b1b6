"""Search in your own images and video (jobs/index_gallery.py, jobs/search.py): an index built on
Ray Data over a folder of images and a short video written here with PyAV, re-indexed after the
folder grows, searched by crop and by image + box, exact against faiss, agreement with the
evaluator on a dataset split, and bad input refused by name. One index, several tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZE = (256, 160)  # video frame size (even, as H.264 wants)


def _write_video(path: Path, images: list[Path], fps: int = 4) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        for image in images:
            rgb = np.asarray(Image.open(image).convert("RGB").resize(SIZE))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _index(model: Path, index: Path, *inputs: str, mlflow_uri: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    logging = ["--tracking-uri", mlflow_uri] if mlflow_uri else ["--no-mlflow"]
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "index_gallery.py"), "--model", str(model), "--index",
                           str(index), "--score-threshold", "0", *logging, *inputs], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def gallery(tiny_cuhk, tiny_students, tmp_path_factory):
    """A folder of 4 scene images and an 8-frame video; indexed once, then again after 2 new
    images and a renamed copy of an indexed one were added."""
    from dkd_ray.data import load_annotations

    annotations = load_annotations("cuhk_sysu", tiny_cuhk)
    scenes = [annotations.image_path(int(i)) for i in annotations.images.indices("test")]
    root = tmp_path_factory.mktemp("gallery")
    folder = root / "footage"
    folder.mkdir()
    for scene in scenes[:4]:
        shutil.copy(scene, folder / scene.name)
    _write_video(folder / "cam1.mp4", scenes[:8])
    mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
    first = _index(tiny_students[0], root / "index", "--input", str(folder), "--fps", "2", mlflow_uri=mlflow_uri)
    info_first = json.loads((root / "index" / "index.json").read_text())
    for scene in scenes[4:6]:
        shutil.copy(scene, folder / scene.name)
    shutil.copy(scenes[0], folder / "renamed-copy.jpg")
    second = _index(tiny_students[0], root / "index", "--input", str(folder), "--fps", "2")
    return {"root": root, "mlflow_uri": mlflow_uri, "folder": folder, "index": root / "index", "first": first, "second": second,
            "info_first": info_first, "model": tiny_students[0], "other_model": tiny_students[1], "scenes": scenes}


def _search(capsys, *argv: str) -> tuple[int, str, str]:
    sys.path.insert(0, str(ROOT / "jobs"))
    import search

    try:
        code = search.main(list(argv))
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_index_holds_every_image_and_the_sampled_video_frames(gallery):
    from dkd_ray.gallery.index import read_index, embeddings_of, boxes_of

    first = gallery["first"]
    assert first.returncode == 0, first.stdout + first.stderr
    assert "indexed 5 new file(s) (0 already indexed)" in first.stdout, first.stdout
    files = {Path(f["source"]).name: f for f in gallery["info_first"]["files"].values()}
    assert sorted(files) == sorted([p.name for p in gallery["scenes"][:4]] + ["cam1.mp4"])
    assert files["cam1.mp4"]["frames"] == 4  # 8 frames at 4 fps sampled at 2 fps: 0, 0.5, 1.0, 1.5 s
    assert all(f["frames"] == 1 for name, f in files.items() if name != "cam1.mp4")

    info, table = read_index(str(gallery["index"]))
    video = table.filter(np.array([s.endswith("cam1.mp4") for s in table.column("source").to_pylist()]))
    assert sorted(set(video.column("frame").to_pylist())) == [0, 2, 4, 6]
    assert np.allclose(sorted(set(video.column("timestamp").to_pylist())), [0.0, 0.5, 1.0, 1.5])
    emb, boxes = embeddings_of(table), boxes_of(table)
    assert emb.shape == (len(table), info.embedding_dim) and len(table) > 0
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    width, height = table.column("image_width").to_numpy(), table.column("image_height").to_numpy()
    # original pixels, within the resize's rounding (the 129-px scenes are detected at 160 px)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width + 1).all() and (boxes[:, 3] <= height + 1).all()


def test_index_run_in_mlflow_has_lineage_counts_and_a_sample_search_picture(gallery):
    from mlflow import MlflowClient

    client = MlflowClient(gallery["mlflow_uri"])
    experiment = client.get_experiment_by_name("dkd-ray/gallery")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the second indexing ran with --no-mlflow
    run = runs[0]
    assert run.data.tags["model_digest"] == gallery["info_first"]["model_digest"]
    assert run.data.tags["model_ref"] == str(gallery["model"]) and run.data.tags["role"] == "index"
    assert run.data.metrics["files_new"] == 5 and run.data.metrics["frames"] == 8  # 4 images + 4 video frames
    assert run.data.metrics["boxes"] == sum(f["boxes"] for f in gallery["info_first"]["files"].values())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "sample_search")}
    assert {"sample_search/results.png", "sample_search/results.html", "sample_search/results.json"} <= artifacts
    assert "index.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_reindexing_a_grown_folder_indexes_only_the_new_files(gallery):
    second = gallery["second"]
    assert second.returncode == 0, second.stdout + second.stderr
    # 2 new images; the renamed copy has an indexed file's content: not indexed again
    assert "indexed 2 new file(s) (6 already indexed)" in second.stdout, second.stdout
    info = json.loads((gallery["index"] / "index.json").read_text())
    assert len(info["parts"]) == 2 and len(info["files"]) == 7
    assert info["model_digest"] == gallery["info_first"]["model_digest"]


def test_query_by_image_and_box_finds_that_detection_first(gallery, capsys, tmp_path):
    from dkd_ray.gallery.index import boxes_of, read_index

    _, table = read_index(str(gallery["index"]))
    scene = str(gallery["folder"] / gallery["scenes"][1].name)
    rows = [i for i, s in enumerate(table.column("source").to_pylist()) if s == scene]
    row = max(rows, key=lambda i: table.column("score")[i].as_py())
    box = boxes_of(table)[row]
    code, out, err = _search(capsys, "--model", str(gallery["model"]), "--index", str(gallery["index"]),
                             "--query", scene, "--box", *map(str, box), "--top-k", "5", "--output-dir", str(tmp_path))
    assert code == 0, err
    hits = json.loads((tmp_path / "results.json").read_text())["hits"]
    # the query embeds the same box of the same image as the detection did: similarity 1
    assert hits[0]["source"] == scene and np.allclose(hits[0]["box"], box, atol=1e-3), hits[0]
    assert hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    assert (tmp_path / "results.png").stat().st_size > 1000
    page = (tmp_path / "results.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 1 + 2 * len(hits) and "http" not in page  # self-contained


def test_query_by_several_crops_averages_them_and_filters_apply(gallery, capsys, tmp_path):
    from dkd_ray.gallery.embed import scene_sizes
    from dkd_ray.gallery.query import Query, embed_queries
    from dkd_ray.models.loading import load_model

    crops = []
    for i, scene in enumerate(gallery["scenes"][:2]):
        crop = tmp_path / f"crop{i}.png"
        Image.open(scene).crop((10, 10, 60, 110)).save(crop)
        crops.append(str(crop))
    model = load_model(gallery["model"], role="student")
    each = [embed_queries(model, [Query(c)], scene_sizes(model)) for c in crops]
    both = embed_queries(model, [Query(c) for c in crops], scene_sizes(model))
    mean = (each[0] + each[1]) / np.linalg.norm(each[0] + each[1])
    assert np.allclose(both, mean, atol=1e-5) and not np.allclose(each[0], each[1])

    code, out, err = _search(capsys, "--model", str(gallery["model"]), "--index", str(gallery["index"]),
                             "--query", *crops, "--source", "cam1*", "--time-range", "0.4", "1.1",
                             "--top-k", "50", "--output-dir", str(tmp_path / "out"))
    assert code == 0, err
    hits = json.loads((tmp_path / "out" / "results.json").read_text())["hits"]
    assert hits and all(h["source"].endswith("cam1.mp4") and 0.4 <= h["timestamp"] <= 1.1 for h in hits)
    assert {h["frame"] for h in hits} <= {2, 4}


def test_faiss_indexes_return_the_exact_top_k_on_a_small_gallery(gallery):
    from dkd_ray.gallery.index import embeddings_of, read_index
    from dkd_ray.gallery.query import top_k

    _, table = read_index(str(gallery["index"]))
    emb = embeddings_of(table)
    rng = np.random.default_rng(0)
    for query in emb[rng.choice(len(emb), 3, replace=False)] + 0.05 * rng.standard_normal((3, emb.shape[1])):
        query = (query / np.linalg.norm(query)).astype(np.float32)
        exact_rows, exact_sims, _ = top_k(emb, query, 10, "exact")
        brute = np.argsort(-(emb @ query), kind="stable")[:10]
        assert np.allclose(exact_sims, (emb @ query)[brute], atol=1e-6)
        for method in ("faiss-flat", "faiss-hnsw"):
            rows, sims, used = top_k(emb, query, 10, method)
            assert used == method and set(rows) == set(exact_rows), method
            assert np.allclose(sims, exact_sims, atol=1e-4)


def test_blocked_exact_search_equals_one_product():
    from dkd_ray.gallery.query import exact_top_k

    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((1000, 8)).astype(np.float32)
    gallery[500] = gallery[3]  # a tie: the lower row first
    query = gallery[3] / 2
    rows, sims = exact_top_k(gallery, query, 7, block_rows=64)
    expected = np.lexsort((np.arange(1000), -(gallery @ query)))[:7]
    assert list(rows) == list(expected) and rows[0] == 3 and rows[1] == 500


def test_index_of_a_dataset_split_scores_as_the_evaluator_does(tiny_cuhk, tiny_students, tmp_path):
    """The index's rows over the test split, handed to the evaluator, give the same arrays and
    the same metrics as the evaluation's own inference over that split."""
    import torch

    from dkd_ray.data import load_annotations
    from dkd_ray.eval.arrays import Detections
    from dkd_ray.eval.pipeline import evaluate_arrays
    from dkd_ray.gallery.embed import scene_sizes
    from dkd_ray.gallery.index import evaluation_detections, read_index
    from dkd_ray.inference import student_gallery, student_queries
    from dkd_ray.models.loading import load_model

    result = _index(tiny_students[0], tmp_path / "index", "--dataset", "cuhk_sysu", "--data-root", str(tiny_cuhk),
                    "--split", "test")
    assert result.returncode == 0, result.stdout + result.stderr
    annotations = load_annotations("cuhk_sysu", tiny_cuhk)
    _, table = read_index(str(tmp_path / "index"))
    from_index = evaluation_detections(table, annotations)

    model = load_model(tiny_students[0], role="student")
    model.roi_heads.score_thresh = 0.0
    short, longest = scene_sizes(model)
    rows = annotations.images.indices("test")
    sizes = dict(short_side=short, max_side=longest, device=torch.device("cpu"))
    direct = Detections.from_lists(*student_gallery(model, annotations, rows, **sizes),
                                   num_images=len(annotations.images), dim=from_index.embeddings.shape[1])
    assert np.array_equal(from_index.offsets, direct.offsets)
    assert np.allclose(from_index.boxes, direct.boxes, atol=1e-4)
    assert np.allclose(from_index.embeddings, direct.embeddings, atol=1e-5)
    _, queries = student_queries(model, annotations, range(len(annotations.queries.image_index)), **sizes)
    a = evaluate_arrays(annotations, from_index, queries, score_threshold=0.0, plots=False).metrics
    b = evaluate_arrays(annotations, direct, queries, score_threshold=0.0, plots=False).metrics
    assert a == b and any(k.endswith("/mAP") for k in a)


def test_bad_inputs_are_refused_by_name(gallery, capsys, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jpg").write_bytes(b"not a jpeg")
    (broken / "bad.mp4").write_bytes(b"\x00" * 64)
    result = _index(gallery["model"], tmp_path / "idx", "--input", str(broken))
    assert result.returncode == 2 and "unreadable" in result.stderr and "bad." in result.stderr, result.stderr
    assert "(and 1 more)" in result.stderr and not (tmp_path / "idx" / "index.json").exists()

    scene = str(gallery["folder"] / gallery["scenes"][1].name)
    code, _, err = _search(capsys, "--model", str(gallery["model"]), "--index", str(gallery["index"]),
                           "--query", scene, "--box", "10", "10", "5000", "50", "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "lies outside" in err and scene in err, err
    code, _, err = _search(capsys, "--model", str(gallery["other_model"]), "--index", str(gallery["index"]),
                           "--query", scene, "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "was built by model" in err and "cannot be compared" in err, err
    code, _, err = _search(capsys, "--model", str(gallery["model"]), "--index", str(tmp_path / "nothing"),
                           "--query", scene)
    assert code == 2 and "no gallery index there" in err, err
    grown = _index(gallery["other_model"], gallery["index"], "--input", scene)
    assert grown.returncode == 2 and "was built by model" in grown.stderr, grown.stderr


def test_exported_embedder_round_trips_to_the_eager_embeddings(tiny_students, tmp_path, capsys):
    import torch

    sys.path.insert(0, str(ROOT / "jobs"))
    import export_model

    from dkd_ray.models.loading import load_model

    out = tmp_path / "embedder.pt2"
    assert export_model.main(["--model", str(tiny_students[0]), "--height", "144", "--width", "192",
                              "--out", str(out)]) == 0
    assert "checked against the eager model" in capsys.readouterr().out
    program = torch.export.load(out)
    student = load_model(tiny_students[0], role="student")
    image = torch.rand(3, 144, 192)
    for n in (1, 3, 11):  # any number of boxes
        boxes = torch.tensor([[4.0 + i, 6.0, 60.0 + 5 * i, 130.0] for i in range(n)])
        with torch.no_grad():
            eager = student.embed_boxes([image], [boxes])[0]
            exported = program.module()(image, boxes)
        assert exported.shape == eager.shape == (n, eager.shape[1])
        assert torch.allclose(exported, eager, atol=1e-5)
    other = load_model(tiny_students[1], role="student")  # and it is this model, not any model
    with torch.no_grad():
        assert not torch.allclose(program.module()(image, boxes), other.embed_boxes([image], [boxes])[0], atol=1e-3)
