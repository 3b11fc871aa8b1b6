"""Search-space files: the shipped ones load; each malformed one is refused naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dkd_ray.search_space import SearchSpaceError, load_search_space, parse_search_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
VALID = {"preset": "cpu-small", "space": {"distill.prob_weight": {"loguniform": [0.1, 10]},
                                          "distill.tri_weight": {"grid": [0.5, 1.0]}}}


@pytest.mark.parametrize("name", sorted(p.name for p in SPACES.glob("*.yaml")))
def test_shipped_spaces_load_and_become_tune_distributions(name):
    from ray import tune

    space = load_search_space(SPACES / name)
    param_space = space.to_tune()
    assert set(param_space) == set(space.space) and space.metric == "val/mAP" and space.mode == "max"
    for key, (kind, _) in space.space.items():
        if kind == "grid":
            assert param_space[key] == {"grid_search": space.space[key][1]}
        else:
            assert isinstance(param_space[key], tune.search.sample.Domain)


def test_valid_dict_keeps_defaults_and_values():
    space = parse_search_space({**VALID, "num_samples": 3, "fixed": {"student.epochs": 2}})
    assert space.num_samples == 3 and space.fixed == {"student.epochs": 2}
    assert space.space["distill.prob_weight"] == ("loguniform", [0.1, 10])
    assert space.scheduler["type"] == "asha"


@pytest.mark.parametrize("change,key", [
    ({"bogus": 1}, "bogus"),
    ({"mode": "maximum"}, "mode"),
    ({"preset": "huge"}, "preset"),
    ({"num_samples": 0}, "num_samples"),
    ({"scheduler": {"type": "asha", "grace": 1}}, "scheduler.grace"),
    ({"scheduler": {"reduction_factor": 1}}, "scheduler.reduction_factor"),
    ({"space": {}}, "space"),
    ({"space": {"distill.nope": {"uniform": [0, 1]}}}, "space.distill.nope"),
    ({"space": {"distill.tri_weight": {"normal": [0, 1]}}}, "space.distill.tri_weight"),
    ({"space": {"distill.tri_weight": {"uniform": [2, 1]}}}, "space.distill.tri_weight"),
    ({"space": {"distill.tri_weight": {"loguniform": [0, 1]}}}, "space.distill.tri_weight"),
    ({"space": {"distill.tri_weight": {"uniform": [-1, 1]}}}, "space.distill.tri_weight"),
    ({"space": {"student.fsa_num": {"uniform": [1, 4]}}}, "space.student.fsa_num"),
    ({"space": {"distill.temperature": {"choice": []}}}, "space.distill.temperature"),
    ({"fixed": {"student.lr": "fast"}}, "fixed.student.lr"),
    ({"fixed": {"distill.tri_weight": 1.0}}, "space.distill.tri_weight"),
])
def test_malformed_spaces_are_refused_naming_the_key(change, key):
    with pytest.raises(SearchSpaceError) as err:
        parse_search_space({**VALID, **change}, "bad.yaml")
    assert f"bad.yaml: {key}:" in str(err.value)


def test_unreadable_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("space: [unclosed\n")
    with pytest.raises(SearchSpaceError, match="broken.yaml: not valid YAML"):
        load_search_space(path)


def test_a_space_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("preset: cpu-small\n# poids \xe9lev\xe9s\n".encode("latin-1"))
    with pytest.raises(SearchSpaceError, match=r"latin1.yaml: not UTF-8 text \(byte 26"):
        load_search_space(path)


@pytest.mark.parametrize("metric", ["val/accuracy", "mAP", "val/cuhk_sysu/g100/accuracy", "test/mAP"])
def test_a_metric_no_trial_reports_is_refused_before_any_trial_runs(metric):
    with pytest.raises(SearchSpaceError, match=f"metric: '{metric}' is never reported"):
        parse_search_space({**VALID, "metric": metric}, "bad.yaml")


@pytest.mark.parametrize("metric", ["val/mAP", "val/top1", "val/prw/full/top5", "val/det/recall", "train/loss_oim"])
def test_metrics_trials_report_are_accepted(metric):
    assert parse_search_space({**VALID, "metric": metric}, "ok.yaml").metric == metric


def _run_job(*args: str):
    import subprocess
    import sys

    job = Path(__file__).resolve().parents[1] / "jobs" / "tune_distill.py"
    return subprocess.run([sys.executable, str(job), *args], capture_output=True, text=True, timeout=120)


def test_the_sweep_job_refuses_a_malformed_space_before_starting_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: cpu-small\nspace:\n  distill.tri_weight: {uniform: [2, 1]}\n")
    result = _run_job("--space", str(bad), "--storage-path", str(tmp_path / "runs"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "bad.yaml: space.distill.tri_weight: uniform needs low < high" in result.stderr
    assert not (tmp_path / "runs").exists(), "nothing may start for a refused space"


def test_the_sweep_job_refuses_a_stage_that_contradicts_the_space(tmp_path):
    result = _run_job("--space", str(SPACES / "cpu_smoke.yaml"), "--stage", "teacher",
                      "--storage-path", str(tmp_path / "runs"))
    assert result.returncode != 0 and "describes a student sweep" in result.stderr
