"""The end-of-sweep summary: ranking, Markdown table, CSV and the metric-vs-parameter PNG."""

from __future__ import annotations

import csv

import pytest

from dkd_ray.sweep.summary import (
    TrialSummary,
    format_trials_table,
    rank_trials,
    write_sweep_summary,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _trials() -> list[TrialSummary]:
    return [
        TrialSummary("t3", "stopped early", 1, {"distill.prob_weight": 3.0, "aug": "flip"}, 0.2, "r3"),
        TrialSummary("t1", "finished", 3, {"distill.prob_weight": 0.123456, "aug": "none"}, 0.12345, "r1", "/ck/t1"),
        TrialSummary("t0", "error", 0, {"distill.prob_weight": 1.0}, None, "r0"),
        TrialSummary("t2", "finished", 3, {"distill.prob_weight": 10.0, "aug": "flip"}, 0.2, "r2", "/ck/t2"),
        TrialSummary("t4", "running", 2, {"distill.prob_weight": 0.5, "aug": "none"}, float("nan")),
    ]


def _ids(trials) -> list[str]:
    return [t.trial_id for t in trials]


def test_rank_max_and_min_put_missing_metrics_last_and_break_ties_by_id():
    assert _ids(rank_trials(_trials(), "max")) == ["t2", "t3", "t1", "t0", "t4"]
    assert _ids(rank_trials(_trials(), "min")) == ["t1", "t2", "t3", "t0", "t4"]
    with pytest.raises(ValueError, match="mode"):
        rank_trials(_trials(), "best")


def test_table_rows_in_rank_order_with_formatting():
    lines = format_trials_table(_trials(), "val/mAP", "max").splitlines()
    assert lines[0] == "| rank | trial | status | epochs | val/mAP | aug | distill.prob_weight | run id |"
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    assert lines[2:] == [
        "| 1 | t2 | finished | 3 | 0.2000 | flip | 10 | r2 |",
        "| 2 | t3 | stopped early | 1 | 0.2000 | flip | 3 | r3 |",
        "| 3 | t1 | finished | 3 | 0.1235 | none | 0.1235 | r1 |",
        "| 4 | t0 | error | 0 | — | — | 1 | r0 |",
        "| 5 | t4 | running | 2 | — | none | 0.5 | — |",
    ]


def test_write_summary_files(tmp_path):
    out = tmp_path / "summary"
    paths = write_sweep_summary(
        _trials(), metric="val/mAP", mode="max", output_dir=out, log_scale=["distill.prob_weight"]
    )
    assert paths == [out / "trials.md", out / "trials.csv", out / "metric_vs_params.png"]

    md = (out / "trials.md").read_text().splitlines()
    assert md[0].startswith("#") and "val/mAP" in md[0] and "max" in md[0]
    assert "| 1 | t2 |" in md[4]

    with (out / "trials.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [
        "rank", "trial_id", "status", "epochs", "val/mAP", "aug", "distill.prob_weight", "run_id", "checkpoint",
    ]
    assert [r["trial_id"] for r in rows] == ["t2", "t3", "t1", "t0", "t4"]
    t1 = rows[2]
    assert t1["rank"] == "3" and t1["status"] == "finished" and t1["epochs"] == "3"
    assert float(t1["val/mAP"]) == 0.12345  # full precision, unlike the Markdown table
    assert float(t1["distill.prob_weight"]) == 0.123456
    assert t1["aug"] == "none" and t1["run_id"] == "r1" and t1["checkpoint"] == "/ck/t1"
    assert rows[3]["val/mAP"] == "" and rows[3]["aug"] == ""  # no metric, param not swept
    assert rows[4]["val/mAP"] == ""  # NaN counts as no metric

    png = (out / "metric_vs_params.png").read_bytes()
    assert len(png) > 1000 and png.startswith(PNG_SIGNATURE)


def test_no_png_without_metrics_or_params(tmp_path):
    unscored = [TrialSummary("a", "error", 0, {"x": 1.0}, None), TrialSummary("b", "running", 0, {"x": 2.0}, None)]
    paths = write_sweep_summary(unscored, metric="loss", mode="min", output_dir=tmp_path / "a")
    assert [p.name for p in paths] == ["trials.md", "trials.csv"]
    assert not (tmp_path / "a" / "metric_vs_params.png").exists()

    no_params = [TrialSummary("a", "finished", 1, {}, 0.5)]
    paths = write_sweep_summary(no_params, metric="loss", mode="min", output_dir=tmp_path / "b")
    assert [p.name for p in paths] == ["trials.md", "trials.csv"]


def test_empty_sweep_writes_header_only_tables(tmp_path):
    paths = write_sweep_summary([], metric="val/mAP", mode="max", output_dir=tmp_path)
    assert [p.name for p in paths] == ["trials.md", "trials.csv"]
    table = format_trials_table([], "val/mAP", "max").splitlines()
    assert table == ["| rank | trial | status | epochs | val/mAP | run id |", "|---|---|---|---|---|---|"]
    with (tmp_path / "trials.csv").open(newline="") as f:
        assert f.read().strip() == "rank,trial_id,status,epochs,val/mAP,run_id,checkpoint"
