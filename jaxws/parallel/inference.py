"""ParallelInference: thread-safe inference, concurrent requests merged into bucketed batches.

Callers on any thread submit inputs and serve each other: one that finds a worker slot
free (one per device, each with its own parameter replica) merges the pending requests of
one shape up to ``batch_limit`` examples, pads them to a power-of-two bucket, runs the
model on its own thread, and hands each caller its rows.
"""

from __future__ import annotations

import collections
import enum
import itertools
import threading
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxws.arrays import allow_reads
from jaxws.data.feed import validate
from jaxws.errors import ConfigurationError, WorkspaceError
from jaxws.interrupts import InterruptGuard, guarded
from jaxws.manager import get_workspace_manager
from jaxws.nn.model import Model

__all__ = ["ParallelInference", "InferenceMode"]

_ids = itertools.count()


class InferenceMode(enum.Enum):
    """How requests reach the model."""

    SEQUENTIAL = "sequential"  # one request per call of the model
    BATCHED = "batched"  # pending requests of one shape merged, up to batch_limit examples


def _bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, capped at ``limit``: few shapes, few compiles."""
    return min(limit, 1 << max(0, n - 1).bit_length())


class _Request:
    """One caller's request and its answer. Its caller waits on ``wake`` (a condition of
    the instance's lock, made when it first has to wait: a lone caller never does) until
    ``done``, or until a slot is free for it to run a batch."""

    __slots__ = ("x", "mask", "shape", "rows", "wake", "done", "result", "error")

    def __init__(self, x: Any, mask: Any, shape: tuple, rows: int):
        self.x = x  # an array, or a tuple of them (a ComputationGraph's inputs)
        self.mask = mask
        self.shape = shape  # what must agree to share a batch: per-example shapes and dtypes
        self.rows = rows
        self.wake: threading.Condition | None = None
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def notify(self) -> None:
        """Wakes the caller if it waits (the instance's lock held)."""
        if self.wake is not None:
            self.wake.notify()


def _host(tree: Any) -> Any:
    """``tree``'s arrays as numpy (one array, the usual request, without a tree walk)."""
    return np.asarray(tree) if isinstance(tree, (np.ndarray, jax.Array)) else jax.tree.map(np.asarray, tree)


def _rows(tree: Any, start: int, stop: int) -> Any:
    return tree[start:stop] if isinstance(tree, np.ndarray) else jax.tree.map(lambda o: o[start:stop], tree)


def _concatenate(parts: list) -> Any:
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


class _Serving(NamedTuple):
    """What the callers run: swapped whole by ``update_model``."""

    model: Model
    infer: Any
    replicas: list  # (params, state) per worker slot, on its device


class ParallelInference:
    """DL4J's ParallelInference: ``output(x)`` from any number of threads.

    There are no server threads: the callers serve each other. A caller that finds a
    worker slot free runs the oldest waiting requests (its own among them, or before it)
    as one batch on that slot's replica, on its own thread, and hands each caller its
    rows; the others wait, and the first waiting caller takes the next batch when a slot
    frees. A lone caller thus runs its request at once, with no thread hand-off, and busy
    callers are merged into bigger batches. Each slot holds its own copy of the model's
    parameters on its device (the model's own buffers are never shared, so training the
    model meanwhile is safe); :meth:`update_model` swaps in new parameters atomically while
    requests keep flowing. In BATCHED mode a request is merged only with requests of the
    same per-example shape and dtype, so one odd request never fails its neighbours.

    Args:
        model: an initialised MultiLayerNetwork, ComputationGraph or FunctionalModel.
        inference_mode: BATCHED (default) merges concurrent requests; SEQUENTIAL does not.
        batch_limit: the most examples in one merged batch (a request larger than this
            runs alone, at its own size).
        queue_limit: the most requests waiting; ``output`` blocks while the queue is full.
        workers: batches that may run at once, each slot with a replica of the parameters
            on its own device (round robin over the local devices).

    Example:
        >>> import numpy as np
        >>> from jaxws.nn import MultiLayerNetwork, NeuralNetConfiguration, OutputLayer
        >>> from jaxws.parallel import ParallelInference
        >>> net = MultiLayerNetwork(NeuralNetConfiguration(layers=[OutputLayer(2)], input_shape=(3,))).init()
        >>> with ParallelInference(net, batch_limit=16) as pi:
        ...     print(pi.output(np.ones((5, 3), np.float32)).shape)
        (5, 2)
    """

    def __init__(
        self,
        model: Model,
        *,
        inference_mode: InferenceMode = InferenceMode.BATCHED,
        batch_limit: int = 32,
        queue_limit: int = 64,
        workers: int = 1,
    ):
        if not isinstance(inference_mode, InferenceMode):
            raise ConfigurationError(f"ParallelInference(inference_mode={inference_mode!r}): expected InferenceMode.BATCHED or SEQUENTIAL.")
        for name, value in (("batch_limit", batch_limit), ("queue_limit", queue_limit), ("workers", workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"ParallelInference({name}={value!r}): expected an int >= 1.")
        self.inference_mode = inference_mode
        self.batch_limit = batch_limit
        self.queue_limit = queue_limit
        self.workers = workers
        self.id = f"PARALLEL_INFERENCE_{next(_ids)}"
        self.executions = 0  # model calls made (merged batches)
        self.batch_sizes: collections.Counter = collections.Counter()  # padded size -> calls
        devices = jax.local_devices()
        self._devices = [devices[i % len(devices)] for i in range(workers)]
        self._serving = self._replicate(model)
        self._lock = threading.Lock()
        self._has_room = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)  # every slot free (what close waits for)
        self._pending: collections.deque[_Request] = collections.deque()
        self._free = list(range(workers))  # worker slots no batch runs on
        self._closed = False

    @property
    def model(self) -> Model:
        """The model whose parameters are served."""
        return self._serving.model

    def _replicate(self, model: Model) -> _Serving:
        if not isinstance(model, Model):
            raise ConfigurationError(f"ParallelInference(model={model!r}): expected a jaxws.nn Model (MultiLayerNetwork, FunctionalModel).")
        with model._lock:  # one committed version, copied before any later step donates it
            carry = model._require_init()
            replicas = [jax.device_put((carry.params, carry.state), d, may_alias=False) for d in self._devices]
        return _Serving(model, model._inference_fn(False), replicas)

    def update_model(self, model: Model) -> None:
        """Serves ``model``'s current parameters from now on (DL4J's ``updateModel``).

        New replicas are copied first, then swapped in at once: a request runs entirely on
        the old parameters or entirely on the new ones. ``model`` may be the same network
        after more training, or another one that accepts the same inputs.
        """
        self._serving = self._replicate(model)

    # -- callers ---------------------------------------------------------------------------

    def output(self, x: Any, mask: Any = None) -> Any:
        """The model's output for ``x`` (``[n, ...]``), as numpy; safe from any thread.

        For a ComputationGraph ``x`` is the list of its inputs (``mask`` a list of masks)
        and the result a tuple with one array per output.

        Raises:
            LeakedWorkspacePointerError, OutdatedWorkspacePointerError: ``x`` is dead.
            InvalidBatchError: ``x`` does not fit the model (raised here, in the caller).
            WorkspaceError: the instance is closed (also for requests still waiting when
                :meth:`close` is called).
            Exception: the model's failure, in every caller of the batch it failed.
        """
        request = self._request(x, mask)
        with self._lock:
            while len(self._pending) >= self.queue_limit and not self._closed:
                self._has_room.wait()
            if self._closed:
                raise self._closed_error()
            self._pending.append(request)
            try:
                while not request.done:
                    if self._free and self._pending:  # a slot and work: this caller runs the next batch
                        with guarded() as guard, guard:  # the slot and the batch come back, interrupted or not
                            self._run(guard, self._free.pop(), self._take())
                    else:
                        if request.wake is None:
                            request.wake = threading.Condition(self._lock)
                        request.wake.wait()
            except BaseException:  # interrupted: the request leaves the queue, the next caller takes over
                if request in self._pending:
                    self._pending.remove(request)
                    self._has_room.notify()
                self._hand_on()
                raise
        if request.error is not None:
            raise request.error  # the model's failure, with the traceback of the caller that ran it
        return request.result

    def _request(self, x: Any, mask: Any) -> _Request:
        """``x`` checked (dead arrays named, shapes judged once per signature) and on the
        host, where requests are merged; the caller's arrays are only read."""
        op = "ParallelInference.output"
        model = self.model
        ds = validate(model._request(x, mask), op, lambda d, shapes=True: model._check_batch(d, op, shapes), "x",
                      seen=model._seen_batches.setdefault(op, set()))
        x, mask = model._inputs_of(ds)
        x, mask = _host(x), None if mask is None else _host(mask)
        if mask is None and isinstance(x, np.ndarray):  # the usual request: one array
            return _Request(x, None, (x.shape[1:], x.dtype), len(x))
        leaves, treedef = jax.tree.flatten((x, mask))
        return _Request(x, mask, (treedef, *[(a.shape[1:], a.dtype) for a in leaves]), len(leaves[0]))

    def _closed_error(self) -> WorkspaceError:
        return WorkspaceError(f"[{self.id}] is closed; create a new ParallelInference.")

    def close(self) -> None:
        """Fails waiting requests at once and waits for running batches; idempotent.

        Batches already running complete and their callers get their rows; every other
        caller, waiting or new, gets a WorkspaceError saying the instance is closed.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                for request in self._pending:
                    request.error, request.done = WorkspaceError(f"[{self.id}] was closed before this request ran."), True
                    request.notify()
                self._pending.clear()
                self._has_room.notify_all()
            while len(self._free) < self.workers:
                self._idle.wait()

    def __enter__(self) -> ParallelInference:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the caller that runs a batch ------------------------------------------------------

    def _take(self) -> list[_Request]:
        """The oldest request and, in BATCHED mode, later ones of its shape up to batch_limit
        rows (called with the lock held)."""
        first = self._pending.popleft()
        taken, rows = [first], first.rows
        if self.inference_mode is InferenceMode.BATCHED and rows < self.batch_limit and self._pending:
            kept = collections.deque()
            for request in self._pending:
                if request.shape == first.shape and rows + request.rows <= self.batch_limit:
                    taken.append(request)
                    rows += request.rows
                else:
                    kept.append(request)
            self._pending = kept
        self._has_room.notify(len(taken))
        return taken

    def _hand_on(self) -> None:
        """Wakes the oldest waiting caller if a slot is free to run its batch (lock held)."""
        if self._free and self._pending:
            self._pending[0].notify()

    def _run(self, guard: InterruptGuard, slot: int, taken: list[_Request]) -> None:
        """Runs ``taken`` as one batch on ``slot``'s replica and hands each caller its rows;
        called in a commit of ``guard``, with the lock held, which it releases meanwhile.
        The model's failure goes to every caller of the batch; an interrupt (only while the
        model runs) puts the unanswered requests back at the head of the queue."""
        self._hand_on()  # another free slot: the next caller need not wait for this batch
        self._lock.release()
        ran = False
        try:
            try:
                with guard.released():
                    out, size = self._compute(slot, taken)
            except Exception as e:  # noqa: BLE001 - every caller of the batch gets it, with its traceback
                for request in taken:
                    request.error, request.done = e, True  # the answer first: waiters read done
            else:
                start = 0
                for request in taken:
                    request.result, request.done = _rows(out, start, start + request.rows), True
                    start += request.rows
                ran = True
        finally:
            self._lock.acquire()
            self._free.append(slot)
            if ran:
                self.executions += 1
                self.batch_sizes[size] += 1
            self._pending.extendleft(reversed([r for r in taken if not r.done]))  # interrupted
            for request in taken:
                request.notify()
            self._hand_on()
            if len(self._free) == self.workers:
                self._idle.notify_all()

    def _compute(self, slot: int, taken: list[_Request]) -> tuple[Any, int]:
        """The model's output for the merged requests, as numpy, and the padded batch size."""
        serving = self._serving  # one version for the whole batch
        params, state = serving.replicas[slot]
        if len(taken) == 1:
            n, x, mask = taken[0].rows, taken[0].x, taken[0].mask
        else:
            n, (x, mask) = sum(t.rows for t in taken), _concatenate([(t.x, t.mask) for t in taken])
        size = _bucket(n, self.batch_limit) if n <= self.batch_limit else n
        if size > n:  # pad to the bucket: no new program for this size
            x, mask = jax.tree.map(lambda a: np.concatenate([a, np.zeros((size - n, *a.shape[1:]), a.dtype)]), (x, mask))
        # host inputs go in as they are: the call moves them to the replica's device; the
        # signature stands for the inputs' shapes and the replica: no flatten of the
        # parameters per batch (the replicas are ours, the inputs host arrays)
        with get_workspace_manager().scope_out_of_workspaces():  # the rows belong to no workspace
            out = serving.infer._call_planned((slot, size, taken[0].shape), (params, state, x, mask, None))
        with allow_reads():  # the callers asked for these rows
            return _host(out), size

    # -- DL4J's builder --------------------------------------------------------------------

    class Builder:
        """``ParallelInference.Builder(model).inference_mode(...).batch_limit(32)...build()``."""

        def __init__(self, model: Model):
            self._model = model
            self._kwargs: dict[str, Any] = {}

        def _set(self, name: str, value: Any) -> ParallelInference.Builder:
            self._kwargs[name] = value
            return self

        def inference_mode(self, mode: InferenceMode):
            return self._set("inference_mode", mode)

        def batch_limit(self, limit: int):
            return self._set("batch_limit", limit)

        def queue_limit(self, limit: int):
            return self._set("queue_limit", limit)

        def workers(self, workers: int):
            return self._set("workers", workers)

        def build(self) -> ParallelInference:
            return ParallelInference(self._model, **self._kwargs)
