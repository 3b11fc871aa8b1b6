"""MLflow runs, model logging, the model registry and model loading (one module each:
``naming``, ``redaction``, ``tracker``, ``spool``, ``model_logging``, ``registry``, ``lineage``,
``loading``, ``errors``).

Where runs go: ``tracking_uri()`` is ``MLFLOW_TRACKING_URI`` when set (a tracking server on a
cluster), else a SQLite store ``<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``, which
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` (run in the same folder) shows. Resolve it
once in the job's driver and hand it to the Ray workers (``Tracker(uri=...)``): a worker's
working directory is Ray's, not the user's.

Layout: one experiment per dataset (``dkd-ray/<dataset>``, or ``--experiment``), one run per job.
Experiments are created as training experiments (``mlflow.experimentKind``) with a description;
runs are named by their role (``teacher-…``, ``student-…``, ``sweep-…``, ``trial-…``), carry
MLflow's source tags (job script, git commit) and their dataset as a dataset input, and a
description linking a saved runs-table view of their pipeline or sweep (``lineage``: an
experiment tag the UI opens with ``?viewStateShareKey=``). Registered versions carry every
headline metric under its full name, their teacher as a ``models:/`` URI, the knowledge bank,
the config digest and a Markdown description; ``latest-good`` follows the newest version whose
metrics are all finite.
The runs of one pipeline (teacher, knowledge bank, student, evaluation) share the tag
``pipeline_id`` (``DKD_PIPELINE_ID`` in the environment, inherited by the jobs a pipeline
submits); filter them in the UI with ``tags.pipeline_id = '<id>'``. Tags are used rather than
nesting because the stages are separate Ray jobs; Tune trials, which do share a driver, are
nested under the sweep's run with ``parent_run_id``.

Robustness: training never waits on MLflow, and an outage never silently drops what was logged.
``Tracker`` turns every call into a best effort: when the server cannot be reached (at start or
mid-run) it warns once, keeps params, tags, metric values (with the step and timestamp they were
logged at) and artifact paths, and tries again after a back-off (30 s, doubling up to 10 min),
sending what it kept, in order, once the server answers. Past ``max_buffered_metrics`` (10k)
metric values the oldest go to a spool file (``spool``: JSON lines, in the run's checkpoint
folder when known, else a temporary folder), so memory stays bounded and nothing is discarded.
``close()`` ends a training loop or a job: a few more tries (``close_timeout_s``, 30 s by
default or ``$DKD_MLFLOW_CLOSE_TIMEOUT_S``), then what is still pending is written to
``<checkpoint folder>/mlflow_pending.jsonl`` and the log says what was sent late, what is left
and the command that sends it once the server is back: ``python jobs/replay_mlflow.py --spool
<file> [--tracking-uri URI]`` (``replay_spool``; idempotent; renames the file ``.replayed``).
``end()`` is ``close()`` with a single last attempt; a tracker never closed spools at exit.
Models are not spooled: a model not logged stays in the checkpoints. MLflow's own HTTP retries
are cut to one retry and a 20 s timeout (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``..._TIMEOUT`` /
``..._BACKOFF_FACTOR``, unless the user set them) so a dead server costs seconds, not the
minutes of MLflow's defaults. Rank 0 tracks; other ranks get a disabled ``Tracker`` whose calls
return at once. Values of params whose names look secret (token, password, secret, api key,
credential) and the user:password part of URIs are never sent, logged or spooled.

Models: ``log_model`` writes one MLflow model holding
- the module serialised by ``mlflow.pytorch.log_model`` with a signature inferred from the input
  example: ``pt2`` (``torch.export``, a graph: loading runs no code) when the model exports,
  else ``pickle`` (the whole module; unpickling runs arbitrary code, so ``load_model`` refuses it
  unless given ``trust_pickle=True`` or ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true`` is set);
- ``extra_files/state_dict.pt`` and ``extra_files/config.json``: the weights as plain tensors and
  the config that rebuilds the architecture.
``load_model(ref, builder=...)`` prefers the second form: ``builder(config_dict)`` rebuilds the
module from this project's code and the weights are read with ``torch.load(weights_only=True)``
(safe, and it survives refactors that rename classes, which break pickles). Without a builder it
loads the serialised module (fine for pt2 from any source; pickle only from sources you trust).
"""

from .errors import ModelNotFoundError
from .loading import PICKLE_ENV, load_model
from .model_logging import CONFIG_FILE, STATE_DICT_FILE
from .naming import (NOTE_TAG, PIPELINE_ENV, experiment_name, new_pipeline_id, registered_model_name, runs_view_link,
                     tracking_uri, version_tags)
from .redaction import redact_params, redact_uri
from .registry import (LATEST_GOOD_ALIAS, UnmeasuredModelError, all_metrics_finite, finite_headline, latest_registered,
                       register_model, set_alias)
from .spool import SPOOL_NAME, ReplayUnreachable, SpoolError
from .spool import replay as replay_spool
from .tracker import Tracker

__all__ = ["CONFIG_FILE", "LATEST_GOOD_ALIAS", "NOTE_TAG", "PICKLE_ENV", "PIPELINE_ENV", "SPOOL_NAME", "STATE_DICT_FILE", "ModelNotFoundError",
           "ReplayUnreachable", "SpoolError", "Tracker", "UnmeasuredModelError", "all_metrics_finite", "finite_headline",
           "experiment_name", "latest_registered", "load_model", "new_pipeline_id", "redact_params", "redact_uri",
           "register_model", "registered_model_name", "replay_spool", "runs_view_link", "set_alias", "tracking_uri", "version_tags"]
