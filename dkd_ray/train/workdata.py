"""Resolve a run's dataset: the user's folder, or synthetic data in the real layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dkd_ray.config import Config
from dkd_ray.data.annotations import Annotations

log = logging.getLogger(__name__)


def dataset_layout(cfg: Config) -> str:
    """The benchmark layout the data folder follows (synthetic data uses CUHK-SYSU's)."""
    return "cuhk_sysu" if cfg.data.dataset == "synthetic" else cfg.data.dataset


def resolve_data_root(cfg: Config, work_dir: str | Path) -> Path:
    """``data.root`` if given; for ``synthetic`` without a root, generate it once under ``work_dir``."""
    if cfg.data.root:
        root = Path(cfg.data.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root {root} is not a folder (pass --data-root to the dataset you unpacked)")
        return root
    if cfg.data.dataset != "synthetic":
        raise ValueError(f"--data-root is required for dataset {cfg.data.dataset!r} (datasets are not downloadable)")
    from dkd_ray.data.synthetic import generate

    root = Path(work_dir) / "data" / f"synthetic-{cfg.data.synthetic_preset}-seed{cfg.train.seed}" / "CUHK-SYSU"
    done = root.parent / ".complete"
    if not done.exists():
        log.info("generating synthetic CUHK-SYSU-layout data (%s) in %s", cfg.data.synthetic_preset, root)
        generate(root, "cuhk_sysu", cfg.data.synthetic_preset, seed=cfg.train.seed, overwrite=True)
        done.write_text("ok\n")
    return root


def load_training_annotations(loop_config: dict[str, Any]) -> Annotations:
    """The annotations a loop trains on; parsed once, then served from the Parquet cache."""
    from dkd_ray.data import load_annotations

    cfg = Config.from_dict(loop_config["config"])
    return load_annotations(dataset_layout(cfg), loop_config["data_root"], box_rule=cfg.data.box_rule)
