"""Object storage as the only storage (issue: clusters without a shared file system).

An S3-compatible server (moto) on 127.0.0.1 stands in for S3/MinIO; clients find it through the
standard ``AWS_*`` variables, as on a cluster. One server (conftest's ``s3``) serves the whole module."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.harness import mlflow_server, ray_head, ray_node, submit_job
from tests.tiny import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bucket(s3, request) -> str:
    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    return s3.create_bucket(name)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "node-cache"
    monkeypatch.setenv("DKD_CACHE_DIR", str(folder))
    return folder


def test_storage_layer_reads_writes_lists_and_localizes_a_folder_once(bucket, cache, tmp_path):
    from dkd_ray import storage

    storage.write_json(f"{bucket}/runs/a/record.json", {"state": "running"})
    assert storage.read_json(f"{bucket}/runs/a/record.json") == {"state": "running"}
    assert storage.read_json(f"{bucket}/runs/b/record.json") is None
    assert storage.list_dir(f"{bucket}/runs") == ["a"] and storage.is_dir(f"{bucket}/runs/a")

    local = tmp_path / "checkpoint"
    (local / "bank").mkdir(parents=True)
    (local / "state.pt").write_bytes(b"\0" * 1000)
    (local / "bank" / "part.parquet").write_bytes(b"parquet")
    storage.upload_dir(local, f"{bucket}/ckpt/checkpoint_000002")
    copy = storage.localize(f"{bucket}/ckpt/checkpoint_000002")
    assert copy.is_relative_to(cache)
    assert (copy / "state.pt").read_bytes() == b"\0" * 1000 and (copy / "bank" / "part.parquet").read_bytes() == b"parquet"
    assert storage.localize(f"{bucket}/ckpt/checkpoint_000002/") == copy  # cached: one download per node
    assert [p.name for p in cache.iterdir() if p.suffix != ".lock"] == [copy.name]  # no staging folder left
    assert storage.localize(local) == local  # a local path is used in place
    with pytest.raises(FileNotFoundError, match="checkpoint_000009"):
        storage.localize(f"{bucket}/ckpt/checkpoint_000009")


def test_uris_keep_their_query_and_file_uris_are_local_paths(s3):
    from dkd_ray import storage

    assert storage.join("s3://b/runs?endpoint_override=127.0.0.1:9000", "r", "ckpt") == \
        "s3://b/runs/r/ckpt?endpoint_override=127.0.0.1:9000"
    assert storage.uri_of("s3://b/runs", "b/runs/r/checkpoint_000") == "s3://b/runs/r/checkpoint_000"
    with pytest.raises(ValueError, match="not inside"):
        storage.uri_of("s3://b/runs", "other/r")
    assert not storage.is_remote("file:///tmp/x") and storage.absolute("file:///tmp/x") == "/tmp/x"
    assert storage.is_remote("gs://b/x") and not storage.is_remote("models:/dkd-student-prw/1")


def test_a_changed_remote_folder_is_downloaded_again_not_served_from_the_cache(bucket, cache, tmp_path):
    from dkd_ray import storage

    folder = tmp_path / "bank"
    folder.mkdir()
    (folder / "part.parquet").write_bytes(b"first")
    storage.upload_dir(folder, f"{bucket}/bank")
    first = storage.localize(f"{bucket}/bank")
    (folder / "part.parquet").write_bytes(b"second, longer")  # re-created under the same name
    storage.upload_dir(folder, f"{bucket}/bank")
    second = storage.localize(f"{bucket}/bank")
    assert second != first and (second / "part.parquet").read_bytes() == b"second, longer"
    assert storage.localize(f"{bucket}/bank") == second


def test_the_node_cache_evicts_the_least_recently_used_copies_past_its_bound(bucket, cache, tmp_path, monkeypatch):
    """Three 1 KB folders downloaded in turn under a 2.5 KB bound: the third download evicts the
    least recently used copy (the first, unless it was used again since), never one used within
    the keep window, and a dead download's staging folder goes too."""
    import time

    from dkd_ray import storage

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.bin").write_bytes(bytes(1000))
        storage.upload_dir(tmp_path / name, f"{bucket}/{name}")
    monkeypatch.setenv("DKD_CACHE_MAX_BYTES", "2500")
    monkeypatch.setenv("DKD_CACHE_KEEP_S", "0")
    a = storage.localize(f"{bucket}/a")
    b = storage.localize(f"{bucket}/b")
    old = time.time() - 100
    os.utime(a, (old, old))
    os.utime(b, (old + 10, old + 10))
    dead = cache / ".xyz-b.deadbeef"  # what a download killed half way leaves
    dead.mkdir()
    os.utime(dead, (old, old))
    assert storage.localize(f"{bucket}/b") == b  # a hit is a use: b is now the newest of the two
    c = storage.localize(f"{bucket}/c")
    assert not a.exists() and b.exists() and c.exists() and not dead.exists()
    assert storage.localize(f"{bucket}/a") == a and (a / "part.bin").stat().st_size == 1000  # fetched again


def test_a_copy_in_use_is_never_evicted(tmp_path):
    import time

    from dkd_ray import storage

    for name, age in (("old", 7200), ("recent", 60)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(bytes(1000))
        os.utime(tmp_path / name, (time.time() - age,) * 2)
    removed = storage.prune_cache(tmp_path, max_bytes=0, keep_s=600)
    assert removed == [tmp_path / "old"] and (tmp_path / "recent").exists()


def test_resume_takes_over_a_run_recorded_as_running_on_another_machine(bucket, caplog):
    """A driver lost with its machine (a preempted pod) leaves its record 'running', and its
    liveness cannot be checked from here: a new start is refused, --resume takes the run over."""
    import argparse

    from dkd_ray.cli import claim_run_name
    from dkd_ray.tracking.run_record import write_record

    storage = f"{bucket}/runs"
    write_record(storage, "student-k8s-1", host="dkd-student-head-x7k2p", pid=42, state="running", run_id="r1")
    with pytest.raises(SystemExit):
        claim_run_name(argparse.Namespace(resume=""), storage, "student-k8s-1")
    claim_run_name(argparse.Namespace(resume="student-k8s-1"), storage, "student-k8s-1")  # no exit
    assert "takes it over" in caplog.text


def test_run_records_live_on_object_storage_and_a_lost_driver_is_reaped_there(bucket, tmp_path):
    from mlflow import MlflowClient

    from dkd_ray.tracking.run_record import claim, read_record, reap_lost_drivers, write_record

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e"))
    storage = f"{bucket}/runs"
    claim(storage, "student-1", run_id=run.info.run_id, uri=uri, experiment="e", pipeline_id="p")
    assert read_record(storage, "student-1")["run_id"] == run.info.run_id
    assert reap_lost_drivers(storage, uri) == []  # this process is alive
    write_record(storage, "student-1", pid=2**22 + 12345)  # a pid that no process has
    assert reap_lost_drivers(storage, uri) == ["student-1"]
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert read_record(storage, "student-1")["state"] == "killed"


def test_a_checkpoint_and_its_bank_load_straight_from_their_uri(bucket, cache, tiny_teacher):
    from dkd_ray import storage
    from dkd_ray.distill.bank import KnowledgeBank
    from dkd_ray.models.loading import check_model_ref, load_model
    from dkd_ray.tracking import ModelNotFoundError

    uri = f"{bucket}/teachers/{tiny_teacher.name}"
    storage.upload_dir(tiny_teacher, uri)
    remote, local = load_model(uri, role="teacher"), load_model(tiny_teacher, role="teacher")
    for (name, a), (_, b) in zip(remote.state_dict().items(), local.state_dict().items()):
        assert torch.equal(a, b), name
    banks = KnowledgeBank.load(f"{uri}/bank"), KnowledgeBank.load(tiny_teacher / "bank")
    assert np.array_equal(banks[0].embedding.numpy(), banks[1].embedding.numpy()) and len(banks[0]) > 0
    check_model_ref(uri, "teacher")  # found without downloading
    with pytest.raises(ModelNotFoundError, match="no checkpoint there"):
        check_model_ref(f"{bucket}/teachers/nothing-here", "teacher")


def test_the_newest_complete_checkpoint_in_a_bucket_skips_a_partial_upload(bucket, tiny_students, tmp_path):
    """What a sweep's champion and its resume read on object storage: the newest checkpoint
    whose manifests' files are all in the bucket with their sizes; one whose upload stopped
    half way (state.pt short, or a rank's manifest not there yet) is skipped, nothing downloaded."""
    import shutil

    from dkd_ray import storage
    from dkd_ray.sweep.champion import final_checkpoint
    from dkd_ray.train.session import newest_complete_checkpoint_uri

    newest, older = tiny_students
    run = f"{bucket}/trials/trial-abc"
    storage.upload_dir(older, f"{run}/{older.name}")
    storage.write_json(f"{run}/checkpoint_manager_snapshot.json", {"not": "a checkpoint"})
    cut = tmp_path / newest.name
    shutil.copytree(newest, cut)
    with open(cut / "state.pt", "r+b") as f:
        f.truncate(1000)
    storage.upload_dir(cut, f"{run}/{newest.name}")
    assert newest_complete_checkpoint_uri(run) == f"{run}/{older.name}"
    assert final_checkpoint(f"{bucket}/trials", "abc", reported="reported") == f"{run}/{older.name}"

    storage.upload_dir(newest, f"{run}/{newest.name}")  # the upload finished after all
    assert newest_complete_checkpoint_uri(run) == f"{run}/{newest.name}"
    filesystem, path = storage.filesystem(f"{run}/{newest.name}/MANIFEST.rank0.json")
    filesystem.delete_file(path)
    assert newest_complete_checkpoint_uri(run) == f"{run}/{older.name}"
    assert newest_complete_checkpoint_uri(f"{bucket}/trials/trial-none") is None


def test_a_node_without_the_drivers_synthetic_data_generates_the_same_files(tmp_path):
    """Synthetic data the driver generated on its own disk is made again, identical, by a worker
    on a node that lacks it (same preset, same seed)."""
    from dkd_ray.config import preset
    from dkd_ray.train.workdata import load_training_annotations, resolve_data_root

    cfg = preset("cpu-small", ["data.synthetic_preset=tiny"])
    driver_root = resolve_data_root(cfg, tmp_path / "driver")
    other_node = tmp_path / "node" / driver_root.relative_to(tmp_path / "driver")
    annotations = load_training_annotations({"config": cfg.to_dict(), "data_root": str(other_node)})
    assert annotations.images.fingerprint() == load_training_annotations(
        {"config": cfg.to_dict(), "data_root": str(driver_root)}).images.fingerprint()
    for name in ("Image/SSM/s1.jpg", "annotation/Images.mat"):
        assert (other_node / name).read_bytes() == (driver_root / name).read_bytes(), name


@pytest.mark.slow
def test_student_job_on_two_nodes_with_only_object_storage(s3, bucket, tiny_cuhk, tiny_teacher, tmp_path):
    """`ray job submit` to a token-authenticated cluster of two Ray nodes (a head and a node joined
    with `ray start --address`), an MLflow server whose artifacts go to the bucket, the teacher
    given as an s3:// checkpoint, --storage-path s3://: the student's two DDP workers (one per
    node) are handed URIs only, read the teacher's bank from the bucket and checkpoint there;
    the second node is lost mid-training (SIGKILL of its raylet and worker), a replacement node
    joins, and the run resumes from the newest checkpoint in the bucket on the same batches, to the
    final weights of a run never interrupted; the
    evaluation files, the run record and the model land in the bucket, nothing on a local
    storage folder; the run's params, metrics
    (the two-step reference too) and artifacts are in MLflow, and the registered model loads
    back with the checkpoint's weights."""
    from mlflow import MlflowClient

    from dkd_ray import storage
    from dkd_ray.eval.pipeline import headline_prefix
    from dkd_ray.models.loading import load_model
    from dkd_ray.train.checkpoint import load_checkpoint
    from tests.ddp import train_student_on_workers

    teacher = f"{bucket}/teachers/tiny"
    storage.upload_dir(tiny_teacher, teacher)
    trace, marker = tmp_path / "trace.txt", tmp_path / "killed"
    cache = tmp_path / "node-cache"  # both nodes are on this machine: one disk, so one cache folder
    with mlflow_server(tmp_path / "mlflow", artifacts_destination=f"{bucket}/mlflow", env=s3.env) as server:
        node_env = {**s3.env, "DKD_CACHE_DIR": str(cache)}
        with ray_head(tmp_path / "ray", num_cpus=1, env=node_env) as head, \
                ray_node(head, tmp_path / "node", num_cpus=1, env=node_env) as second:
            args = [sys.executable, str(ROOT / "jobs" / "train_student.py"), "--data-root", str(tiny_cuhk),
                    "--teacher", teacher, "--num-workers", "2", "--max-iters", "6",
                    "--storage-path", f"{bucket}/runs", "--run-name", "student-s3",
                    "--set", "train.checkpoint_every_iters=2", "--set", "train.deterministic=true"]
            for override in TINY_OVERRIDES:
                args += ["--set", override]
            env_vars = {"MLFLOW_TRACKING_URI": server.uri, "DKD_TRACE_FILE": str(trace)}
            outcome: dict = {}
            job = threading.Thread(target=lambda: outcome.setdefault("result", submit_job(
                head.dashboard_url, args, head.client_env(), timeout_s=900,
                extra_args=["--runtime-env-json", json.dumps({"env_vars": env_vars})])), daemon=True)
            job.start()
            deadline = time.monotonic() + 600
            while job.is_alive() and time.monotonic() < deadline and \
                    not (trace.exists() and len(trace.read_text().splitlines()) >= 3):
                time.sleep(0.2)
            assert job.is_alive(), outcome
            second.kill()  # the second node is lost mid-training: its raylet and its worker die at once
            done_before = len(trace.read_text().splitlines())
            with ray_node(head, tmp_path / "replacement", num_cpus=1, env=node_env):  # a new node joins
                job.join(timeout=900)
        result = outcome["result"]
        assert result.status == "SUCCEEDED", result.submit_output + result.logs[-6000:]
        placed = [line for line in result.logs.splitlines() if "world_rank=" in line]
        assert any("ip=127.0.0.2" in line for line in placed) and any("ip=127.0.0.1" in line for line in placed), \
            placed or result.logs[-6000:]  # one worker on each node

        # After the node loss both workers restarted from the newest checkpoint in the bucket
        # (every 2 iterations) and trained the same batches again, then went on to 6.
        lineage = [tuple(line.split()) for line in trace.read_text().splitlines()]
        iterations = [int(i) for i, _ in lineage]
        restart = next((k for k in range(1, len(iterations)) if iterations[k] <= iterations[k - 1]), None)
        assert restart is not None and restart >= done_before, lineage  # no iteration ran twice: no restart?
        resumed_from = iterations[restart]
        assert resumed_from % 2 == 1, lineage
        assert iterations[restart:] == list(range(resumed_from, 7)), lineage
        assert lineage[resumed_from - 1:restart] == lineage[restart:restart + restart - resumed_from + 1], lineage
        fetched = {p.name.split("-", 1)[1] for p in cache.iterdir()}
        assert {"bank", "evaluation"} <= fetched, fetched  # read from the bucket into the nodes' cache
        keys = s3.keys(f"{bucket.removeprefix('s3://')}/runs/student-s3")
        assert any(k.endswith("_i0000006/state.pt") for k in keys), keys  # the final checkpoint
        assert any(k.endswith("/evaluation/metrics.json") for k in keys), keys
        assert any(k.endswith("/mlflow_run.json") for k in keys), keys
        assert not (tmp_path / "runs").exists() and not Path("runs", "student-s3").exists()

        client = MlflowClient(server.uri, server.uri)  # the registry too: earlier tests set a process-wide one
        runs = client.search_runs([client.get_experiment_by_name("dkd-ray/synthetic").experiment_id],
                                  "tags.job = 'train_student'")
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED" and run.data.tags["checkpoint"].startswith(f"{bucket}/runs/student-s3/")
        assert run.data.params["student.batch_size"] == "2" and run.data.params["distill.enabled"] == "True"
        assert not any("testing" in str(v) for v in run.data.params.values())  # no credential reached MLflow
        for key in ("cuhk_sysu/g5/mAP", "cuhk_sysu/full/top1", "det/ap", "two_step/cuhk_sysu/g5/mAP",
                    "train/loss_kd_tri"):
            assert key in run.data.metrics, key
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert {"evaluation/metrics.json", "evaluation/results.jsonl", "evaluation/cmc.png"} <= artifacts
        artifact_keys = s3.keys(f"{bucket.removeprefix('s3://')}/mlflow")
        assert any(k.endswith("/evaluation/metrics.json") for k in artifact_keys), "artifacts are not in S3"

        version = client.get_model_version("dkd-student-synthetic", "1")
        assert version.run_id == run.info.run_id and version.tags["dataset"] == "synthetic"
        head_key = headline_prefix(run.data.metrics, "cuhk_sysu")
        assert head_key == "cuhk_sysu/g10"  # the tiny data's largest gallery (no TestG100)
        assert float(version.tags["mAP"]) == pytest.approx(run.data.metrics[f"{head_key}/mAP"], abs=1e-4)
        assert float(version.tags["top1"]) == pytest.approx(run.data.metrics[f"{head_key}/top1"], abs=1e-4)
        model = load_model("models:/dkd-student-synthetic/1", role="student", uri=server.uri)
    stored = load_model(run.data.tags["checkpoint"], role="student")
    for (name, a), (_, b) in zip(model.state_dict().items(), stored.state_dict().items()):
        assert torch.equal(a, b), name

    # The interrupted run ends with the weights an uninterrupted one reaches (deterministic mode):
    # its own config, read from its final checkpoint, on two plain gloo processes never stopped.
    final = load_checkpoint(storage.localize(run.data.tags["checkpoint"]))
    uninterrupted = load_checkpoint(train_student_on_workers(
        {"config": final.config, "data_root": str(tiny_cuhk), "bank_path": str(tiny_teacher / "bank")},
        tmp_path / "uninterrupted"))
    assert final.iteration == uninterrupted.iteration == 6
    differing = [name for name, value in uninterrupted.model.items() if not torch.equal(value, final.model[name])]
    assert not differing, f"{len(differing)} tensors differ from the uninterrupted run's, e.g. {differing[:5]}"
