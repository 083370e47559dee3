"""What a ``dinor1`` command prints: dinor1's own lines by default, the libraries' too with
``dinor1 --verbose``.

By default (quiet) the console shows dinor1's ``[demo]``, ``[train]``, ``[eval]`` and
``[mlflow]`` lines, warnings and errors, and not the chatter of the libraries underneath: Ray
Data's progress bars and execution logs, Ray Train's INFO logs (worker group start, every
``TrainingReport``), DeepSpeed's accelerator warning and INFO logs, MLflow's and transformers'
INFO logs, and two deprecation warnings that libraries raise about each other's internals on
every run. Ray's log files (``/tmp/ray/session_latest/logs``) keep what Ray and Ray Data log
there; ``--verbose`` leaves every library's defaults alone and prints the resolved config too
(always kept in the run folder and in MLflow).

How the setting reaches each process:

- this process: :func:`configure` (the CLI calls it first) sets logger levels, warning filters
  and the environment variables the libraries read when they are imported;
- the processes of a Ray that this process starts (Ray Data's tasks and actors, Ray Train's
  controller): they inherit that environment (:func:`quiet_env`);
- Ray Train's workers, on any cluster: ``RunConfig(worker_runtime_env=...)`` with
  :func:`worker_env` and ``RunConfig(logging_config=...)``; there ``build_engine`` calls
  :func:`quiet_train_worker` before it imports DeepSpeed and :func:`quiet_deepspeed` after.

Whatever the setting, no line is printed twice. Ray Train's print patch sends a worker's
``print`` to a logger whose handler writes it to the console, and also prints it (a worker's
``sys.stdout`` is not ``sys.__stdout__``): every ``[train]`` line reached the driver twice. It
is off unless ``RAY_TRAIN_ENABLE_PRINT_PATCH`` says otherwise, and the progress line writes to
``sys.stdout`` itself.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

VERBOSE_ENV = "DINOR1_VERBOSE"
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
# (message start, category): deprecation warnings one library raises about another's use of it,
# on every run; nothing a dinor1 user can act on
NOISY_WARNINGS = (
    ("`ExecutionOptions.exclude_resources` is deprecated", DeprecationWarning),  # Ray Train
    ("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning),  # DeepSpeed
)
# Ray Data's console: errors only (its log file, ray-data.log, keeps everything)
_RAY_DATA_LOGGING = """\
# written by dinor1 (dinor1/console.py): Ray Data's logging in quiet mode
version: 1
formatters:
  ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray,
         filename: ray-data.log}
  console: {class: ray._private.log.PlainRayHandler, formatter: ray, level: ERROR}
loggers:
  ray.data: {level: DEBUG, handlers: [file, console], propagate: false}
"""


def is_verbose() -> bool:
    """Whether this process (or the command that started it) runs with ``--verbose``."""
    return os.environ.get(VERBOSE_ENV) == "1"


def _python_warnings() -> str:
    """``PYTHONWARNINGS`` ignoring :data:`NOISY_WARNINGS`, after the user's own filters (the
    later entries win)."""
    ours = [f"ignore:{message}:{category.__name__}" for message, category in NOISY_WARNINGS]
    theirs = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w and w not in ours]
    return ",".join([*ours, *theirs])


def _ray_data_logging_file() -> Path:
    """A local file holding :data:`_RAY_DATA_LOGGING` (for ``RAY_DATA_LOGGING_CONFIG``)."""
    folder = Path(tempfile.gettempdir()) / f"dinor1-{os.getuid() if hasattr(os, 'getuid') else 0}"
    path = folder / "ray_data_logging.yaml"
    if not path.is_file() or path.read_text() != _RAY_DATA_LOGGING:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(_RAY_DATA_LOGGING)
        os.replace(tmp, path)
    return path


def quiet_env() -> dict[str, str]:
    """The environment of quiet mode, for this process and every process of a Ray it starts
    (only processes on this machine: it names a local file)."""
    return {
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_DATA_LOGGING_CONFIG": str(_ray_data_logging_file()),
        "RAY_DEDUP_LOGS": "1",
        # worker lines without Ray's coloured "(RayTrainWorker pid=...)" prefix: dinor1's own
        # lines name their source ("[train NAME]"); read by the driver when it imports Ray
        "RAY_DISABLE_WORKER_LOG_PREFIX": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "PYTHONWARNINGS": _python_warnings(),
    }


def worker_env() -> dict[str, str]:
    """Environment variables for Ray Train's workers (``RunConfig.worker_runtime_env``)."""
    env = {VERBOSE_ENV: "1" if is_verbose() else "0",
           PRINT_PATCH_ENV: os.environ.get(PRINT_PATCH_ENV, "0")}
    if not is_verbose():
        env.update({k: v for k, v in quiet_env().items()
                    if k not in ("RAY_DATA_LOGGING_CONFIG", "RAY_DEDUP_LOGS")})
    return env


def configure(verbose: bool) -> None:
    """Set this process's verbosity (the CLI calls it before it imports Ray or DeepSpeed)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    os.environ.setdefault(PRINT_PATCH_ENV, "0")  # (read from here when a run starts)
    if verbose:
        return
    for key, value in quiet_env().items():
        if key == "PYTHONWARNINGS":
            os.environ[key] = value  # (keeps the user's filters: see _python_warnings)
        else:
            os.environ.setdefault(key, value)
    ignore_noisy_warnings()
    # already imported libraries no longer read the environment
    for name in ("mlflow", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray's note that a Ray started here has token authentication on (it stays on)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.ERROR)
    if "ray.data" in sys.modules:  # imported before: its defaults were read already
        quiet_ray_data()


def ignore_noisy_warnings() -> None:
    """:data:`NOISY_WARNINGS` off in this process."""
    for message, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)


def quiet_ray_data() -> None:
    """Ray Data without progress bars or execution summaries (datasets created after this call
    carry the setting to the processes that execute them)."""
    if is_verbose():
        return
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    ignore_noisy_warnings()  # (importing Ray put its own filter for its warnings first)


def quiet_train_worker() -> None:
    """At the start of a Ray Train worker, before DeepSpeed is imported: no warning that
    DeepSpeed falls back to the CPU (``DS_ACCELERATOR=cpu`` exactly when its own test would
    choose the CPU), no INFO line with each ``TrainingReport`` (Ray Train logs it under a logger
    named by its file, which its ``LoggingConfig`` does not reach)."""
    if is_verbose():
        return
    ignore_noisy_warnings()
    import torch

    if "DS_ACCELERATOR" not in os.environ and not (torch.cuda.device_count() > 0
                                                   and torch.cuda.is_available()):
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train: its own logging then
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_deepspeed() -> None:
    """After DeepSpeed is imported: its logger (which it creates at WARNING) at ERROR."""
    if not is_verbose():
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
