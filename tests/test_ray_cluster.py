"""A real token-authenticated Ray head (tests.harness) and the cluster launcher file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.harness import ray_head, submit_job

ROOT = Path(__file__).resolve().parents[1]
PRINT_RESOURCES = ["python", "-c", "import ray; ray.init(); print('resources', ray.cluster_resources())"]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("ray"), token_auth=True, num_cpus=2) as running:
        yield running


@pytest.mark.slow
def test_job_submitted_with_the_token_runs(head):
    result = submit_job(head.dashboard_url, PRINT_RESOURCES, head.client_env(), timeout_s=180)
    assert result.status == "SUCCEEDED", result.logs
    assert "'CPU': 2.0" in result.logs  # the driver joined this head (2 CPUs), not a new cluster
    assert "node:127.0.0.1" in result.logs  # and the cluster lives on the loopback


@pytest.mark.slow
def test_job_submission_without_the_token_is_refused(head):
    missing = submit_job(head.dashboard_url, PRINT_RESOURCES, head.client_env(with_token=False), timeout_s=60)
    assert missing.status == "REJECTED" and missing.submit_returncode != 0
    assert "Authentication required" in missing.submit_output  # HTTP 401
    wrong = submit_job(head.dashboard_url, PRINT_RESOURCES, head.client_env(token="0" * 64), timeout_s=60)
    assert wrong.status == "REJECTED" and wrong.submit_returncode != 0
    assert "Authentication failed" in wrong.submit_output  # HTTP 403


@pytest.mark.slow
def test_driver_without_the_token_cannot_join(head):
    """The GCS itself (not only the job API) refuses a client without the token."""
    code = f"import ray; ray.init(address={head.gcs_address!r}); print('joined')"
    done = subprocess.run([sys.executable, "-c", code], env=head.client_env(with_token=False),
                          capture_output=True, text=True, timeout=90)
    assert done.returncode != 0 and "joined" not in done.stdout
    assert "InvalidAuthToken" in done.stdout + done.stderr


# ---------------------------------------------------------------------------------- cluster.yaml
@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_a_valid_launcher_config(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(cluster)  # Ray's own JSON schema for `ray up`
    prepared = prepare_config(cluster)  # merged with the AWS defaults, as `ray up` does
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers.values())
    gpu_prefixes = ("g4", "g5", "g6", "p3", "p4", "p5")
    assert not types[prepared["head_node_type"]]["node_config"]["InstanceType"].startswith(gpu_prefixes)
    assert all(t["node_config"]["InstanceType"].startswith(gpu_prefixes) for t in workers.values())


def test_cluster_yaml_wires_auth_storage_tracking_and_install(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    worker_start = " ".join(cluster["worker_start_ray_commands"])
    for commands in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in commands and "MLFLOW_TRACKING_URI=" in commands
    assert "--dashboard-host=127.0.0.1" in head_start  # the job API only through `ray dashboard`
    assert "~/.ray/auth_token" in cluster["file_mounts"]  # the token reaches every node
    setup = " ".join(cluster["setup_commands"])
    assert "/mnt/shared" in setup and "mount -t nfs4" in setup
    assert "constraints.txt" in setup and "dkd-ray @ git+" in setup and "@v" in setup
