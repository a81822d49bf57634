"""CheckpointListener: saves the model every N iterations, epochs or minutes, and keeps a
rotating set of checkpoints written asynchronously (DL4J's CheckpointListener).

Each checkpoint is what :func:`jaxws.nn.checkpoints.save_model` writes, numbered in one
directory by an orbax CheckpointManager.
"""

from __future__ import annotations

import atexit
import datetime
import numbers
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

from jaxws.errors import CheckpointError, ConfigurationError
from jaxws.interrupts import guarded
from jaxws.nn.checkpoints import (
    ITEMS,
    checked_flag,
    checked_iterator,
    checked_meta,
    checked_path,
    content,
    install,
    items_args,
    model_from_meta,
    orbax_checkpoint,
    restore_plan,
)
from jaxws.nn.listeners import TrainingListener

__all__ = ["Checkpoint", "CheckpointListener"]

_TRASH = "deleted"  # checkpoints past keep_last are renamed here (atomic), then removed


class Checkpoint(NamedTuple):
    """One checkpoint a CheckpointListener keeps (DL4J's Checkpoint)."""

    number: int
    iteration: int
    epoch: int
    saved_at: str
    iterator: dict | None


class CheckpointListener(TrainingListener):
    """Saves the model every N iterations, epochs or minutes (DL4J's CheckpointListener).

    Checkpoints are numbered 0, 1, 2, ... in ``directory`` (an orbax CheckpointManager):
    the last ``keep_last`` are kept, and every checkpoint whose number is a multiple of
    ``keep_every``. Saving is asynchronous: the arrays are copied to host memory at the
    save (so the next step may donate the device buffers) and written while training goes
    on; each write is atomic. A KeyboardInterrupt during a save waits until the save has
    started (written, when not asynchronous), so every checkpoint on disk is one the
    listener counts and rotates. Between saves the listener costs an integer test (and a
    clock read with ``save_every``) per iteration: no host sync.

    Args:
        directory: where the checkpoints go (created if needed; existing ones are kept and
            numbering continues after them). Numbered entries there that are not jaxws
            checkpoints are refused (CheckpointError), never deleted.
        keep_last: how many of the latest to keep (None: all).
        keep_every: also keep every checkpoint whose number is a multiple of this.
        save_every_n_iterations, save_every_n_epochs: when to save.
        save_every: a time span between saves (seconds or a ``datetime.timedelta``).
        save_updater: include the updater state (needed to resume training exactly).
        iterator: the training iterator, whose position (epoch, cursor, seed) is recorded
            so a resumed run can continue where this one stopped.
        asynchronous: write in the background (default) or before training goes on.

    With ``fit(steps_per_execution=k)`` a checkpoint holds the state after the execution
    that contains the iteration that triggered it; its recorded ``iteration`` says which.

    Example:
        >>> import tempfile
        >>> from jaxws.nn import CheckpointListener
        >>> listener = CheckpointListener(tempfile.mkdtemp(), keep_last=3, save_every_n_iterations=100)
        >>> listener.available_checkpoints()
        []
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        save_every_n_iterations: int | None = None,
        save_every_n_epochs: int | None = None,
        save_every: float | datetime.timedelta | None = None,
        save_updater: bool = True,
        iterator: Any = None,
        asynchronous: bool = True,
    ):
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every),
                            ("save_every_n_iterations", save_every_n_iterations),
                            ("save_every_n_epochs", save_every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"CheckpointListener({name}={value!r}): expected an int >= 1, or None.")
        if isinstance(save_every, datetime.timedelta):
            save_every = save_every.total_seconds()
        if save_every is not None and (isinstance(save_every, bool) or not isinstance(save_every, (int, float)) or save_every <= 0):
            raise ConfigurationError(f"CheckpointListener(save_every={save_every!r}): expected seconds > 0 or a timedelta.")
        if not (save_every_n_iterations or save_every_n_epochs or save_every):
            raise ConfigurationError(
                "CheckpointListener: say when to save: save_every_n_iterations=, save_every_n_epochs= "
                "or save_every= (seconds or a timedelta)."
            )
        directory = checked_path(directory, "CheckpointListener(directory")
        if directory.exists() and not directory.is_dir():
            raise ConfigurationError(
                f"CheckpointListener(directory={str(directory)!r}): that is a file; give the listener a "
                "directory of its own (new or empty, or one it wrote before)."
            )
        checked_flag(save_updater, "CheckpointListener(save_updater")
        checked_flag(asynchronous, "CheckpointListener(asynchronous")
        checked_iterator(iterator, "CheckpointListener(iterator")
        ocp = orbax_checkpoint()
        self.directory = directory
        self.save_every_n_iterations = save_every_n_iterations
        self.save_every_n_epochs = save_every_n_epochs
        self.save_every = save_every
        self.save_updater = save_updater
        self.iterator = iterator
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_last, keep_period=keep_every, create=True,
                enable_async_checkpointing=asynchronous,
                # renamed away in one step: a process killed while old files are removed never
                # leaves a half-deleted checkpoint among the kept ones
                todelete_subdir=_TRASH),
            item_names=ITEMS,
        )
        steps = self._manager.all_steps()
        self._refuse_foreign(steps)
        self._next = (max(steps) + 1) if steps else 0
        self._last_save = time.monotonic()
        atexit.register(self.close)  # a save still being written at exit is finished, not torn

    # -- the listener ------------------------------------------------------------------------

    def iteration_done(self, model, iteration, epoch, loss):
        n = self.save_every_n_iterations
        if (n and iteration % n == 0) or (self.save_every and time.monotonic() - self._last_save >= self.save_every):
            self.save(model)

    def on_epoch_end(self, model, epoch):
        n = self.save_every_n_epochs
        if n and (epoch + 1) % n == 0:
            self.save(model)

    @property
    def _open(self) -> Any:
        if self._manager is None:
            raise CheckpointError(f"The CheckpointListener of {self.directory} is closed; make a new one.")
        return self._manager

    def save(self, model: Any) -> int:
        """Saves ``model`` now, as the next checkpoint; returns its number."""
        manager = self._open
        self._empty_trash()
        arrays, meta = content(model, save_updater=self.save_updater, iterator=self.iterator)
        number = self._next
        # one commit: an interrupt inside orbax's save (its wait for the last write, its list of
        # steps) left checkpoints on disk that it no longer counted, so never deleted past keep_last
        with guarded() as guard, guard:
            manager.save(number, args=items_args(arrays, meta))
            self._next += 1
        self._last_save = time.monotonic()
        return number

    # -- reading them back -------------------------------------------------------------------

    def wait(self) -> None:
        """Waits until every checkpoint started is written."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def available_checkpoints(self) -> list[Checkpoint]:
        """The checkpoints kept, oldest first (written ones only)."""
        self.wait()
        return [self._describe(n) for n in sorted(self._open.all_steps())]

    def last_checkpoint(self) -> Checkpoint | None:
        """The latest checkpoint kept, or None."""
        checkpoints = self.available_checkpoints()
        return checkpoints[-1] if checkpoints else None

    def _refuse_foreign(self, steps: list[int]) -> None:
        """Raises CheckpointError where ``directory`` holds numbered entries that are not
        jaxws checkpoints: orbax counts them among the steps and deletes them past
        ``keep_last``, whoever made them."""
        foreign = []
        for number in steps:
            try:
                self._meta(number)
            except CheckpointError:
                foreign.append(number)
        if foreign:
            self._manager.close()
            self._manager = None
            names = ", ".join(repr(str(number)) for number in foreign)
            what, it = ("is not a jaxws checkpoint", "it") if len(foreign) == 1 else ("are not jaxws checkpoints", "them")
            raise CheckpointError(
                f"CheckpointListener({str(self.directory)!r}): {names} there {what}; the listener would "
                f"count {it} among its own and delete {it} past keep_last. Give it a directory of its own "
                "(new or empty, or one it wrote before)."
            )

    def _meta(self, number: int) -> dict:
        try:
            meta = self._open.restore(number, args=items_args(None, None, restore=True)).meta
        except Exception as e:
            raise CheckpointError(f"Cannot read checkpoint {number} in {self.directory}: {type(e).__name__}: {e}") from e
        return checked_meta(meta, f"Checkpoint {number} in {self.directory}")

    def _describe(self, number: int) -> Checkpoint:
        meta = self._meta(number)
        return Checkpoint(number, meta["iteration"], meta["epoch"], meta["saved_at"], meta.get("iterator"))

    def load_checkpoint(self, number: int | None = None, *, model: Any = None, load_updater: bool = True,
                        conf: Any = None) -> Any:
        """The model of checkpoint ``number`` (default: the last).

        Restored into ``model`` if given (same architecture), else built from the saved
        configuration (a MultiLayerNetwork or ComputationGraph; ``conf=`` where the saved one
        used a raw optax updater).

        Raises:
            CheckpointError: no such checkpoint, or it does not fit ``model``.
        """
        if number is not None and (isinstance(number, bool) or not isinstance(number, numbers.Integral)):
            raise ConfigurationError(
                f"load_checkpoint(number={number!r}): expected a checkpoint's number (an int; "
                "available_checkpoints() lists them), or None for the last."
            )
        if model is not None and not callable(getattr(model, "_require_init", None)):
            raise ConfigurationError(
                f"load_checkpoint(model=<{type(model).__name__}>): expected a jaxws model of the saved "
                "architecture (MultiLayerNetwork, ComputationGraph, FunctionalModel), or None."
            )
        checked_flag(load_updater, "load_checkpoint(load_updater")
        number = None if number is None else int(number)
        self.wait()
        steps = sorted(self._open.all_steps())
        if number is None:
            if not steps:
                raise CheckpointError(f"No checkpoint in {self.directory} yet.")
            number = steps[-1]
        if number not in steps:
            raise CheckpointError(f"No checkpoint {number} in {self.directory}; available: {steps}.")
        meta = self._meta(number)
        if model is None:
            model = model_from_meta(meta, conf, f"checkpoint {number} in {self.directory}")
        saved, _ = restore_plan(model, meta, load_updater, f"checkpoint {number} in {self.directory}")
        try:
            arrays = self._manager.restore(number, args=items_args(saved, None, restore=True)).arrays
        except Exception as e:
            raise CheckpointError(f"Cannot read the arrays of checkpoint {number} in {self.directory}: {e}") from e
        install(model, arrays, meta, load_updater)
        return model

    def _empty_trash(self) -> None:
        """Removes the checkpoints orbax renamed away (each one already out of sight)."""
        trash = self.directory / _TRASH
        if trash.is_dir():
            for old in trash.iterdir():
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Waits for pending writes and releases the manager; idempotent."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None
            self._empty_trash()
            atexit.unregister(self.close)
