"""Ground truth of a generated folder, for tests and for the job's report.

Counts follow the readers' rules (docs/DATASETS.md): zero-area boxes are dropped (and counted
apart), everything else is kept; "labelled" means a box with an identity. Nothing here is
written inside the dataset folder, which holds only what the real benchmark holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .scene import ImagePlan


@dataclass(frozen=True)
class SplitSummary:
    images: int
    boxes: int  # boxes the readers keep (w > 0 and h > 0), labelled or not
    labelled_boxes: int
    identities: int  # distinct identities among the labelled boxes of this split's images
    zero_area_boxes: int  # planted boxes the readers must drop

    @classmethod
    def of(cls, plans: list[ImagePlan], identity_keys: np.ndarray) -> "SplitSummary":
        """Counts over ``plans``; ``identity_keys`` maps identity index -> dataset id."""
        valid = [p.valid for p in plans]
        labelled = [p.identity[v] for p, v in zip(plans, valid)]
        labelled = np.concatenate(labelled) if labelled else np.zeros(0, np.int64)
        labelled = labelled[labelled >= 0]
        return cls(
            images=len(plans),
            boxes=int(sum(v.sum() for v in valid)),
            labelled_boxes=len(labelled),
            identities=len(np.unique(identity_keys[labelled])) if len(labelled) else 0,
            zero_area_boxes=int(sum((~v).sum() for v in valid)),
        )


@dataclass(frozen=True)
class EdgeCases:
    """What was planted for the readers to survive (empty when ``edge_cases=False``)."""

    zero_area_boxes: int = 0
    negative_coordinate_boxes: int = 0  # PRW: boxes with x < 0 or y < 0
    alternate_box_keys: dict[str, str] = field(default_factory=dict)  # PRW: file -> key
    empty_idlocate: dict[str, int] = field(default_factory=dict)  # CUHK-SYSU: '0x0'/'1x0' -> count
    unlabelled_only_images: tuple[str, ...] = ()
    train_ids_in_test_images: tuple[int, ...] = ()  # PRW: training pids also in test frames
    missing_train_ids: tuple[int, ...] = ()  # PRW: gaps inside the training id range


@dataclass(frozen=True)
class SyntheticSummary:
    layout: str  # 'cuhk_sysu' | 'prw'
    root: Path
    preset: str
    seed: int
    annotations_only: bool
    train: SplitSummary
    test: SplitSummary
    queries: int
    query_identities: int
    gallery_sizes: tuple[int, ...]  # CUHK-SYSU TestG<size> files; () for PRW
    train_ids: tuple[int, ...]  # the dataset's own ids (CUHK-SYSU 'p1234' -> 1234; PRW pid)
    test_ids: tuple[int, ...]  # query identities
    edge_cases: EdgeCases
    image_sizes_file: Path | None  # the sidecar written in annotation-only mode
    files_written: int
    seconds: float  # wall time of generate(); not part of the ground truth

    @property
    def images(self) -> int:
        return self.train.images + self.test.images

    @property
    def boxes(self) -> int:
        return self.train.boxes + self.test.boxes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings)."""
        out = dataclasses.asdict(self)
        out["root"] = str(self.root)
        out["image_sizes_file"] = None if self.image_sizes_file is None else str(self.image_sizes_file)
        return out
