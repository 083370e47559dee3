"""Checkpoint folders of a run: their names, their completion marker, and which one to resume.

A checkpoint is the folder Ray Train persists for one ``ray.train.report`` (every rank uploads
its DeepSpeed files into it), named ``checkpoint_<step, 8 digits>_<attempt>_<n>`` so names sort
by step and two attempts replaying the same step never write into one folder (``n`` counts the
saves of one step within an attempt: the end of training right after a periodic save). Uploads are plain
file copies, so a save cut short (a worker killed, a node lost) can leave a folder holding some
files. Only after every rank's ``report`` returned does rank 0 write ``complete.json`` into it:
a folder without it never passes for a checkpoint.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from dinor1 import storage as store
from dinor1.errors import UserError

CHECKPOINT_TAG = "ds"  # DeepSpeed's subfolder
STATE_NAME = "trainer_state.json"
REFERENCE_NAME = "reference.safetensors"
COMPLETE_NAME = "complete.json"
_NAME_RE = re.compile(r"^checkpoint_(\d{8})_([0-9a-f]+_\d+)$")


def checkpoint_dir_name(step: int, attempt: str) -> str:
    return f"checkpoint_{step:08d}_{attempt}"


def checkpoint_step(name: str) -> int | None:
    """The step in a checkpoint folder name (None for a name this module did not make)."""
    match = _NAME_RE.match(name)
    return int(match.group(1)) if match else None


def mark_complete(location: str, step: int, world_size: int) -> None:
    """Rank 0, once every rank's upload into ``location`` is done."""
    store.write_text(store.join(location, COMPLETE_NAME),
                     json.dumps({"step": step, "world_size": world_size}))


def checkpoint_problem(location: str) -> str | None:
    """Why the checkpoint folder at ``location`` is not complete, or None when it is: its
    completion marker and trainer state parse, and the DeepSpeed files of every rank are there.
    """
    try:
        json.loads(store.read_text(store.join(location, COMPLETE_NAME)))
    except (OSError, FileNotFoundError, ValueError) as exc:
        return f"no completion marker ({COMPLETE_NAME}: {type(exc).__name__}; the save was cut short)"
    try:
        state = json.loads(store.read_text(store.join(location, STATE_NAME)))
    except (OSError, FileNotFoundError, ValueError) as exc:
        return f"{STATE_NAME} unreadable ({type(exc).__name__})"
    files = [name for name, _ in store.files(store.join(location, CHECKPOINT_TAG))]
    if not any(name.endswith("model_states.pt") for name in files):
        return f"no DeepSpeed model states in {CHECKPOINT_TAG}/"
    if state.get("zero_stage", 0) > 0:
        for rank in range(state.get("world_size", 1)):
            if not any(f"zero_pp_rank_{rank}_" in n and n.endswith("optim_states.pt")
                       for n in files):
                return f"rank {rank}'s optimizer partition is missing"
    return None


def newest_complete(run_folder: str) -> tuple[str, int, list[str]]:
    """(location, step) of the newest complete checkpoint in a run folder (local or object
    store), ("", -1) when there is none; plus the incomplete ones newer than it, described."""
    found = []
    for name, mtime in store.subfolders(run_folder, "checkpoint_"):
        step = checkpoint_step(name)
        # names this module made sort by step; others (Ray's timestamps) by time, then name
        found.append(((0, step, name) if step is not None else (-1, mtime or 0, name), name))
    skipped = []
    for _, name in sorted(found, reverse=True):
        location = store.join(run_folder, name)
        problem = checkpoint_problem(location)
        if problem is None:
            state = json.loads(store.read_text(store.join(location, STATE_NAME)))
            return location, int(state.get("step", 0)), skipped
        skipped.append(f"{name} ({problem})")
    return "", -1, skipped


def latest_checkpoint(path: str | Path) -> str:
    """A checkpoint folder as is, or the newest complete checkpoint of a run folder (local or
    object store); incomplete ones (an interrupted save) are skipped, and named."""
    location = str(path) if store.is_uri(path) else str(Path(path).expanduser().resolve())
    if store.exists(store.join(location, STATE_NAME)):
        problem = checkpoint_problem(location)
        if problem:
            raise UserError(f"checkpointing.start_from: {location} is incomplete: {problem}")
        return location
    found, _, skipped = newest_complete(location)
    if found:
        if skipped:
            print(f"[train] skipped incomplete checkpoints: {'; '.join(skipped)}",
                  file=sys.stderr)
        return found
    detail = f" (incomplete: {'; '.join(skipped)})" if skipped else ""
    raise UserError(f"checkpointing.start_from: no complete checkpoint in {location}{detail}")
