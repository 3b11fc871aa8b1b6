"""k8s/rayjob.yaml: a RayJob whose entrypoint the student job accepts, with storage on S3,
token authentication, a GPU worker group whose GPUs match --num-workers, and credentials only
from a Secret."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _manifest() -> dict:
    return yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())


def _job_parser(script: str):
    spec = importlib.util.spec_from_file_location(f"job_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parser()


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_the_entrypoint_is_a_student_job_its_parser_accepts_with_storage_on_s3():
    manifest = _manifest()
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    words = shlex.split(manifest["spec"]["entrypoint"])
    assert words[:2] == ["python", "jobs/train_student.py"]
    args = _job_parser(words[1]).parse_args(words[2:])  # SystemExit(2) on an unknown or bad flag
    assert args.storage_path.startswith("s3://")
    assert args.use_gpu == "true" and args.run_name
    cluster = manifest["spec"]["rayClusterSpec"]
    gpus = sum(int(group["replicas"]) * int(c["resources"]["limits"]["nvidia.com/gpu"])
               for group in cluster["workerGroupSpecs"] for c in group["template"]["spec"]["containers"])
    assert args.num_workers == gpus  # one Ray Train worker per GPU, all of them used
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0"
    assert yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["working_dir"] == "/app"


def test_token_auth_is_on_and_credentials_come_only_from_a_secret():
    manifest = _manifest()
    cluster = manifest["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert tuple(int(p) for p in cluster["rayVersion"].split(".")) >= (2, 52, 0)  # token auth's first release
    secrets = set()
    for container in _containers(cluster):
        secrets |= {source["secretRef"]["name"] for source in container.get("envFrom", [])}
        literal = {e["name"] for e in container.get("env", []) if "value" in e}
        assert not literal & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN",
                              "RAY_AUTH_TOKEN"}, container["name"]
        assert container.get("envFrom"), f"{container['name']} gets no credentials"
    assert len(secrets) == 1  # the one Secret the header's `kubectl create secret` makes
    header = (ROOT / "k8s" / "rayjob.yaml").read_text().split("apiVersion:")[0]
    assert f"kubectl create secret generic {secrets.pop()}" in header


def test_the_image_recipe_installs_the_tested_versions_at_the_working_dir():
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    assert "rayproject/ray:2.60.0" in dockerfile and "WORKDIR /app" in dockerfile
    assert "-c constraints.txt" in dockerfile
    ray_pin = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("ray==")]
    assert ray_pin == ["ray==2.60.0"] and _manifest()["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
