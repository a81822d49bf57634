"""The feed: how whatever a caller passes becomes device batches, decided in one place.

``fit``, ``do_evaluation`` and ``score`` hand their ``data`` to a :class:`Feed`; each pass
yields DataSets on the device. Batches already there pass through untouched; host batches
are placed in the consumer thread or prefetched by an async ring; k may be stacked.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.arrays import check_arrays
from jaxws.data.dataset import DataSet, MultiDataSet
from jaxws.data.iterators import ArrayDataSetIterator, as_dataset, from_iterable
from jaxws.data.placement import Placement, host_leaf
from jaxws.data.prefetch import AsyncDataSetIterator
from jaxws.errors import AsyncIteratorError, ConfigurationError, InvalidBatchError, WorkspaceError

__all__ = ["Feed", "is_single_batch", "prepare", "stack", "validate"]

_END = object()


def is_single_batch(data: Any) -> bool:
    """A DataSet, a dict, or an (x, y[, masks]) tuple of arrays; anything else is batches."""
    if isinstance(data, (DataSet, MultiDataSet, dict)):
        return True
    return isinstance(data, tuple) and 2 <= len(data) <= 4 and hasattr(data[0], "shape")


def validate(ds: Any, op: str, check: Callable[[Any], Any] | None = None, where: str = "data") -> Any:
    """``ds`` with array leaves (lists become numpy), after the checks every entry point runs.

    Dead arrays (leaked, outdated, donated) are named first, before any shape is judged;
    then ``check`` (the model's batch check) runs.
    """
    check_arrays(op, ds, where)
    ds = jax.tree.map(host_leaf, ds, is_leaf=lambda x: isinstance(x, list))  # nested lists are data
    if check is not None:
        try:
            check(ds)
        except InvalidBatchError as e:
            if where in ("data", "x"):
                raise
            raise InvalidBatchError(f"{e} (in {where}, counting from 0)") from None
    return ds


def prepare(ds: Any, op: str, check: Callable[[Any], Any] | None = None, placement: Placement | None = None) -> Any:
    """One batch, validated and on the device (what ``output`` and friends run on)."""
    return (placement or Placement()).place(validate(ds, op, check))[0]


def _signature(ds: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(ds)
    return treedef, tuple((np.shape(x), x.dtype) for x in leaves)


def stack(group: list) -> Any:
    """One batch with a leading steps axis (on the device if the batches are)."""
    if len(group) == 1:
        return jax.tree.map(lambda x: x[None], group[0])
    return jax.tree.map(lambda *xs: jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack(xs), *group)


def _grouped(items: Iterator, k: int) -> Iterator[list]:
    """Groups of ``k`` consecutive batches of one shape; a batch that breaks a group (the
    last, smaller one) flushes what was pending one by one, so programs stay few."""
    group: list = []
    for ds in items:
        if group and _signature(ds) != _signature(group[0]):
            yield from ([g] for g in group)
            group = []
        group.append(ds)
        if len(group) == k:
            yield group
            group = []
    yield from ([g] for g in group)


class Feed:
    """One call's data, as passes of device batches.

    Args:
        data: a DataSet, an ``(x, y[, fmask, lmask])`` pair, a dict, a list of batches, an
            iterator (a DataSetIterator, an AsyncDataSetIterator, a generator) or any
            iterable of batches.
        op: the caller's name, for messages.
        check: validates one host-side batch (shapes, ranks); raises InvalidBatchError.
        batch_size: splits a single batch into batches of this size.
        prefetch: the async ring's queue size for host batches (0: placed in the caller).
        steps: batches per execution; groups of this many are stacked on a leading axis.
        epochs: passes that will be asked for (a one-shot iterator allows one).
        rewind: ``"exhausted"`` (fit: a resettable iterator with no batch left starts
            over) or ``"always"`` (evaluation: start from the first batch).
        placement: where batches go (default: the default device; batches already on a
            device pass through).
        place: False yields the checked batches as they are (host or device), for a
            caller that stacks and places them itself (ParallelWrapper).

    Each pass checks every batch for leaked, outdated or donated arrays before anything
    else, then with ``check``; a list of batches is checked whole before its first batch is
    used. A pass that would yield no batch raises ConfigurationError.
    """

    def __init__(
        self,
        data: Any,
        *,
        op: str,
        check: Callable[[Any], Any] | None = None,
        batch_size: int | None = None,
        prefetch: int = 0,
        steps: int = 1,
        epochs: int = 1,
        rewind: str = "exhausted",
        placement: Placement | None = None,
        place: bool = True,
    ):
        self.op = op
        self._check = check
        self.prefetch = prefetch
        self.steps = steps
        self.rewind = rewind
        self.placement = placement or Placement()
        self._place = place
        self._ring: AsyncDataSetIterator | None = None
        self._passes = 0
        self._pulled = 0
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigurationError(
                f"{op}(batch_size={batch_size!r}): expected an int >= 1, the examples per batch "
                "(or None to use the data as one batch)."
            )
        if isinstance(data, tuple) and len(data) in (1, 5, 6) and hasattr(data[0], "shape"):
            raise ConfigurationError(
                f"{op}(data=<a tuple of {len(data)} arrays>): a tuple is read as (features, labels"
                "[, features_mask, labels_mask]). Pass (x, y), or a DataSet(x, y)."
            )
        if is_single_batch(data):
            ds = self._validated(as_dataset(data))
            if ds.num_examples == 0:
                raise ConfigurationError(f"{op}: the data has no examples (0 rows); pass at least one example.")
            data = [ds] if batch_size is None else ArrayDataSetIterator(
                ds.features, ds.labels, batch_size, features_mask=ds.features_mask, labels_mask=ds.labels_mask)
        elif batch_size is not None:
            raise ConfigurationError(
                f"{op}(batch_size={batch_size}): batch_size splits one DataSet or (x, y) pair; "
                "an iterator already yields batches."
            )
        if isinstance(data, (list, tuple)):  # batches in memory: all checked before the first runs
            data = [self._validated(as_dataset(item), f"data[{i}]") for i, item in enumerate(data)]
            self._prechecked = True
        else:
            self._prechecked = False
            if not hasattr(data, "__next__"):
                data = from_iterable(data)  # an iterable: restartable
            elif not hasattr(data, "reset") and epochs > 1:
                raise ConfigurationError(
                    f"{op}(epochs={epochs}) got a one-shot iterator; pass something that can be "
                    "iterated again (a list, an ArrayDataSetIterator, or from_iterable(lambda: ...))."
                )
        self.source = data

    # -- validation ------------------------------------------------------------------------

    def _validated(self, ds: Any, where: str = "data") -> Any:
        return validate(ds, self.op, self._check, where)

    # -- passes ----------------------------------------------------------------------------

    def _start(self) -> Iterator:
        source = self.source
        if isinstance(source, list):
            return iter(source)
        resettable = hasattr(source, "reset") and getattr(source, "reset_supported", True)
        if resettable and (self._passes or self.rewind == "always"):
            source.reset()
        it = iter(source)
        first = next(it, _END)
        if first is _END and resettable and not self._passes and self.rewind == "exhausted":
            source.reset()  # DL4J: fit starts an exhausted iterator over
            it = iter(source)
            first = next(it, _END)
        return it if first is _END else itertools.chain([first], it)

    def __iter__(self) -> Iterator[Any]:
        """One pass: device batches (stacked ``[steps, ...]`` groups when ``steps > 1``)."""
        items = self._start()
        self._passes += 1
        first = next(items, _END)
        if first is _END:
            raise ConfigurationError(
                f"{self.op}: the data has no batches{self._why_empty()}. Pass data with at "
                "least one example, or an iterator that can be reset."
            )
        items = itertools.chain([first], items)
        if not self._place:
            return self._batches(items)
        on_device = self.placement.holds_all(as_dataset(first))
        if self.prefetch and not on_device and getattr(self.source, "async_supported", True):
            return self._prefetched(items)
        return self._inline(items)

    def _why_empty(self) -> str:
        source = self.source
        if isinstance(source, list):
            return " (an empty list)"
        if not getattr(source, "reset_supported", hasattr(source, "reset")):
            return " (a one-shot iterator that is exhausted)"
        return " (the iterator yields nothing, even after reset())"

    def _batches(self, items: Iterator) -> Iterator[Any]:
        self._pulled = 0  # batches taken from the source this pass: the next one is the failing one
        for i, item in enumerate(items):
            self._pulled = i + 1
            ds = as_dataset(item)
            yield ds if self._prechecked else self._validated(ds, f"batch {i}")

    def _inline(self, items: Iterator) -> Iterator[Any]:
        place = self.placement.place
        if self.steps == 1:
            for ds in self._batches(items):
                yield place(ds)[0]
        else:
            for group in _grouped(self._batches(items), self.steps):
                yield place(stack(group))[0]

    def _prefetched(self, items: Iterator) -> Iterator[Any]:
        if self.steps == 1:
            base, collate = self._batches(items), as_dataset
        else:
            base, collate = _grouped(self._batches(items), self.steps), stack
        ring = self._ring = AsyncDataSetIterator(
            base, self.prefetch, device=self.placement.device, sharding=self.placement.sharding,
            collate=collate)
        try:
            yield from ring
        except AsyncIteratorError as e:
            if isinstance(e.__cause__, WorkspaceError):
                raise e.__cause__ from None  # our own check, run in the prefetch thread: say it plainly
            error = AsyncIteratorError(ring.id, self._pulled)  # counted in batches, not groups
            raise error from e.__cause__
        finally:
            self._ring = None
            ring.close()

    def close(self) -> None:
        """Stops a pass's prefetch thread, if one runs; idempotent."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __len__(self) -> int:
        """Batches per pass, where the source knows its length (TypeError otherwise)."""
        return len(self.source)
