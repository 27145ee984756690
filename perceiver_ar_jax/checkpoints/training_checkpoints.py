"""Training checkpoints: an orbax CheckpointManager in `<workdir>/checkpoints`.

Each step directory holds four items:
    params/     the parameters (orbax array checkpoint, restorable onto any mesh)
    opt_state/  the optimizer state
    meta/       step and RNG key data
    data/       one JSON file per process with that process's input-iterator state (its position in the stream)

Saves are asynchronous (training continues while arrays are written) and atomic: orbax writes to a temporary
directory and renames it when every process has finished, so a job killed mid-save leaves no half checkpoint
under a step's name. Restoring sorts failures (`restore_errors.py`): a transient storage error is retried; a
checkpoint whose files are damaged is reported in one line, moved aside as `corrupted-<step>` and the one before
it used (only once that one restored, so a config that fits no checkpoint renames nothing); anything else stops
with its cause and changes nothing. (`model_directory.py` is the other format: a finished model.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from perceiver_ar_jax.checkpoints.restore_errors import classify
from perceiver_ar_jax.errors import CheckpointError, StorageUnavailableError

CHECKPOINTS_DIR = "checkpoints"
ITEMS = ("params", "opt_state", "meta", "data")


# ----------------------------------------------------------------------------------------------------------------
# per-process input-iterator state
class ProcessJsonHandler(ocp.CheckpointHandler):
    """Every process writes (and reads back) its own JSON file: each host's input pipeline reads a different share
    of the data, so each has its own position to resume from. (orbax's JSON handler writes on one host only.)"""

    @staticmethod
    def filename(process_index: int, process_count: int) -> str:
        return f"process_{process_index}-of-{process_count}.json"

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        path = directory / self.filename(jax.process_index(), jax.process_count())
        path.write_text(json.dumps(args.item, default=_numpy_to_python))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> dict[str, Any] | None:
        """This process's state, or None when the checkpoint was written by a different number of processes."""
        path = directory / self.filename(jax.process_index(), jax.process_count())
        if not path.exists():
            written = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))
            logging.warning("no input-iterator state for process %d of %d in %s (it has %s): the data stream of "
                            "this run starts afresh", jax.process_index(), jax.process_count(), directory, written)
            return None
        return json.loads(path.read_text())


def _numpy_to_python(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays in an iterator's state
        return value.tolist()
    raise TypeError(f"input-iterator state value {value!r} of type {type(value).__name__} is not JSON serialisable")


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    item: dict[str, Any]


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    item: Any = None


# ----------------------------------------------------------------------------------------------------------------
class UnreadableCheckpointError(CheckpointError):
    """No checkpoint of a workdir can be restored (the message names each one and why)."""


class TrainingCheckpoints:
    """The checkpoints of one training workdir: save every N steps, keep the last K, restore the newest good one.

    Nothing is created on disk until `create_directory()` (called once the run has really started) or a save.
    restore_attempts / retry_delay_s: tries of a restore that fails with a transient storage error, and the wait
    before the first retry (doubled before each next one).
    """

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False, restore_attempts: int = 4, retry_delay_s: float = 2.0):
        self.directory = str(workdir_path(workdir) / CHECKPOINTS_DIR)
        self.read_only = read_only  # readers (load_params) never rename, delete or create anything
        self.restore_attempts, self.retry_delay_s = restore_attempts, retry_delay_s
        if not read_only:
            self._report_incomplete()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            enable_async_checkpointing=async_save,
            create=False,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def create_directory(self) -> None:
        if not self.read_only and jax.process_index() == 0:
            epath.Path(self.directory).mkdir(parents=True, exist_ok=True)

    def _report_incomplete(self) -> None:
        directory = epath.Path(self.directory)
        if jax.process_index() != 0 or not directory.is_dir():
            return
        for path in sorted(directory.iterdir(), key=lambda p: p.name):
            if "tmp" in path.name:
                logging.warning("incomplete checkpoint %s (a save interrupted before it finished) is ignored", path)

    # ------------------------------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, data_state: dict[str, Any] | None, *, force: bool = False) -> bool:
        """Start an (asynchronous) save of `state` (a TrainState) at its step; False if that step is saved already."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return False
        self.create_directory()
        if jax.process_count() > 1:  # every process writes into it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint_directory_{step}")
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            data=DataStateSave(data_state or {}),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any] | None]:
        """Restore the TrainState at `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs), and
        this process's data-iterator state."""
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            meta=ocp.args.StandardRestore({"step": abstract_state.step, "rng": abstract_state.rng}),
            data=DataStateRestore(),
        )
        restored = self.manager.restore(step, args=args)
        state = abstract_state.replace(params=restored.params, opt_state=restored.opt_state,
                                       step=restored.meta["step"], rng=restored.meta["rng"])
        return state, restored.data

    def restore_params(self, step: int, abstract_params) -> Any:
        return self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
                                    ).params

    def restore_latest(self, restore_fn: Callable[[int], Any]) -> tuple[int, Any] | None:
        """restore_fn(step) on the newest step, falling back to older ones while checkpoints are damaged.

        Returns (step, restore_fn's result), or None when there is no checkpoint at all. A transient storage error
        is retried (StorageUnavailableError when every attempt failed). Damaged checkpoints newer than the one
        restored are reported and, unless read-only, renamed to `corrupted-<step>` so that training can save those
        steps again. When no checkpoint can be restored, or one fails for another reason than damaged files (e.g.
        a config that does not fit it), nothing is renamed and UnreadableCheckpointError says why, in one line.
        """
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                result = self._restore_retrying(step, restore_fn)
            except StorageUnavailableError:
                raise
            except Exception as e:  # noqa: BLE001 - orbax and the file system raise many types; classify sorts them
                failure = classify(e)
                if failure.kind != "damaged":
                    raise UnreadableCheckpointError(
                        f"cannot restore the checkpoint {self.directory}/{step}: {failure.cause}. Nothing was "
                        "changed; if the config differs from the one the run was started with, use that config or "
                        "another --workdir") from None
                damaged.append((step, failure.cause))
                continue
            for bad_step, cause in damaged:
                self._report_damaged(bad_step, cause, used=step)
            return step, result
        if damaged:
            causes = "; ".join(f"{step}: {cause}" for step, cause in damaged)
            raise UnreadableCheckpointError(
                f"every checkpoint in {self.directory} is damaged ({causes}). Nothing was changed; move the "
                "checkpoints away (or use another --workdir) to start afresh")
        return None

    def _restore_retrying(self, step: int, restore_fn: Callable[[int], Any]) -> Any:
        for attempt in range(1, self.restore_attempts + 1):
            try:
                return restore_fn(step)
            except Exception as e:
                failure = classify(e)
                if failure.kind != "transient":
                    raise
                if attempt == self.restore_attempts:
                    raise StorageUnavailableError(
                        f"cannot read the checkpoint {self.directory}/{step}: transient storage errors on all "
                        f"{attempt} attempts, the last {failure.cause}. The files were left as they are; run again "
                        "later") from None
                delay = self.retry_delay_s * 2 ** (attempt - 1)
                logging.warning("checkpoint %s/%d: transient storage error (%s); retrying in %.1f s (attempt %d of "
                                "%d)", self.directory, step, failure.cause, delay, attempt + 1, self.restore_attempts)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _report_damaged(self, step: int, cause: str, used: int) -> None:
        src = epath.Path(self.directory) / str(step)
        if self.read_only:
            logging.warning("checkpoint %s is damaged (%s); using the checkpoint at step %d", src, cause, used)
            return
        dst, n = src.parent / f"corrupted-{step}", 1
        while dst.exists():
            dst, n = src.parent / f"corrupted-{step}.{n}", n + 1
        if jax.process_index() == 0 and src.is_dir():
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self.manager.reload()
        logging.warning("checkpoint %s is damaged (%s); set aside as %s, resuming from step %d", src, cause,
                        dst.name, used)

    def reached_preemption(self, step: int) -> bool:
        """True on every process when the cluster announced a preemption (multi-host; needs jax.distributed)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def workdir_path(path: str | os.PathLike) -> epath.Path:
    """A workdir as an etils Path: local paths made absolute, gs:// and other URLs as they are."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def is_training_workdir(path: str | os.PathLike) -> bool:
    return (workdir_path(path) / CHECKPOINTS_DIR).is_dir()


def saved_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of a workdir's finished checkpoints (directories named by their step), without orbax."""
    directory = workdir_path(workdir) / CHECKPOINTS_DIR
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def load_params(workdir: str | os.PathLike, abstract_params) -> tuple[int, Any]:
    """The parameters of the newest readable checkpoint of a training workdir -> (step, params).

    abstract_params: ShapeDtypeStructs with shardings (the layout to restore onto)."""
    checkpoints = TrainingCheckpoints(workdir, read_only=True, async_save=False)
    try:
        found = checkpoints.restore_latest(lambda step: checkpoints.restore_params(step, abstract_params))
    finally:
        checkpoints.close()
    if found is None:
        raise UnreadableCheckpointError(f"no training checkpoint in {checkpoints.directory}")
    return found
