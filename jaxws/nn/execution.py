"""Fused multi-step execution: k batches per jitted call (Keras' steps_per_execution).

Consecutive batches of one shape are stacked on a leading axis and scanned by one
program; each step's loss stays on the device until a listener reads it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.data.dataset import DataSet
from jaxws.data.iterators import DataSetIterator, as_dataset

__all__ = ["StepLoss", "grouped", "stack", "Executions", "GroupIterator"]


class StepLoss:
    """The loss of one step of a fused execution; read from the device only when asked.

    ``float(loss)`` and ``np.asarray(loss)`` read it; ``loss.value`` is the device scalar.
    Like any loss it belongs to its workspace cycle.
    """

    __slots__ = ("_losses", "_index")

    def __init__(self, losses: jax.Array, index: int):
        self._losses = losses
        self._index = index

    @property
    def value(self) -> jax.Array:
        return self._losses[self._index]

    def __float__(self) -> float:
        return float(self.value)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.value, dtype=dtype)

    def __repr__(self) -> str:
        return f"StepLoss({self._index} of {self._losses.shape[0]})"


def _signature(ds: DataSet) -> tuple:
    leaves, treedef = jax.tree.flatten(ds)
    return treedef, tuple((np.shape(x), x.dtype) for x in leaves)


def grouped(items: Iterable, k: int, check: Callable[[DataSet], Any]) -> Iterator[list[DataSet]]:
    """Groups of ``k`` consecutive batches of one shape; a batch that breaks a group (the
    last, smaller one) flushes what was pending one by one, so programs stay few."""
    group: list[DataSet] = []
    for item in items:
        ds = as_dataset(item)
        check(ds)
        if group and _signature(ds) != _signature(group[0]):
            yield from ([g] for g in group)
            group = []
        group.append(ds)
        if len(group) == k:
            yield group
            group = []
    yield from ([g] for g in group)


def stack(group: list[DataSet]) -> DataSet:
    """One DataSet with a leading steps axis (on the device for device batches)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack(xs), *group)


class Executions:
    """``source`` seen as stacked executions of up to k batches; iterable once per epoch."""

    def __init__(self, source: Iterable, k: int, check: Callable[[DataSet], Any]):
        self.source, self.k, self.check = source, k, check

    def __iter__(self) -> Iterator[DataSet]:
        return (stack(g) for g in grouped(self.source, self.k, self.check))

    def reset(self) -> None:
        if hasattr(self.source, "reset"):
            self.source.reset()


class GroupIterator(DataSetIterator):
    """The groups of ``grouped``, restartable: for a prefetch thread to stack and place."""

    def __init__(self, base: Any, k: int, check: Callable[[DataSet], Any]):
        self.base, self.k, self.check = base, k, check
        self._groups = grouped(base, k, check)

    def __next__(self) -> list[DataSet]:
        return next(self._groups)

    def reset(self) -> None:
        self.base.reset()
        self._groups = grouped(self.base, self.k, self.check)

    @property
    def reset_supported(self) -> bool:
        return getattr(self.base, "reset_supported", True)
