"""Which MLflow run a Ray Train run folder belongs to, kept in the folder itself.

``<storage>/<run name>/mlflow_run.json`` records the MLflow run id (and tracking URI, experiment,
pipeline id) of the job that trains into that folder, the driver's host and pid, and the job's
state (running, finished, failed, killed). It is what lets ``--resume`` continue the *same* MLflow
run after a lost driver instead of opening a second one, and what lets the next driver start mark
a run whose driver died (SIGKILL, a lost node: nothing could say so then) KILLED instead of
leaving it RUNNING forever. Written atomically, on the run's storage whatever it is (a folder,
NFS, ``s3://``), so a driver on another machine finds it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from dkd_ray import storage as store

from .redaction import redact_uri

log = logging.getLogger(__name__)

RECORD_FILE = "mlflow_run.json"
LIVE = "running"


def _record_uri(storage: str | os.PathLike, name: str) -> str:
    return store.join(store.absolute(storage), name, RECORD_FILE)


def read_record(storage: str | os.PathLike, name: str) -> dict[str, Any] | None:
    uri = _record_uri(storage, name)
    try:
        record = store.read_json(uri)
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s): the run's MLflow link is lost; a new MLflow run is opened", uri, error)
        return None
    return record if isinstance(record, dict) else None


def write_record(storage: str | os.PathLike, name: str, **facts: Any) -> None:
    """Merge ``facts`` into the record (created if missing); never fatal."""
    uri = _record_uri(storage, name)
    record = read_record(storage, name) or {}
    record.update({k: v for k, v in facts.items() if v is not None}, updated=time.time())
    try:
        store.write_json(uri, record)
    except OSError as error:
        log.warning("could not write %s (%s): a resumed job will open a new MLflow run", uri, error)


def claim(storage: str | os.PathLike, name: str, *, run_id: str | None, uri: str, experiment: str | None,
          pipeline_id: str | None) -> None:
    """This driver now trains into ``name``: record its MLflow run, host, pid and state."""
    write_record(storage, name, run_id=run_id, tracking_uri=redact_uri(uri), experiment=experiment,
                 pipeline_id=pipeline_id, host=socket.gethostname(), pid=os.getpid(), state=LIVE)


def _driver_alive(record: dict[str, Any]) -> bool:
    if record.get("host") != socket.gethostname():
        return True  # another node's driver: cannot tell from here, so leave it alone
    try:
        os.kill(int(record["pid"]), 0)
    except (KeyError, TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


def live_driver(storage: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The record of ``name`` when a driver on this host is training into it right now."""
    record = read_record(storage, name)
    if record and record.get("state") == LIVE and record.get("pid") != os.getpid() and _driver_alive(record):
        return record
    return None


def reap_lost_drivers(storage: str | os.PathLike, uri: str) -> list[str]:
    """Mark KILLED the MLflow runs of run folders in ``storage`` whose driver died while running
    (state still ``running``, its pid gone from this host). Returns the run names marked. Never
    fatal: an unreachable server leaves them for the next start."""
    text = store.absolute(storage)
    try:
        names = store.list_dir(text)
    except OSError as error:
        log.warning("could not list %s (%s): lost drivers are looked for at the next start", text, error)
        return []
    marked = []
    for name in names:
        record = read_record(text, name)  # one small read per run folder; None when it has no record
        if not record or record.get("state") != LIVE or _driver_alive(record) or not record.get("run_id"):
            continue
        try:
            from mlflow import MlflowClient

            client = MlflowClient(uri)
            if client.get_run(record["run_id"]).info.status == "RUNNING":
                client.set_tag(record["run_id"], "failure", f"driver lost (pid {record.get('pid')} on "
                                                            f"{record.get('host')} ended without closing the run)")
                client.set_terminated(record["run_id"], "KILLED")
        except Exception as error:  # noqa: BLE001 - tracking never stops a job from starting
            log.warning("could not mark the run of %s KILLED (%s); will try at the next start", name, error)
            continue
        write_record(text, name, state="killed")
        marked.append(name)
        log.warning("run %s: its driver was lost; MLflow run %s marked KILLED (continue it with --resume %s)",
                    name, record["run_id"], name)
    return marked
