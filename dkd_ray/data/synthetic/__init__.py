"""Synthetic CUHK-SYSU and PRW folders in exactly the real benchmarks' layout.

Nothing can be downloaded in tests or demos, so this package writes dataset folders that the
real readers load unchanged: MATLAB files (scipy.io.savemat, same variables, fields, shapes
and nesting as the real ones) and rendered JPEGs of people whose identities are learnable.

    from dkd_ray.data.synthetic import generate
    summary = generate("data/CUHK-SYSU", "cuhk_sysu", preset="small", seed=0)

``summary`` (a :class:`SyntheticSummary`) holds the ground truth: per-split images, boxes,
labelled boxes and identities, queries, gallery sizes and the planted edge cases.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import cuhk_sysu_layout, prw_layout
from .output import SIZES_SIDECAR, Progress, ProgressFn, check_root, load_image_sizes, prepare_root
from .presets import PRESETS, CuhkSysuConfig, PrwConfig, override_names, preset_config
from .summary import EdgeCases, SplitSummary, SyntheticSummary

LAYOUTS = ("cuhk_sysu", "prw")
_MODULES = {"cuhk_sysu": cuhk_sysu_layout, "prw": prw_layout}

__all__ = [
    "LAYOUTS",
    "PRESETS",
    "SIZES_SIDECAR",
    "CuhkSysuConfig",
    "EdgeCases",
    "PrwConfig",
    "SplitSummary",
    "SyntheticSummary",
    "generate",
    "load_image_sizes",
    "override_names",
    "preset_config",
]


def generate(
    root: str | Path,
    layout: str,
    preset: str = "small",
    *,
    seed: int = 0,
    annotations_only: bool = False,
    edge_cases: bool = True,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    **overrides: Any,
) -> SyntheticSummary:
    """Write a synthetic ``layout`` dataset folder at ``root`` (``root`` is the CUHK-SYSU/ or
    PRW/ folder itself) and return its ground truth.

    - ``preset``: 'tiny' (unit tests), 'small' (CPU demo), 'full' (the real benchmarks'
      counts; use with ``annotations_only``).
    - ``annotations_only``: write the annotation files only, no JPEGs; image sizes then go to
      ``root/synthetic_image_sizes.json`` (see :func:`load_image_sizes`).
    - ``edge_cases``: plant the real data's irregularities (zero-area boxes, empty-idlocate
      styles, alternate PRW keys, negative coordinates, non-contiguous training ids, ...).
    - ``overwrite``: allow a non-empty ``root`` (files are replaced in place).
    - ``progress``: called with a line of text now and then (e.g. ``print``).
    - ``overrides``: preset fields by name (see :class:`CuhkSysuConfig`, :class:`PrwConfig`).

    The same arguments give byte-identical files.
    """
    started = time.perf_counter()
    config = preset_config(layout, preset, overrides)
    module = _MODULES[layout]
    root = Path(root)
    check_root(root, overwrite)  # fail before minutes of planning, create nothing on error
    reporter = Progress(progress)
    reporter.say(f"{layout}: planning {preset} preset (seed {seed})")
    plan = module.plan(config, seed, edge_cases)
    prepare_root(root, overwrite)
    files = module.write(root, plan, seed, annotations_only, reporter)
    sidecar = root / SIZES_SIDECAR
    return SyntheticSummary(
        layout=layout,
        root=root,
        preset=preset,
        seed=seed,
        annotations_only=annotations_only,
        image_sizes_file=sidecar if annotations_only else None,
        files_written=files,
        seconds=time.perf_counter() - started,
        **module.summarise(plan),
    )
