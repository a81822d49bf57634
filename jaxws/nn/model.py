"""The training and inference machinery shared by MultiLayerNetwork and user models.

A model is a pure training step ``(carry, batch) -> (carry, loss)`` (so a scan can fuse k
of them) plus fit / output / score around it: the carry is donated in every mode but
NONE, each step runs in a workspace cycle, and nothing is read back unless asked.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxws.arrays import check_arrays, detach, leverage_to
from jaxws.configuration import SpillPolicy, WorkspaceConfiguration
from jaxws.data.dataset import DataSet
from jaxws.data.iterators import ArrayDataSetIterator, as_dataset, from_iterable
from jaxws.data.prefetch import AsyncDataSetIterator, consuming
from jaxws.errors import ConfigurationError, WorkspaceError
from jaxws.eval.kernel import EvaluationMixin
from jaxws.manager import get_workspace_manager
from jaxws.nn.execution import Executions, GroupIterator, StepLoss, stack
from jaxws.nn.listeners import TrainingListener
from jaxws.nn.modes import WorkspaceMode
from jaxws.step import WorkspaceFunction, jit
from jaxws.workspace import Workspace

__all__ = ["Model", "TrainState"]

TRAINING_WORKSPACE = "WS_TRAINING"
TRAINING_CONF = WorkspaceConfiguration(policy_spill=SpillPolicy.REALLOCATE)


class TrainState(NamedTuple):
    """The carry of a training step: donated, and back in the same buffers, every step."""

    params: Any
    state: Any  # non-trainable layer state (batch-norm statistics, dropout keys)
    opt_state: Any


class Model(EvaluationMixin, abc.ABC):
    """Base class: subclasses define ``_apply`` and ``_loss_of``; the rest is shared."""

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
        self._steps: dict[tuple[WorkspaceMode, bool], WorkspaceFunction] = {}
        self._infer: dict[bool, WorkspaceFunction] = {}
        self._score_fn: WorkspaceFunction | None = None
        self._eval_fns: dict[tuple, WorkspaceFunction] = {}
        self._output_shapes: dict[tuple, tuple] = {}
        self.listeners: list[TrainingListener] = []
        self.iteration = 0
        self.epoch = 0

    # -- what subclasses provide -----------------------------------------------------------

    @abc.abstractmethod
    def _apply(self, params, state, x, mask, training: bool, mode: WorkspaceMode):
        """``(predictions, loss_input, new_state)``."""

    @abc.abstractmethod
    def _loss_of(self, loss_input, labels, mask) -> jax.Array:
        """The mean loss of a batch."""

    def _check_batch(self, ds: DataSet, op: str) -> None:
        """Raises a clear error for a batch that does not fit the model (host-side)."""

    # -- state -----------------------------------------------------------------------------

    def _require_init(self) -> TrainState:
        if self._carry is None:
            raise WorkspaceError(f"{type(self).__name__} is not initialised: call init() first.")
        return self._carry

    @property
    def params(self) -> Any:
        """The live parameters (no copy).

        In ENABLED/SINGLE/SEPARATE the next ``fit`` donates these buffers: keep a copy with
        ``jaxws.detach(net.params)``. In NONE they stay valid.
        """
        return self._require_init().params

    @property
    def state(self) -> Any:
        """The live non-trainable state (batch-norm statistics, dropout keys)."""
        return self._require_init().state

    @property
    def updater_state(self) -> Any:
        return self._require_init().opt_state

    def set_params(self, params: Any) -> None:
        """Replaces the parameters (numpy or JAX arrays of the same structure and shapes).

        They are copied into buffers the model owns, cast to the current dtypes.
        """
        carry = self._require_init()
        check_arrays("set_params", params, "params")
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
        fresh = detach(jax.tree.unflatten(treedef, leaves))
        self._carry = carry._replace(params=fresh)

    def add_listeners(self, *listeners: TrainingListener) -> None:
        self.listeners.extend(listeners)

    def set_listeners(self, *listeners: TrainingListener) -> None:
        self.listeners = list(listeners)

    # -- the pure step ---------------------------------------------------------------------

    def _loss(self, params, state, ds: DataSet, training: bool, mode: WorkspaceMode):
        _, loss_input, new_state = self._apply(params, state, ds.features, ds.features_mask, training, mode)
        return self._loss_of(loss_input, ds.labels, ds.labels_mask), new_state

    def train_step(self, mode: WorkspaceMode | None = None, reduce_grads: Callable | None = None) -> Callable:
        """The pure ``(carry, batch) -> (carry, loss)`` function of ``mode`` (not jitted).

        ``reduce_grads`` (e.g. a cross-device mean) transforms the gradients before the
        updater sees them.
        """
        mode = mode or self.training_workspace_mode

        def step(carry: TrainState, ds: DataSet):
            (loss, state), grads = jax.value_and_grad(self._loss, has_aux=True)(
                carry.params, carry.state, ds, True, mode
            )
            if reduce_grads is not None:
                grads = reduce_grads(grads)
            updates, opt_state = self._updater.update(grads, carry.opt_state, carry.params)
            return TrainState(optax.apply_updates(carry.params, updates), state, opt_state), loss

        return step

    def compiled_step(self, mode: WorkspaceMode | None = None, fused: bool = False) -> WorkspaceFunction:
        """The jitted step of ``mode``: the carry donated unless the mode is NONE.

        ``fused``: the program that scans a stack of batches ``[k, batch, ...]`` and returns
        the k losses (``fit(steps_per_execution=k)``).
        """
        mode = mode or self.training_workspace_mode
        if (mode, fused) not in self._steps:
            step = self.train_step(mode)
            fun = (lambda carry, stacked: jax.lax.scan(step, carry, stacked)) if fused else step
            fun.__name__ = f"{type(self).__name__}.fit[{mode.name}{', fused' if fused else ''}]"
            self._steps[mode, fused] = jit(fun, donate_argnums=0 if mode.donates else ())
        return self._steps[mode, fused]

    # -- fit / output / score --------------------------------------------------------------

    def _source(self, data: Any, epochs: int, batch_size: int | None, op: str, prefetch: int, steps: int = 1):
        """What one pass iterates: batches (or stacked groups of ``steps``), async-wrapped if it may be."""
        if _is_single_batch(data):
            ds = as_dataset(data)
            if not batch_size:
                return [ds]
            data = ArrayDataSetIterator(ds.features, ds.labels, batch_size,
                                        features_mask=ds.features_mask, labels_mask=ds.labels_mask)
        elif batch_size:
            raise ConfigurationError(
                f"{op}(batch_size={batch_size}): batch_size splits one DataSet or (x, y) pair; "
                "an iterator already yields batches."
            )
        check = lambda ds: self._check_batch(ds, op)  # noqa: E731
        if isinstance(data, (tuple, list)):
            return Executions(data, steps, check) if steps > 1 else data  # batches in memory
        if not hasattr(data, "__next__"):
            data = from_iterable(data)  # an iterable: restartable
        elif not hasattr(data, "reset"):
            if epochs > 1:
                raise ConfigurationError(
                    f"{op}(epochs={epochs}) got a one-shot iterator; pass something that can be "
                    "iterated again (a list, an ArrayDataSetIterator, or from_iterable(lambda: ...))."
                )
            data = from_iterable(data)
        if prefetch and getattr(data, "async_supported", False):
            if steps > 1:  # the prefetch thread groups, checks and stacks
                return AsyncDataSetIterator(GroupIterator(data, steps, check), prefetch, collate=stack)
            return AsyncDataSetIterator(data, prefetch, callback=check)
        return Executions(data, steps, check) if steps > 1 else data

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

        Iterators that support it (``async_supported``) are wrapped in an
        AsyncDataSetIterator that prefetches ``prefetch`` batches onto the device. Each
        step runs in a workspace cycle (except in NONE mode) with the carry donated;
        nothing is read back from the device unless a listener reads the loss.

        Args:
            data: the training data.
            epochs: passes over ``data``.
            batch_size: split a single DataSet / pair into batches of this size.
            progress: show tqdm progress bars.
            prefetch: async queue size (0: no background thread).
            steps_per_execution: batches per jitted call: consecutive batches of one shape
                are stacked and scanned by one program (one dispatch for k steps, as
                Keras' option of that name). Listeners still see every step, with a
                :class:`StepLoss` read only when asked.

        Returns:
            self.
        """
        from tqdm.auto import tqdm

        self._require_init()
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigurationError(f"fit(epochs={epochs!r}): expected an int >= 1.")
        k = steps_per_execution
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"fit(steps_per_execution={k!r}): expected an int >= 1.")
        source = self._source(data, epochs, batch_size, "fit", prefetch, k)
        checked = k > 1 or isinstance(source, AsyncDataSetIterator)  # checked where batches were made
        mode = self.training_workspace_mode
        step = self.compiled_step(mode, fused=k > 1)
        after = self._after_execution if k > 1 else self._after_iteration
        cycle = (get_workspace_manager().get_workspace_for_current_thread(TRAINING_CONF, TRAINING_WORKSPACE)
                 if mode.donates else contextlib.nullcontext())  # NONE: no cycles, nothing invalidated
        with consuming(source, data):
            for e in tqdm(range(epochs), desc="epochs", disable=not progress or epochs == 1, leave=False):
                if e and hasattr(source, "reset"):
                    source.reset()
                for listener in self.listeners:
                    listener.on_epoch_start(self, self.epoch)
                try:
                    total = len(source)
                except TypeError:
                    total = None
                for item in tqdm(source, total=total, desc=f"epoch {self.epoch}", disable=not progress, leave=False):
                    ds = self._device_batch(as_dataset(item), "fit", checked)
                    with cycle:
                        self._carry, loss = step(self._carry, ds)
                        after(loss)
                for listener in self.listeners:
                    listener.on_epoch_end(self, self.epoch)
                self.epoch += 1
        return self

    def _after_iteration(self, loss: jax.Array) -> None:
        self.iteration += 1
        for listener in self.listeners:
            listener.iteration_done(self, self.iteration, self.epoch, loss)

    def _after_execution(self, losses: jax.Array) -> None:
        for i in range(losses.shape[0]):
            self._after_iteration(StepLoss(losses, i))

    def _device_batch(self, ds: DataSet, op: str, checked: bool = False) -> DataSet:
        # stale (leaked, outdated, donated) arrays are refused by the jaxws.jit step itself
        if not checked:
            self._check_batch(ds, op)
        return jax.tree.map(_to_device, ds)

    def _inference_fn(self, training: bool) -> WorkspaceFunction:
        if training not in self._infer:
            def infer(params, state, x, mask):
                return self._apply(params, state, x, mask, training, WorkspaceMode.SINGLE)[0]

            infer.__name__ = f"{type(self).__name__}.output"
            self._infer[training] = jit(infer)
        return self._infer[training]

    def output(
        self,
        x: Any,
        training: bool = False,
        *,
        mask: Any = None,
        workspace: Workspace | str | None = None,
    ) -> jax.Array:
        """The network's output for ``x``.

        Without ``workspace`` the result is detached: it belongs to no workspace and
        survives any later ``fit``. With an open ``workspace`` (or its id) the result is
        attached to it and dies with its cycle, as DL4J's output into a workspace.

        Raises:
            WorkspaceError: ``workspace`` given while ``inference_workspace_mode`` is NONE,
                or not open.
        """
        carry = self._require_init()
        ds = self._device_batch(DataSet(x, None, mask), "output")
        fn = self._inference_fn(training)
        manager = get_workspace_manager()
        if workspace is None:
            with manager.scope_out_of_workspaces():
                return fn(carry.params, carry.state, ds.features, ds.features_mask)
        if self.inference_workspace_mode is WorkspaceMode.NONE:
            raise WorkspaceError(
                "output(workspace=...) needs an inference workspace, but "
                "inference_workspace_mode is WorkspaceMode.NONE. Drop workspace= to get a "
                "detached array, or configure inference_workspace_mode=WorkspaceMode.ENABLED."
            )
        ws = manager.workspace(workspace) if isinstance(workspace, str) else workspace
        if not ws.is_scope_active:
            raise WorkspaceError(f"output(workspace=[{ws.id}]): the workspace is not open; call it inside `with ws:`.")
        return leverage_to(ws, fn(carry.params, carry.state, ds.features, ds.features_mask))

    def score(self, data: Any, *, batch_size: int | None = None) -> float:
        """The mean loss over ``data`` (inference mode), weighted by examples; one sync."""
        carry = self._require_init()
        if self._score_fn is None:
            def score(params, state, ds):
                return self._loss(params, state, ds, False, WorkspaceMode.SINGLE)[0]

            score.__name__ = f"{type(self).__name__}.score"
            self._score_fn = jit(score)
        total, count = jnp.zeros(()), 0
        with get_workspace_manager().scope_out_of_workspaces():
            for item in self._source(data, 1, batch_size, "score", prefetch=0):
                ds = self._device_batch(as_dataset(item), "score")
                total = total + self._score_fn(carry.params, carry.state, ds) * ds.num_examples
                count += ds.num_examples
        if count == 0:
            raise ConfigurationError("score(data): the data has no examples.")
        return float(total) / count

    def residual_bytes(self, data: Any, mode: WorkspaceMode | None = None) -> int:
        """Bytes backprop saves for one batch under ``mode`` (the residuals of ``jax.vjp``)."""
        from jaxws.memory import residual_bytes

        carry = self._require_init()
        ds = self._device_batch(as_dataset(data), "residual_bytes")
        mode = mode or self.training_workspace_mode
        return residual_bytes(lambda p: self._loss(p, carry.state, ds, True, mode)[0], carry.params)


def _to_device(x: Any) -> Any:
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _is_single_batch(data: Any) -> bool:
    """A DataSet, a dict, or an (x, y[, masks]) tuple of arrays; anything else is batches."""
    if isinstance(data, (DataSet, dict)):
        return True
    return isinstance(data, tuple) and 2 <= len(data) <= 4 and hasattr(data[0], "shape")
