"""The machinery MultiLayerNetwork, ComputationGraph and user models share: fit, output, score.

A model is a pure training step ``(carry, batch) -> (carry, loss)`` (so a scan can fuse k
of them) plus fit / output / score around it: the carry is donated in every mode but
NONE, each step runs in a workspace cycle, and nothing is read back unless asked.
"""

from __future__ import annotations

import abc
import contextlib
import math
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxws.arrays import allow_reads, check_arrays, detach
from jaxws.configuration import SpillPolicy, WorkspaceConfiguration
from jaxws.data.dataset import DataSet
from jaxws.data.iterators import ArrayDataSetIterator
from jaxws.data.feed import Feed, Judged, Rows, Steps, prepare
from jaxws.data.feed import signature as signature_of
from jaxws.errors import ConfigurationError, WorkspaceError
from jaxws.eval.kernel import EvaluationMixin
from jaxws.interrupts import guarded
from jaxws.manager import get_workspace_manager
from jaxws.nn.checks import FitChecks, LabelCheck
from jaxws.nn.checkpoints import CheckpointMixin
from jaxws.nn.listeners import StepLoss, TrainingListener
from jaxws.nn.modes import WorkspaceMode
from jaxws.nn.outputs import OutputMixin
from jaxws.nn.progress import NO_BAR, Bar, interactive, tqdm_class
from jaxws.nn.steps import StepsMixin, TrainState
from jaxws.step import WorkspaceFunction

__all__ = ["Model", "TrainState"]

TRAINING_WORKSPACE = "WS_TRAINING"
TRAINING_CONF = WorkspaceConfiguration(policy_spill=SpillPolicy.REALLOCATE)


_NO_CYCLE = contextlib.nullcontext()  # a NONE-mode step's: nothing invalidated (reusable, made once)


class LeftAtTheStepsTaken:
    """Around a fit's pass over ``feed`` (``fit``'s, ParallelWrapper's): where it ends by an
    exception (an interrupt, a bad batch), the ArrayDataSetIterator it was reading is put
    back at the first batch no step took (the async ring reads ahead of the steps; a
    device-resident pass moves the cursor as it takes the next batch), so ``fit(it)``
    called again trains on each batch once. The pass's ``feed.origin`` (the model's
    ``_position``) counts the examples the steps took."""

    __slots__ = ("_feed",)

    def __init__(self, feed: Feed):
        self._feed = feed

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        taken = self._feed.origin
        if exc_type is None or taken is None:
            return
        source = taken["source"]
        if isinstance(source, ArrayDataSetIterator) and source.epoch == taken["epoch"]:
            source.seek(taken["position"])


class Model(StepsMixin, OutputMixin, CheckpointMixin, EvaluationMixin, abc.ABC):
    """Base class: subclasses define ``_apply`` and ``_loss_of``; the rest is shared.

    The model owns its carry (params, layer state, updater state). ``fit`` donates it
    through every step (all modes but NONE) and stores the new carry in one commit that
    neither a KeyboardInterrupt nor a reader on another thread can split: a reader
    (``output``, ``score``, ``do_evaluation``) sees one complete parameter version,
    the one committed before it started.
    """

    def __init__(
        self,
        updater: optax.GradientTransformation,
        training_workspace_mode: WorkspaceMode,
        inference_workspace_mode: WorkspaceMode,
    ):
        self._updater = updater
        self.training_workspace_mode = training_workspace_mode
        self.inference_workspace_mode = inference_workspace_mode
        self._carry: TrainState | None = None
        self._lock = threading.RLock()  # held to commit a carry, or to read one and dispatch
        self._pins: dict[int, int] = {}  # id(params) -> readers on that version
        self._steps: dict[Any, Any] = {}  # (mode, fused or "resident", losses[, "unchecked"]), and "labels"
        self._infer: dict[bool, WorkspaceFunction] = {}
        self._score_fn: WorkspaceFunction | None = None
        self._eval_fns: dict[tuple, WorkspaceFunction] = {}
        self._output_shapes: dict[tuple, tuple] = {}
        self.listeners: list[TrainingListener] = []
        self.iteration = 0
        self.epoch = 0
        self._rng = jax.random.key(0)  # fresh randomness for output(training=True)
        self._pending_checks: list[FitChecks] = []  # label checks of fits not read yet
        self._spare_checks: list[FitChecks] = []  # checks read as valid: later fits donate them on
        self._seen_batches: dict[str, set] = {}  # per operation: batch signatures whose shapes were checked
        self._counts_labels: dict[Any, bool] = {}  # per batch signature: whether its steps count class labels
        self._position: dict | None = None  # where fit's ArrayDataSetIterator stands, as consumed
        self._restored_position: dict | None = None  # the iterator position a restored checkpoint holds

    # -- what subclasses provide -----------------------------------------------------------

    @abc.abstractmethod
    def _apply(self, params, state, x, mask, training: bool, mode: WorkspaceMode):
        """``(predictions, loss_input, new_state)``."""

    @abc.abstractmethod
    def _loss_of(self, loss_input, labels, mask) -> jax.Array:
        """The mean loss of a batch."""

    def _check_batch(self, ds: DataSet, op: str, shapes: bool = True) -> None:
        """Raises a clear error for a batch that does not fit the model (host-side).

        ``shapes=False``: this batch's signature was checked already; check only values.
        """

    def _class_labels(self, ds: DataSet) -> tuple[Any, Any, int] | None:
        """``(labels, mask, classes)`` when the labels are integer classes (traced), else None."""
        return None

    def _labels_what(self) -> str:
        """The loss the labels are for, in messages."""
        return "the model's loss"

    def _counted_apart(self, checks: FitChecks, signature: Any, ds: Any) -> bool:
        """Whether the step on ``ds`` runs without counting labels (added to ``checks``' lag):
        the feed judged them on the host (a :class:`Judged` signature), or, judged once per
        signature, they are not integer class labels (a regression loss, one-hot labels):
        nothing to count, so no check to pass in and out of the step."""
        if type(signature) is not Judged:
            try:
                counts = self._counts_labels[signature]
            except KeyError:
                counts = self._counts_labels[signature] = self._class_labels(ds) is not None
            if counts:
                return False
        checks.lag += 1
        return True

    def _reseed(self, state: Any, key: jax.Array) -> Any:
        """The layer state drawing fresh randomness from ``key`` (training-mode output)."""
        return state

    # -- state -----------------------------------------------------------------------------

    def _require_init(self) -> TrainState:
        if self._carry is None:
            raise WorkspaceError(f"{type(self).__name__} is not initialised: call init() first.")
        return self._carry

    @property
    def params(self) -> Any:
        """The live parameters (no copy).

        Live, not detached: in ENABLED/SINGLE/SEPARATE the next ``fit`` donates these
        buffers, after which jaxws calls given them raise DeletedArrayError (and plain JAX
        "Array has been deleted"). Keep a copy with ``jaxws.detach(net.params)``. In NONE
        they stay valid.
        """
        return self._require_init().params

    @property
    def state(self) -> Any:
        """The live non-trainable state (batch-norm statistics, dropout keys); live as ``params``."""
        return self._require_init().state

    @property
    def updater_state(self) -> Any:
        """The live updater (optax) state; live as ``params``."""
        return self._require_init().opt_state

    def set_params(self, params: Any) -> None:
        """Replaces the parameters (numpy or JAX arrays of the same structure and shapes).

        They are copied into buffers the model owns, cast to the current dtypes; the
        arrays given stay yours, untouched.
        """
        check_arrays("set_params", params, "params")
        with self._lock:
            carry = self._require_init()
            paths, treedef = jax.tree_util.tree_flatten_with_path(carry.params)
            try:
                new = treedef.flatten_up_to(params)
            except (ValueError, TypeError) as e:
                raise ConfigurationError(f"set_params: the tree does not match the model's parameters {treedef}: {e}") from None
            leaves = []
            for (path, old), value in zip(paths, new):
                if np.shape(value) != old.shape:
                    raise ConfigurationError(
                        f"set_params: params{jax.tree_util.keystr(path)} has shape {np.shape(value)}, "
                        f"expected {old.shape}."
                    )
                leaves.append(jnp.asarray(value, dtype=old.dtype))
            self._carry = carry._replace(params=detach(jax.tree.unflatten(treedef, leaves)))

    def add_listeners(self, *listeners: TrainingListener) -> None:
        self.listeners.extend(listeners)

    def set_listeners(self, *listeners: TrainingListener) -> None:
        self.listeners = list(listeners)

    @contextlib.contextmanager
    def _pinned(self) -> Iterator[TrainState]:
        """The current carry, kept valid for a pass of several reads (one version throughout).

        A ``fit`` on another thread that would donate a pinned version trains on a copy of
        its params and state instead, once; readers on this thread finish before it commits.
        """
        with self._lock:
            carry = self._require_init()
            key = id(carry.params)
            self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield carry
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]

    def _commit(self, step: WorkspaceFunction, signature: Any, check: LabelCheck | None, n: int, args: tuple,
                kwargs: dict | None = None) -> tuple:
        """Runs ``step`` (``n`` training steps) on the carry; stores the new one and the count.

        The carry is the model's own and the batch was checked by the feed, so the step runs
        on jaxws.jit's lean path, planned per batch ``signature``. Returns the new check (None
        for a program without one) and the losses (None from a program without them: no
        listener reads them).
        """
        with self._lock:
            carry = self._carry
            if self._pins and id(carry.params) in self._pins:  # a reader holds this version
                carry = carry._replace(params=detach(carry.params), state=detach(carry.state))
            if check is None:
                self._carry, *losses = step._call_planned(signature, (carry, *args), kwargs)
            else:
                self._carry, check, *losses = step._call_planned(signature, (carry, check, *args), kwargs)
            self.iteration += n
        return check, (losses[0] if losses else None)

    # -- the pure step ---------------------------------------------------------------------

    @staticmethod
    def _request(x: Any, mask: Any) -> Any:
        """The batch of one inference request (ParallelInference)."""
        return DataSet(x, None, mask)

    @staticmethod
    def _inputs_of(ds: Any) -> tuple:
        """``(inputs, masks)`` of a batch, as ``_apply`` takes them."""
        return ds.features, ds.features_mask

    @staticmethod
    def _labels_of(ds: Any) -> tuple:
        """``(labels, masks)`` of a batch, as ``_loss_of`` takes them."""
        return ds.labels, ds.labels_mask

    def _loss(self, params, state, ds: Any, training: bool, mode: WorkspaceMode):
        _, loss_input, new_state = self._apply(params, state, *self._inputs_of(ds), training, mode)
        return self._loss_of(loss_input, *self._labels_of(ds)), new_state

    # -- fit / output / score --------------------------------------------------------------

    def _feed(self, data: Any, op: str, **kwargs: Any) -> Feed:
        return Feed(data, op=op, check=lambda ds, shapes=True: self._check_batch(ds, op, shapes),
                    seen=self._seen_batches.setdefault(op, set()), **kwargs)

    def _input(self, ds: Any, op: str) -> Any:
        """One batch for a single read: checked (dead arrays first), on the device."""
        return prepare(ds, op, lambda d, shapes=True: self._check_batch(d, op, shapes))

    def fit(
        self,
        data: Any,
        epochs: int = 1,
        *,
        batch_size: int | None = None,
        progress: bool = True,
        prefetch: int = 8,
        steps_per_execution: int = 1,
    ) -> Model:
        """Trains on ``data``: a DataSet, an ``(x, y)`` pair, or an iterable of those.

        Host batches from an iterator are prefetched onto the device by an async ring
        (``prefetch`` batches ahead), except, on the CPU backend, host data already in memory
        (a list of batches, an ArrayDataSetIterator), which the steps take in this thread
        (each moves its batch as it runs); batches already on the device are used as they are
        (never copied, donated or invalidated: they stay yours). Each step runs in a
        workspace cycle (except in NONE mode) with the carry donated; nothing is read back
        from the device unless a listener reads the loss. A KeyboardInterrupt stops
        training between steps: the model keeps the state of the last completed step, and
        an ArrayDataSetIterator stands at the first batch no step took (``fit(it)`` again
        goes on from there).

        Args:
            data: the training data.
            epochs: passes over ``data``.
            batch_size: split a single DataSet / pair into batches of this size.
            progress: show tqdm progress bars (in a terminal or a notebook; never when the
                output goes to a file or a pipe): one per epoch, and one over the epochs when
                there are several. An epoch of a single batch gets no bar of its own, so
                ``fit(batch)`` called per batch draws none.
            prefetch: async queue size for host batches (0: no background thread).
            steps_per_execution: batches per jitted call: consecutive batches of one shape
                are stacked and scanned by one program (one dispatch for k steps, as
                Keras' option of that name). Listeners still see every step, with a
                :class:`StepLoss` read only when asked.

        Returns:
            self.

        Raises:
            InvalidBatchError: a batch that does not fit the model, an item of ``data`` that
                is not a batch, or integer class labels out of range. Host labels and
                device-resident data are judged before any step runs; the labels of device
                batches are counted in the steps and reported when ``fit`` returns, naming
                the first bad batch.
            ConfigurationError: an argument out of range, ``data`` of a kind fit does not
                take (None, a string, a number), or data with no batch.
        """
        self._require_init()
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigurationError(f"fit(epochs={epochs!r}): expected an int >= 1.")
        k = steps_per_execution
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"fit(steps_per_execution={k!r}): expected an int >= 1.")
        feed = self._feed(data, "fit", batch_size=batch_size, prefetch=prefetch, steps=k, epochs=epochs, resident=True)
        mode = self.training_workspace_mode
        # per step, by whether a listener reads the losses: the program returns them, or not
        steps = (self.compiled_step(mode, fused=k > 1, losses=False), self.compiled_step(mode, fused=k > 1))
        # looked up at their first batch: device batches need neither
        judged = None  # single steps with no labels to count (judged on the host, or none): no count
        residents = None  # Rows: the resident programs
        manager = get_workspace_manager()
        try:
            total = len(feed)
        except TypeError:
            total = None
        checks = self._new_checks()
        # bars where someone watches them draw, and where they show progress: an epoch of one
        # batch (DL4J's fit(batch) per batch) gets none, a bar drawn and cleared per call
        epoch_bars = total != 1
        progress = progress and (epochs > 1 or epoch_bars) and interactive()
        tqdm = tqdm_class() if progress else None
        workspaces = manager._workspaces
        donates = mode.donates
        with LeftAtTheStepsTaken(feed), feed, guarded() as guard:
            for _ in tqdm(range(epochs), desc="epochs", leave=False) if progress and epochs > 1 else range(epochs):
                for listener in self.listeners:
                    listener.on_epoch_start(self, self.epoch)
                checks.epoch_starts.append(checks.steps)
                bar = Bar(tqdm(total=total, desc=f"epoch {self.epoch}", leave=False)) if progress and epoch_bars else NO_BAR
                with bar:
                    passing = feed.signed()
                    self._position = feed.origin  # where the data stands before this pass
                    for item, signature in passing:
                        # looked up each step: a listener may have destroyed it
                        cycle = ((workspaces.get(TRAINING_WORKSPACE)
                                  or manager.get_workspace_for_current_thread(TRAINING_CONF, TRAINING_WORKSPACE))
                                 if donates else _NO_CYCLE)
                        listeners = self.listeners
                        with guard, cycle:
                            if type(item) is Rows:  # device-resident: batches taken in the program
                                n, fused = item.count, True
                                signature = (item.count, item.size, item.order is None, signature_of(item.data))
                                if residents is None:  # the call's first: its labels judged before any step
                                    if not item.judged:  # device arrays (host ones were, by the feed)
                                        self._refuse_invalid_labels(item.data)
                                    residents = (self.resident_step(mode, losses=False), self.resident_step(mode))
                                checks.state, losses = self._commit(
                                    residents[bool(listeners)], signature, checks.state, n,
                                    (item.data, item.order, item.start), {"count": item.count, "size": item.size})
                            elif k == 1 and self._counted_apart(checks, signature, item):  # nothing to count here
                                n, fused = 1, False
                                if judged is None:
                                    judged = (self.compiled_step(mode, losses=False, checked=False),
                                              self.compiled_step(mode, checked=False))
                                losses = self._commit(judged[bool(listeners)], signature, None, n, (item,))[1]
                            else:  # a batch, k stacked ones, or k Steps stacked in the program
                                n, fused = (1 if k == 1 else item.count if type(item) is Steps
                                            else jax.tree.leaves(item)[0].shape[0]), k > 1
                                checks.state, losses = self._commit(steps[bool(listeners)], signature,
                                                                    checks.counting(), n, (item,))
                            checks.steps += n
                            checks.executions += 1
                            if self._position is not None:  # examples consumed: the resume point
                                self._position["position"] += (
                                    item.examples if type(item) in (Rows, Steps)
                                    else math.prod(jax.tree.leaves(item)[0].shape[:2 if k > 1 else 1]))
                            if listeners:
                                with guard.released():
                                    self._notify(losses, n, fused, self._verify)
                        if bar is not NO_BAR:
                            bar.update(n)
                for listener in self.listeners:
                    listener.on_epoch_end(self, self.epoch)
                self.epoch += 1
        # the one read of the label check; a single-dispatch fit (fit(batch) in a loop) does not
        # wait for it: it is read if done, else at the next read (fit, score, evaluation, a loss)
        if checks.settle():
            self._pending_checks.append(checks)
        else:  # only judged steps: the check is as valid as it was
            with self._lock:
                self._spare_checks.append(checks)
        self._verify(wait=checks.executions > 1)
        return self

    def _new_checks(self) -> FitChecks:
        """A fit's label check: one read as valid, donated on, or a new one. In DL4J's loop
        (``fit(batch)`` per batch) each call reads the checks of the calls before it, so a
        few checks serve the whole loop."""
        with self._lock:  # one taker: a check is donated once
            spare = self._spare_checks.pop() if self._spare_checks else None
        return FitChecks.after(spare)

    def _verify(self, wait: bool = True) -> None:
        """Reads pending label checks (all, or those already computed) and raises for invalid labels."""
        while self._pending_checks:
            checks = self._pending_checks[0]
            if not (wait or checks.state.values.is_ready()):
                return
            self._pending_checks.pop(0)
            where = "an earlier fit call: " if self._pending_checks else ""
            with allow_reads():  # asked for: not a hidden sync
                checks.state.raise_if_invalid("fit", self._labels_what(), self._num_classes(),
                                              checks.epoch_starts, where, checks.offset)
            self._spare_checks.append(checks)

    def _num_classes(self) -> int:
        return 0

    def _notify(self, losses: jax.Array, n: int, fused: bool, verify: Callable[[], None]) -> None:
        first = self.iteration - n
        for i in range(n):
            loss = StepLoss(losses, i if fused else None, verify)
            for listener in self.listeners:
                listener.iteration_done(self, first + i + 1, self.epoch, loss)

    def residual_bytes(self, data: Any, mode: WorkspaceMode | None = None) -> int:
        """Bytes backprop saves for one batch under ``mode`` (the residuals of ``jax.vjp``)."""
        from jaxws.data.iterators import as_dataset
        from jaxws.memory import residual_bytes

        ds = self._input(as_dataset(data), "residual_bytes")
        mode = mode or self.training_workspace_mode
        with self._pinned() as carry:
            return residual_bytes(lambda p: self._loss(p, carry.state, ds, True, mode)[0], carry.params)
