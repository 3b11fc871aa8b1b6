"""Every entry point turns bad input into one line on stderr and exit status 2, before Ray starts
and before anything is written or registered. Real processes, as a user runs the jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_job(job: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(REPO / "jobs" / job), *args], capture_output=True, text=True,
                          timeout=180, cwd=cwd, env=env)


def assert_one_line_refusal(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("job", ["train_teacher.py", "train_student.py", "pipeline.py", "tune_distill.py"])
@pytest.mark.parametrize("override, key", [("teacher.lr=inf", "teacher.lr"), ("student.lr=nan", "student.lr"),
                                           ("distill.prob_weight=-1", "distill.prob_weight"),
                                           ("student.no_such_key=1", "student.no_such_key")])
def test_a_bad_config_value_is_one_line_naming_the_key(job, override, key, tmp_path):
    result = run_job(job, "--set", override, "--storage-path", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_refusal(result, key)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("teacher, fragment", [("no/such/teacher", "'no/such/teacher'"),
                                               ("models:/dkd-teacher-synthetic/41", "dkd-teacher-synthetic/41"),
                                               ("0123456789abcdef0123456789abcdef", "0123456789abcdef"),
                                               ("EMPTY", "holds no model")])
def test_a_teacher_reference_naming_nothing_is_one_line_before_ray(teacher, fragment, tmp_path):
    if teacher == "EMPTY":
        teacher = str(tmp_path / "empty-checkpoint")
        Path(teacher).mkdir()
    result = run_job("train_student.py", "--teacher", teacher, "--storage-path", str(tmp_path / "runs"),
                     cwd=tmp_path)
    assert_one_line_refusal(result, fragment)
    assert not (tmp_path / "runs").exists()  # no data generated, no Ray run


def test_a_corrupt_checkpoint_file_is_one_line_naming_it(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "state.pt").write_bytes(b"\x80\x02 not a checkpoint")
    result = run_job("train_student.py", "--teacher", str(folder), "--storage-path", str(tmp_path / "runs"),
                     cwd=tmp_path)
    assert_one_line_refusal(result, str(folder))


def test_make_synthetic_into_a_folder_that_cannot_exist_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"  # a file where a folder must go: refused even for root
    blocker.write_text("not a folder")
    result = run_job("make_synthetic.py", "--layout", "cuhk_sysu", "--root", str(blocker / "CUHK-SYSU"),
                     "--preset", "tiny", cwd=tmp_path)
    assert_one_line_refusal(result, "a-file")


@pytest.fixture(scope="module")
def tiny_prw(tmp_path_factory) -> Path:
    from dkd_ray.data.synthetic import generate

    root = tmp_path_factory.mktemp("prw") / "PRW"
    generate(root, "prw", "tiny", seed=0)
    return root


def test_a_nan_query_box_stops_training_on_the_driver_before_ray(tiny_prw, tmp_path):
    broken = Path(shutil.copytree(tiny_prw, tmp_path / "PRW", ignore=shutil.ignore_patterns(".dkd_cache")))
    lines = (broken / "query_info.txt").read_text().splitlines()
    fields = lines[1].split()
    fields[2] = "nan"  # the x coordinate of the second query's box
    lines[1] = " ".join(fields)
    (broken / "query_info.txt").write_text("\n".join(lines) + "\n")
    result = run_job("train_teacher.py", "--dataset", "prw", "--data-root", str(broken), "--storage-path",
                     str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_refusal(result, "query_info.txt", "line 2")
    assert "Ray" not in result.stdout  # refused before a cluster started
    assert not (tmp_path / "mlflow.db").exists()  # no run, nothing registered


def test_a_dataset_too_small_for_the_teacher_batch_is_refused_naming_the_file(tiny_cuhk, tmp_path):
    result = run_job("train_student.py", "--dataset", "cuhk_sysu", "--data-root", str(tiny_cuhk), "--set",
                     "teacher.p_identities=500", "--storage-path", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_refusal(result, "Train.mat", "training identities")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_run_name_in_use_is_refused_unless_resumed(tmp_path):
    storage = tmp_path / "runs"
    (storage / "teacher-a").mkdir(parents=True)
    taken = run_job("train_teacher.py", "--run-name", "teacher-a", "--storage-path", str(storage), cwd=tmp_path)
    assert_one_line_refusal(taken, "'teacher-a'", "--resume teacher-a")
    missing = run_job("train_teacher.py", "--resume", "teacher-b", "--storage-path", str(storage), cwd=tmp_path)
    assert_one_line_refusal(missing, "no run 'teacher-b'")

    from dkd_ray.tracking.run_record import claim

    claim(storage, "teacher-a", run_id="r" * 32, uri="sqlite:///x.db", experiment="e", pipeline_id="p")
    live = run_job("train_teacher.py", "--resume", "teacher-a", "--storage-path", str(storage), cwd=tmp_path)
    assert_one_line_refusal(live, "'teacher-a'", f"pid {os.getpid()}")  # this test process holds it
    assert sorted(p.name for p in storage.iterdir()) == ["teacher-a"]


def test_a_run_whose_driver_died_is_marked_killed_at_the_next_start(tmp_path):
    from mlflow import MlflowClient

    from dkd_ray.tracking.run_record import claim, read_record, reap_lost_drivers

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e"), run_name="student-x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage = tmp_path / "runs"
    claim(storage, "student-x", run_id=run.info.run_id, uri=uri, experiment="e", pipeline_id="p")
    record = read_record(storage, "student-x")
    record["pid"] = int(dead.stdout)  # the driver that was SIGKILLed
    (storage / "student-x" / "mlflow_run.json").write_text(__import__("json").dumps(record))
    claim(storage, "student-live", run_id=client.create_run(run.info.experiment_id).info.run_id, uri=uri,
          experiment="e", pipeline_id="p")  # this process: alive, left alone
    assert reap_lost_drivers(storage, uri) == ["student-x"]
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert "driver lost" in client.get_run(run.info.run_id).data.tags["failure"]
    assert read_record(storage, "student-x")["state"] == "killed"
    assert reap_lost_drivers(storage, uri) == []  # once
