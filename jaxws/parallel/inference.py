"""ParallelInference: thread-safe inference, concurrent requests merged into bucketed batches.

Callers on any thread submit inputs; named daemon workers (one per device, each with its
own parameter replica) merge pending requests of one shape up to ``batch_limit`` examples,
pad them to a power-of-two bucket, run the model, and hand each caller its rows.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import itertools
import threading
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxws.arrays import allow_reads
from jaxws.data.feed import validate
from jaxws.errors import ConfigurationError, WorkspaceError
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


class _Request(NamedTuple):
    x: Any  # an array, or a tuple of them (a ComputationGraph's inputs)
    mask: Any
    future: concurrent.futures.Future
    shape: tuple  # what must agree to share a batch: per-example shapes and dtypes
    rows: int


def _concatenate(parts: list) -> Any:
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


class _Serving(NamedTuple):
    """What the workers run: swapped whole by ``update_model``."""

    model: Model
    infer: Any
    replicas: list  # (params, state) per worker, on its device


class ParallelInference:
    """DL4J's ParallelInference: ``output(x)`` from any number of threads.

    Each worker holds its own copy of the model's parameters on its device (the model's
    own buffers are never shared, so training the model meanwhile is safe);
    :meth:`update_model` swaps in new parameters atomically while requests keep flowing.
    In BATCHED mode a request is merged only with requests of the same per-example shape
    and dtype, so one odd request never fails its neighbours.

    Args:
        model: an initialised MultiLayerNetwork or FunctionalModel.
        inference_mode: BATCHED (default) merges concurrent requests; SEQUENTIAL does not.
        batch_limit: the most examples in one merged batch (a request larger than this
            runs alone, at its own size).
        queue_limit: the most requests waiting; ``output`` blocks while the queue is full.
        workers: worker threads, each with a replica of the parameters on its own device
            (round robin over the local devices).

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
        self.id = f"PARALLEL_INFERENCE_{next(_ids)}"
        self.executions = 0  # model calls made (merged batches)
        self.batch_sizes: collections.Counter = collections.Counter()  # padded size -> calls
        devices = jax.local_devices()
        self._devices = [devices[i % len(devices)] for i in range(workers)]
        self._serving = self._replicate(model)
        lock = threading.Lock()
        self._has_work = threading.Condition(lock)
        self._has_room = threading.Condition(lock)
        self._pending: collections.deque[_Request] = collections.deque()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, args=(i,), name=f"jaxws-inference-{self.id}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def model(self) -> Model:
        """The model whose parameters the workers serve."""
        return self._serving.model

    def _replicate(self, model: Model) -> _Serving:
        if not isinstance(model, Model):
            raise TypeError(f"ParallelInference(model={model!r}): expected a jaxws.nn Model (MultiLayerNetwork, FunctionalModel).")
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
        """
        op = "ParallelInference.output"
        model = self.model
        batch = model._request(x, mask)
        ds = validate(batch, op, lambda d, shapes=True: model._check_batch(d, op, shapes), "x",
                      seen=model._seen_batches.setdefault(op, set()))  # shapes judged once per signature
        x, mask = jax.tree.map(np.asarray, model._inputs_of(ds))  # on the host: the caller's arrays are only read
        leaves, treedef = jax.tree.flatten((x, mask))
        shape = (treedef, *[(a.shape[1:], a.dtype) for a in leaves])
        request = _Request(x, mask, concurrent.futures.Future(), shape, len(leaves[0]))
        with self._has_room:
            while len(self._pending) >= self.queue_limit and not self._closed:
                self._has_room.wait()
            if self._closed:
                raise self._closed_error()
            self._pending.append(request)
            self._has_work.notify()
        return request.future.result()

    def _closed_error(self) -> WorkspaceError:
        return WorkspaceError(f"[{self.id}] is closed; create a new ParallelInference.")

    def close(self) -> None:
        """Stops and joins the workers; waiting requests fail at once; idempotent.

        Requests a worker has already taken complete; every other caller, waiting or new,
        gets a WorkspaceError saying the instance is closed.
        """
        with self._has_work:
            if self._closed:
                return
            self._closed = True
            abandoned = list(self._pending)
            self._pending.clear()
            self._has_work.notify_all()
            self._has_room.notify_all()
        for request in abandoned:
            request.future.set_exception(WorkspaceError(f"[{self.id}] was closed before this request ran."))
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def __enter__(self) -> ParallelInference:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- workers ---------------------------------------------------------------------------

    def _take(self) -> list[_Request] | None:
        """The oldest request and, in BATCHED mode, later ones of its shape up to batch_limit rows."""
        with self._has_work:
            while not self._pending and not self._closed:
                self._has_work.wait()
            if not self._pending:
                return None  # closed
            first = self._pending.popleft()
            taken, rows = [first], first.rows
            if self.inference_mode is InferenceMode.BATCHED and rows < self.batch_limit:
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

    def _serve(self, index: int) -> None:
        manager = get_workspace_manager()  # this thread's: outputs belong to no workspace
        while (taken := self._take()) is not None:
            try:
                serving = self._serving  # one version for the whole batch
                params, state = serving.replicas[index]
                n = sum(t.rows for t in taken)
                x, mask = (taken[0].x, taken[0].mask) if len(taken) == 1 else _concatenate([(t.x, t.mask) for t in taken])
                size = _bucket(n, self.batch_limit) if n <= self.batch_limit else n
                if size > n:  # pad to the bucket: no new program for this size
                    x, mask = jax.tree.map(lambda a: np.concatenate([a, np.zeros((size - n, *a.shape[1:]), a.dtype)]), (x, mask))
                # host inputs go in as they are: the call moves them to the replica's device;
                # the signature stands for the inputs' shapes and the replica: no flatten of the
                # parameters per batch (the replicas are ours, the inputs host arrays)
                signature = (index, size, taken[0].shape)
                with manager.scope_out_of_workspaces():
                    out = serving.infer._call_planned(signature, (params, state, x, mask, None))
                with allow_reads():  # the callers asked for these rows
                    out = jax.tree.map(np.asarray, out)
                with self._has_work:  # counted under the lock: several workers finish at once
                    self.executions += 1
                    self.batch_sizes[size] += 1
                start = 0
                for request in taken:
                    request.future.set_result(jax.tree.map(lambda o: o[start:start + request.rows], out))
                    start += request.rows
            except BaseException as e:  # noqa: BLE001 - the callers get it, with its traceback
                for request in taken:
                    if not request.future.done():
                        request.future.set_exception(e)

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
