"""The learning benchmark's statistics (bench/learning.py), on hand-computed runs: per-variant
mean and sample std, the paired difference against no KD, and the target check."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("learning", Path(__file__).resolve().parents[1] / "bench" / "learning.py")
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)

G100, TWO = "cuhk_sysu/g100/mAP", "two_step/cuhk_sysu/g100/mAP"


def runs(nokd, dkd, two_step):
    out = {}
    for seed, (a, b, t) in enumerate(zip(nokd, dkd, two_step)):
        out["nokd", seed] = {G100: a, TWO: t, "det/ap": 0.5}
        out["all", seed] = {G100: b, "det/ap": 0.5}
    return out


def test_mean_and_sample_std():
    assert learning.mean_std([0.1, 0.2, 0.3]) == pytest.approx((0.2, 0.1))
    assert learning.mean_std([0.4]) == (0.4, 0.0)


def test_paired_difference_and_a_met_target():
    # Seeds move both variants together (0.10, 0.20, 0.15 baseline); the gain is 0.05 +- 0.01.
    summary = learning.summarise(runs([0.10, 0.20, 0.15], [0.16, 0.24, 0.20], [0.18, 0.28, 0.23]))
    gain, std, seeds, diffs = summary["paired"]["all"]
    assert diffs == pytest.approx([0.06, 0.04, 0.05]) and seeds == [0, 1, 2]
    assert (gain, std) == pytest.approx((0.05, 0.01))
    # Unpaired, the seed-to-seed spread (std 0.05) would swamp the 0.05 gain.
    assert summary["variants"]["nokd"]["mAP"] == pytest.approx((0.15, 0.05))
    target = summary["target"]
    assert target["gap"] == pytest.approx(0.08) and target["closed"] == pytest.approx(0.625)
    assert target["separated"] and target["met"]
    text = learning.table(summary)
    assert "+5.0 ± 1.0 (+6.0, +4.0, +5.0)" in text and "target met" in text


def test_target_not_met_when_the_gain_is_noise_or_closes_too_little():
    noisy = learning.summarise(runs([0.10, 0.20, 0.15], [0.16, 0.18, 0.17], [0.18, 0.28, 0.23]))
    assert noisy["paired"]["all"][0] == pytest.approx(0.02) and not noisy["target"]["separated"]
    assert not noisy["target"]["met"]
    small = learning.summarise(runs([0.10, 0.20, 0.15], [0.11, 0.21, 0.16], [0.30, 0.40, 0.35]))
    assert small["target"]["separated"] and not small["target"]["met"]  # 0.01 of a 0.20 gap
    two_seeds = learning.summarise(runs([0.10, 0.20], [0.16, 0.24], [0.18, 0.28]))
    assert not two_seeds["target"]["met"]  # the issue asks for at least three seeds
    assert math.isfinite(two_seeds["target"]["gain"])


def test_the_demo_prints_the_benchmarked_no_kd_comparison_of_its_preset(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from pipeline import no_kd_twin_line

    from dkd_ray.config import preset

    summary = learning.summarise(runs([0.10, 0.20, 0.15], [0.16, 0.24, 0.20], [0.18, 0.28, 0.23]))
    learning.write(summary, tmp_path / "table.md", "python bench/learning.py", preset("cpu-small"), "teacher")
    line = no_kd_twin_line(preset("cpu-small"), tmp_path / "table.json")
    assert "g100 mAP 20.0 ± 4.0 with all KD terms vs 15.0 ± 5.0 without" in line
    assert "paired difference +5.0 ± 1.0 points" in line and "3 seeds" in line
    assert no_kd_twin_line(preset("cuhk_sysu"), tmp_path / "table.json") == ""  # another recipe: not known
    assert no_kd_twin_line(preset("cpu-small"), tmp_path / "missing.json") == ""


def test_a_given_teacher_folder_is_handed_to_every_run_with_its_bank(tmp_path, monkeypatch):
    """--teacher: every run gets that checkpoint (absolute) and its bank/, one run per seed and
    variant (the refactor that made checkpoints strings once broke this, after an hour of teacher)."""
    import dkd_ray.stages as stages

    calls = []

    def student_stage(cfg, data_root, *, teacher_ref, bank_path, storage_path, experiment, run_name, output_dir):
        calls.append((teacher_ref, str(bank_path), cfg.train.seed, run_name))
        return stages.StageResult("student", str(tmp_path / run_name), {G100: 0.1})

    monkeypatch.setattr(stages, "train_student_stage", student_stage)
    monkeypatch.setattr(learning, "prepare_driver", lambda args, cfg: (tmp_path / "data", str(tmp_path / "runs")))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    teacher = tmp_path / "teacher"
    (teacher / "bank").mkdir(parents=True)
    assert learning.main(["--teacher", "teacher", "--variants", "nokd", "--seeds", "0", "1", "--stamp", "t",
                          "--output", str(tmp_path / "out.md")]) == 0
    assert [call[:3] for call in calls] == [(str(teacher), str(teacher / "bank"), 0),
                                           (str(teacher), str(teacher / "bank"), 1)]
    assert [call[3] for call in calls] == ["learning-t-nokd-s0", "learning-t-nokd-s1"]


def test_the_teacher_it_trains_is_handed_on_as_its_checkpoint_uri(tmp_path, monkeypatch):
    import dkd_ray.stages as stages

    calls = []
    checkpoint = str(tmp_path / "runs" / "learning-t-teacher" / "teacher_e024")  # stages return strings
    monkeypatch.setattr(stages, "train_teacher_stage", lambda *a, **k: stages.StageResult("teacher", checkpoint, {}))
    monkeypatch.setattr(stages, "train_student_stage", lambda cfg, data_root, **k: calls.append(k) or
                        stages.StageResult("student", "s", {G100: 0.1}))
    monkeypatch.setattr(learning, "prepare_driver", lambda args, cfg: (tmp_path / "data", str(tmp_path / "runs")))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert learning.main(["--variants", "nokd", "--seeds", "0", "--stamp", "t", "--output", str(tmp_path / "o.md")]) == 0
    assert calls[0]["teacher_ref"] == checkpoint and calls[0]["bank_path"] == f"{checkpoint}/bank"
