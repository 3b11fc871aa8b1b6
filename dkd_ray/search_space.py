"""Search-space files (``search_spaces/*.yaml``): a small schema, checked before anything starts.

Schema (every key but ``space`` optional)::

    stage: student              # student (default) | teacher
    preset: cpu-small           # config preset the trials start from
    metric: val/mAP             # what trials report per epoch and the scheduler ranks
    mode: max                   # max | min
    num_samples: 4              # trials (times every grid combination)
    max_concurrent: 2           # at most this many trials at once (default: as resources allow)
    scheduler:                  # ASHA early stopping on `metric`, counted in epochs
      type: asha
      grace_period: 1
      reduction_factor: 2
    fixed:                      # config values every trial gets
      student.epochs: 3
    space:                      # config keys to explore: one distribution each
      distill.prob_weight: {loguniform: [0.1, 10]}
      distill.pair_weight: {uniform: [0.0, 2.0]}
      distill.tri_weight: {choice: [0.5, 1.0, 2.0]}
      distill.temperature: {grid: [2, 4]}

A malformed file is refused with ``SearchSpaceError`` naming the file, the key and the reason.
Config keys are checked against ``dkd_ray.config.Config`` (a value that the config would refuse
is refused here, before any trial starts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dkd_ray.config import PRESETS, ConfigError, preset
from dkd_ray.errors import InputError

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")
# What trials report per epoch (on the validation split: val/...; see train/evaluation.py).
REPORTED_METRIC = re.compile(r"val/(mAP|top1|(cuhk_sysu|prw)/[\w-]+/(mAP|top\d+)|det(/labelled)?/(ap|recall))"
                             r"|train/loss\w*")
TOP_LEVEL = ("stage", "preset", "metric", "mode", "num_samples", "max_concurrent", "scheduler", "fixed", "space")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor", "max_t")


class SearchSpaceError(InputError, ValueError):
    """A search-space file is malformed; the message names the file and the key."""


@dataclass
class SearchSpace:
    path: Path
    space: dict[str, tuple[str, list]]  # config key -> (distribution, arguments)
    stage: str = "student"
    preset: str = "cpu-small"
    metric: str = "val/mAP"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent: int = 0
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha", "grace_period": 1,
                                                               "reduction_factor": 2})
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def num_trials(self) -> int:
        """Trials a complete sweep runs: ``num_samples`` times every grid combination."""
        count = self.num_samples
        for kind, args in self.space.values():
            count *= len(args) if kind == "grid" else 1
        return count

    def to_tune(self) -> dict[str, Any]:
        """The ``param_space`` for ``ray.tune.Tuner``: config key -> Tune distribution."""
        from ray import tune

        make = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                "choice": tune.choice, "grid": tune.grid_search}
        return {key: make[kind](args) for key, (kind, args) in self.space.items()}


def load_search_space(path: str | Path) -> SearchSpace:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SearchSpaceError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise SearchSpaceError(f"{path}: cannot read the search space: {err}") from None
    except yaml.YAMLError as err:
        raise SearchSpaceError(f"{path}: not valid YAML: {err}") from None
    return parse_search_space(data, path)


def parse_search_space(data: Any, path: str | Path = "<search space>") -> SearchSpace:
    path = Path(path)

    def fail(key: str, reason: str) -> SearchSpaceError:
        return SearchSpaceError(f"{path}: {key}: {reason}")

    if not isinstance(data, dict):
        raise fail("<top level>", "expected a mapping of keys to values")
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise fail(unknown[0], f"unknown key (allowed: {', '.join(TOP_LEVEL)})")
    result = SearchSpace(path=path, space={})
    result.stage = _one_of(data.get("stage", "student"), ("student", "teacher"), "stage", fail)
    result.preset = _one_of(data.get("preset", "cpu-small"), tuple(PRESETS), "preset", fail)
    result.mode = _one_of(data.get("mode", "max"), ("max", "min"), "mode", fail)
    metric = data.get("metric", "val/mAP")
    if not isinstance(metric, str) or not metric:
        raise fail("metric", f"expected a metric name such as val/mAP, got {metric!r}")
    if not REPORTED_METRIC.fullmatch(metric):  # else every trial runs and none can be ranked
        raise fail("metric", f"{metric!r} is never reported by a trial (trials report val/mAP, val/top1, "
                             "val/<dataset>/<protocol>/<mAP|topK>, val/det/<ap|recall>, train/<loss>)")
    result.metric = metric
    result.num_samples = _positive_int(data.get("num_samples", 1), "num_samples", fail)
    if "max_concurrent" in data:
        result.max_concurrent = _positive_int(data["max_concurrent"], "max_concurrent", fail)
    result.scheduler = _scheduler(data.get("scheduler", {}), fail)

    base = preset(result.preset)
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise fail("fixed", "expected a mapping of config keys to values")
    for key, value in fixed.items():
        _check_value(base, f"fixed.{key}", key, value, fail)
    result.fixed = dict(fixed)

    space = data.get("space")
    if not isinstance(space, dict) or not space:
        raise fail("space", "expected a non-empty mapping of config keys to distributions")
    for key, spec in space.items():
        if key in fixed:
            raise fail(f"space.{key}", "also given under fixed: a key is either fixed or explored")
        result.space[key] = _distribution(base, key, spec, fail)
    return result


def _one_of(value: Any, allowed: tuple, key: str, fail) -> str:
    if value not in allowed:
        raise fail(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")
    return value


def _positive_int(value: Any, key: str, fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(key, f"expected a whole number >= 1, got {value!r}")
    return value


def _scheduler(spec: Any, fail) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise fail("scheduler", "expected a mapping (type, grace_period, reduction_factor, max_t)")
    unknown = sorted(set(spec) - set(SCHEDULER_KEYS))
    if unknown:
        raise fail(f"scheduler.{unknown[0]}", f"unknown key (allowed: {', '.join(SCHEDULER_KEYS)})")
    out = {"type": _one_of(spec.get("type", "asha"), ("asha", "none"), "scheduler.type", fail),
           "grace_period": _positive_int(spec.get("grace_period", 1), "scheduler.grace_period", fail),
           "reduction_factor": spec.get("reduction_factor", 2)}
    factor = out["reduction_factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise fail("scheduler.reduction_factor", f"expected a number > 1, got {factor!r}")
    if "max_t" in spec:
        out["max_t"] = _positive_int(spec["max_t"], "scheduler.max_t", fail)
    return out


def _check_value(base, where: str, key: str, value: Any, fail) -> None:
    """Refuse a config key or value the config itself would refuse."""
    try:
        base.copy().apply_overrides({key: value})
    except ConfigError as err:
        raise fail(where, str(err)) from None


def _field_type(key: str) -> Any:
    import dataclasses
    import typing

    from dkd_ray import config

    section, _, name = key.partition(".")
    section_type = typing.get_type_hints(config.Config).get(section)
    if section_type is None or not dataclasses.is_dataclass(section_type):
        return None
    return typing.get_type_hints(section_type).get(name)


def _distribution(base, key: str, spec: Any, fail) -> tuple[str, list]:
    where = f"space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise fail(where, f"expected one distribution, e.g. {{uniform: [0.0, 1.0]}}; one of {', '.join(DISTRIBUTIONS)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise fail(where, f"unknown distribution {kind!r} (allowed: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        raise fail(where, f"{kind} needs a non-empty list of values")
    if kind in ("uniform", "loguniform"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise fail(where, f"{kind} needs [low, high] numbers, got {args!r}")
        if _field_type(key) is int:
            raise fail(where, f"{key} takes whole numbers: use choice or grid, not {kind}")
        low, high = args
        if low >= high:
            raise fail(where, f"{kind} needs low < high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise fail(where, f"loguniform needs low > 0, got {low!r}")
        samples = [low, high]
    else:
        samples = args
    for value in samples:  # every end point / option must be a value the config accepts
        _check_value(base, where, key, value, fail)
    return kind, list(args)
