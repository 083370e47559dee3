"""A trained model as an MLflow model, and the MLflow model registry.

- :func:`log_model` logs a model directory (``final_model``) into an MLflow run as an MLflow 3
  logged model: the ``python_function`` flavour (``dinor1/mlflow_model.py``, one JSON request
  per row, ``dinor1/api.py``'s :func:`~dinor1.api.request_from_json`), its signature, the weights
  (safetensors), config and tokenizer as they are, the training run's ``resolved_config.yaml``
  (its evaluation resolution), generic prompts when an evaluation made them, and dinor1's code.
  The evaluation metrics go on the logged model and the version as tags (the run has them as
  metrics already). With a name it registers a new version, and optionally sets an alias
  (``champion``).
- :func:`download_model` turns ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` (or
  ``runs:/RUN/model``) into a local model directory; ``dinor1 eval``, ``predict``, ``serve``
  and ``Detector.from_pretrained`` take those URIs wherever they take a checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from dinor1.errors import UserError

LOGGED_NAME = "model"  # the logged model's name in its run (runs:/RUN/model)
MODEL_URI_PREFIXES = ("models:/", "runs:/")


def is_model_uri(value: str | None) -> bool:
    return bool(value) and str(value).startswith(MODEL_URI_PREFIXES)


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "request")]),  # one JSON request per row
        outputs=Schema([ColSpec("string", "detections")]),  # a JSON list per row
        params=ParamSchema([ParamSpec("max_pixels", "long", 40_000_000)]))


def _requirements() -> list[str]:
    """What loading the model needs beside dinor1's own code (shipped with it)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "safetensors", "numpy", "pillow", "pyyaml", "pydantic",
                 "scipy", "mlflow"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


@contextlib.contextmanager
def fluent_tracking_uri(uri: str):
    """MLflow's fluent API (and its registry) pointed at ``uri`` for a moment, then put back.
    ``set_tracking_uri`` mirrors itself into ``MLFLOW_TRACKING_URI``, so that is the old one
    (unset stays unset)."""
    import os

    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(previous)


@contextlib.contextmanager
def _quiet():
    """MLflow's prints, progress bars, INFO logs and warnings off unless ``--verbose``."""
    import io
    import logging
    import os
    import warnings

    from dinor1.console import is_verbose

    if is_verbose():
        yield
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def log_model(model_dir: str, *, run_id: str, tracking_uri: str, metrics: dict | None = None,
              register_as: str | None = None, alias: str | None = None,
              generic_prompts: str | Path | None = None, log=print) -> dict:
    """Log ``model_dir`` into run ``run_id`` (reopened, and finished again); with
    ``register_as``, a new registered version (and ``alias`` set on it). Returns the logged
    model's URI, id, and the version."""
    from dinor1 import storage

    local = storage.local_copy(model_dir) if storage.is_uri(model_dir) else model_dir
    if not (Path(local) / "config.json").is_file():
        raise UserError(f"mlflow model: {model_dir} has no config.json")
    artifacts = {"model": str(local)}
    resolved = Path(local).parent / "resolved_config.yaml"
    if resolved.is_file():  # the run's evaluation resolution (dinor1/api.py:run_resolution)
        artifacts["resolved_config"] = str(resolved)
    if generic_prompts:
        artifacts["generic_prompts"] = str(generic_prompts)
    metric_tags = {k: f"{float(v):.6g}" for k, v in (metrics or {}).items()}
    with _quiet(), fluent_tracking_uri(tracking_uri) as mlflow:
        package = Path(__file__).parent
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=LOGGED_NAME, artifacts=artifacts,
                python_model=str(package / "mlflow_model.py"),
                signature=_signature(), code_paths=[str(package)],
                pip_requirements=_requirements(),
                # the metrics as tags: logged again as metrics they would repeat the run's
                tags={"dinor1.source": str(model_dir), **metric_tags})
        out = {"model_uri": info.model_uri, "model_id": info.model_id, "version": None}
        if register_as:
            version = mlflow.register_model(info.model_uri, register_as, tags=metric_tags)
            out["version"] = version.version
            if alias:
                mlflow.MlflowClient().set_registered_model_alias(register_as, alias,
                                                                 version.version)
    where = f"registered {register_as} version {out['version']}" + \
        (f" (@{alias})" if alias else "") if register_as else f"logged {info.model_uri}"
    log(f"[mlflow] model {where}")
    return out


def download_model(uri: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """``models:/...`` or ``runs:/...`` -> (the local model directory, the training run id)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    train_run = None
    try:
        if uri.startswith("models:/"):
            name, _, rest = uri[len("models:/"):].partition("/")
            if "@" in name:
                name, alias = name.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            elif rest:
                version = client.get_model_version(name, rest)
            else:
                raise UserError(f"{uri}: give a version or an alias (models:/NAME/VERSION, "
                                "models:/NAME@ALIAS)")
            train_run = version.run_id
        # (MLflow resolves models:/ with its global registry URI, whatever is passed here)
        with _quiet(), fluent_tracking_uri(tracking_uri or mlflow.get_tracking_uri()):
            root = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except MlflowException as exc:
        raise UserError(f"{uri}: not found in the MLflow registry at "
                        f"{tracking_uri or mlflow.get_tracking_uri()} "
                        f"({str(exc).splitlines()[0][:200]})") from exc
    from mlflow.models import Model

    try:
        flavor = Model.load(root).flavors["python_function"]
        model_dir = Path(root) / flavor["artifacts"]["model"]["path"]
    except (OSError, KeyError) as exc:
        raise UserError(f"{uri}: not a dinor1 model (no model artifact)") from exc
    return str(model_dir), train_run
