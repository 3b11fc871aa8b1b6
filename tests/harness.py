"""Real services for end-to-end tests: an MLflow tracking server and a token-authenticated Ray head.

Import these in tests (``from tests.harness import mlflow_server, ray_head, submit_job``); wrap
them in fixtures of the scope you need, e.g.::

    @pytest.fixture(scope="module")
    def ray_cluster(tmp_path_factory):
        with ray_head(tmp_path_factory.mktemp("ray")) as head:
            yield head

Both services bind to 127.0.0.1 on free ports and keep all their files under the given folder,
so several engineers (or CI jobs) can run them side by side. The Ray head is stopped by
signalling the processes this harness started (never ``ray stop``, which stops every Ray on the
machine).

Ray 2.60 token authentication, as used here and on clusters:

- The head is started with ``RAY_AUTH_MODE=token`` and the token in ``RAY_AUTH_TOKEN`` (or a
  file named by ``RAY_AUTH_TOKEN_PATH``; default file ``~/.ray/auth_token``, created by
  ``ray get-auth-token --generate``). Every Ray process inherits them, so job drivers'
  ``ray.init()`` joins the cluster without further setup.
- Clients (``ray job submit``, ``JobSubmissionClient``, ``ray.init(address=...)``) need the same
  two variables; the HTTP APIs take ``Authorization: Bearer <token>``. A request without a
  token is answered 401, one with a wrong token 403.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent  # the venv's console scripts: mlflow, ray


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_uri() -> str:
    """An http URI on 127.0.0.1 where nothing listens (connection refused at once)."""
    return f"http://127.0.0.1:{free_port()}"


def _wait_http(url: str, timeout_s: float, process: subprocess.Popen, headers: dict | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"service exited with code {process.returncode} before {url} "
                               f"answered:\n{tail}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                        timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as error:
            last_error = error
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s (last error: {last_error})")


# ---------------------------------------------------------------------------------------- MLflow
class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1: SQLite store and proxied artifacts under ``root``."""

    def __init__(self, root: str | os.PathLike, port: int | None = None, timeout_s: float = 120.0,
                 artifacts_destination: str | None = None, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts_destination = artifacts_destination or str(self.root / "artifacts")
        self.env = env  # e.g. an S3 server's AWS_* for an s3:// artifacts destination
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "mlflow-server.log"
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--artifacts-destination", self.artifacts_destination]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                            start_new_session=True, env={**os.environ, **(self.env or {})})
        try:
            _wait_http(f"{self.uri}/health", self.timeout_s, self.process, log=self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server now (idempotent): the tracking server going away mid-run."""
        if self.process is not None:
            _terminate(_descendants(self.process.pid), self.process)

    def kill(self) -> None:
        """SIGKILL the server and its workers (a crash: nothing is shut down cleanly)."""
        if self.process is not None and self.process.poll() is None:
            for pid in [self.process.pid, *_descendants(self.process.pid)]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def restart(self) -> None:
        """Start again on the same port with the same store (the server coming back)."""
        self.stop()
        self.start()


@contextlib.contextmanager
def mlflow_server(root: str | os.PathLike, timeout_s: float = 120.0, artifacts_destination: str | None = None,
                  env: dict[str, str] | None = None) -> Iterator[MlflowServer]:
    """Run ``mlflow server`` on a free 127.0.0.1 port for the ``with`` block; yields the server."""
    server = MlflowServer(root, timeout_s=timeout_s, artifacts_destination=artifacts_destination, env=env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------- S3
@dataclass
class S3Server:
    """moto's S3-compatible server on 127.0.0.1: what a MinIO or S3 endpoint is to the code."""

    endpoint: str
    process: subprocess.Popen
    env: dict[str, str]  # the standard AWS_* variables that point every client at it

    def create_bucket(self, name: str) -> str:
        from pyarrow import fs

        s3 = fs.S3FileSystem(endpoint_override=self.endpoint, access_key="testing", secret_key="testing",
                             region="us-east-1", allow_bucket_creation=True)
        s3.create_dir(name)
        return f"s3://{name}"

    def keys(self, prefix: str) -> list[str]:
        """Every object key under ``s3://<prefix>`` (recursive)."""
        from pyarrow import fs

        s3 = fs.S3FileSystem(endpoint_override=self.endpoint, access_key="testing", secret_key="testing",
                             region="us-east-1")
        infos = s3.get_file_info(fs.FileSelector(prefix.removeprefix("s3://"), recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == fs.FileType.File)


@contextlib.contextmanager
def s3_server(root: str | os.PathLike, timeout_s: float = 60.0) -> Iterator[S3Server]:
    """``moto_server`` on a free 127.0.0.1 port for the ``with`` block (buckets in memory)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = root / "s3-server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                   stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        _wait_http(f"{endpoint}/moto-api/", timeout_s, process, log=log)
        yield S3Server(endpoint, process, env)
    finally:
        _terminate(_descendants(process.pid), process)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a local service; ``cut()``/``restore()`` simulate an outage.

    While cut, the port refuses connections and open ones are closed, exactly what a client sees
    when the server dies, but the service itself keeps running and comes back at once.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            sockets, self._connections = self._connections, []
            if self._listener is not None:
                sockets.append(self._listener)
                self._listener = None
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:  # ends when cut() closes the listener
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):  # ends at EOF or when either side is closed
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


# ---------------------------------------------------------------------------------------- Ray
@dataclass
class RayHead:
    gcs_address: str  # for ray.init(address=...) and worker nodes
    dashboard_url: str  # for `ray job submit --address` / JobSubmissionClient
    token: str | None
    temp_dir: Path
    process: subprocess.Popen
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # what a client needs: auth mode + token

    def client_env(self, *, with_token: bool = True, token: str | None = None) -> dict[str, str]:
        """``os.environ`` plus this cluster's settings for a client (``ray job submit``, ray.init).

        ``with_token=False``: no token at all (auth disabled on the client, no token file read);
        ``token=...``: a different token (e.g. a wrong one).
        """
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # resolve 127.0.0.1 as itself (see ray_head)
        if with_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token or self.token or "")
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@contextlib.contextmanager
def ray_head(root: str | os.PathLike, token_auth: bool = True, num_cpus: int = 2,
             object_store_mib: int = 200, timeout_s: float = 120.0,
             env: dict[str, str] | None = None) -> Iterator[RayHead]:
    """Start a real Ray head (``ray start --head --block``) on 127.0.0.1, stop it on exit.
    ``env``: more environment for the head's processes (its workers inherit it)."""
    extra_env = env
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Ray's unix sockets live under the temp dir and must stay below ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))
    token = secrets.token_hex(32) if token_auth else None
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.pop("RAY_ADDRESS", None)
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # `ray start` replaces --node-ip-address 127.0.0.1 with the machine's address unless this
    # is 0 (Ray's single-node switch): keep every Ray connection on the loopback.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Job entrypoints run `python ...` with the head's PATH: make that this venv's python.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra_env or {})
    gcs_port, dashboard_port = free_port(), free_port()
    worker_ports = _free_port_range(64)
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
        "--num-cpus", str(num_cpus), "--num-gpus", "0", "--object-store-memory", str(object_store_mib * 2**20),
        "--temp-dir", str(temp_dir),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--ray-client-server-port", str(free_port()),
        "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
        "--min-worker-port", str(worker_ports[0]), "--max-worker-port", str(worker_ports[-1]),
    ]
    log = root / "ray-head.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=root, start_new_session=True)
    head = RayHead(gcs_address=f"127.0.0.1:{gcs_port}",
                   dashboard_url=f"http://127.0.0.1:{dashboard_port}", token=token,
                   temp_dir=temp_dir, process=process, log=log)
    head.env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                **({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {})}
    try:
        # /api/version answers once the dashboard's job API is up (it needs the GCS).
        _wait_http(f"{head.dashboard_url}/api/version", timeout_s, process,
                   headers=head.auth_headers(), log=log)
        yield head
    finally:
        _terminate(_descendants(process.pid), process)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class RayNode:
    """A second Ray node (``ray start --address``) of a ``ray_head`` cluster, on this machine."""

    process: subprocess.Popen
    temp_dir: Path
    log: Path
    node_id: str = ""

    def kill(self) -> None:
        """SIGKILL its raylet and every worker it started: the node is lost, not stopped."""
        for pid in _descendants(self.process.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@contextlib.contextmanager
def ray_node(head: RayHead, root: str | os.PathLike, num_cpus: int = 1, resources: dict[str, float] | None = None,
             timeout_s: float = 120.0, env: dict[str, str] | None = None) -> Iterator[RayNode]:
    """Join a worker node to ``head`` for the ``with`` block; waits until the GCS lists it alive.
    ``env``: more environment for the node's processes (its workers inherit it)."""
    extra_env = env
    import json

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="rayn-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(head.env, RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # The head keeps to 127.0.0.1 with Ray's single-node switch (see ray_head), which also stops
    # nodes from joining. This node lifts it, takes another loopback address (127.0.0.2) and
    # keeps Ray from swapping the head's 127.0.0.1 for the machine's address (sitecustomize).
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    env["DKD_LOOPBACK_NODE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent / "loopback_node"),
                                                      env.get("PYTHONPATH")]))
    env.update(extra_env or {})
    worker_ports = _free_port_range(32)
    command = [str(BIN / "ray"), "start", "--address", head.gcs_address, "--block", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.2", "--num-cpus", str(num_cpus), "--num-gpus", "0",
               "--object-store-memory", str(100 * 2**20), "--temp-dir", str(temp_dir),
               "--resources", json.dumps(resources or {}),
               "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
               "--min-worker-port", str(worker_ports[0]), "--max-worker-port", str(worker_ports[-1])]
    log = root / "ray-node.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                   start_new_session=True)
    node = RayNode(process, temp_dir, log)
    try:
        node.node_id = _wait_for_node(head, "127.0.0.2", timeout_s, process, log)
        yield node
    finally:
        _terminate(_descendants(process.pid), process)
        shutil.rmtree(temp_dir, ignore_errors=True)


_WAIT_FOR_NODE = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    alive = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == sys.argv[2]]
    if alive:
        print(alive[0]["NodeID"])
        break
    time.sleep(0.5)
"""


def _wait_for_node(head: RayHead, address: str, timeout_s: float, process: subprocess.Popen, log: Path) -> str:
    """The id of the node at ``address`` once the GCS lists it alive (asked from a client process)."""
    probe = subprocess.run([sys.executable, "-c", _WAIT_FOR_NODE, head.gcs_address, address, str(timeout_s)],
                           env=head.client_env(), capture_output=True, text=True, timeout=timeout_s + 60)
    node_id = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else ""
    if not node_id or process.poll() is not None:
        raise RuntimeError(f"the Ray node at {address} did not join {head.gcs_address}: {probe.stderr[-2000:]}\n"
                           f"{log.read_text(errors='replace')[-3000:]}")
    return node_id


def _free_port_range(size: int) -> list[int]:
    """``size`` consecutive free ports in the high range (bounded number of tries)."""
    rng = secrets.SystemRandom()
    for _ in range(50):
        start = rng.randrange(20000, 60000 - size)
        ports = list(range(start, start + size))
        if all(_is_free(p) for p in ports):
            return ports
    raise RuntimeError(f"found no {size} consecutive free ports")


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc; no psutil in the environment)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def _terminate(pids: list[int], leader: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the leader (it shuts its own children down), wait, then SIGKILL what is left."""
    if leader.poll() is None:
        leader.terminate()
        try:
            leader.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        leader.wait(timeout=5)


# ---------------------------------------------------------------------------------------- jobs
@dataclass
class JobResult:
    submission_id: str
    status: str  # SUCCEEDED | FAILED | STOPPED | ... ; "REJECTED" when the submission was refused
    logs: str
    submit_returncode: int
    submit_output: str


def submit_job(address: str, entrypoint: list[str] | str, env: dict[str, str],
               timeout_s: float = 300.0, working_dir: str | None = None,
               extra_args: list[str] | None = None) -> JobResult:
    """``ray job submit`` (the CLI users run), then wait for the job, bounded by ``timeout_s``.

    ``env`` is the client's environment (``RayHead.client_env()``): it carries the token. The
    job is stopped if it outlives the timeout, and ``TimeoutError`` carries its logs.
    """
    from ray.job_submission import JobSubmissionClient

    submission_id = f"test-{uuid.uuid4().hex[:12]}"
    if isinstance(entrypoint, str):
        entrypoint = ["bash", "-c", entrypoint]
    command = [str(BIN / "ray"), "job", "submit", "--address", address,
               "--submission-id", submission_id, "--no-wait"]
    if working_dir:
        command += ["--working-dir", working_dir]
    command += list(extra_args or []) + ["--", *entrypoint]
    submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    output = submitted.stdout + submitted.stderr
    if submitted.returncode != 0:
        return JobResult(submission_id, "REJECTED", "", submitted.returncode, output)

    token = env.get("RAY_AUTH_TOKEN")
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)
    deadline = time.monotonic() + timeout_s
    status = _status_name(client.get_job_status(submission_id))
    while status not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(1.0)
        status = _status_name(client.get_job_status(submission_id))
    logs = client.get_job_logs(submission_id)
    if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        client.stop_job(submission_id)
        raise TimeoutError(f"job {submission_id} still {status} after {timeout_s:.0f} s; logs:\n{logs}")
    return JobResult(submission_id, status, logs, submitted.returncode, output)


def _status_name(status) -> str:
    return getattr(status, "value", str(status))
