"""A synthetic PRW folder, file for file in the real layout.

```
PRW/frames/c<cam>s<seq>_<frame6>.jpg
PRW/annotations/<frame>.jpg.mat   M×5 double [pid x y w h] under 'box_new' ('anno_file' or
                                  'anno_previous' in a few files); pid -2 = unlabelled
PRW/frame_train.mat               img_index_train  N×1 cell of names without .jpg
PRW/frame_test.mat                img_index_test
PRW/query_info.txt                "pid x y w h frame" per line (frame without .jpg)
PRW/ID_train.mat                  ID_train  1×K double, sorted
PRW/ID_test.mat                   ID_test2  1×K double (the real file's variable name)
PRW/query_box/<pid>_<frame>.jpg   query crops (pixel mode only, as in the real download)
```
Each camera films one fixed scene (its own background, horizon and colour cast; the last
camera is standard definition). Identities walk through a few cameras and appear in runs of
consecutive frames there; each test identity has one query per camera it appears in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import matfile
from .output import Progress, save_jpeg, write_image_sizes
from .presets import PrwConfig
from .render import Appearances, camera_look, render_background, render_image, sample_appearances
from .scene import (
    UNLABELLED,
    ImagePlan,
    choose_labelled_slots,
    image_rng,
    place_people,
    split_total,
    spread,
)
from .summary import EdgeCases, SplitSummary

LAYOUT_CODE = 2
_PLACE, _RENDER, _CAMERA = 1, 2, 3  # image_rng streams
UNLABELLED_PID = -2
BOX_KEYS = ("box_new", "anno_file", "anno_previous")


@dataclass
class PrwPlan:
    config: PrwConfig
    frames: list[ImagePlan]  # sorted by name
    appearances: Appearances  # identity rows: training identities first, then test ones
    pids: np.ndarray  # [identities] dataset pid of each identity
    queries: list[tuple[int, int, int]]  # (identity, frame, box), sorted by pid then camera
    box_keys: dict[str, str]  # frame name -> key, for frames not using 'box_new'
    strays: tuple[int, ...]  # training identities that also appear in test frames


def dataset_pids(n_train: int, n_test: int, edge_cases: bool) -> tuple[np.ndarray, np.ndarray]:
    """Training and test pids. With edge cases, the real files' shape: training ids
    1..a, a+2..a+5 and one high id (real: 1..478, 480..483, 932); test ids fill the gaps."""
    if not edge_cases or n_train < 6 or n_test < 2:
        return np.arange(1, n_train + 1), np.arange(n_train + 1, n_train + n_test + 1)
    a = n_train - 5
    top = n_test + a + 4
    train = np.concatenate([np.arange(1, a + 1), np.arange(a + 2, a + 6), [top]])
    test = np.concatenate([[a + 1], np.arange(a + 6, top), [top + 1]])
    return train, test


def plan(config: PrwConfig, seed: int, edge_cases: bool) -> PrwPlan:
    _check(config)
    rng = image_rng(seed, LAYOUT_CODE, 0, 0)
    names, split, camera = _timeline(config, rng)
    walker = _Walker(config, rng, split, camera, edge_cases)
    n_train, n_test = config.train_identities, config.test_identities
    train_pids, test_pids = dataset_pids(n_train, n_test, edge_cases)
    pids = np.concatenate([train_pids, test_pids])

    # training identities walk through training frames; a few stray into test frames
    totals = split_total(
        config.train_labelled, n_train, 2, max(2, 4 * config.train_labelled // n_train), rng
    )
    lo, hi = config.cameras_per_train_identity
    for ident in range(n_train):
        walker.walk_cameras(
            ident, "train", int(totals[ident]), min(int(rng.integers(lo, hi + 1)), int(totals[ident]))
        )
    strays = rng.choice(
        n_train, size=config.train_ids_in_test_frames if edge_cases else 0, replace=False
    )
    stray_counts = rng.integers(1, 3, size=len(strays))
    for ident, count in zip(strays.tolist(), stray_counts.tolist()):
        walker.walk(ident, "test", int(rng.integers(1, config.cameras + 1)), count)

    # test identities: one query per camera they appear in
    query_cams = split_total(config.queries, n_test, 2, config.cameras, rng)
    extra = config.test_labelled - int(stray_counts.sum()) - int(query_cams.sum())
    if extra < 0:
        raise ValueError(
            f"test_labelled={config.test_labelled} is below one appearance per query camera"
        )
    test_totals = query_cams + spread(extra, n_test, rng)
    query_frames = []  # (identity, frame row)
    for j in range(n_test):
        ident = n_train + j
        for cam in walker.walk_cameras(ident, "test", int(test_totals[j]), int(query_cams[j])):
            rows = walker.seen[(ident, int(cam))]
            query_frames.append((ident, rows[int(rng.integers(len(rows)))]))

    frames = _place(config, seed, rng, names, split, camera, walker.people)
    if edge_cases and config.negative_coordinate_boxes:
        _plant_negative_coordinates(frames, config.negative_coordinate_boxes, rng)
    box_keys = {}
    if edge_cases and config.alternate_key_files:
        picks = rng.choice(len(frames), 2 * config.alternate_key_files, replace=False)
        for i, row in enumerate(picks.tolist()):
            box_keys[names[row]] = BOX_KEYS[1 + i % 2]
    queries = [
        (ident, row, int(np.flatnonzero(frames[row].identity == ident)[0]))
        for ident, row in query_frames
    ]
    queries.sort(key=lambda q: (int(pids[q[0]]), frames[q[1]].camera, frames[q[1]].name))
    return PrwPlan(
        config=config,
        frames=frames,
        appearances=sample_appearances(rng, n_train + n_test),
        pids=pids,
        queries=queries,
        box_keys=box_keys,
        strays=tuple(sorted(int(pids[i]) for i in strays)),
    )


def _timeline(config: PrwConfig, rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Frame names sorted, with their split and camera: per camera a time line of sequences
    whose frames are randomly train or test."""
    names, split, camera = [], [], []
    per_cam = {
        s: _even_split(n, config.cameras, rng)
        for s, n in (("train", config.train_frames), ("test", config.test_frames))
    }
    for ci, cam in enumerate(range(1, config.cameras + 1)):
        n_train, n_test = per_cam["train"][ci], per_cam["test"][ci]
        splits = np.array(["train"] * n_train + ["test"] * n_test)[rng.permutation(n_train + n_test)]
        sequence = np.sort(rng.integers(1, config.sequences_per_camera + 1, size=len(splits)))
        number = np.cumsum(rng.integers(20, 160, size=len(splits))) + rng.integers(0, 500)
        names += [f"c{cam}s{sq}_{num:06d}.jpg" for sq, num in zip(sequence, number)]
        split += splits.tolist()
        camera += [cam] * len(splits)
    order = np.argsort(names)
    return [names[i] for i in order], np.array(split)[order], np.array(camera)[order]


class _Walker:
    """Puts identities into runs of consecutive frames of one camera (people walking by)."""

    def __init__(
        self,
        config: PrwConfig,
        rng: np.random.Generator,
        split: np.ndarray,
        camera: np.ndarray,
        edge_cases: bool,
    ) -> None:
        self.rng = rng
        # some frames of each split are kept for unlabelled people only
        reserved = np.zeros(len(split), bool)
        if edge_cases and config.unlabelled_only_frames:
            for s in ("train", "test"):
                rows = np.flatnonzero(split == s)
                reserved[rng.choice(rows, config.unlabelled_only_frames, replace=False)] = True
        self.cameras = np.arange(1, config.cameras + 1)
        self.walkable = {
            (s, int(c)): np.flatnonzero((split == s) & (camera == c) & ~reserved)
            for s in ("train", "test")
            for c in self.cameras
        }
        self.people: list[list[int]] = [[] for _ in range(len(split))]  # identities per frame
        self.seen: dict[tuple[int, int], list[int]] = {}  # (identity, camera) -> frame rows

    def walk(self, ident: int, split: str, cam: int, count: int) -> None:
        rows = self.walkable[(split, cam)]
        count = min(count, len(rows))
        # of a few random starts, take the run through the most still-empty frames: people
        # spread over the frames instead of leaving many with nobody labelled
        starts = self.rng.integers(0, len(rows) - count + 1, size=4)
        empty = [sum(not self.people[r] for r in rows[s : s + count]) for s in starts]
        start = int(starts[int(np.argmax(empty))])
        for row in rows[start : start + count].tolist():
            self.people[row].append(ident)
            self.seen.setdefault((ident, cam), []).append(row)

    def walk_cameras(self, ident: int, split: str, total: int, n_cams: int) -> np.ndarray:
        """``total`` appearances over ``n_cams`` random cameras (>= 1 each); returns them."""
        chosen = np.sort(self.rng.choice(self.cameras, size=n_cams, replace=False))
        counts = 1 + self.rng.multinomial(total - n_cams, np.full(n_cams, 1 / n_cams))
        room = np.array([len(self.walkable[(split, int(c))]) for c in chosen])
        overflow = int(np.clip(counts - room, 0, None).sum())
        counts = np.minimum(counts, room)
        for k in np.argsort(counts - room):  # move what does not fit to roomier cameras
            moved = min(overflow, int(room[k] - counts[k]))
            counts[k] += moved
            overflow -= moved
        for cam, count in zip(chosen, counts):
            self.walk(ident, split, int(cam), int(count))
        return chosen


def _place(
    config: PrwConfig,
    seed: int,
    rng: np.random.Generator,
    names: list[str],
    split: np.ndarray,
    camera: np.ndarray,
    people: list[list[int]],
) -> list[ImagePlan]:
    """Add the unlabelled people, then place everyone in each frame."""
    n_labelled = np.array([len(p) for p in people])
    n_unlabelled = np.zeros(len(names), np.int64)
    for s, total in (("train", config.train_unlabelled), ("test", config.test_unlabelled)):
        rows = np.flatnonzero(split == s)
        n_unlabelled[rows] = spread(total, len(rows), rng, (n_labelled[rows] == 0).astype(np.int64))
    horizon = {
        cam: image_rng(seed, LAYOUT_CODE, _CAMERA, cam).uniform(0.3, 0.5)
        for cam in range(1, config.cameras + 1)
    }  # each camera films one fixed scene
    frames = []
    for row, name in enumerate(names):
        cam = int(camera[row])
        width, height = config.sd_frame_size if cam == config.cameras else config.frame_size
        frames.append(
            _plan_frame(
                seed,
                row,
                name,
                str(split[row]),
                cam,
                width,
                height,
                horizon[cam] * height,
                people[row],
                int(n_unlabelled[row]),
            )
        )
    return frames


def _check(config: PrwConfig) -> None:
    for split, n in (("train", config.train_frames), ("test", config.test_frames)):
        if n // config.cameras < config.unlabelled_only_frames + 2:
            raise ValueError(
                f"{split}_frames={n} leaves fewer than {config.unlabelled_only_frames + 2} "
                f"frames per camera"
            )
    if not 2 * config.test_identities <= config.queries <= config.cameras * config.test_identities:
        raise ValueError(
            f"queries={config.queries}: each of the {config.test_identities} test identities needs "
            f"2..{config.cameras} queries (one per camera it appears in)"
        )


def _even_split(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    counts = np.full(parts, total // parts)
    counts[rng.choice(parts, total % parts, replace=False)] += 1
    return counts


def _plan_frame(
    seed: int,
    row: int,
    name: str,
    split: str,
    cam: int,
    width: int,
    height: int,
    horizon: float,
    identities: list[int],
    n_unlabelled: int,
) -> ImagePlan:
    rng = image_rng(seed, LAYOUT_CODE, _PLACE, row)
    n_people = len(identities) + n_unlabelled
    # surveillance cameras see people smaller than CUHK-SYSU's street snaps and movie frames
    boxes = place_people(
        rng, width, height, n_people, horizon, integer=False, near_height=(0.4, 0.6), min_height=0.1
    )
    identity = np.full(n_people, UNLABELLED, np.int64)
    identity[choose_labelled_slots(rng, boxes, len(identities))] = rng.permutation(identities)
    order = rng.permutation(n_people)
    return ImagePlan(
        name=name,
        split=split,
        width=width,
        height=height,
        camera=cam,
        horizon=horizon,
        boxes=boxes[order],
        identity=identity[order],
        ishard=np.zeros(n_people, bool),
        drawn=np.ones(n_people, bool),
    )


def _plant_negative_coordinates(frames: list[ImagePlan], count: int, rng: np.random.Generator) -> None:
    """Push ``count`` boxes slightly past the left or top edge, as in the real annotations."""
    refs = [(f, k) for f in frames for k in range(len(f.boxes))]
    for i in rng.choice(len(refs), size=min(count, len(refs)), replace=False).tolist():
        frame, k = refs[i]
        axis = 0 if rng.random() < 0.7 else 1
        frame.boxes[k, axis] = -round(float(rng.uniform(0.3, 4.0)), 4)


def write(root: Path, p: PrwPlan, seed: int, annotations_only: bool, progress: Progress) -> int:
    """Write the folder; returns the number of files written."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "frames").mkdir(parents=True, exist_ok=True)
    _write_lists(root, p)
    progress.say(f"PRW: writing {len(p.frames)} annotation files")
    for i, frame in enumerate(p.frames):
        pid = np.where(frame.identity >= 0, p.pids[np.maximum(frame.identity, 0)], UNLABELLED_PID)
        table = np.column_stack([pid.astype(np.float64), frame.boxes])
        key = p.box_keys.get(frame.name, BOX_KEYS[0])
        matfile.save_mat(root / "annotations" / f"{frame.name}.mat", {key: table})
        progress.tick("PRW annotations", i + 1, len(p.frames))
    files = 5 + len(p.frames)
    if annotations_only:
        write_image_sizes(root, {f"frames/{f.name}": (f.width, f.height) for f in p.frames})
        return files + 1
    return files + _render_frames(root, p, seed, progress)


def _write_lists(root: Path, p: PrwPlan) -> None:
    """frame_train/test.mat, ID_train/test.mat and query_info.txt."""
    for split, var in (("train", "img_index_train"), ("test", "img_index_test")):
        stems = [_stem(f.name) for f in p.frames if f.split == split]
        matfile.save_mat(root / f"frame_{split}.mat", {var: matfile.cell_column(stems)})
    n_train = len(p.appearances) - p.config.test_identities
    matfile.save_mat(root / "ID_train.mat", {"ID_train": p.pids[:n_train].astype(np.float64)[None, :]})
    matfile.save_mat(root / "ID_test.mat", {"ID_test2": p.pids[n_train:].astype(np.float64)[None, :]})
    lines = []
    for ident, row, k in p.queries:
        x, y, w, h = p.frames[row].boxes[k]
        # 4 decimals print the plan's (4-decimal) values exactly: the box matches its annotation
        lines.append(f"{p.pids[ident]} {x:.4f} {y:.4f} {w:.4f} {h:.4f} {_stem(p.frames[row].name)}\n")
    (root / "query_info.txt").write_text("".join(lines))


def _render_frames(root: Path, p: PrwPlan, seed: int, progress: Progress) -> int:
    """The frames (each camera: one background and colour cast) and the query crops."""
    backgrounds, looks = {}, {}
    for cam in sorted({f.camera for f in p.frames}):
        frame = next(f for f in p.frames if f.camera == cam)
        rng = image_rng(seed, LAYOUT_CODE, _CAMERA, cam)
        rng.uniform()  # the horizon draw (see plan)
        backgrounds[cam] = render_background(rng, frame.width, frame.height, frame.horizon)
        looks[cam] = camera_look(rng)
    crops_of: dict[int, list[tuple[int, int]]] = {}
    for ident, row, k in p.queries:
        crops_of.setdefault(row, []).append((ident, k))
    (root / "query_box").mkdir(exist_ok=True)
    progress.say(f"PRW: rendering {len(p.frames)} frames")
    files = 0
    for i, frame in enumerate(p.frames):
        rng = image_rng(seed, LAYOUT_CODE, _RENDER, i)
        image = render_image(frame, p.appearances, rng, backgrounds[frame.camera], looks[frame.camera])
        save_jpeg(image, root / "frames" / frame.name)
        for ident, k in crops_of.get(i, []):
            x, y, w, h = frame.boxes[k]
            crop = image.crop((int(max(x, 0)), int(max(y, 0)), int(round(x + w)), int(round(y + h))))
            save_jpeg(crop, root / "query_box" / f"{p.pids[ident]}_{_stem(frame.name)}.jpg")
            files += 1
        progress.tick("PRW frames", i + 1, len(p.frames))
    return files + len(p.frames)


def _stem(name: str) -> str:
    return name[: -len(".jpg")]


def summarise(p: PrwPlan) -> dict:
    train = [f for f in p.frames if f.split == "train"]
    test = [f for f in p.frames if f.split == "test"]
    n_train = len(p.appearances) - p.config.test_identities
    train_ids = tuple(int(v) for v in p.pids[:n_train])
    missing = sorted(set(range(1, max(train_ids) + 1)) - set(train_ids)) if train_ids else []
    return dict(
        train=SplitSummary.of(train, p.pids),
        test=SplitSummary.of(test, p.pids),
        queries=len(p.queries),
        query_identities=len({q[0] for q in p.queries}),
        gallery_sizes=(),
        train_ids=train_ids,
        test_ids=tuple(int(v) for v in p.pids[n_train:]),
        edge_cases=EdgeCases(
            negative_coordinate_boxes=sum(int((f.boxes[:, :2] < 0).any(axis=1).sum()) for f in p.frames),
            alternate_box_keys=dict(sorted(p.box_keys.items())),
            unlabelled_only_images=tuple(f.name for f in p.frames if not (f.identity >= 0).any()),
            train_ids_in_test_images=p.strays,
            missing_train_ids=tuple(missing),
        ),
    )
