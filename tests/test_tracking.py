"""dkd_ray.tracking against a real MLflow server (tests.harness) and a local SQLite store."""

from __future__ import annotations

import importlib.util
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from dkd_ray import tracking
from dkd_ray.config import preset
from dkd_ray.tracking import ModelNotFoundError, Tracker, load_model
from dkd_ray.train.checkpoint import TrainingState, save_checkpoint
from dkd_ray.train.session import LocalSession
from dkd_ray.train.tracking_hooks import epoch_tracker
from tests.harness import TcpProxy, closed_port_uri, mlflow_server

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


class TinyNet(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.head(self.body(x))


class BranchyNet(TinyNet):
    """Data-dependent control flow: torch.export cannot trace it, so it is logged as a pickle."""

    def forward(self, x):
        y = self.head(self.body(x))
        return y * 2 if bool(y.sum() > 0) else y


def build_tiny(config: dict) -> nn.Module:
    return TinyNet(hidden=config["hidden"])


@pytest.fixture(scope="module")
def _mlflow(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as running:
        yield running


@pytest.fixture
def server(_mlflow):
    """The module's server, started again if a test stopped it."""
    if _mlflow.process.poll() is not None:
        _mlflow.start()
    return _mlflow


@pytest.fixture(scope="module")
def example():
    return np.random.default_rng(0).random((6, 4), dtype=np.float32)


@pytest.fixture(scope="module")
def logged(_mlflow, example):
    """One run with config, metrics, an artifact and a registered model (shared by the tests)."""
    torch.manual_seed(0)
    model = TinyNet(hidden=8)
    model.train()
    model(torch.randn(16, 4))  # move BatchNorm's running stats away from their defaults
    cfg = preset("cpu-small", ["student.lr=0.01", "teacher.lr_steps=20,35"])
    name = "dkd-teacher-synthetic"
    server = _mlflow
    with Tracker("synthetic", "teacher", uri=server.uri, pipeline_id="pipe-1") as tracker:
        tracker.log_config(cfg)
        tracker.log_params({"api_token": "s3cret", "store": "https://bob:hunter2@example.invalid/x"})
        for step, loss in enumerate([0.9, 0.5, 0.25]):
            tracker.log_metrics({"loss": loss, "lr": torch.tensor(0.01)}, step=step)
        notes = server.root / "notes.txt"
        notes.write_text("hello")
        tracker.log_artifact(notes, "reports")
        info = tracker.log_model(model, "teacher", example, config={"hidden": 8},
                                 registered_name=name,
                                 version_tags=tracking.version_tags(cfg, {"mAP": 0.5, "top-1": 0.75}),
                                 alias="champion")
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(example))
    return {"run_id": tracker.run_id, "info": info, "name": name, "model": model,
            "expected": expected, "client": MlflowClient(server.uri, server.uri)}


def test_tracking_uri_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_secrets_are_redacted():
    assert tracking.redact_uri("https://alice:pw@mlflow.example.invalid:5000/p?token=abc&x=1") == \
        "https://***@mlflow.example.invalid:5000/p?token=***&x=1"
    assert tracking.redact_params({"db_password": "pw", "AWS_SECRET_ACCESS_KEY": "k", "lr": 0.1,
                                   "uri": "s3://key:secret@bucket/path"}) == \
        {"db_password": "***", "AWS_SECRET_ACCESS_KEY": "***", "lr": 0.1, "uri": "s3://***@bucket/path"}
    # URIs without secrets are shown exactly as given (an absolute SQLite path keeps its four slashes).
    assert tracking.redact_uri("sqlite:////tmp/runs/mlflow.db") == "sqlite:////tmp/runs/mlflow.db"


def test_run_records_params_metrics_artifacts_and_model(logged):
    client, run_id = logged["client"], logged["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["student.lr"] == "0.01"
    assert run.data.params["teacher.lr_steps"] == "20,35"  # tuples as the CLI writes them
    assert run.data.params["api_token"] == "***"
    assert run.data.params["store"] == "https://***@example.invalid/x"
    assert run.data.tags["dataset"] == "synthetic" and run.data.tags["pipeline_id"] == "pipe-1"
    assert run.data.tags["preset"] == "cpu-small"
    assert client.get_experiment(run.info.experiment_id).name == "dkd-ray/synthetic"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(0, 0.9), (1, 0.5), (2, 0.25)]
    assert [m.value for m in client.get_metric_history(run_id, "lr")] == pytest.approx([0.01] * 3)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "reports"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "reports")] == ["reports/notes.txt"]
    config = mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json")
    assert config["student"]["lr"] == 0.01 and config["preset"] == "cpu-small"


def test_registered_version_has_tags_and_alias(logged):
    client, name = logged["client"], logged["name"]
    version = client.get_model_version_by_alias(name, "champion")
    assert version.version == logged["info"].registered_model_version == "1"
    assert version.tags == {"dataset": "synthetic", "preset": "cpu-small", "mAP": "0.5000",
                            "top-1": "0.7500"}
    assert version.run_id == logged["run_id"]
    latest = tracking.latest_registered(name, uri=client.tracking_uri)
    assert latest is not None and latest.version == "1"
    assert tracking.latest_registered("dkd-student-nothing", uri=client.tracking_uri) is None


def test_a_model_without_a_finite_map_is_never_registered_aliased_or_chosen(logged, example):
    client, name = logged["client"], logged["name"]
    uri = client.tracking_uri
    cfg = preset("cpu-small")
    for bad in (float("nan"), float("inf")):
        with Tracker("synthetic", "teacher", uri=uri) as tracker:
            info = tracker.log_model(TinyNet(), "teacher", example, config={"hidden": 8}, registered_name=name,
                                     version_tags=tracking.version_tags(cfg, {"mAP": bad}), alias="champion")
        assert info is not None and getattr(info, "registered_model_version", None) is None  # logged, not registered
        assert client.get_run(tracker.run_id).data.tags["registration"] == f"refused: mAP={bad:.4f}"
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    # A version registered around the rule (by hand, or by an older release) is never chosen nor aliased.
    mlflow.set_registry_uri(uri)
    sneaked = mlflow.register_model(logged["info"].model_uri, name, tags={"mAP": "inf"})
    try:
        assert tracking.latest_registered(name, uri=uri).version == "1"
        with pytest.raises(tracking.UnmeasuredModelError, match="its mAP is inf"):
            tracking.set_alias(name, "champion", sneaked.version, uri=uri)
        assert client.get_model_version_by_alias(name, "champion").version == "1"
        with pytest.raises(tracking.UnmeasuredModelError, match="needs a finite one"):
            tracking.register_model(logged["info"].model_uri, name, tags={"mAP": "nan"}, uri=uri)
    finally:
        client.delete_model_version(name, sneaked.version)


def test_load_model_from_alias_run_id_and_paths(logged, server, example, tmp_path):
    x, expected, uri = torch.from_numpy(example), logged["expected"], server.uri
    local_dir = mlflow.artifacts.download_artifacts(logged["info"].model_uri, dst_path=str(tmp_path))
    save_checkpoint(TrainingState.capture(logged["model"], epoch=3, iteration=30,
                                          config={"hidden": 8}), tmp_path / "ckpt")
    safe_refs = [f"models:/{logged['name']}@champion", f"models:/{logged['name']}/1",
                 logged["run_id"], local_dir, tmp_path / "ckpt", tmp_path / "ckpt" / "state.pt"]
    for ref in safe_refs:  # weights-only: rebuilt from config.json + state dict
        model = load_model(ref, builder=build_tiny, uri=uri)
        assert isinstance(model, TinyNet) and not model.training, ref
        with torch.no_grad():
            assert torch.equal(model(x), expected), ref
    for ref in (f"models:/{logged['name']}@champion", logged["run_id"], local_dir):
        exported = load_model(ref, uri=uri)  # the torch.export graph, no builder needed
        with torch.no_grad():
            assert torch.allclose(exported(x), expected, atol=1e-6), ref


def test_load_model_errors_name_the_ref(logged, server, tmp_path):
    with pytest.raises(ModelNotFoundError, match="missing-alias"):
        load_model(f"models:/{logged['name']}@missing-alias", uri=server.uri)
    with pytest.raises(ModelNotFoundError, match="no-such-file"):
        load_model(str(tmp_path / "no-such-file"), uri=server.uri)
    with pytest.raises(ModelNotFoundError, match="0" * 32):
        load_model("0" * 32, uri=server.uri)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="holds no model"):
        load_model(tmp_path / "empty")
    save_checkpoint(TrainingState.capture(logged["model"], epoch=0, iteration=0), tmp_path / "c")
    with pytest.raises(ValueError, match="builder"):
        load_model(tmp_path / "c")


def test_untraceable_model_falls_back_to_pickle_and_loads_weights_only(server, example):
    torch.manual_seed(1)
    model = BranchyNet(hidden=5).eval()
    with Tracker("synthetic", "student", uri=server.uri) as tracker:
        info = tracker.log_model(model, "student", example, config={"hidden": 5})
    assert info is not None
    with pytest.raises(ValueError, match="trust_pickle"):
        load_model(info.model_uri, uri=server.uri)  # unpickling runs code: refused by default
    trusted = load_model(info.model_uri, uri=server.uri, trust_pickle=True)
    assert isinstance(trusted, BranchyNet)

    def build_branchy(config):
        return BranchyNet(hidden=config["hidden"])

    loaded = load_model(tracker.run_id, builder=build_branchy, uri=server.uri)
    x = torch.from_numpy(example)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_disabled_tracker_does_nothing(server, example):
    client = MlflowClient(server.uri)
    before = len(client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()]))
    tracker = Tracker("synthetic", "teacher", uri=server.uri, enabled=False)
    with tracker:
        tracker.log_metrics({"loss": 1.0}, step=0)
        assert tracker.log_model(TinyNet(), "teacher", example) is None
    assert tracker.run_id is None
    after = len(client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()]))
    assert after == before


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("dkd_ray.tracking") and r.levelno == logging.WARNING and " unreachable (" in r.getMessage()]  # not a tmp_path's name


def test_unreachable_server_warns_once_and_backs_off(caplog, example, tmp_path):
    uri = closed_port_uri()
    caplog.set_level(logging.WARNING, logger="dkd_ray.tracking")
    checkpoints = tmp_path / "ckpt-here"
    checkpoints.mkdir()
    tracker = Tracker("synthetic", "teacher", uri=uri, checkpoint_dir=str(checkpoints), retry_after_s=3600)
    assert tracker.start() is None
    tracker.log_config(preset("cpu-small"))
    for step in range(50):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    assert tracker.log_model(TinyNet(), "teacher", example) is None
    assert tracker.pending()["metrics"] == 50  # kept for when the server comes back
    spool = tracker.end()  # one last attempt, then everything goes to the spool
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert uri in warnings[0] and "training continues" in warnings[0] and str(checkpoints) in warnings[0]
    assert spool == checkpoints / tracking.SPOOL_NAME
    assert len(_spooled_metrics(spool)) == 50


def test_back_off_makes_no_network_attempts(caplog, tmp_path):
    """A listener that drops every connection: counts how often the tracker tries."""
    attempts = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def drop_connections():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            attempts.append(1)
            connection.close()

    thread = threading.Thread(target=drop_connections, daemon=True)
    thread.start()
    try:
        tracker = Tracker("synthetic", "teacher", uri=f"http://127.0.0.1:{listener.getsockname()[1]}",
                          retry_after_s=3600, checkpoint_dir=str(tmp_path))
        tracker.log_metrics({"loss": 1.0}, step=0)
        first = len(attempts)
        for step in range(1, 30):
            tracker.log_metrics({"loss": 1.0}, step=step)
            tracker.log_params({"x": step})
        assert 1 <= first <= 2  # one request + MLflow's single retry
        assert len(attempts) == first  # in back-off: no further connection at all
        assert len(_warnings(caplog)) == 1
        assert tracker.end() == tmp_path / tracking.SPOOL_NAME
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_connection_lost_mid_run_then_back(server, caplog):
    caplog.set_level(logging.WARNING, logger="dkd_ray.tracking")
    proxy = TcpProxy(server.port)
    try:
        tracker = Tracker("synthetic", "teacher", uri=proxy.uri, retry_after_s=0.0)
        run_id = tracker.start()
        tracker.log_metrics({"loss": 1.0}, step=0)
        proxy.cut()
        for step in (1, 2, 3):  # must not raise
            tracker.log_metrics({"loss": 1.0 + step}, step=step)
        tracker.log_params({"after_outage": "yes"})
        assert len(_warnings(caplog)) == 1
        proxy.restore()
        tracker.log_metrics({"loss": 5.0}, step=4)  # the first call that gets through flushes
        tracker.end()
    finally:
        proxy.close()
    client = MlflowClient(server.uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0), (4, 5.0)]
    run = client.get_run(run_id)
    assert run.data.params["after_outage"] == "yes" and run.info.status == "FINISHED"


def test_server_process_stopped_mid_run(server, caplog, example, tmp_path):
    caplog.set_level(logging.WARNING, logger="dkd_ray.tracking")
    tracker = Tracker("synthetic", "teacher", uri=server.uri, checkpoint_dir=str(tmp_path))
    run_id = tracker.start()
    tracker.log_metrics({"loss": 1.0}, step=0)
    server.stop()  # the `server` fixture starts it again for any later test
    for step in (1, 2):
        tracker.log_metrics({"loss": 1.0}, step=step)
    assert tracker.log_model(TinyNet(), "teacher", example) is None
    spool = tracker.end()
    assert run_id is not None and len(_warnings(caplog)) == 1
    assert [(m["step"], m["value"]) for m in _spooled_metrics(spool)] == [(1, 1.0), (2, 1.0)]


def test_local_sqlite_store_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with Tracker("synthetic", "evaluate") as tracker:
        tracker.log_metrics({"mAP": 0.42}, step=0)
        tracker.log_dict({"mAP": 0.42}, "results/summary.json")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.metrics == {"mAP": 0.42}
    stored = list((tmp_path / "mlartifacts").rglob("summary.json"))
    assert len(stored) == 1 and stored[0].parent.name == "results"


# ---------------------------------------------------------------- an outage never drops a value
KEYS = ("train/loss", "train/acc", "train/lr", "val/mAP")


def _value(key: str, step: int) -> float:
    return step * 10.0 + KEYS.index(key) if key in KEYS else float(step)


def _spooled_metrics(path) -> list[dict]:
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["kind"] == "metric"]


def _messages(caplog, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("dkd_ray.tracking") and fragment in r.getMessage()]


def _assert_every_value_arrived(client: MlflowClient, run_id: str, steps: range, keys=KEYS) -> dict:
    histories = {}
    for key in keys:
        history = sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))
        assert [(s, v) for s, v, _ in history] == [(s, _value(key, s)) for s in steps], key
        histories[key] = history
    return histories


def _replay_main():
    spec = importlib.util.spec_from_file_location("replay_mlflow_job", REPO / "jobs" / "replay_mlflow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_outage_mid_run_then_back_every_value_of_every_key_arrives(server, caplog, tmp_path):
    """The proxy cut for steps 8-21 of 30, on four keys: the tracker retries (with back-off), sends
    what waited once the server answers, with the steps and times it was logged at."""
    caplog.set_level(logging.WARNING, logger="dkd_ray.tracking")
    proxy = TcpProxy(server.port)
    try:
        tracker = Tracker("synthetic", "teacher", uri=proxy.uri, checkpoint_dir=str(tmp_path),
                          retry_after_s=0.05, max_retry_after_s=0.4, close_timeout_s=5)
        run_id = tracker.start()
        for step in range(30):
            if step == 8:
                proxy.cut()
            if step == 22:
                proxy.restore()
                restored_ms = time.time() * 1000
                time.sleep(0.5)  # longer than the back-off: the next call gets through
            tracker.log_metrics({key: _value(key, step) for key in KEYS}, step=step)
            if 8 <= step < 22:
                assert tracker.pending()["metrics"] == 4 * (step - 7)  # nothing sent, nothing lost
                time.sleep(0.05)  # several failed retries during the outage
        assert tracker.pending()["metrics"] == 0  # sent mid-run, once the server answered
        assert tracker.close() is None
    finally:
        proxy.close()
    histories = _assert_every_value_arrived(MlflowClient(server.uri), run_id, range(30))
    outage = [t for s, _, t in histories["train/loss"] if 8 <= s < 22]
    assert max(outage) < restored_ms  # the time each value was logged at, not when it was sent
    assert len(_warnings(caplog)) == 1
    assert _messages(caplog, "reachable again") and "56 metric values" in _messages(caplog, "reachable again")[0]
    late = _messages(caplog, "sent late")
    assert len(late) == 1 and "train/loss x14 (steps 8-21)" in late[0] and "nothing is pending" in late[0]
    assert not list(tmp_path.iterdir())  # no spool left behind


def test_worker_epoch_tracker_close_sends_what_the_back_off_still_held(server, tmp_path):
    """The bug seen: the server comes back while rank 0's tracker is still backing off, and the
    loop ends; close() at the end of training must send every epoch's values."""
    driver = Tracker("synthetic", "train_teacher", uri=server.uri)
    run_id = driver.start()
    proxy = TcpProxy(server.port)
    loop_config = {"mlflow": {"uri": proxy.uri, "run_id": run_id, "dataset": "synthetic", "job": "train_teacher",
                              "retry_after_s": 3600, "close_timeout_s": 5}}
    try:
        tracker = epoch_tracker(loop_config, LocalSession(checkpoint_root=tmp_path))
        assert isinstance(tracker, Tracker) and tracker.checkpoint_dir == str(tmp_path)
        tracker.log_metrics({key: _value(key, 1) for key in KEYS}, step=1)
        proxy.cut()
        for epoch in range(2, 17):
            tracker.log_metrics({key: _value(key, epoch) for key in KEYS}, step=epoch)
        proxy.restore()  # back before the end, but the back-off (an hour) outlasts the run
        assert tracker.pending()["metrics"] == 60
        assert tracker.close() is None
    finally:
        proxy.close()
    client = MlflowClient(server.uri)
    _assert_every_value_arrived(client, run_id, range(1, 17))
    assert client.get_run(run_id).info.status == "RUNNING"  # the worker never ends the driver's run
    driver.close()
    assert client.get_run(run_id).info.status == "FINISHED"


def test_server_still_down_at_close_spools_and_the_replay_delivers_everything(server, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="dkd_ray.tracking")
    proxy = TcpProxy(server.port)
    try:
        tracker = Tracker("synthetic", "teacher", uri=proxy.uri, checkpoint_dir=str(tmp_path),
                          retry_after_s=0.05, max_buffered_metrics=10, close_timeout_s=1.5)
        run_id = tracker.start()
        tracker.log_params({"lr": 0.1})
        tracker.log_metrics({key: _value(key, 0) for key in KEYS}, step=0)
        proxy.cut()
        tracker.log_params({"late.param": "yes", "lr": 0.1})
        tracker.set_tags({"stage": "late"})
        for step in range(1, 20):  # 76 values: most past the bound of 10, in the spool already
            tracker.log_metrics({key: _value(key, step) for key in KEYS}, step=step)
        tracker.log_dict({"mAP": 0.5}, "results/summary.json")
        started = time.monotonic()
        spool = tracker.close()
        waited = time.monotonic() - started
    finally:
        proxy.close()
    assert 1.0 <= waited < 15  # a few tries over close_timeout_s, then the spool
    assert spool == tmp_path / "mlflow_pending.jsonl" and spool.is_file()
    spooled = _spooled_metrics(spool)
    assert [(r["key"], r["step"]) for r in spooled] == [(k, s) for s in range(1, 20) for k in KEYS]  # in order
    assert tracker.pending() == {"params": 0, "tags": 0, "metrics": 0, "artifacts": 0, "inputs": 0, "models": 0,
                                 "end": 0}
    (message,) = _messages(caplog, "still pending")
    assert str(spool) in message and "76 metric values" in message and "train/loss x19 (steps 1-19)" in message
    assert f"replay_mlflow.py --spool {spool} --tracking-uri {proxy.uri}" in message
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"

    main = _replay_main()
    assert main(["--spool", str(spool), "--tracking-uri", server.uri]) == 0  # the server answers again
    replayed = spool.with_name("mlflow_pending.jsonl.replayed")
    assert replayed.is_file() and not spool.exists()
    _assert_every_value_arrived(client, run_id, range(20))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["late.param"] == "yes" and run.data.tags["stage"] == "late"
    assert [a.path for a in client.list_artifacts(run_id, "results")] == ["results/summary.json"]
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/results/summary.json") == {"mAP": 0.5}
    assert main(["--spool", str(replayed), "--tracking-uri", server.uri]) == 0  # again: harmless
    _assert_every_value_arrived(client, run_id, range(20))


def test_replay_creates_the_run_the_outage_never_let_the_tracker_create(server, tmp_path, capsys):
    tracker = Tracker("synthetic", "evaluate", uri=closed_port_uri(), checkpoint_dir=str(tmp_path),
                      run_name="never-created", pipeline_id="pipe-9", close_timeout_s=0.2)
    assert tracker.start() is None
    tracker.log_params({"cbgm": True})
    for step in range(5):
        tracker.log_metrics({key: _value(key, step) for key in KEYS}, step=step)
    spool = tracker.close()
    assert spool is not None and json.loads(spool.read_text().splitlines()[0])["run_id"] is None
    main = _replay_main()
    assert main(["--spool", str(spool), "--tracking-uri", server.uri]) == 0
    run_id = capsys.readouterr().out.split("into run ")[1].split()[0]
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "never-created" and run.info.status == "FINISHED"
    assert run.data.tags["pipeline_id"] == "pipe-9" and run.data.params["cbgm"] == "True"
    assert client.get_experiment(run.info.experiment_id).name == "dkd-ray/synthetic"
    _assert_every_value_arrived(client, run_id, range(5))


def test_past_the_bound_values_go_to_the_spool_file_and_all_arrive(server, tmp_path):
    proxy = TcpProxy(server.port)
    try:
        tracker = Tracker("synthetic", "teacher", uri=proxy.uri, checkpoint_dir=str(tmp_path),
                          retry_after_s=3600, max_buffered_metrics=25, close_timeout_s=5)
        run_id = tracker.start()
        proxy.cut()
        for step in range(50):  # 200 values, 8 times the bound
            tracker.log_metrics({key: _value(key, step) for key in KEYS}, step=step)
            assert len(tracker._pending_metrics) <= 25  # memory stays bounded
        spool = tmp_path / "mlflow_pending.jsonl"
        assert len(_spooled_metrics(spool)) >= 175 and tracker.pending()["metrics"] == 200
        proxy.restore()
        assert tracker.close() is None
    finally:
        proxy.close()
    _assert_every_value_arrived(MlflowClient(server.uri), run_id, range(50))
    assert not spool.exists()  # drained, then removed


def test_a_refused_value_does_not_take_its_batch_with_it(server, caplog):
    caplog.set_level(logging.WARNING, logger="dkd_ray.tracking")
    with Tracker("synthetic", "teacher", uri=server.uri) as tracker:
        tracker.log_params({"a": 1})
        tracker.log_params({"a": 2, "b": 3})  # "a" cannot change value; "b" must still be recorded
        tracker.log_metrics({"ok": 1.0, "bad key!": 2.0, "also_ok": 3.0}, step=0)
    client = MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"a": "1", "b": "3"}
    assert set(run.data.metrics) == {"ok", "also_ok"}
    assert any("bad key!" in m for m in _messages(caplog, "rejected"))


def test_a_tracker_never_closed_spools_at_exit(tmp_path):
    from dkd_ray.tracking.tracker import _spool_at_exit

    tracker = Tracker("synthetic", "teacher", uri=closed_port_uri(), checkpoint_dir=str(tmp_path),
                      retry_after_s=3600)
    tracker.log_metrics({"loss": 0.5}, step=3)
    _spool_at_exit()  # what atexit runs
    assert [(r["key"], r["step"]) for r in _spooled_metrics(tmp_path / "mlflow_pending.jsonl")] == [("loss", 3)]
    assert tracker.pending()["metrics"] == 0


def test_replay_refuses_bad_input_in_one_line(tmp_path, capsys):
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "replay_mlflow.py"), "--spool",
                             str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"error: --spool {tmp_path / 'missing.jsonl'}: no such file"
    main = _replay_main()
    bad = tmp_path / "bad.jsonl"
    for content, fragment in (('{"kind":"metric"}\n', "not an MLflow spool"),
                              ('{"kind":"run","version":1}\nnot json\n{}\n', "line 2"),
                              ('{"kind":"run","version":1}\n{"kind":"metric","key":"x"}\n', "line 2")):
        bad.write_text(content)
        with pytest.raises(SystemExit) as stop:
            main(["--spool", str(bad)])
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and err.startswith("error: ") and fragment in err and "\n" not in err
        assert bad.exists()  # never renamed
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0 and "--tracking-uri" in capsys.readouterr().out


def _teacher_and_example(checkpoint):
    from dkd_ray.models.loading import load_model as load_checkpoint_model

    from dkd_ray.config import Config

    teacher = load_checkpoint_model(checkpoint, role="teacher")
    cfg = Config.from_dict(teacher.spec["config"])
    example = np.random.default_rng(0).random((1, 3, cfg.teacher.input_height, cfg.teacher.input_width),
                                              dtype=np.float32)
    tags = tracking.version_tags(cfg, {"cuhk_sysu/g100/mAP": 0.5, "cuhk_sysu/g100/top1": 0.6}, "cuhk_sysu/g100")
    return teacher, example, tags


def _cut_off_tracker(proxy: TcpProxy, folder: Path, run_name: str, close_timeout_s: float) -> tuple[Tracker, str]:
    """A tracker whose run exists, then the connection to the server cut."""
    tracker = Tracker("synthetic", "teacher", uri=proxy.uri, checkpoint_dir=str(folder), run_name=run_name,
                      retry_after_s=0.05, close_timeout_s=close_timeout_s)
    run_id = tracker.start()
    proxy.cut()
    return tracker, run_id


def _log_teacher(tracker: Tracker, teacher, example, tags, checkpoint, registered_name: str):
    return tracker.log_model(teacher, "model", example, config=teacher.spec, checkpoint=str(checkpoint),
                             serialization="pickle", registered_name=registered_name, version_tags=tags,
                             alias="champion")


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_model_logged_during_an_outage_is_logged_and_registered_when_the_server_answers(
        server, tiny_teacher, tmp_path, caplog):
    from dkd_ray.models.loading import load_model as load_any_model

    teacher, example, tags = _teacher_and_example(tiny_teacher)
    proxy = TcpProxy(server.port)
    try:
        tracker, run_id = _cut_off_tracker(proxy, tmp_path, "model-waits", close_timeout_s=20)
        with caplog.at_level(logging.WARNING, logger="dkd_ray.tracking"):
            assert _log_teacher(tracker, teacher, example, tags, tiny_teacher, "dkd-teacher-waits") is None
        assert tracker.pending()["models"] == 1
        assert any("waits for MLflow" in r.getMessage() for r in caplog.records)
        proxy.restore()
        assert tracker.close() is None  # sent at close: nothing spooled
    finally:
        proxy.close()
    client = MlflowClient(server.uri, server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.outputs.model_outputs
    version = client.get_model_version_by_alias("dkd-teacher-waits", "champion")
    assert version.run_id == run_id and float(version.tags["mAP"]) == 0.5
    assert _same_weights(load_any_model("models:/dkd-teacher-waits@champion", uri=server.uri), teacher)


def test_a_model_still_waiting_at_close_is_spooled_with_its_checkpoint_and_the_replay_registers_it(
        server, tiny_teacher, tmp_path):
    from dkd_ray.models.loading import load_model as load_any_model

    teacher, example, tags = _teacher_and_example(tiny_teacher)
    proxy = TcpProxy(server.port)
    try:
        tracker, run_id = _cut_off_tracker(proxy, tmp_path, "model-spooled", close_timeout_s=0.5)
        _log_teacher(tracker, teacher, example, tags, tiny_teacher, "dkd-teacher-spooled")
        # without a checkpoint it cannot outlive the process: not spooled
        tracker.log_model(teacher, "in-memory-only", example, config=teacher.spec, serialization="pickle")
        spool = tracker.close()
    finally:
        proxy.close()
    kinds = [json.loads(line)["kind"] for line in spool.read_text().splitlines()]
    assert kinds.count("model") == 1 and kinds.index("model") < kinds.index("end")  # the model, then the status
    (record,) = [json.loads(line) for line in spool.read_text().splitlines() if '"kind":"model"' in line]
    assert record["checkpoint"] == str(tiny_teacher) and record["registered_name"] == "dkd-teacher-spooled"
    client = MlflowClient(server.uri, server.uri)
    assert client.get_run(run_id).info.status == "RUNNING" and not client.get_run(run_id).outputs.model_outputs

    assert _replay_main()(["--spool", str(spool), "--tracking-uri", server.uri]) == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and len(run.outputs.model_outputs) == 1
    version = client.get_model_version_by_alias("dkd-teacher-spooled", "champion")
    assert version.run_id == run_id and float(version.tags["top1"]) == 0.6
    assert _same_weights(load_any_model("models:/dkd-teacher-spooled@champion", uri=server.uri), teacher)


def test_a_registration_cut_off_by_an_outage_is_retried_without_logging_the_model_twice(
        server, example, monkeypatch, tmp_path):
    from dkd_ray.tracking import registry

    real, calls = registry.register_model, []

    def cut_once(*args, **kwargs):  # the server goes away between the log and the registration
        calls.append(args)
        if len(calls) == 1:
            raise OSError("connection refused")
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "register_model", cut_once)
    cfg = preset("cpu-small")
    tags = tracking.version_tags(cfg, {"cuhk_sysu/g100/mAP": 0.4, "cuhk_sysu/g100/top1": 0.5}, "cuhk_sysu/g100")
    tracker = Tracker("synthetic", "teacher", uri=server.uri, checkpoint_dir=str(tmp_path), run_name="half-sent",
                      retry_after_s=0.05, close_timeout_s=20)
    run_id = tracker.start()
    assert tracker.log_model(TinyNet(), "model", example, config={"hidden": 8}, serialization="pickle",
                             registered_name="dkd-teacher-half", version_tags=tags) is None
    assert tracker.pending()["models"] == 1
    assert tracker.close() is None
    client = MlflowClient(server.uri, server.uri)
    assert len(client.get_run(run_id).outputs.model_outputs) == 1  # logged once
    assert [v.version for v in client.search_model_versions("name = 'dkd-teacher-half'")] == ["1"]
    assert len(calls) == 2
