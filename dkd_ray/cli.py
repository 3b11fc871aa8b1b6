"""The flags every job shares, and turning them into a validated ``Config``."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Callable, NoReturn

from dkd_ray.config import PRESETS, Config, ConfigError, preset
from dkd_ray.errors import EXIT_BAD_INPUT, InputError

DATASETS = ("cuhk_sysu", "prw", "synthetic")


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit status 2 (argparse's), no traceback."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)  # one line, always
    raise SystemExit(EXIT_BAD_INPUT)


def exits_on_bad_input(main: Callable[..., int]) -> Callable[..., int]:
    """A job's ``main`` whose bad input (any ``InputError``: a dataset, config value, model
    reference, array file; also from a Ray worker, which ``fit`` re-raises) ends in ``fail``."""

    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        quiet_libraries()  # their INFO lines (e.g. MLflow creating its database) are not for stderr
        try:
            return main(*args, **kwargs)
        except InputError as error:
            fail(str(error))

    return guarded


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    quiet_libraries()


def quiet_libraries() -> None:
    for noisy in ("urllib3", "alembic", "matplotlib", "PIL", "filelock", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="synthetic",
                      help="benchmark to use; 'synthetic' generates CUHK-SYSU-layout data when --data-root is "
                           "not given (default: %(default)s)")
    data.add_argument("--data-root", default="", help="the dataset folder as unpacked (CUHK-SYSU/ or PRW/)")
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                     help="configuration preset; auto: the dataset's real recipe on GPU clusters, cpu-small for "
                          "synthetic data (default: %(default)s)")
    run.add_argument("--num-workers", type=int, help="Ray Train workers (one per GPU on a GPU cluster)")
    run.add_argument("--use-gpu", choices=("auto", "true", "false"), help="default: auto (GPU when the cluster has one)")
    run.add_argument("--storage-path", default=os.environ.get("DKD_STORAGE_PATH", "runs"),
                     help="where checkpoints, the knowledge bank, final models and run files go: a local "
                          "folder, an NFS mount, or object storage (s3://bucket/prefix, gs://, abfs://; "
                          "credentials and endpoint from AWS_* etc.), required for nodes without a shared "
                          "disk (default: %(default)s)")
    run.add_argument("--experiment", default="",
                     help="MLflow experiment (default: dkd-ray/<dataset>); tracking URI from MLFLOW_TRACKING_URI, "
                          "else sqlite:///mlflow.db in the working folder")
    run.add_argument("--backbone-weights", metavar="imagenet|none|PATH",
                     help="starting weights of the teacher's and the student's ResNet trunks: torchvision's "
                          "ImageNet weights (downloaded once), random init, or a state dict file (default: the "
                          "preset's: imagenet for cuhk_sysu/prw, none for cpu-small)")
    run.add_argument("--seed", type=int, help="random seed (train.seed)")
    run.add_argument("--max-iters", type=int, help="stop each training stage after this many iterations (smoke runs)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="config override, repeatable, e.g. --set student.lr=0.01 --set distill.tri_weight=0.5")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Preset, then dataset and flags, then ``--set`` overrides; errors name the bad key."""
    name = args.preset
    if name == "auto":
        name = "cpu-small" if args.dataset == "synthetic" else args.dataset
    overrides = [f"data.dataset={args.dataset}"]
    if args.data_root:
        overrides.append(f"data.root={Path(args.data_root).expanduser().resolve()}")
    for flag, key in (("num_workers", "train.num_workers"), ("use_gpu", "train.use_gpu"),
                      ("seed", "train.seed"), ("max_iters", "train.max_iters")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    weights = getattr(args, "backbone_weights", None)
    if weights is not None:
        if weights not in ("imagenet", "none"):  # a file: workers run in other folders
            path = Path(weights).expanduser().resolve()
            if not path.is_file():
                fail(f"--backbone-weights {weights}: no such file (expected imagenet, none or the path of a "
                     "state dict)")
            weights = str(path)
        overrides += [f"teacher.backbone_weights={weights}", f"student.backbone_weights={weights}"]
    try:
        return preset(name, overrides + list(args.overrides))
    except ConfigError as err:
        fail(str(err))


def experiment_name(args: argparse.Namespace, cfg: Config) -> str:
    return args.experiment or f"dkd-ray/{cfg.data.dataset}"


def add_run_name_args(parser: argparse.ArgumentParser, job: str) -> None:
    parser.add_argument("--run-name", default="", help=f"name of the Ray Train run (default: {job}-<timestamp>)")
    parser.add_argument("--resume", metavar="RUN_NAME", default="",
                        help="continue an interrupted run: same --storage-path and this run name; training "
                             "restarts from its latest checkpoint")


def run_name(args: argparse.Namespace, job: str) -> str:
    import time

    return args.resume or args.run_name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_of(args: argparse.Namespace) -> str:
    """``--storage-path`` as the workers need it: absolute, or an object-store URI as given."""
    from dkd_ray.storage import absolute

    return absolute(args.storage_path)


def claim_run_name(args: argparse.Namespace, storage: str, name: str) -> None:
    """Refuse a run name already in use on this storage unless the user asked to continue it:
    two jobs in one run folder would overwrite each other's checkpoints, and a restart of either
    would resume from the other's weights. ``--resume`` needs the run to exist."""
    from dkd_ray import storage as store
    from dkd_ray.tracking.run_record import live_driver

    folder = store.join(storage, name)
    live = live_driver(storage, name)
    if live is not None and getattr(args, "resume", "") and live.get("host") != socket.gethostname():
        # Another machine's driver cannot be checked from here, and one lost with its node (a
        # preempted pod, a dead VM) never says so: --resume is the user saying it is gone.
        logging.getLogger("dkd_ray").warning(
            "run %s is recorded as being trained by pid %s on %s; --resume takes it over (if that driver still "
            "runs, stop it: two drivers would write the same checkpoints)", name, live.get("pid"), live.get("host"))
    elif live is not None:
        fail(f"run {name!r} in {storage} is being trained right now by pid {live.get('pid')} on {live.get('host')}; "
             "wait for it or pick another --run-name (a driver on another machine that was lost: --resume "
             f"{name})")
    if getattr(args, "resume", "") and not store.is_dir(folder):
        fail(f"--resume {name}: there is no run {name!r} in {storage} to continue")
    if not getattr(args, "resume", "") and store.exists(folder):
        fail(f"run name {name!r} is already used in {storage} ({folder}); continue that run with --resume {name}, "
             "or pick another --run-name")


def prepare_driver(args: argparse.Namespace, cfg: Config, *, check_data: bool = True) -> tuple[Path, str]:
    """Logging, MLflow location and pipeline id for the workers, the dataset folder (checked
    that it can train, unless ``check_data`` is False), then Ray. Returns ``(data_root, storage_path)``."""
    from dkd_ray import tracking
    from dkd_ray.train.runner import init_ray
    from dkd_ray.train.workdata import check_trainable, resolve_data_root

    setup_logging()
    # Resolved once here: workers run in Ray's folders, not the user's.
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.tracking_uri())
    os.environ.setdefault(tracking.PIPELINE_ENV, tracking.new_pipeline_id())
    storage = storage_of(args)
    _stop_cleanly_on_sigterm()
    from dkd_ray.storage import cache_dir, is_remote

    # Synthetic data without a --data-root goes beside local runs, else into this node's cache
    # (workers on other nodes generate the same files from the same seed).
    data_root = resolve_data_root(cfg, cache_dir() if is_remote(storage) else storage)
    if check_data:  # bad data fails here in seconds, not in a worker after Ray started
        check_trainable(cfg, data_root)
    init_ray()
    from dkd_ray.tracking.run_record import reap_lost_drivers  # runs whose driver died (SIGKILL, lost node):

    reap_lost_drivers(storage, os.environ["MLFLOW_TRACKING_URI"])  # marked KILLED, not left RUNNING
    logging.getLogger("dkd_ray").info("MLflow tracking: %s (pipeline %s)", tracking.redact_uri(
        os.environ["MLFLOW_TRACKING_URI"]), os.environ[tracking.PIPELINE_ENV])
    return data_root, storage


def _stop_cleanly_on_sigterm() -> None:
    """``ray job stop`` and schedulers send SIGTERM: raise it as KeyboardInterrupt, so the stage
    ends its MLflow run KILLED (and the run folder says so) instead of dying silently."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)

