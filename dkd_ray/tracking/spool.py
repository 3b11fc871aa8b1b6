"""The spool: what a ``Tracker`` could not send to MLflow, as a JSON-lines file, and its replay.

A spool is written in two cases: past ``Tracker(max_buffered_metrics=...)`` pending metric values
(10k by default) while the server is away, so memory stays bounded (the tracker sends them back in
order when the server answers and then deletes the file); and by ``Tracker.close``/``end`` when the
server is still away at the end, with everything still pending. It lies in the run's checkpoint
folder (``checkpoint_dir``) when that is a writable local folder, else in a temporary folder, and
is named ``mlflow_pending.jsonl`` (``mlflow_pending-2.jsonl``, ... when that name is taken, e.g. by
the driver's and a worker's tracker of one run). Replay it once the server answers::

    python jobs/replay_mlflow.py --spool <checkpoint_dir>/mlflow_pending.jsonl [--tracking-uri URI]

One JSON object a line, ``kind`` first:

- ``run``: ``version``, ``uri`` (credentials masked), ``experiment``, ``run_name``, ``run_id``
  (null when the run could not be created yet: the replay creates it with ``start_ms`` and
  ``tags``), ``owns_run``. Later ``run`` lines only fill in ``run_id``;
- ``params`` / ``tags``: ``{"params": {name: value}}``, ``{"tags": {name: value}}``;
- ``metric``: ``key``, ``value`` (null: not finite, sent as NaN as the tracker does), ``timestamp``
  (ms, when it was logged), ``step``; in the order they were logged;
- ``artifact``: ``path`` (a local file or folder), ``artifact_path``;
- ``model``: a model whose logging waited for the server (``pending_model.py``): ``name``, its
  ``checkpoint``, ``serialization``, ``example_shape``, its ``tags``, what registering it needs
  (``registered_name``, ``version_tags``, ``alias``, ``description``) and ``model_uri`` when it
  was logged and only its registration waited; the replay rebuilds it from the checkpoint, logs
  it and registers it, each step once (one a previous replay did is found in MLflow and skipped).
  Releases before this record kind refuse such a spool ("unknown kind");
- ``end``: ``status`` and ``end_ms`` (only for a run the tracker created).

The replay is idempotent where MLflow allows: a metric value sent again with the same step and
timestamp is stored once, params already set with the same value are skipped, tags and artifacts
are overwritten with the same content, and the end status is only set on a run still RUNNING.
When everything was sent the file is renamed ``<spool>.replayed``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from dkd_ray.errors import InputError

from .redaction import redact_uri

logger = logging.getLogger(__name__)

SPOOL_NAME = "mlflow_pending.jsonl"
REPLAYED_SUFFIX = ".replayed"
FORMAT_VERSION = 1
_REPLAY_JOB = Path(__file__).resolve().parents[2] / "jobs" / "replay_mlflow.py"


class SpoolError(InputError):
    """A spool file that cannot be read or replayed as given (the message names the file)."""


class ReplayUnreachable(RuntimeError):
    """The tracking server did not answer during a replay; the spool is left as it was."""


# ------------------------------------------------------------------ records
def run_record(*, uri: str, experiment: str, run_name: str, run_id: str | None, start_ms: int | None,
               tags: Mapping[str, str], owns_run: bool) -> dict[str, Any]:
    return {"kind": "run", "version": FORMAT_VERSION, "uri": redact_uri(uri), "experiment": experiment,
            "run_name": run_name, "run_id": run_id, "start_ms": start_ms, "tags": dict(tags),
            "owns_run": owns_run}


def metric_record(key: str, value: float, timestamp: int, step: int) -> dict[str, Any]:
    return {"kind": "metric", "key": key, "value": value if math.isfinite(value) else None,
            "timestamp": int(timestamp), "step": int(step)}


def encode(record: Mapping[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), allow_nan=False, default=str) + "\n"


def metric_of(record: Mapping[str, Any]):
    """An ``mlflow.entities.Metric`` of a ``metric`` record (non-finite values as NaN)."""
    from mlflow.entities import Metric

    value = record["value"]
    return Metric(record["key"], float("nan") if value is None else float(value), int(record["timestamp"]),
                  int(record["step"]))


class MetricTally:
    """Counts of metric values per key with their step range, for messages."""

    def __init__(self) -> None:
        self.keys: dict[str, list[int]] = {}  # key -> [count, first step, last step]

    def add(self, key: str, step: int) -> None:
        entry = self.keys.get(key)
        if entry is None:
            self.keys[key] = [1, step, step]
        else:
            entry[0] += 1
            entry[1], entry[2] = min(entry[1], step), max(entry[2], step)

    @property
    def total(self) -> int:
        return sum(entry[0] for entry in self.keys.values())

    def __bool__(self) -> bool:
        return bool(self.keys)

    def describe(self, limit: int = 12) -> str:
        if not self.keys:
            return "0 metric values"
        parts = [f"{key} x{n} (step {lo})" if lo == hi else f"{key} x{n} (steps {lo}-{hi})"
                 for key, (n, lo, hi) in list(self.keys.items())[:limit]]
        if len(self.keys) > limit:
            parts.append(f"{len(self.keys) - limit} more keys")
        return f"{self.total} metric values: " + ", ".join(parts)


def replay_command(path: str | os.PathLike, uri: str | None = None) -> str:
    """The shell command that replays ``path`` (the tracking URI with its credentials masked)."""
    job = _REPLAY_JOB if _REPLAY_JOB.is_file() else Path("jobs/replay_mlflow.py")
    command = ["python", str(job), "--spool", str(path)]
    if uri:
        command += ["--tracking-uri", redact_uri(uri)]
    return " ".join(shlex.quote(part) for part in command)


# ------------------------------------------------------------------ files
def usable_folder(folder: str | os.PathLike | None) -> Path | None:
    """``folder`` when it is an existing, writable local folder (not a URI), else None."""
    if not folder or "://" in str(folder):
        return None
    path = Path(folder)
    return path if path.is_dir() and os.access(path, os.W_OK | os.X_OK) else None


def create_spool(folder: Path) -> Path:
    """A new, empty spool file in ``folder``: ``mlflow_pending.jsonl``, else ``-2``, ``-3``, ... (atomic)."""
    stem, suffix = SPOOL_NAME.split(".", 1)
    for number in range(1, 10_000):
        path = folder / (SPOOL_NAME if number == 1 else f"{stem}-{number}.{suffix}")
        try:
            with open(path, "x", encoding="utf-8"):
                return path
        except FileExistsError:
            continue
    raise OSError(f"{folder}: no free spool file name")


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """Replace ``path``'s content atomically (a crash leaves the old file or the new one)."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as out:
            out.writelines(lines)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


class SpoolFile:
    """A spool a tracker appends metric values to (past its memory bound) and drains in order.

    ``offset``: the byte where the first value not yet sent starts. Lines are appended whole and
    synced, so a crash loses at most the line being written, and the replay tolerates that.
    """

    def __init__(self, path: Path, temporary_folder: Path | None = None):
        self.path = path
        self.temporary_folder = temporary_folder  # removed with the file (a folder we made for it)
        self.offset = 0
        self.unsent = 0

    @classmethod
    def create(cls, folder: Path, header: Mapping[str, Any], temporary_folder: Path | None = None) -> SpoolFile:
        spool = cls(create_spool(folder), temporary_folder)
        spool.append([header], count=False)
        spool.offset = spool.path.stat().st_size
        return spool

    def append(self, records: Iterable[Mapping[str, Any]], *, count: bool = True) -> None:
        text = "".join(encode(r) for r in records)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if count:
            self.unsent += text.count('"kind":"metric"')

    def read_unsent(self, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Up to ``limit`` metric records from ``offset`` on, and the offset after them."""
        records: list[dict[str, Any]] = []
        with open(self.path, "rb") as source:
            source.seek(self.offset)
            offset = self.offset
            while len(records) < limit:
                line = source.readline()
                if not line.endswith(b"\n"):
                    break  # end of file (or a line still being written)
                offset += len(line)
                record = json.loads(line)
                if record.get("kind") == "metric":
                    records.append(record)
        return records, offset

    def mark_sent(self, offset: int, sent: int) -> None:
        self.offset = offset
        self.unsent = max(0, self.unsent - sent)

    def unsent_lines(self) -> list[str]:
        """The metric lines not sent yet, as written."""
        with open(self.path, encoding="utf-8") as source:
            source.seek(self.offset)
            return [line for line in source if line.endswith("\n") and '"kind":"metric"' in line]

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        if self.temporary_folder is not None:
            try:
                self.temporary_folder.rmdir()
            except OSError:
                pass


# ------------------------------------------------------------------ reading
@dataclass
class Spool:
    path: Path
    run: dict[str, Any]
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)
    models: list[Any] = field(default_factory=list)  # PendingModel
    end: dict[str, Any] | None = None


def read_spool(path: str | os.PathLike) -> Spool:
    """Parse a spool file; ``SpoolError`` names the file (and line) when it is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpoolError(f"--spool {path}: no such file") from None
    except IsADirectoryError:
        raise SpoolError(f"--spool {path}: is a folder, not a spool file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpoolError(f"--spool {path}: cannot be read ({error})") from None
    lines = text.split("\n")
    spool: Spool | None = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if number == len(lines) and not text.endswith("\n"):  # cut short by a crash while writing it
                logger.warning("%s: line %d was cut short (not replayed)", path, number)
                break
            raise SpoolError(f"--spool {path}: line {number} is not a spool record ({error})") from None
        kind = record.get("kind")
        if spool is None:
            if kind != "run":
                raise SpoolError(f"--spool {path}: not an MLflow spool (its first line is not a 'run' record)")
            if record.get("version") != FORMAT_VERSION:
                raise SpoolError(f"--spool {path}: spool format version {record.get('version')!r}; this "
                                 f"release reads version {FORMAT_VERSION}")
            spool = Spool(path, dict(record))
            continue
        try:
            if kind == "run":
                run_id = record.get("run_id")
                if run_id and spool.run.get("run_id") not in (None, run_id):
                    raise ValueError(f"names run {run_id}, the file's run is {spool.run['run_id']}")
                spool.run["run_id"] = run_id or spool.run.get("run_id")
            elif kind == "params":
                spool.params.update({str(k): str(v) for k, v in record["params"].items()})
            elif kind == "tags":
                spool.tags.update({str(k): str(v) for k, v in record["tags"].items()})
            elif kind == "metric":
                value = record["value"]
                if value is not None:
                    float(value)
                spool.metrics.append({"key": str(record["key"]), "value": value,
                                      "timestamp": int(record["timestamp"]), "step": int(record["step"])})
            elif kind == "artifact":
                spool.artifacts.append((str(record["path"]), record.get("artifact_path")))
            elif kind == "model":
                from .pending_model import PendingModel

                spool.models.append(PendingModel.from_record(record))
            elif kind == "end":
                spool.end = {"status": str(record["status"]), "end_ms": record.get("end_ms")}
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SpoolError(f"--spool {path}: line {number} is not a valid {kind!r} record ({error})") from None
    if spool is None:
        raise SpoolError(f"--spool {path}: empty, not an MLflow spool")
    return spool


# ------------------------------------------------------------------ replay
@dataclass
class ReplayReport:
    path: Path
    uri: str
    run_id: str
    created: bool = False
    metrics: MetricTally = field(default_factory=MetricTally)
    params_sent: int = 0
    params_skipped: int = 0  # already set with the same value
    params_conflicting: list[str] = field(default_factory=list)  # set with another value: MLflow keeps that
    tags: int = 0
    artifacts: int = 0
    missing_artifacts: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # "model (registered as <name> version <v>)"
    models_not_logged: list[str] = field(default_factory=list)
    rejected: int = 0
    status: str | None = None  # the end status set, if any
    replayed_path: Path | None = None

    def describe(self) -> str:
        parts = [f"replayed {self.path} into run {self.run_id}{' (created now)' if self.created else ''} at "
                 f"{redact_uri(self.uri)}: {self.metrics.describe()}",
                 f"{self.params_sent} params sent ({self.params_skipped} already set)"]
        if self.params_conflicting:
            parts.append(f"{len(self.params_conflicting)} params already set with another value, kept as they "
                         f"are: {', '.join(self.params_conflicting[:10])}")
        parts.append(f"{self.tags} tags, {self.artifacts} artifacts")
        if self.models:
            parts.append(f"models logged: {', '.join(self.models)}")
        if self.models_not_logged:
            parts.append(f"models NOT logged (see the warnings): {', '.join(self.models_not_logged)}")
        if self.missing_artifacts:
            parts.append(f"missing artifacts not logged: {', '.join(self.missing_artifacts)}")
        if self.rejected:
            parts.append(f"{self.rejected} values rejected by the server (see the warnings)")
        parts.append(f"run status set to {self.status}" if self.status else "run status unchanged")
        if self.replayed_path:
            parts.append(f"spool renamed to {self.replayed_path}")
        return "; ".join(parts)


def replay(path: str | os.PathLike, uri: str | None = None) -> ReplayReport:
    """Send a spool's params, tags, metrics (original steps and timestamps), artifacts and end
    status into the run it names (created first when it has no run id), then rename it
    ``<path>.replayed``. ``uri``: the tracking server (default: the spool's own URI, else
    ``MLFLOW_TRACKING_URI``). ``SpoolError`` for a file or run that cannot be replayed as given,
    ``ReplayUnreachable`` when the server does not answer (the spool is then left unchanged)."""
    spool = read_spool(path)
    uri = uri or _spool_uri(spool)
    if uri.startswith(("http://", "https://")):  # a dead server answers in seconds, not minutes
        from .tracker import _HTTP_DEFAULTS

        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    try:
        return _replay(spool, uri)
    except (SpoolError, ReplayUnreachable):
        raise
    except Exception as error:  # noqa: BLE001 - anything else the client raises: the server is away
        from .errors import _short

        raise ReplayUnreachable(f"MLflow at {redact_uri(uri)} did not answer ({_short(error)}); {spool.path} is "
                                "unchanged: run the command again when the server is back") from None


def _spool_uri(spool: Spool) -> str:
    recorded = spool.run.get("uri") or ""
    if recorded and "***" not in recorded:
        return recorded
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    raise SpoolError(f"--spool {spool.path}: its tracking URI {recorded!r} has masked credentials (or none): "
                     "give --tracking-uri")


def _replay(spool: Spool, uri: str) -> ReplayReport:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    from .errors import _is_rejection

    mlflow.set_tracking_uri(uri)  # artifact repositories of proxied artifacts resolve against it
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = spool.run.get("run_id")
    report = ReplayReport(spool.path, uri, run_id or "")
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception as error:  # noqa: BLE001
            if _is_rejection(error):
                raise SpoolError(f"--spool {spool.path}: run {run_id} does not exist at {redact_uri(uri)} (give "
                                 "the --tracking-uri of the server the run was created on)") from None
            raise
    else:
        run = _create_run(client, spool, uri)
        report.run_id, report.created = run.info.run_id, True
        try:  # a replay that fails later sends into this run, not another new one
            SpoolFile(spool.path).append([{"kind": "run", "run_id": run.info.run_id}], count=False)
        except OSError as error:
            logger.warning("could not note run %s in %s (%s): a replay after a failure would create "
                           "another run", run.info.run_id, spool.path, error)
    run_id = report.run_id

    def send(kind: str, items: list) -> int:
        """Rejected batches are split so that only the values the server refuses are left out."""
        if not items:
            return 0
        try:
            client.log_batch(run_id, **{kind: items})
            return 0
        except Exception as error:  # noqa: BLE001
            if not _is_rejection(error):
                raise
            if len(items) > 1 and getattr(error, "error_code", "") == "INVALID_PARAMETER_VALUE":
                half = len(items) // 2
                return send(kind, items[:half]) + send(kind, items[half:])
            logger.warning("MLflow rejected %d %s (%s...): %s", len(items), kind, items[0].key, error)
            return len(items)

    existing = dict(run.data.params)
    params = {}
    for key, value in spool.params.items():
        if key not in existing:
            params[key] = value
        elif existing[key] == value:
            report.params_skipped += 1
        else:
            report.params_conflicting.append(key)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limits
        report.rejected += send("params", items[start:start + 100])
    report.params_sent = len(items)
    tags = [RunTag(k, v) for k, v in spool.tags.items()]
    for start in range(0, len(tags), 100):
        report.rejected += send("tags", tags[start:start + 100])
    report.tags = len(tags)
    for start in range(0, len(spool.metrics), 1000):
        chunk = spool.metrics[start:start + 1000]
        report.rejected += send("metrics", [metric_of(r) for r in chunk])
        for record in chunk:
            report.metrics.add(record["key"], record["step"])
    for local, artifact_path in spool.artifacts:
        if os.path.isdir(local):
            client.log_artifacts(run_id, local, artifact_path)
        elif os.path.exists(local):
            client.log_artifact(run_id, local, artifact_path)
        else:
            report.missing_artifacts.append(local)
            continue
        report.artifacts += 1
    from dkd_ray.train.checkpoint import CheckpointError

    from .errors import ModelNotFoundError
    from .pending_model import ModelNotLogged

    for pending in spool.models:  # before the end status: a FINISHED run has its model
        try:
            if pending.model_uri is None:
                pending.load()
        except (ModelNotFoundError, CheckpointError, FileNotFoundError, ValueError) as error:  # gone or broken
            logger.warning("model %r not logged: its checkpoint %s cannot be loaded (%s)", pending.name,
                           pending.checkpoint, error)
            report.models_not_logged.append(f"{pending.name} ({pending.checkpoint})")
            continue
        try:  # each step once, also when an earlier replay got part of the way
            info = pending.send(run_id, run.info.experiment_id, uri)
        except ModelNotLogged as error:
            logger.warning("%s", error)
            report.models_not_logged.append(f"{pending.name} ({pending.checkpoint})")
            continue
        except Exception as error:  # noqa: BLE001 - an outage propagates: the spool stays as it is
            if not _is_rejection(error):
                raise
            logger.warning("MLflow rejected model %r from %s: %s", pending.name, pending.checkpoint, error)
            report.rejected += 1
            continue
        report.models.append(f"{info.model_uri}" + (f" (registered as {pending.registered_name} version "
                                                    f"{info.registered_model_version})"
                                                    if info.registered_model_version else ""))
    if spool.end is not None:
        status = client.get_run(run_id).info.status
        if status == "RUNNING":
            client.set_terminated(run_id, spool.end["status"], end_time=spool.end.get("end_ms"))
            report.status = spool.end["status"]
        else:
            logger.info("run %s is already %s: its status is left as it is", run_id, status)
    if not spool.path.name.endswith(REPLAYED_SUFFIX):
        report.replayed_path = spool.path.with_name(spool.path.name + REPLAYED_SUFFIX)
        os.replace(spool.path, report.replayed_path)
    return report


def _create_run(client: Any, spool: Spool, uri: str):
    from .tracker import _experiment_id

    run = spool.run
    experiment = run.get("experiment")
    if not experiment:
        raise SpoolError(f"--spool {spool.path}: names neither a run id nor an experiment")
    experiment_id = _experiment_id(client, experiment, uri)
    return client.create_run(experiment_id, start_time=run.get("start_ms"), tags=dict(run.get("tags") or {}),
                             run_name=run.get("run_name"))
