"""Resolve a run's dataset: the user's folder, or synthetic data in the real layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dkd_ray.config import Config, ConfigError
from dkd_ray.data.annotations import Annotations
from dkd_ray.data.matlab import DatasetError

log = logging.getLogger(__name__)


def dataset_layout(cfg: Config) -> str:
    """The benchmark layout the data folder follows (synthetic data uses CUHK-SYSU's)."""
    return "cuhk_sysu" if cfg.data.dataset == "synthetic" else cfg.data.dataset


def check_trainable(cfg: Config, data_root: Path) -> None:
    """On the driver, before any worker starts: the annotations load (Parquet-cached, so a
    second job pays nothing) and can train the teacher's P x K batches and be evaluated (a query
    with a gallery match). Refused with ``DatasetError`` naming the file, never in a worker."""
    from dkd_ray.data import load_annotations
    from dkd_ray.data.report import ValidationReport
    from dkd_ray.data.validate import check_usable

    annotations = load_annotations(dataset_layout(cfg), data_root, box_rule=cfg.data.box_rule)
    report = ValidationReport(dataset_layout(cfg), data_root)
    check_usable(annotations, report, min_identities=cfg.teacher.p_identities)
    if report.errors:
        first = report.errors[0]
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise DatasetError(data_root / first.file, f"{first.where + ': ' if first.where else ''}{first.message}{more}; "
                           f"run jobs/validate_dataset.py --dataset {dataset_layout(cfg)} --data-root {data_root}")


def resolve_data_root(cfg: Config, work_dir: str | Path) -> Path:
    """``data.root`` if given; for ``synthetic`` without a root, generate it once under ``work_dir``."""
    if cfg.data.root:
        root = Path(cfg.data.root).expanduser()
        if not root.is_dir():
            raise DatasetError(root, "not a folder (pass --data-root the dataset folder as unpacked: CUHK-SYSU/ or PRW/)")
        return root
    if cfg.data.dataset != "synthetic":
        raise ConfigError(f"--data-root is required for dataset {cfg.data.dataset!r} (datasets are not downloadable)")
    from dkd_ray.data.synthetic import generate

    root = Path(work_dir).resolve() / "data" / f"synthetic-{cfg.data.synthetic_preset}-seed{cfg.train.seed}" / "CUHK-SYSU"
    done = root.parent / ".complete"
    if not done.exists():
        import fcntl

        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.parent.parent / f".{root.parent.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one generator per machine: workers of one node may race
            if not done.exists():
                log.info("generating synthetic CUHK-SYSU-layout data (%s) in %s", cfg.data.synthetic_preset, root)
                generate(root, "cuhk_sysu", cfg.data.synthetic_preset, seed=cfg.train.seed, overwrite=True)
                done.write_text("ok\n")
    return root


def load_training_annotations(loop_config: dict[str, Any]) -> Annotations:
    """The annotations a loop trains on; parsed once, then served from the Parquet cache."""
    from dkd_ray.data import load_annotations

    cfg = Config.from_dict(loop_config["config"])
    root = Path(loop_config["data_root"])
    if not root.exists() and cfg.data.dataset == "synthetic" and not cfg.data.root and len(root.parents) > 2:
        # Synthetic data the driver generated on its own disk (a node without a shared one): the
        # same preset and seed make the same files here.
        resolve_data_root(cfg, root.parents[2])
    return load_annotations(dataset_layout(cfg), root, box_rule=cfg.data.box_rule)
