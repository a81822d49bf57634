"""The feed: how whatever a caller passes becomes device batches, decided in one place.

``fit``, ``do_evaluation`` and ``score`` hand their ``data`` to a :class:`Feed`; each pass
yields DataSets on the device. Batches already there pass through untouched; host batches
are placed in the consumer thread or prefetched by an async ring; k may be stacked.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterator, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.arrays import check_arrays
from jaxws.data.dataset import DataSet, Judged, MultiDataSet, Rows, Steps, _device_key, _host_key, signature
from jaxws.data.iterators import (
    ArrayDataSetIterator,
    ArrayMultiDataSetIterator,
    as_dataset,
    as_multi_dataset,
    from_iterable,
    refuse_non_source,
)
from jaxws.data.placement import Placement, host_leaf
from jaxws.data.prefetch import AsyncDataSetIterator, AsyncMultiDataSetIterator
from jaxws.errors import AsyncIteratorError, ConfigurationError, InvalidBatchError, WorkspaceError

__all__ = ["Feed", "Judged", "Rows", "Steps", "is_single_batch", "prepare", "stack", "validate"]

_END = object()
_ANYWHERE = Placement()  # the default placement; a Placement is not changed after it is made


def is_single_batch(data: Any, multi: bool = False) -> bool:
    """A DataSet, a dict, or an (x, y[, masks]) tuple of arrays (``multi``: also an
    (inputs, labels) tuple of lists of arrays); anything else is batches."""
    if isinstance(data, (DataSet, MultiDataSet, dict)):
        return True
    if not (isinstance(data, tuple) and 2 <= len(data) <= 4):
        return False
    first = data[0]
    if multi and isinstance(first, (list, tuple)):
        return bool(first) and all(hasattr(x, "shape") for x in first) and isinstance(data[1], (list, tuple))
    return hasattr(first, "shape")


def validate(ds: Any, op: str, check: Callable[..., Any] | None = None, where: str = "data",
             seen: set | None = None) -> Any:
    """``ds`` with array leaves (lists become numpy), after the checks every entry point runs.

    Dead arrays (leaked, outdated, donated) are named first, before any shape is judged;
    then ``check(ds, shapes)`` (the model's batch check) runs. With ``seen`` (a set kept
    by the caller), shapes are checked once per signature; value checks still run per batch.
    A DataSet of numpy arrays of a signature seen before goes straight to its value check.
    """
    host = _host_key(ds) if seen is not None else None
    known = host is not None and host in seen  # numpy: nothing dead, nothing to convert
    if not known:
        check_arrays(op, ds, where)
        leaves, treedef = jax.tree.flatten(ds, is_leaf=lambda x: isinstance(x, list))  # nested lists are data
        arrays = [host_leaf(x) for x in leaves]
        if any(a is not x for a, x in zip(arrays, leaves)):
            ds = jax.tree.unflatten(treedef, arrays)
    if check is not None:
        shapes = not known
        if seen is not None and shapes:
            signature = (treedef, tuple([a.aval if isinstance(a, jax.Array) else (a.shape, a.dtype) for a in arrays]))
            shapes = signature not in seen
        try:
            check(ds, shapes)
        except InvalidBatchError as e:
            if where in ("data", "x"):
                raise
            raise InvalidBatchError(f"{e} (in {where}, counting from 0)") from None
        if seen is not None and shapes:
            seen.add(signature)
    if host is not None and not known:
        seen.add(host)
    return ds


def prepare(ds: Any, op: str, check: Callable[..., Any] | None = None, placement: Placement | None = None,
            *, seen: set | None = None, stage: bool = False) -> Any:
    """One batch, validated (shapes once per signature with ``seen``, as :func:`validate`)
    and on the device (what ``output`` and friends run on). ``stage``: on the CPU, small
    numpy batches come back as copies for the jitted call to move (``Placement.staged``)."""
    return (placement or _ANYWHERE).place(validate(ds, op, check, seen=seen), stage=stage)[0]


def _on_host(ds: Any) -> bool:
    return all(isinstance(x, np.ndarray) for x in jax.tree.leaves(ds))  # np.memmap included


def _labels_on_host(ds: Any) -> bool:
    """Whether a batch's labels are host arrays: the feed's check judged their values."""
    labels = ds.labels
    return all(isinstance(x, np.ndarray) for x in (labels if isinstance(labels, (tuple, list)) else (labels,)))


@jax.jit
def _stack_on_device(group: list) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *group)


def stack(group: list) -> Any:
    """One batch with a leading steps axis (one dispatch for device batches)."""
    if isinstance(jax.tree.leaves(group[0])[0], jax.Array):
        return _stack_on_device(list(group))
    return jax.tree.map(lambda *xs: np.stack(xs), *group)


def _grouped(items: Iterator[tuple], k: int) -> Iterator[tuple[list, tuple | None]]:
    """``(group, key)``: groups of ``k`` consecutive batches of one signature from
    ``(batch, key)`` pairs (``key``: the device key :meth:`Feed._checked` gives, None for a
    batch that is not an unattached device one); the group's key is theirs, or None if any
    was None. A batch that breaks a group (the last, smaller one) flushes what was pending
    one by one, so programs stay few."""
    pending: list = []
    first = None
    for ds, key in items:
        sig = key or signature(ds)
        if pending and sig != first:
            yield from (([d], dk) for d, dk in pending)
            pending = []
        if not pending:
            first = sig
        pending.append((ds, key))
        if len(pending) == k:
            yield [d for d, _ in pending], (first if all(dk for _, dk in pending) else None)
            pending = []
    yield from (([d], dk) for d, dk in pending)


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
        resident: the caller runs :class:`Rows`: an ArrayDataSetIterator whose data fits on
            the device yields them (its batches taken inside the program) instead of batches.
        multi: batches are MultiDataSets (a ComputationGraph's): items become them through
            ``as_multi_dataset``, and the async ring is an AsyncMultiDataSetIterator.
        seen: the batch signatures whose shapes ``check`` passed before (a model keeps one
            set per operation, so a signature's shapes are checked once, not once per call);
            the feed adds the ones it checks.

    Each pass checks every batch for leaked, outdated or donated arrays before anything
    else, then with ``check`` (shapes once per signature); a list of batches is checked
    whole before its first batch is used. A pass that would yield no batch raises
    ConfigurationError.
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
        resident: bool = False,
        multi: bool = False,
        seen: set | None = None,
    ):
        self.op = op
        self._as = as_multi_dataset if multi else as_dataset
        self._kind = MultiDataSet if multi else DataSet  # what _as returns as it is
        self._multi = multi
        self._check = check
        self._seen: set = set() if seen is None else seen  # batch signatures whose shapes were checked
        self._last_key: tuple | None = None  # the last device batch's signature (in _seen)
        self._resident = resident
        self.prefetch = prefetch
        self.steps = steps
        self.rewind = rewind
        self.placement = placement or _ANYWHERE
        self._place = place
        self._ring: AsyncDataSetIterator | None = None
        self._passes = 0
        self._pulled = 0
        self._whole: bool | None = None  # the source's host data checked whole: its batches need no check
        self.origin: dict | None = None  # an ArrayDataSetIterator source's epoch and cursor at a pass's start
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigurationError(
                f"{op}(batch_size={batch_size!r}): expected an int >= 1, the examples per batch "
                "(or None to use the data as one batch)."
            )
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ConfigurationError(
                f"{op}(prefetch={prefetch!r}): expected an int >= 0, the host batches to read ahead "
                "on a background thread (0: none)."
            )
        if not is_single_batch(data, multi):
            refuse_non_source(data, f"{op}(data=", also="a DataSet, an (x, y) pair of arrays, ")
        if isinstance(data, tuple) and len(data) in (1, 5, 6) and hasattr(data[0], "shape"):
            raise ConfigurationError(
                f"{op}(data=<a tuple of {len(data)} arrays>): a tuple is read as (features, labels"
                "[, features_mask, labels_mask]). Pass (x, y), or a DataSet(x, y)."
            )
        checked = None  # batches in memory, checked
        if is_single_batch(data, multi):
            ds, key = self._checked(self._dataset(data, "data"), "data", 0)
            self._whole = batch_size is not None and _on_host(ds)
            if ds.num_examples == 0:
                raise ConfigurationError(f"{op}: the data has no examples (0 rows); pass at least one example.")
            if batch_size is None:
                checked = [(ds, key)]
            elif isinstance(ds, MultiDataSet):
                data = ArrayMultiDataSetIterator(ds.features, ds.labels, batch_size, features_masks=ds.features_masks,
                                                 labels_masks=ds.labels_masks)
            else:
                data = ArrayDataSetIterator(ds.features, ds.labels, batch_size, features_mask=ds.features_mask,
                                            labels_mask=ds.labels_mask)
        elif batch_size is not None:
            raise ConfigurationError(
                f"{op}(batch_size={batch_size}): batch_size splits one DataSet or (x, y) pair; "
                "an iterator already yields batches."
            )
        if checked is None and isinstance(data, (list, tuple)):  # batches in memory: all checked before the first runs
            kind = self._kind
            checked = [self._checked(item if type(item) is kind else self._dataset(item, f"data[{i}]"), "data[{}]", i)
                       for i, item in enumerate(data)]
        self._prechecked = checked is not None
        # batches in memory that are all unattached device arrays: a pass needs nothing but them
        self._keyed = self._prechecked and all([key is not None for _, key in checked])
        if self._prechecked:
            data = checked
        elif not hasattr(data, "__next__"):
            data = from_iterable(data)  # an iterable: restartable
        elif not hasattr(data, "reset") and epochs > 1:
            raise ConfigurationError(
                f"{op}(epochs={epochs}) got a one-shot iterator; pass something that can be "
                "iterated again (a list, an ArrayDataSetIterator, or from_iterable(lambda: ...))."
            )
        self.source = data

    # -- validation ------------------------------------------------------------------------

    def _dataset(self, item: Any, where: str) -> Any:
        """``item`` as a DataSet (MultiDataSet), or InvalidBatchError naming it (``where``)."""
        try:
            return self._as(item)
        except TypeError as e:  # our own check: from the prefetch thread too, it is raised plainly
            raise InvalidBatchError(f"{self.op}: {where} is not a batch: {e}") from None

    def _validated(self, ds: Any, where: str = "data") -> Any:
        return validate(ds, self.op, self._check, where, self._seen)

    def _checked(self, ds: Any, where: str, i: int) -> tuple[Any, tuple | None]:
        """``(ds checked, its signature)``; ``where.format(i)`` names it in an error. Device
        arrays of a signature checked before need nothing more on the host: a dead one is
        refused by the step (a tagged one is named here), and their labels are counted on
        the device. Avals are shared objects, so a batch keyed as the one before it is
        recognised by identity (``key == last``), with no hash."""
        key = _device_key(ds)
        if key is not None and (key == self._last_key or key in self._seen):
            self._last_key = key
            return ds, key
        ds = self._validated(ds, where.format(i))
        if key is not None:
            self._seen.add(key)
            self._last_key = key
        return ds, key  # None: a host batch, whose signature only grouping needs

    # -- passes ----------------------------------------------------------------------------

    def _start(self) -> Iterator:
        source = self.source
        if isinstance(source, list):
            return iter(source)
        resettable = hasattr(source, "reset") and getattr(source, "reset_supported", True)
        reset = resettable and (self._passes or self.rewind == "always")
        if reset:
            source.reset()
        self.origin = self._origin(source, reset)
        it = iter(source)
        first = next(it, _END)
        if first is _END and resettable and not self._passes and self.rewind == "exhausted":
            source.reset()  # DL4J: fit starts an exhausted iterator over
            self.origin = self._origin(source, True)
            it = iter(source)
            first = next(it, _END)
        return it if first is _END else itertools.chain([first], it)

    @staticmethod
    def _origin(source: Any, reset: bool) -> dict | None:
        """Where an ArrayDataSetIterator (or an async one around it, just reset) stands."""
        if isinstance(source, ArrayDataSetIterator):
            return {"source": source, "epoch": source.epoch, "position": source.position}
        base = getattr(source, "base", None)
        if reset and isinstance(base, ArrayDataSetIterator):
            return {"source": source, "epoch": base.epoch, "position": 0}
        return None

    def _rows(self) -> Iterator[Rows]:
        """A pass over a device-resident ArrayDataSetIterator: the rest of its epoch as Rows."""
        it = self.source
        if self._passes or self.rewind == "always" or it.position >= it.num_examples:
            it.reset()
        self._passes += 1
        self.origin = self._origin(it, False)
        n, size = it.num_examples, it.batch_size
        if self._passes == 1:  # all the examples checked once, as one batch
            self._validated(it.data)
        judged = _labels_on_host(it.data)  # their values too: the caller need not judge them on the device
        data, order = it.on_device(self.placement)
        position = it.position
        full = position + (n - position) // size * size
        if position >= (full if it.drop_last else n):
            raise ConfigurationError(
                f"{self.op}: the data has no batches (an ArrayDataSetIterator of {n} examples, batch "
                f"size {size}, drop_last={it.drop_last}). Pass at least one batch of examples."
            )
        return self._resident_pass(it, data, order, position, full, n, size, judged)

    def _resident_pass(self, it, data, order, position, full, n, size, judged) -> Iterator[Rows]:
        while position < full:
            count = min(self.steps, (full - position) // size)
            yield Rows(data, order, position, count, size, judged)
            position += count * size
            it.seek(position)
        if position < n and not it.drop_last:  # the smaller last batch, at its own shape
            yield Rows(data, order, position, 1, n - position, judged)
            it.seek(n)

    def __iter__(self) -> Iterator[Any]:
        """One pass: device batches (groups of ``steps`` when ``steps > 1``: :class:`Steps`
        of the user's device batches, or host ones stacked ``[steps, ...]`` and placed), or
        :class:`Rows` for a device-resident ArrayDataSetIterator (``resident=True``)."""
        return self._pass(signed=False)

    def signed(self) -> Iterator[tuple[Any, tuple | None]]:
        """One pass as ``(batch, signature(batch))`` pairs (``(rows, None)`` for Rows): a
        caller that keys its programs on the signature gets the one computed for the check.
        A single host batch whose labels were judged on the host has a :class:`Judged`
        signature (its labels are not counted on the device a second time); on the CPU,
        in this thread or from the ring, it comes as copies of its small numpy arrays, which
        the jitted step moves as it runs (:meth:`Placement.staged`), not in a call of its own."""
        return self._pass(signed=True)

    def _pass(self, signed: bool) -> Iterator[Any]:
        if (self._resident and self._place and not self._prechecked
                and isinstance(self.source, ArrayDataSetIterator) and self.source.fits_on_device()):
            return ((rows, None) for rows in self._rows()) if signed else self._rows()
        if self._keyed and signed and self._place and self.placement.anywhere and self.source:
            self._passes += 1  # checked, keyed device batches used where they lie (fit(batch), fit(list))
            return iter(self.source) if self.steps == 1 else self._inline(iter(self.source), signed)
        if self._whole is None:
            self._whole = self._check_whole()
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
            return self._batches(items) if signed else (ds for ds, _ in self._batches(items))
        if self._prechecked:  # a device key: unattached device arrays, which pass through where anywhere
            on_device = (first[1] is not None and self.placement.anywhere) or self.placement.holds_all(first[0])
        else:
            on_device = self.placement.holds_all(self._dataset(first, "batch 0"))
        single = self._prechecked and len(self.source) == 1  # fit(batch): no later batch to overlap with
        # a signed pass's step (fit's, an evaluation's) moves a host batch itself on the CPU, so
        # batches in memory (a list, an ArrayDataSetIterator) leave a ring nothing to overlap
        # (nor does DL4J prefetch them)
        held = (signed and self.steps == 1 and self.placement.stages
                and (self._prechecked or isinstance(self.source, ArrayDataSetIterator)))
        if (self.prefetch and not on_device and not single and not held
                and getattr(self.source, "async_supported", True)):
            judged = collections.deque()  # per ring batch, in order: were its labels judged on the host
            ring = self._prefetched(items, judged if signed and self.steps == 1 else None)
            if not signed:
                return ring
            if self.steps > 1:
                return ((ds, signature(ds)) for ds in ring)
            return ((ds, Judged(signature(ds)) if judged.popleft() else signature(ds)) for ds in ring)
        return self._inline(self._batches(items), signed)

    def _why_empty(self) -> str:
        source = self.source
        if isinstance(source, list):
            return " (an empty list)"
        if not getattr(source, "reset_supported", hasattr(source, "reset")):
            return " (a one-shot iterator that is exhausted)"
        return " (the iterator yields nothing, even after reset())"

    def _batches(self, items: Iterator) -> Iterator[tuple]:
        """``(batch, signature)`` for each item: checked (lists were, up front; the batches
        of host data checked whole are slices of checked arrays)."""
        self._pulled = 0  # batches taken from the source this pass: the next one is the failing one
        prechecked, whole, dataset, kind = self._prechecked, self._whole, self._dataset, self._kind
        for i, item in enumerate(items):
            self._pulled = i + 1
            if prechecked:
                yield item
            elif whole:
                yield item, None
            else:
                yield self._checked(item if type(item) is kind else dataset(item, f"batch {i}"), "batch {}", i)

    def _check_whole(self) -> bool:
        """Checks an Array(Multi)DataSetIterator's host arrays once, whole (shapes, label
        values), before its first batch: one pass over its labels, not a check per batch."""
        source = self.source
        if not (isinstance(source, ArrayDataSetIterator) and _on_host(source.data)):
            return False
        self._validated(source.data)
        return True

    def _inline(self, pairs: Iterator[tuple], signed: bool) -> Iterator[Any]:
        """Checked ``(batch, key)`` pairs placed (or stacked by ``steps``) in this thread."""
        place, anywhere = self.placement.place, self.placement.anywhere
        # a shuffled ArrayDataSetIterator's batches are fresh gathers of its numpy arrays: no one
        # else holds them, so the step may read them as they are (anything else is copied)
        copy = not (self._whole and isinstance(self.source, ArrayDataSetIterator) and self.source.shuffle)
        if self.steps == 1:
            for ds, key in pairs:
                judged = False
                if key is None:  # a host batch (or partly): its labels were judged if they were host arrays
                    judged = signed and _labels_on_host(ds)
                    ds = place(ds, judged, copy)[0]  # judged: staged, for the step to move as it runs
                elif not anywhere:  # key: unattached device arrays, used where they are
                    ds = place(ds)[0]
                if signed:  # placing keeps the avals
                    yield ds, (Judged(signature(ds)) if judged else key or signature(ds))
                else:
                    yield ds
        else:
            for group, key in _grouped(pairs, self.steps):
                if key is not None and anywhere:  # stacked by the program that runs them
                    steps = Steps(tuple(group))
                    yield (steps, (len(group), key)) if signed else steps
                else:
                    ds = place(stack(group))[0]
                    yield (ds, signature(ds)) if signed else ds

    def _prefetched(self, items: Iterator, judged: collections.deque | None = None) -> Iterator[Any]:
        """The async ring's batches; ``judged`` (fit's single batches): gets, in order, whether
        each batch's labels were host arrays, judged by the check (appended before the ring has
        it), and the ring stages them as :meth:`_inline` does (copies the step moves)."""
        if self.steps == 1:
            def base():
                for ds, key in self._batches(items):
                    if judged is not None:
                        judged.append(key is None and _labels_on_host(ds))
                    yield ds

            base, collate = base(), self._as
        else:
            base, collate = (group for group, _ in _grouped(self._batches(items), self.steps)), stack
        # fit's single steps move small host batches themselves on the CPU: the ring stages copies
        ring = self._ring = (AsyncMultiDataSetIterator if self._multi else AsyncDataSetIterator)(
            base, self.prefetch, device=self.placement.device, sharding=self.placement.sharding,
            collate=collate, _stage=judged is not None)
        try:
            yield from ring
        except AsyncIteratorError as e:
            self.raise_from_ring(e)
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

    @property
    def in_memory(self) -> int | None:
        """The batches of a pass where they are in memory (a DataSet, a pair, a list), else None."""
        return len(self.source) if self._prechecked else None

    def raise_from_ring(self, error: AsyncIteratorError) -> NoReturn:
        """Raises what the failure of a ring over this feed's pass means: our own check's
        error as it is (it ran in the prefetch thread), else the source's, at the batch the
        source failed to make (the ring counts what it yielded: groups, where it stacks)."""
        if isinstance(error.__cause__, WorkspaceError):
            raise error.__cause__ from None
        raise AsyncIteratorError(error.iterator_id, self._pulled) from error.__cause__

    @property
    def one_batch(self) -> bool:
        """A pass is one batch in memory (a DataSet, a pair, a list of one): a caller may
        make what the pass accumulates inside that batch's program."""
        return self.in_memory == 1
