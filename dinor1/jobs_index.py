"""The job YAMLs shipped with dinor1, and resolving a job argument to a file.

The files live in the repository's ``jobs/`` folder and are installed as the package
``dinor1.jobs`` (package data; see ``[tool.setuptools]`` in pyproject.toml), so an installed
``dinor1`` finds them without a checkout. Where a job file is expected, the command line takes a
path (``jobs/grqo.yaml``, ``./mine.yaml``) or the name of a packaged job (``grqo``, ``demo.yaml``).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from dinor1.errors import UserError

PACKAGE = "dinor1.jobs"
SUFFIX = ".yaml"


def jobs_dir() -> Path:
    """The folder holding the packaged job YAMLs.

    ``dinor1.jobs`` when it is importable (an installed or editable-installed dinor1); else the
    ``jobs/`` folder next to the ``dinor1`` package (a checkout on ``PYTHONPATH``, not installed).
    """
    try:
        return Path(str(importlib.resources.files(PACKAGE)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "jobs"


def packaged_jobs() -> list[str]:
    """Names (without ``.yaml``) of the packaged jobs, sorted."""
    folder = jobs_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(SUFFIX)] for p in folder.glob(f"*{SUFFIX}") if p.is_file())


def packaged_job(name: str) -> Path:
    """The packaged job ``name`` (``grqo`` or ``grqo.yaml``); :class:`UserError` naming the
    packaged jobs when there is none of that name."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if stem in packaged_jobs():
        return jobs_dir() / f"{stem}{SUFFIX}"
    raise UserError(_unknown(name))


def resolve_job(arg: str | Path) -> Path:
    """A job argument -> the YAML file to load.

    An existing file wins (``demo.yaml`` in the current folder is that file); otherwise a bare
    name (no folder part) is looked up among the packaged jobs. Anything else is an error
    listing the packaged jobs.
    """
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    if path.name == str(arg) and str(arg) not in ("", ".", ".."):
        return packaged_job(str(arg))
    raise UserError(_unknown(str(arg)))


def _unknown(arg: str) -> str:
    names = ", ".join(packaged_jobs()) or "none found"
    return f"no job file or packaged job {arg!r} (packaged jobs: {names})"
