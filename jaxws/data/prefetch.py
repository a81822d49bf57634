"""AsyncDataSetIterator: two prefetch threads filling a bounded ring of device batches.

One named daemon thread pulls from the base iterator and pads dynamic axes to a capacity
bucket; a second puts what is loaded on the device (or shards it; every batch loaded by
then in one transfer call), so a transfer overlaps the loading of the next batch. Each
batch crosses to the consumer as ``(element, exception)``, and a count of tokens bounds
the batches ahead of it. What the ring placed is valid until the next ``next()``; arrays
that were on the device already pass through and stay the caller's. For ``fit``'s steps on
the CPU the ring stages instead (copies its step moves as it runs): one thread, nothing placed.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import queue
import threading
import weakref
from typing import Any, Callable

import jax
import numpy as np

from jaxws.configuration import ResetPolicy, WorkspaceConfiguration
from jaxws.data.dataset import DataSet, _device_key, signature
from jaxws.data.iterators import DataSetIterator, IterableDataSetIterator, as_dataset, from_iterable, refuse_non_source
from jaxws.data.placement import Placement
from jaxws.errors import AsyncIteratorError, ConfigurationError, WorkspaceError
from jaxws.interrupts import guarded
from jaxws.manager import get_workspace_manager
from jaxws.memory import tree_bytes
from jaxws.workspace import _pad_to

__all__ = ["AsyncDataSetIterator", "AsyncMultiDataSetIterator"]

log = logging.getLogger("jaxws")
_END = object()
_INLINE = object()  # the loader's word that the base yields device batches: the consumer reads them
_MORE = object()  # the transfer thread's word that nothing else is loaded yet
_STOP = object()  # the word that the iterator is closing
_ids = itertools.count()
_POLL_S = 0.05  # a wait for the threads looks for a pending interrupt this often
_RING_CONF = WorkspaceConfiguration(policy_reset=ResetPolicy.ENDOFBUFFER_REACHED, steps_number=1)


class _Preparer:
    """What the prefetch threads run: collate, pad, learn the ring's slot size, place.

    Holds no reference to the iterator, so an abandoned iterator can be collected.
    """

    def __init__(self, iterator_id, config, placement, callback, pad_axis, collate, stage=False):
        self.iterator_id = iterator_id
        self.stage = stage and placement.stages  # host copies for a step that moves them (fit's, on the CPU)
        self.collate = collate
        self.config = config
        self.placement = placement
        self.callback = callback
        self.pad_axis = pad_axis
        self.slot_bytes = 0
        self.reallocations = 0
        self.capacity: int | None = None
        self._bytes: dict = {}  # batch signature -> bytes: the bookkeeping is once per shape
        # nothing to do for a device batch of a known shape: no collation, callback, padding or move
        self.plain = collate is as_dataset and callback is None and pad_axis is None and placement.anywhere

    @property
    def shapes(self) -> set:
        return set(self._bytes)

    def __call__(self, item: Any) -> tuple[Any, list]:
        """``(batch on the device, the arrays the ring placed)``: a device DataSet of a shape
        seen before comes back as it is, with nothing to do (the consumer's thread reads
        device batches, one call per batch)."""
        if self.plain and _device_key(item) in self._bytes:
            return item, ()
        return self.placement.place(self.host(item))

    def host(self, item: Any) -> Any:
        """The host half: collate, callback, padding and the slot size."""
        ds = self.collate(item)
        if self.callback is not None:
            ds = self.callback(ds) or ds
        if self.pad_axis is not None:
            ds = self._pad(ds)
        key = signature(ds)
        nbytes = self._bytes.get(key)
        if nbytes is None:
            nbytes = self._bytes[key] = tree_bytes(ds)
        if nbytes > self.slot_bytes:
            self._learn(nbytes)
        return ds

    def _learn(self, nbytes: int) -> None:
        """The slot size: learned from the first batch, grown by a larger one (variable lengths)."""
        if not self.slot_bytes:
            self.slot_bytes = self.config.round_up(nbytes)
        elif nbytes > self.slot_bytes:
            self.slot_bytes = self.config.round_up(nbytes)
            self.reallocations += 1
            log.debug("[%s]: a batch of %d bytes grew the ring slot to %d bytes.", self.iterator_id, nbytes, self.slot_bytes)

    def _pad(self, ds: Any) -> DataSet:
        if not isinstance(ds, DataSet):
            raise ConfigurationError(f"[{self.iterator_id}]: pad_axis works on DataSet batches, got {type(ds).__name__}.")
        axis = self.pad_axis
        x = np.asarray(ds.features)
        length = x.shape[axis]
        if self.capacity is None or length > self.capacity:
            self.capacity = self.config.allocate(length)
        cap = self.capacity
        lead = x.shape[: axis + 1]
        own = np.broadcast_to(np.arange(lead[-1]) < length, lead).astype(np.float32)

        def mask(existing):
            m = own if existing is None else np.asarray(existing, np.float32)
            return _pad_to(m, axis, cap, 0)

        labels, labels_mask = ds.labels, ds.labels_mask
        if labels is not None and np.ndim(labels) > axis and np.shape(labels)[axis] == length:
            labels = _pad_to(np.asarray(labels), axis, cap, 0)
            labels_mask = mask(labels_mask)
        return DataSet(_pad_to(x, axis, cap, 0), labels, mask(ds.features_mask), labels_mask)


def _load(base, hq: queue.SimpleQueue, tokens: threading.Semaphore, stop: threading.Event, prepare: _Preparer) -> None:
    """The loading thread: each batch of ``base`` through ``prepare.host`` into ``hq``
    (when staging, straight to the consumer's queue as ``Placement.place(ds, stage=True)``
    gives it, copies for the step to move: there is no transfer thread).

    It takes a token before each batch and the consumer gives one back for each batch it
    takes, so the batches loaded and not yet handed out never outnumber the tokens.
    """
    try:
        items, first = iter(base), True
        while True:
            tokens.acquire()
            if stop.is_set():
                return
            item = next(items, _END)
            if item is _END:
                hq.put((_END, None))
                return
            ds = prepare.host(item)
            if first and prepare.pad_axis is None and prepare.placement.holds_all(ds):  # no thread needed
                hq.put((prepare.placement.place(ds, True) if prepare.stage else ds, _INLINE))
                return
            first = False
            hq.put((prepare.placement.place(ds, True) if prepare.stage else ds, None))
    except BaseException as e:  # noqa: BLE001 - every failure crosses to the consumer
        hq.put((None, e))


def _place(hq: queue.SimpleQueue, q: queue.SimpleQueue, stop: threading.Event, prepare: _Preparer) -> None:
    """The transfer thread: what ``hq`` holds onto the device into ``q``, in order.

    One transfer call has a fixed cost, so it takes every batch loaded by the time it is
    free, in one call: an in-memory source's several at once, a slow loader's one at a
    time as each is ready. The transfer of one batch overlaps the loading of the next.
    """
    try:
        while True:  # until the end, a failure, or the word to stop (close always sends it)
            group, (ds, flag) = [], hq.get()
            while flag is None and ds is not _END:  # a batch: take the others already loaded
                group.append(ds)
                try:
                    ds, flag = hq.get_nowait()
                except queue.Empty:
                    ds, flag = None, _MORE
            if stop.is_set():
                return  # closing: what was loaded is not transferred
            if group:
                for batch in prepare.placement.place_many(group):
                    q.put((batch, None))
            if flag is _MORE:
                continue
            if flag is _INLINE:
                ds = prepare.placement.place(ds)
            if flag is not _STOP:  # the end, the loader's failure, or the batch on the device
                q.put((ds, flag))
            return
    except BaseException as e:  # noqa: BLE001 - every failure crosses to the consumer
        q.put((None, e))


def _shutdown(stop: threading.Event, tokens: threading.Semaphore, hq: queue.SimpleQueue,
              q: queue.SimpleQueue, threads: tuple[threading.Thread, ...]) -> None:
    stop.set()
    tokens.release()  # wakes a loader waiting for room
    hq.put((None, _STOP))  # wakes the transfer thread
    for thread in threads:
        if thread is not threading.current_thread() and thread.is_alive():  # one not started is not joined
            thread.join()
    while True:  # what was placed and never taken: freed now
        try:
            q.get_nowait()
        except queue.Empty:
            break


class AsyncDataSetIterator(DataSetIterator):
    """Prefetches batches onto the device in background threads (DL4J's async iterator).

    Loading and transfer run in two threads, so a batch goes to the device while the next
    one loads. At most ``queue_size + 1`` batches are ahead of the consumer, loaded or
    placed, so at most ``queue_size + 2`` batches the ring placed are alive on the device
    whatever the consumer does (with the one handed out last). Host batches from a fast
    source go to the device several per transfer call (a call has a fixed cost): every
    batch loaded by the time the transfer thread is free; a slow loader's go one at a
    time, as each is ready. When the first batch is already on the device there is
    nothing to transfer: the threads stop after it and later batches are read on the
    consumer's thread. With ``use_workspace=True`` a batch the ring placed belongs to the
    iterator's ring workspace:
    the next ``next()`` invalidates it and frees its memory, and passing it to a jaxws entry
    point afterwards raises OutdatedWorkspacePointerError; ``batch.detach()`` keeps it.
    Arrays the base iterator yields already on the device (or already laid out with
    ``sharding``) pass through uncopied and are never invalidated: they stay yours.

    Args:
        base: an iterator (or iterable) of DataSets, ``(x, y)`` pairs or dicts.
        queue_size: batches prefetched; below 2 is raised to 2, as in DL4J.
        use_workspace: invalidate each batch when the next is taken (the ring).
        device: the device to put batches on (default: the default device).
        sharding: a sharding to lay batches out as global arrays (every leaf, with
            ``jax.make_array_from_process_local_data``, so it works across processes).
        callback: called with each host batch in the prefetch thread; may return a
            replacement (validation, transformation).
        pad_axis: a dynamic axis (1 for the time of ``[batch, time, features]``) padded to a
            capacity that grows by the allocation policy, with masks built; the number of
            distinct shapes stays logarithmic in the length range.
        config: the allocation policy for the slot size and the capacity (default:
            OVERALLOCATE with limit 1.0, so capacities double).
        collate: turns each item of ``base`` into the pytree placed on the device, in the
            prefetch thread (default: a DataSet from a DataSet, pair, dict or array).

    Example:
        >>> import numpy as np
        >>> from jaxws.data import ArrayDataSetIterator, AsyncDataSetIterator
        >>> base = ArrayDataSetIterator(np.ones((10, 3)), np.zeros(10), batch_size=4)
        >>> with AsyncDataSetIterator(base, queue_size=2) as it:
        ...     print([b.num_examples for b in it])
        [4, 4, 2]
    """

    _batch_type = DataSet

    def __init__(
        self,
        base: Any,
        queue_size: int = 8,
        *,
        use_workspace: bool = True,
        device: jax.Device | None = None,
        sharding: jax.sharding.Sharding | None = None,
        callback: Callable[[Any], Any] | None = None,
        pad_axis: int | None = None,
        config: WorkspaceConfiguration | None = None,
        collate: Callable[[Any], Any] = as_dataset,
        _stage: bool = False,
    ):
        name = type(self).__name__
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ConfigurationError(f"{name}(queue_size={queue_size!r}): expected an int >= 0 (batches to prefetch).")
        if device is not None and sharding is not None:
            raise ConfigurationError(f"{name}: pass device= or sharding=, not both.")
        if pad_axis is not None and (isinstance(pad_axis, bool) or not isinstance(pad_axis, int) or pad_axis < 0):
            raise ConfigurationError(f"{name}(pad_axis={pad_axis!r}): expected an axis index >= 0 (1 = time).")
        if not hasattr(base, "__next__"):
            refuse_non_source(base, f"{name}(base=")
            base = from_iterable(base)
        self.id = f"ASYNC_ITERATOR_{next(_ids)}"
        self.base = base
        self.queue_size = max(2, queue_size)
        self.use_workspace = use_workspace
        self.config = config or WorkspaceConfiguration(overallocation_limit=1.0)
        self._prepare = _Preparer(self.id, self.config, Placement(device, sharding), callback, pad_axis, collate,
                                   _stage)
        self._ring = None
        self._closed = False
        self._exhausted = False
        self._produced = 0
        self._threaded = True  # False once the loader finds the base yields device batches
        self._pending = None  # the first batch, which the threads prepared before they stopped
        self._start()

    # -- the threads -----------------------------------------------------------------------

    def _start(self) -> None:
        self._held = None  # what _take took as an interrupt arrived: the next call's
        self._origin = self.base.state_dict() if hasattr(self.base, "state_dict") else None
        self._consumed = 0  # examples handed out since _origin
        self._tokens = threading.Semaphore(self.queue_size + 1)  # loaded or placed, not yet handed out
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        stop, loaded = threading.Event(), queue.SimpleQueue()
        name = f"jaxws-prefetch-{self.id}"
        stage = self._prepare.stage  # a copy to stage is no transfer: the loader makes it, no thread between
        threads = (threading.Thread(target=_load, args=(self.base, self._queue if stage else loaded, self._tokens, stop,
                                                        self._prepare), name=f"{name}-load", daemon=True),)
        if not stage:
            threads += (threading.Thread(target=_place, args=(loaded, self._queue, stop, self._prepare),
                                         name=f"{name}-put", daemon=True),)
        # registered first: an interrupt in a start() (it waits for the thread to run) left
        # threads no finalizer stops, blocked for good on a full ring
        self._finalizer = weakref.finalize(self, _shutdown, stop, self._tokens, loaded, self._queue, threads)
        try:
            for thread in threads:
                thread.start()
        except BaseException:
            self._finalizer()
            raise

    def _stop_threads(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # idempotent: stop, drain, join

    def _fail(self, error: BaseException):
        """Stops after the base iterator raised: reset() starts again."""
        self._exhausted = True
        self._stop_threads()
        if not isinstance(error, Exception):
            raise error  # KeyboardInterrupt, SystemExit: what the loader raised, as it is
        raise AsyncIteratorError(self.id, self._produced) from error

    def _next_inline(self) -> Any:
        """The next batch without a thread (the base yields device batches)."""
        if self._pending is not None:
            prepared, self._pending = self._pending, None
            return prepared
        try:
            item = next(self.base)
        except StopIteration:
            return _END
        except BaseException as e:  # noqa: BLE001 - reported as the threads' would be
            self._fail(e)
        try:
            return self._prepare(item)
        except BaseException as e:  # noqa: BLE001
            self._fail(e)

    # -- the consumer ----------------------------------------------------------------------

    def _ring_workspace(self):
        if self._ring is None or self._ring.is_destroyed:
            self._ring = get_workspace_manager().get_workspace_for_current_thread(_RING_CONF, self.id)
        return self._ring

    def __next__(self):
        if self._closed:
            raise WorkspaceError(f"[{self.id}] is closed; create a new iterator.")
        if self._exhausted:
            raise StopIteration
        ring = self._ring_workspace() if self.use_workspace else None
        if ring is not None:
            ring._release_slot()  # before taking the next: the ring bound holds
        if self._threaded:
            item, error = self._held or self._take()
            self._held = None
            if error is _INLINE:  # device batches: nothing to transfer, so no thread from here on
                self._stop_threads()
                self._threaded, self._pending = False, item
                item = self._next_inline()
            elif error is not None:
                self._fail(error)
        else:
            item = self._next_inline()
        if item is _END:
            self._exhausted = True
            raise StopIteration
        self._produced += 1
        batch, owned = item
        if self._origin is not None:
            self._consumed += jax.tree.leaves(batch)[0].shape[0]
        if ring is not None:
            ring._hold_slot(owned)  # never the caller's arrays that passed through
            ring.current_size = self._prepare.slot_bytes * (self.queue_size + 2)
            ring.reallocations = self._prepare.reallocations
        return batch

    def _take(self) -> tuple | None:
        """The threads' next ``(item, error)`` and its token given back, as one interrupt
        commit (an interrupt as ``get()`` returned lost both: a ring out of tokens waits for
        good). The wait polls, so an interrupt still stops it (nothing taken); an item taken
        as one arrives is the next call's."""
        with guarded() as guard, guard:
            while True:
                try:
                    taken = self._queue.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    if guard.pending:
                        return None  # raised as the commit ends: nothing taken
            if taken[1] is None and taken[0] is not _END:
                self._tokens.release()
            if guard.pending:  # raised as the commit ends: the item is the next call's
                self._held = taken
            return taken

    def state_dict(self) -> dict | None:
        """The base iterator's position as consumed here (the thread reads ahead of it), or
        None if the base records none (only an ArrayDataSetIterator does)."""
        origin = self._origin
        if origin is None:
            return None
        return {**origin, "position": origin["position"] + self._consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a ``state_dict()``: the base is moved there and prefetching restarts."""
        if not hasattr(self.base, "load_state_dict"):
            raise ConfigurationError(f"[{self.id}]: the base iterator records no position (it has no load_state_dict).")
        self._stop_threads()
        if self._ring is not None and self.use_workspace:
            self._ring._release_slot()
        self.base.load_state_dict(state)
        self._exhausted, self._produced = False, 0
        self._threaded, self._pending = True, None
        self._start()

    def reset(self) -> None:
        """Drains the queue, restarts the base iterator and the prefetch thread.

        Also after the base iterator raised: the iterator starts again from its first batch.
        """
        if self._closed:
            raise WorkspaceError(f"[{self.id}] is closed; create a new iterator.")
        if not getattr(self.base, "reset_supported", True):
            raise ConfigurationError(
                f"[{self.id}]: the base iterator does not support reset() (a one-shot iterator such "
                "as a generator); wrap a function that makes one: from_iterable(lambda: gen())."
            )
        self._stop_threads()
        if self._ring is not None and self.use_workspace:
            self._ring._release_slot()
        self.base.reset()
        self._exhausted = False
        self._produced = 0
        self._threaded, self._pending = True, None
        self._start()

    def close(self) -> None:
        """Stops and joins the prefetch thread, frees the ring and closes a generator source; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_threads()
        if inspect.isgenerator(self.base) or isinstance(self.base, IterableDataSetIterator):
            self.base.close()  # the threads have stopped: a generator's own finally runs now
        ring, self._ring = self._ring, None
        if ring is not None and ring._owner == threading.get_ident():
            get_workspace_manager().destroy_workspace(ring)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.base)

    @property
    def reset_supported(self) -> bool:
        return getattr(self.base, "reset_supported", True)

    @property
    def async_supported(self) -> bool:
        return False  # already asynchronous

    @property
    def slot_bytes(self) -> int:
        """Bytes of one ring slot, learned from the first batch."""
        return self._prepare.slot_bytes

    @property
    def reallocations(self) -> int:
        """How often a larger batch grew the ring slot."""
        return self._prepare.reallocations

    @property
    def capacity(self) -> int | None:
        """The current capacity of ``pad_axis``."""
        return self._prepare.capacity

    @property
    def num_shapes(self) -> int:
        """Distinct batch shapes produced so far (each one compiles a step once)."""
        return len(self._prepare.shapes)

    @property
    def workspace(self):
        """The ring workspace (None before the first batch or with use_workspace=False)."""
        return self._ring


class AsyncMultiDataSetIterator(AsyncDataSetIterator):
    """AsyncDataSetIterator for MultiDataSet batches (several inputs and outputs)."""
