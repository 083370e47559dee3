"""Checkpoint folders of a run: their names, their completion marker, and which one to resume.

A checkpoint is the folder Ray Train persists for one ``ray.train.report`` (every rank uploads
its DeepSpeed files into it), named ``checkpoint_<step, 8 digits>_<attempt>_<n>`` so names sort
by step and two attempts replaying the same step never write into one folder (``n`` counts the
saves of one step within an attempt: the end of training right after a periodic save). Uploads are plain
file copies, so a save cut short (a worker killed, a node lost) can leave a folder holding some
files. Only after every rank's ``report`` returned does rank 0 write ``complete.json`` into it:
a folder without it never passes for a checkpoint.

Inside the folder: DeepSpeed's files (``ds/``, every rank's partition), the trainer state
(``trainer_state.json``, :class:`~dinor1.train.state.TrainState`) and, once GRQO started, the
reference model (``reference.safetensors``). :func:`save_checkpoint` writes one and reports it to
Ray Train, :func:`restore_point` and :func:`load_checkpoint` find and load one, and
:func:`export_final_model` writes the ``from_pretrained`` directory a run ends with.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import tempfile
from pathlib import Path

from dinor1 import storage as store
from dinor1.errors import UserError
from dinor1.train.state import TrainState

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
        state = TrainState.from_json(store.read_text(store.join(location, STATE_NAME)))
    except (OSError, FileNotFoundError, ValueError) as exc:
        return f"{STATE_NAME} unreadable ({type(exc).__name__})"
    files = [name for name, _ in store.files(store.join(location, CHECKPOINT_TAG))]
    if not any(name.endswith("model_states.pt") for name in files):
        return f"no DeepSpeed model states in {CHECKPOINT_TAG}/"
    if state.zero_stage > 0:
        for rank in range(state.world_size):
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
            state = TrainState.from_json(store.read_text(store.join(location, STATE_NAME)))
            return location, state.step, skipped
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


def broadcast_from_rank0(value, rank: int):
    """Rank 0's ``value`` on every rank."""
    import torch.distributed

    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def restore_point(run_folder: str, start_from: str | None, rank: int):
    """The ``ray.train.Checkpoint`` this attempt starts from (the same on every rank), or None.

    This run's own newest checkpoint first: the newer of the one Ray Train registered (after a
    restart) and the newest complete one in the run folder (a worker lost between the save and
    Ray's registration of it must not cost those steps); else ``start_from`` (branching off
    another run). Rank 0 decides.
    """
    import ray.train

    registered = ray.train.get_checkpoint()
    choice = None
    if rank == 0:
        folder, step, _ = newest_complete(run_folder) if run_folder else ("", -1, [])
        ray_step = checkpoint_step(Path(registered.path).name) if registered else None
        if registered is not None and (ray_step is None or ray_step >= step):
            choice = ("registered", None)
        elif folder:
            choice = ("folder", folder)
        elif start_from:
            choice = ("folder", start_from)
    choice = broadcast_from_rank0(choice, rank)
    if choice is None:
        return None
    if choice[0] == "registered":
        return registered
    return ray.train.Checkpoint(choice[1])  # a folder or a URI


def load_checkpoint(checkpoint, engine, reference, world_size: int) -> TrainState:
    """Load a checkpoint into the engine (weights, optimiser) and ``reference``
    (:class:`~dinor1.train.stages.GRQOReference`, when the checkpoint has one); returns its
    trainer state.

    A ZeRO-1/2/3 checkpoint saved by another number of workers than ``world_size`` (an elastic
    run that shrank or grew) cannot be loaded as it is: DeepSpeed refuses optimiser partitions
    of another data-parallel size. It is converted first into DeepSpeed's universal checkpoint
    (every parameter's fp32 weights and Adam moments whole, :func:`universal_copy`) and loaded
    from there, re-partitioned for ``world_size``."""
    with checkpoint.as_directory() as folder:
        state = TrainState.from_json((Path(folder) / STATE_NAME).read_text(),
                                     source=f"{checkpoint.path}/{STATE_NAME}")
        if state.zero_stage and state.world_size != world_size:
            with node_universal_copy(Path(folder) / CHECKPOINT_TAG) as universal:
                config = engine._config  # DeepSpeed reads this flag when it loads
                config.load_universal_checkpoint = True
                try:
                    engine.load_checkpoint(universal, tag=CHECKPOINT_TAG)
                finally:
                    config.load_universal_checkpoint = False
        else:
            engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        if (Path(folder) / REFERENCE_NAME).exists():
            reference.restore(engine, Path(folder) / REFERENCE_NAME,
                              state.reference_refresh_step)
    return state


@contextlib.contextmanager
def node_universal_copy(ds_folder: Path):
    """Every worker: the folder holding the universal copy of ``ds_folder`` (under the tag
    folder's name) made for this node. The node's first worker converts, the others wait for it
    (a node of 8 GPU workers converts once, not 8 times); it is removed once every worker has
    loaded. Collective: every rank of the group calls it."""
    import shutil
    import uuid

    import ray
    import ray.train
    import torch.distributed

    context = ray.train.get_context()
    token = broadcast_from_rank0(uuid.uuid4().hex[:8], context.get_world_rank())
    # (the node in the name: the nodes of a cluster on one machine share its temp folder)
    node = ray.get_runtime_context().get_node_id()[:12]
    folder = Path(tempfile.gettempdir()) / f"dinor1-universal-{token}-{node}"
    first = context.get_local_rank() == 0
    try:
        if first:
            universal_copy(ds_folder, folder / CHECKPOINT_TAG)
        torch.distributed.barrier()
        yield folder
        torch.distributed.barrier()  # every worker of the node has read it
    finally:
        if first:
            shutil.rmtree(folder, ignore_errors=True)


def universal_copy(ds_folder: Path, out: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` of one ZeRO-1/2/3 checkpoint tag folder (all ranks' files)
    into ``out``: in this process, one worker, its console output kept off unless the run is
    verbose; for the model sizes here that takes seconds."""
    import io
    from types import SimpleNamespace

    from deepspeed.checkpoint import ds_to_universal

    from dinor1.console import is_verbose

    args = SimpleNamespace(input_folder=str(ds_folder), output_folder=str(out),
                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                           strict=True,
                           # our model records no tensor-parallel layout: there is none
                           inject_missing_state=True)
    with contextlib.ExitStack() as stack:
        if not is_verbose():
            buffer = io.StringIO()
            stack.enter_context(contextlib.redirect_stdout(buffer))
            stack.enter_context(contextlib.redirect_stderr(buffer))
        ds_to_universal.main(args)


def save_checkpoint(engine, state: TrainState, reference, *, rank: int, name: str,
                    run_folder: str, metrics: dict[str, float], after_save=None) -> None:
    """Every rank: DeepSpeed's files; rank 0: the trainer state and the reference. Reported to
    Ray Train under ``name`` (which uploads it into the run folder), then marked complete.

    ``after_save(folder)`` runs on every rank once the files are written, before the report
    (the loop logs checksums of what was saved there)."""
    import ray.train
    import torch.distributed

    from dinor1.model.dino_r1 import save_weights

    state.saved_step = state.step
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
        if rank == 0:
            if reference.model is not None:
                save_weights(reference.model.model, Path(folder) / REFERENCE_NAME)
                state.reference_refresh_step = reference.refresh_step
            (Path(folder) / STATE_NAME).write_text(state.to_json())
        if after_save is not None:
            after_save(folder)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=name)
    # every rank's files are uploaded once all reports returned: only now is it complete
    torch.distributed.barrier()
    if rank == 0 and run_folder:
        mark_complete(store.join(run_folder, name), state.step, state.world_size)


def export_final_model(model, state_dict, final_dir: str) -> Path:
    """The final weights as a ``from_pretrained`` directory in ``final_dir`` (a local folder, or
    an object-store URI: written locally, then uploaded). Returns the local directory."""
    remote = final_dir if final_dir and store.is_uri(final_dir) else None
    target = Path(final_dir) if final_dir and not remote else Path(tempfile.mkdtemp())
    model.save_pretrained(target, state_dict)
    if remote:
        store.upload_dir(target, remote)
    from dinor1.console import is_verbose

    if is_verbose():  # (quiet, the driver's last line names the run folder)
        print(f"[train] final weights: {remote or target}", file=sys.stderr, flush=True)
    return target
