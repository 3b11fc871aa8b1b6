"""Sizes of the synthetic benchmarks: ``tiny`` (unit tests), ``small`` (the CPU demo), ``full``
(the real benchmarks' counts, meant for annotation-only folders).

Every field can be overridden by name through ``generate(..., **overrides)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PRESETS = ("tiny", "small", "learning", "full")


@dataclass(frozen=True)
class CuhkSysuConfig:
    train_images: int
    test_images: int  # the gallery pool
    train_identities: int
    test_identities: int  # one query each, as in the real protocol
    train_boxes: int  # valid (non-zero-area) boxes in training images, labelled or not
    test_boxes: int
    train_labelled: int  # labelled training boxes: sum of images per training identity
    test_labelled: int  # query + gallery appearances of the test identities
    images_per_train_identity: tuple[int, int]  # inclusive range
    images_per_test_identity: tuple[int, int]  # query image + >= 1 gallery image
    gallery_sizes: tuple[int, ...]
    image_width: tuple[int, int]  # inclusive range, pixels
    aspect_ratios: tuple[float, ...]  # width / height
    zero_area_boxes: int  # planted extra boxes with w == 0 or h == 0 (edge cases)
    hard_fraction: float = 0.1  # share of boxes flagged ishard


@dataclass(frozen=True)
class PrwConfig:
    train_frames: int
    test_frames: int
    cameras: int
    sequences_per_camera: int
    train_identities: int
    test_identities: int
    queries: int  # one per (test identity, camera); spread over cameras_per_test_identity
    train_labelled: int
    test_labelled: int  # includes the training identities that stray into test frames
    train_unlabelled: int  # pid -2 boxes
    test_unlabelled: int
    cameras_per_train_identity: tuple[int, int]
    frame_size: tuple[int, int]  # HD cameras (width, height)
    sd_frame_size: tuple[int, int]  # the last camera is standard definition, as in PRW
    alternate_key_files: int  # annotation files using 'anno_file', and as many 'anno_previous'
    negative_coordinate_boxes: int
    unlabelled_only_frames: int  # per split: frames holding only pid -2 boxes
    train_ids_in_test_frames: int  # training identities also seen in a few test frames


_CUHK_SYSU = {
    "tiny": CuhkSysuConfig(
        train_images=24,
        test_images=16,
        train_identities=12,
        test_identities=8,
        train_boxes=72,
        test_boxes=52,
        train_labelled=36,
        test_labelled=20,
        images_per_train_identity=(2, 4),
        images_per_test_identity=(2, 3),
        gallery_sizes=(5, 10),
        image_width=(160, 256),
        aspect_ratios=(4 / 3,),
        zero_area_boxes=2,
    ),
    "small": CuhkSysuConfig(
        train_images=240,
        test_images=160,
        train_identities=96,
        test_identities=50,
        train_boxes=840,
        test_boxes=520,
        train_labelled=384,
        test_labelled=150,
        images_per_train_identity=(3, 5),
        images_per_test_identity=(2, 4),
        gallery_sizes=(25, 50, 100),
        image_width=(320, 480),
        aspect_ratios=(4 / 3, 3 / 2, 16 / 9),
        zero_area_boxes=6,
    ),
    # The learning benchmark (bench/learning.py): enough queries (200) and gallery scenes (300) to
    # separate a few mAP points, more identities with fewer sightings each than `small`, so that
    # Re-ID (not detection) limits the score.
    "learning": CuhkSysuConfig(
        train_images=300,
        test_images=300,
        train_identities=120,
        test_identities=200,
        train_boxes=1000,
        test_boxes=1000,
        train_labelled=480,
        test_labelled=620,
        images_per_train_identity=(3, 5),
        images_per_test_identity=(2, 4),
        gallery_sizes=(50, 100),
        image_width=(320, 480),
        aspect_ratios=(4 / 3, 3 / 2, 16 / 9),
        zero_area_boxes=6,
    ),
    # Real CUHK-SYSU: 18,184 images (11,206 train / 6,978 pool), 96,143 boxes
    # (55,272 / 40,871), 8,432 identities (5,532 / 2,900 queries).
    "full": CuhkSysuConfig(
        train_images=11206,
        test_images=6978,
        train_identities=5532,
        test_identities=2900,
        train_boxes=55272,
        test_boxes=40871,
        train_labelled=15080,
        test_labelled=7000,
        images_per_train_identity=(2, 5),
        images_per_test_identity=(2, 4),
        gallery_sizes=(50, 100, 500, 1000, 2000, 4000),
        image_width=(600, 1024),
        aspect_ratios=(4 / 3, 3 / 2, 16 / 9),
        zero_area_boxes=24,
    ),
}

_PRW = {
    "tiny": PrwConfig(
        train_frames=24,
        test_frames=24,
        cameras=6,
        sequences_per_camera=1,
        train_identities=10,
        test_identities=6,
        queries=14,
        train_labelled=40,
        test_labelled=34,
        train_unlabelled=10,
        test_unlabelled=10,
        cameras_per_train_identity=(1, 3),
        frame_size=(256, 144),
        sd_frame_size=(180, 144),
        alternate_key_files=1,
        negative_coordinate_boxes=3,
        unlabelled_only_frames=1,
        train_ids_in_test_frames=1,
    ),
    "small": PrwConfig(
        train_frames=180,
        test_frames=180,
        cameras=6,
        sequences_per_camera=2,
        train_identities=60,
        test_identities=40,
        queries=110,
        train_labelled=480,
        test_labelled=440,
        train_unlabelled=110,
        test_unlabelled=120,
        cameras_per_train_identity=(1, 4),
        frame_size=(480, 270),
        sd_frame_size=(338, 270),
        alternate_key_files=3,
        negative_coordinate_boxes=12,
        unlabelled_only_frames=2,
        train_ids_in_test_frames=4,
    ),
    # Real PRW: 11,816 frames (5,704 train / 6,112 test), 6 cameras (5 HD 1920x1080, one SD
    # 720x576), ID_train lists 483 ids (1..478, 480..483, 932), 450 test ids, 2,057 queries,
    # 43,110 boxes of which 34,304 labelled (train 14,907 + 3,141 unlabelled).
    "full": PrwConfig(
        train_frames=5704,
        test_frames=6112,
        cameras=6,
        sequences_per_camera=6,
        train_identities=483,
        test_identities=450,
        queries=2057,
        train_labelled=14907,
        test_labelled=19397,
        train_unlabelled=3141,
        test_unlabelled=5665,
        cameras_per_train_identity=(1, 4),
        frame_size=(1920, 1080),
        sd_frame_size=(720, 576),
        alternate_key_files=20,
        negative_coordinate_boxes=150,
        unlabelled_only_frames=40,
        train_ids_in_test_frames=90,
    ),
}

_CONFIGS = {"cuhk_sysu": _CUHK_SYSU, "prw": _PRW}


def preset_config(layout: str, preset: str, overrides: dict[str, Any]) -> CuhkSysuConfig | PrwConfig:
    """The named preset of ``layout`` with ``overrides`` applied (names checked)."""
    if layout not in _CONFIGS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {tuple(_CONFIGS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    if preset not in _CONFIGS[layout]:
        raise ValueError(f"preset {preset!r} has no {layout} layout; {layout} presets: {sorted(_CONFIGS[layout])}")
    config = _CONFIGS[layout][preset]
    known = {f.name: f for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown {layout} override(s) {unknown}; valid names: {sorted(known)}")
    coerced = {name: _coerce(name, value, getattr(config, name)) for name, value in overrides.items()}
    return dataclasses.replace(config, **coerced)


def override_names(layout: str) -> list[str]:
    return [f.name for f in dataclasses.fields(next(iter(_CONFIGS[layout].values())))]


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Match an override's type to the preset's (so CLI strings and lists work)."""
    try:
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            kind = type(default[0]) if default else float
            return tuple(kind(float(v)) if kind is int else kind(v) for v in items)
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if isinstance(default, int):
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError("not an integer")
            return int(as_float)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"override {name}={value!r}: expected a value like {default!r} ({err})"
        ) from None
    return value
