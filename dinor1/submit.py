"""``dinor1 submit JOB.yaml [key=value ...]``: a training job to a running Ray cluster, through
Ray's job API (:class:`ray.job_submission.JobSubmissionClient`), with the job file's
``runtime_env:`` section as the job's runtime environment.

What is submitted is ``python -m dinor1.cli train JOB key=value ...`` run in the uploaded
working directory (so the job runs the code you submit, not whatever dinor1 the cluster has
installed), which is what ``ray job submit --runtime-env-json ... -- python -m dinor1.cli train
...`` does; ``--dry-run`` prints that command. Before anything is sent, the job and its
overrides are validated here exactly as ``dinor1 train`` validates them, and relative local
paths of the job (shards, the run folder, a local model) are made absolute: the job runs in a
copy of the working directory that Ray deletes afterwards, so a relative run folder would be
lost with it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinor1.errors import UserError

# keys of a job holding paths that `dinor1 train` reads or writes on the cluster
PATH_KEYS = ("data.train_shards", "data.val_shards", "eval.shards", "eval.support_shards",
             "checkpointing.storage_path", "model.init")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# variables a job's env_vars must not set: Ray's own auth mode there makes the job hang in
# PENDING and then fail (the cluster decides it, not the job)
REFUSED_ENV_VARS = ("RAY_AUTH_MODE",)


@dataclass
class Submission:
    """What ``dinor1 submit`` sends: an entrypoint and a runtime environment."""

    entrypoint: list[str]
    runtime_env: dict[str, Any]
    job_name: str

    def ray_command(self, address: str) -> str:
        """The equivalent ``ray job submit`` command line."""
        return shlex.join(["ray", "job", "submit", "--address", address,
                           "--runtime-env-json", json.dumps(self.runtime_env, sort_keys=True),
                           "--", *self.entrypoint])


def runtime_env_of(data: dict[str, Any], job: Path, *, base: Path) -> dict[str, Any]:
    """The ``runtime_env:`` section of a job YAML, checked, with ``working_dir`` (default: the
    current folder) made absolute against ``base``. One-line errors name the bad key."""
    from dinor1.config import RUNTIME_ENV_KEYS

    section = data.get("runtime_env") or {}
    if not isinstance(section, dict):
        raise UserError(f"{job}: runtime_env must be a mapping of Ray runtime-environment keys")
    for key in section:
        if key not in RUNTIME_ENV_KEYS:
            raise UserError(f"{job}: runtime_env.{key}: not a Ray runtime-environment key "
                            f"(known: {', '.join(RUNTIME_ENV_KEYS)})")
    env = dict(section)
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise UserError(f"{job}: runtime_env.env_vars must be a mapping NAME: value")
    for name in REFUSED_ENV_VARS:
        if name in env_vars:
            raise UserError(f"{job}: runtime_env.env_vars.{name}: set by the cluster, not by a "
                            "job (a job setting it stays PENDING, then fails)")
    env["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    working_dir = env.get("working_dir", ".")
    if isinstance(working_dir, str) and "://" not in working_dir:
        folder = (base / os.path.expanduser(working_dir)).resolve()
        if not folder.is_dir():
            raise UserError(f"{job}: runtime_env.working_dir: no folder {folder}")
        working_dir = str(folder)
    env["working_dir"] = working_dir
    return env


def absolute_path(value: Any, base: Path) -> Any:
    """A relative local path (or list of them) -> absolute against ``base``; URIs, absolute
    paths and preset names (``model.init=tiny-cpu``: not a local folder) stay as they are."""
    if isinstance(value, list):
        return [absolute_path(v, base) for v in value]
    if not isinstance(value, str) or "://" in value or os.path.isabs(os.path.expanduser(value)):
        return value
    return str((base / value).resolve())


def build_submission(job_arg: str, overrides: list[str], *, base: Path | None = None
                     ) -> Submission:
    """Validate the job as ``dinor1 train`` would, then build the entrypoint and runtime env."""
    from dinor1.config import load_train_config, load_yaml, run_name
    from dinor1.jobs_index import jobs_dir, resolve_job

    base = (base or Path.cwd()).resolve()
    job = resolve_job(job_arg)
    cfg = load_train_config(job, overrides)  # fails here, with the local one-line errors
    env = runtime_env_of(load_yaml(job), job, base=base)
    # the job file as the job will see it: inside the uploaded folder, else a packaged job
    working_dir = env["working_dir"]
    job_abs = job.resolve()
    if "://" not in working_dir and job_abs.is_relative_to(working_dir):
        job_ref = str(job_abs.relative_to(working_dir))
    elif job_abs.parent == jobs_dir().resolve():
        job_ref = job_abs.stem  # a packaged job: the cluster's dinor1 has it too
    else:
        raise UserError(f"{job}: not inside runtime_env.working_dir ({working_dir}), so the job "
                        "would not find it; put it there or set working_dir")
    resolved = []
    for item in overrides:
        key, _, _ = item.partition("=")
        if key not in PATH_KEYS:
            resolved.append(item)
    dumped = cfg.model_dump(mode="json")
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = dumped[section][name]
        if value is None or (key == "model.init" and not (base / str(value)).is_dir()):
            continue
        new = absolute_path(value, base)
        if new != value or any(o.startswith(f"{key}=") for o in overrides):
            resolved.append(f"{key}={json.dumps(new) if isinstance(new, list) else new}")
    entrypoint = [_python(env), "-m", "dinor1.cli", "train", job_ref, *resolved]
    return Submission(entrypoint=entrypoint, runtime_env=env, job_name=run_name(cfg))


def _python(env: dict[str, Any]) -> str:
    """``python`` on the cluster: a ``py_executable`` of the runtime env, else the cluster's."""
    return str(env.get("py_executable") or "python")


def submit(args) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    _quiet_job_client()

    submission = build_submission(args.config, list(args.overrides))
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or \
        os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if args.dry_run:
        print(submission.ray_command(address))
        return 0
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"no Ray job API at {address} ({_first_line(exc)}); start a cluster "
                        "(dinor1 cluster local up) or pass --address http://HEAD:8265") from None
    submission_id = args.submission_id or \
        f"dinor1-{submission.job_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    job_id = _submit_with_retry(client, submission, submission_id)
    print(f"[submit] job {job_id} submitted to {address}: {shlex.join(submission.entrypoint)}")
    print(f"[submit] follow: ray job logs --address {address} --follow {job_id}")
    print(f"[submit] stop:   ray job stop --address {address} {job_id}")
    if not args.wait:
        return 0
    try:
        asyncio.run(_tail(client, job_id))
    except KeyboardInterrupt:
        print(f"[submit] stopped following; job {job_id} goes on "
              f"(ray job stop --address {address} {job_id})", file=sys.stderr)
        return 130
    status = _final_status(client, job_id)
    print(f"[submit] job {job_id}: {status.value}")
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        if info.message:
            print(f"[submit] {_first_line(info.message)}", file=sys.stderr)
        return 1
    return 0


def _quiet_job_client() -> None:
    """Without ``--verbose``: not Ray's INFO lines about packaging and uploading the working
    dir, nor its warnings that ``.git`` and ``.venv`` are left out (as they should be)."""
    import logging

    from dinor1.console import is_verbose

    if is_verbose():
        return
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # (each sets INFO for itself)
    logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)


def _submit_with_retry(client, submission: Submission, submission_id: str,
                       seconds: float = 30.0) -> str:
    """A head that has just started answers "No available agent" for a few seconds."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.submit_job(entrypoint=shlex.join(submission.entrypoint),
                                     runtime_env=submission.runtime_env,
                                     submission_id=submission_id)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise UserError(f"job submission refused: {_first_line(exc)}") from None
            time.sleep(2)


async def _tail(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def _final_status(client, job_id: str, seconds: float = 30.0):
    """The job's status once terminal (the log stream may end a moment before it is)."""
    deadline = time.monotonic() + seconds
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return status


def _first_line(exc: Any) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
