"""The pure training step and the jitted programs ``fit`` runs around it.

``train_step`` is ``(carry, batch) -> (carry, loss)``; ``compiled_step`` jits it with the
carry and a LabelCheck donated (one step, or a scan over a stack of k); ``resident_step``
takes its batches from device-resident data inside the program.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxws.arrays import allow_reads
from jaxws.data.dataset import DataSet
from jaxws.data.feed import Steps
from jaxws.errors import InvalidBatchError
from jaxws.nn.checks import LabelCheck
from jaxws.nn.modes import WorkspaceMode
from jaxws.step import WorkspaceFunction, jit

__all__ = ["StepsMixin", "TrainState"]


class TrainState(NamedTuple):
    """The carry of a training step: donated, and back in the same buffers, every step."""

    params: Any
    state: Any  # non-trainable layer state (batch-norm statistics, dropout keys)
    opt_state: Any


class StepsMixin:
    """The step programs of a model with ``_loss``, ``_updater``, ``_class_labels`` and ``_steps``."""

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

    def compiled_step(self, mode: WorkspaceMode | None = None, fused: bool = False,
                      losses: bool = True, checked: bool = True) -> WorkspaceFunction:
        """The jitted step ``fit`` runs: ``(carry, check, batch) -> (carry, check, loss)``.

        The carry (a :class:`TrainState`) and the :class:`~jaxws.nn.LabelCheck` (invalid
        class labels counted on the device) are donated unless the mode is NONE.
        ``fused``: the program that scans k batches, a stack ``[k, batch, ...]`` or the
        :class:`~jaxws.data.feed.Steps` of k device batches that it stacks itself, and
        returns the k losses (``fit(steps_per_execution=k)``). ``losses=False``: the
        program returns ``(carry, check)`` only (what ``fit`` runs while no listener reads
        the loss: one output buffer fewer to make and free per call). ``checked=False``:
        no check, ``(carry, batch) -> (carry, loss)`` (``(carry,)`` without losses), what
        ``fit`` runs on host batches whose labels it judged on the host already. ``train_step``
        is the pure, unjitted ``(carry, batch) -> (carry, loss)`` for your own loops.

        Example:
            >>> import jax.numpy as jnp
            >>> from jaxws.data import DataSet
            >>> from jaxws.nn import LabelCheck, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer
            >>> net = MultiLayerNetwork(NeuralNetConfiguration(layers=[OutputLayer(2)], input_shape=(3,))).init()
            >>> batch = DataSet(jnp.ones((4, 3)), jnp.zeros(4, jnp.int32))
            >>> net.compiled_step().memory_plan(net._carry, LabelCheck.init(), batch).alias_bytes > 0
            True
        """
        mode = mode or self.training_workspace_mode
        key = (mode, fused, losses) if checked else (mode, fused, losses, "unchecked")
        program = self._steps.get(key)
        if program is None:
            step = self.train_step(mode)
            if fused:  # the scan trains; the labels of all k steps are counted once, beside it
                def scanned(carry, stacked):
                    if isinstance(stacked, Steps):  # device batches, stacked here: no copy before the call
                        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stacked.batches)
                    return (*jax.lax.scan(step, carry, stacked), stacked)

                def fun(carry, check, stacked):
                    carry, losses, stacked = scanned(carry, stacked)
                    return carry, self._check_steps(check, stacked, losses.shape[0]), losses

                def unchecked(carry, stacked):
                    return scanned(carry, stacked)[:2]
            else:
                fun, unchecked = self._checked_step(mode), step
            name = f"{mode.name}{', fused' if fused else ''}{'' if checked else ', unchecked'}"
            program = self._steps[key] = self._program(fun if checked else unchecked, name, mode, losses, checked)
        return program

    def resident_step(self, mode: WorkspaceMode | None = None, losses: bool = True) -> WorkspaceFunction:
        """The jitted program ``fit`` runs on device-resident data.

        ``(carry, check, data, order, start, *, count, size) -> (carry, check, losses)``:
        ``count`` steps, step i on the ``size`` examples at ``order[start + i*size:]`` (or
        contiguous from there when ``order`` is None), taken inside the program: sliced
        where they lie, or gathered once per execution when shuffled. ``losses=False``:
        ``(carry, check)`` only, as in :meth:`compiled_step`. The check only counts the
        steps: ``fit`` judges all of ``data``'s labels before the first execution
        (:meth:`_refuse_invalid_labels`).
        """
        mode = mode or self.training_workspace_mode
        program = self._steps.get((mode, "resident", losses))
        if program is None:
            step = self.train_step(mode)

            def resident(carry, check, data, order, start, count, size):
                if order is None:  # in order: each step slices its batch where it lies
                    def sliced(carry, i):
                        return step(carry, jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start + i * size, size), data))

                    carry, losses = jax.lax.scan(sliced, carry, jnp.arange(count))
                else:  # shuffled: one gather of the execution's rows, then contiguous batches
                    rows = jax.lax.dynamic_slice_in_dim(order, start, count * size)
                    batches = jax.tree.map(
                        lambda a: jnp.take(a, rows, axis=0).reshape(count, size, *a.shape[1:]), data)
                    carry, losses = jax.lax.scan(step, carry, batches)
                # the labels were judged whole before the first execution (_refuse_invalid_labels):
                # the check only counts the steps, so that a later call names its own
                return carry, check.after(None, count), losses

            program = self._steps[mode, "resident", losses] = self._program(
                resident, f"{mode.name}, resident", mode, losses, static_argnames=("count", "size"))
        return program

    def _program(self, fun: Callable, name: str, mode: WorkspaceMode, losses: bool, checked: bool = True,
                 **jit_kwargs: Any) -> WorkspaceFunction:
        """``fun`` jitted as fit runs it: the carry and the check (``checked``, the second
        argument) donated unless the mode is NONE, never the batch; without its last output
        (the losses) when ``losses`` is False."""
        if not losses:
            with_losses = fun

            @functools.wraps(with_losses)  # keeps the signature: static_argnames resolve
            def fun(*args, **kwargs):
                return with_losses(*args, **kwargs)[:-1]
        fun = functools.partial(fun)  # named below, whatever ``fun`` is
        fun.__name__ = f"{type(self).__name__}.fit[{name}{'' if losses else ', no losses'}]"
        donated = ((0, 1) if checked else (0,)) if mode.donates else ()
        return jit(fun, donate_argnums=donated, **jit_kwargs)

    def _checked_step(self, mode: WorkspaceMode) -> Callable:
        """``train_step`` that also counts invalid class labels: ``(carry, check, batch) -> (carry, check, loss)``."""
        step = self.train_step(mode)

        def checked(carry, check, ds):
            carry, loss = step(carry, ds)
            return carry, check.update(*(self._class_labels(ds) or (None, None, 0))), loss

        return checked

    def _refuse_invalid_labels(self, data: Any) -> None:
        """Raises InvalidBatchError for device-resident ``data`` (fit's Rows) with class
        labels out of range, before any step runs on it. All its rows are known up front,
        so they are judged whole: one small program and one read per ``fit`` call, where
        counting them in every execution would only report them after training on them."""
        program = self._steps.get("labels")
        if program is None:
            def judged(data):
                found = self._class_labels(data)
                return None if found is None else LabelCheck.rows(*found)

            program = self._steps["labels"] = jax.jit(judged)
        found = program(data)
        if found is None:  # no integer class labels
            return
        with allow_reads():  # asked for: not a hidden sync
            count, low, high, row = np.asarray(found).tolist()
        if count:
            classes = self._num_classes()
            raise InvalidBatchError(
                f"fit: labels out of range for {self._labels_what()}: found classes {low}..{high}, expected "
                f"0..{classes - 1}; {count} invalid label(s), the first in example {row} of the data "
                f"(counting from 0). Nothing was trained. Fix the labels: one integer class in "
                f"0..{classes - 1} per example (mask out padding with a labels mask)."
            )

    def _check_steps(self, check: Any, stacked: Any, steps: int) -> Any:
        """The label check after the ``steps`` batches of ``stacked`` ([steps, batch, ...]),
        counted outside the scanned loop: one pass over their labels per program, not two
        small reductions in every iteration."""
        def stats(ds):
            found = self._class_labels(ds)
            return None if found is None else LabelCheck.stats(*found)

        return check.after(jax.vmap(stats)(stacked), steps)
