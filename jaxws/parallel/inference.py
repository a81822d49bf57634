"""ParallelInference: thread-safe inference, concurrent requests merged into bucketed batches.

Callers on any thread submit inputs; named daemon workers (one per device) merge pending
requests up to ``batch_limit`` examples, pad them to a power-of-two bucket (so a handful
of programs serve every size), run the model, and hand each caller its rows.
"""

from __future__ import annotations

import concurrent.futures
import enum
import itertools
import queue
import threading
from typing import Any

import jax
import numpy as np

from jaxws.data.dataset import DataSet
from jaxws.errors import ConfigurationError, WorkspaceError
from jaxws.manager import get_workspace_manager
from jaxws.nn.model import Model

__all__ = ["ParallelInference", "InferenceMode"]

_ids = itertools.count()
_STOP = object()


class InferenceMode(enum.Enum):
    """How requests reach the model."""

    SEQUENTIAL = "sequential"  # one request per call of the model
    BATCHED = "batched"  # pending requests merged, up to batch_limit examples


def _bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, capped at ``limit``: few shapes, few compiles."""
    return min(limit, 1 << max(0, n - 1).bit_length())


class ParallelInference:
    """DL4J's ParallelInference: ``output(x)`` from any number of threads.

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
        if not isinstance(model, Model):
            raise TypeError(f"ParallelInference(model={model!r}): expected a jaxws.nn Model.")
        carry = model._require_init()
        if not isinstance(inference_mode, InferenceMode):
            raise ConfigurationError(f"ParallelInference(inference_mode={inference_mode!r}): expected InferenceMode.BATCHED or SEQUENTIAL.")
        for name, value in (("batch_limit", batch_limit), ("queue_limit", queue_limit), ("workers", workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"ParallelInference({name}={value!r}): expected an int >= 1.")
        self.model = model
        self.inference_mode = inference_mode
        self.batch_limit = batch_limit
        self.queue_limit = queue_limit
        self.id = f"PARALLEL_INFERENCE_{next(_ids)}"
        self.executions = 0  # model calls made (merged batches)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_limit)
        self._closed = False
        self._lock = threading.Lock()
        devices = jax.local_devices()
        self._threads = []
        for i in range(workers):
            device = devices[i % len(devices)]
            params, state = jax.device_put((carry.params, carry.state), device)  # this worker's replica
            thread = threading.Thread(target=self._serve, args=(params, state, device),
                                      name=f"jaxws-inference-{self.id}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # -- callers ---------------------------------------------------------------------------

    def output(self, x: Any, mask: Any = None) -> np.ndarray:
        """The model's output for ``x`` (``[n, ...]``), as numpy; safe from any thread.

        Raises:
            InvalidBatchError: ``x`` does not fit the model (raised here, in the caller).
            WorkspaceError: the instance is closed.
        """
        if self._closed:
            raise WorkspaceError(f"[{self.id}] is closed; create a new ParallelInference.")
        x = np.asarray(x)
        self.model._check_batch(DataSet(x, None, mask), "ParallelInference.output")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((x, None if mask is None else np.asarray(mask), future))
        return future.result()

    def close(self) -> None:
        """Stops and joins the workers; pending requests fail; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            thread.join()
        while True:  # requests that arrived after the stop signals
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[2].set_exception(WorkspaceError(f"[{self.id}] was closed before this request ran."))

    def __enter__(self) -> ParallelInference:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- workers ---------------------------------------------------------------------------

    def _take(self, leftover: Any) -> tuple[list | None, Any]:
        """A request, and in BATCHED mode whatever else waits, up to batch_limit rows.

        Returns ``(requests, leftover)``: a request that did not fit starts the next round
        (kept here, never put back: the queue may be full).
        """
        first = self._queue.get() if leftover is None else leftover
        if first is _STOP:
            return None, None
        taken, rows = [first], len(first[0])
        while self.inference_mode is InferenceMode.BATCHED and rows < self.batch_limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP or rows + len(item[0]) > self.batch_limit or (item[1] is None) != (first[1] is None):
                return taken, item
            taken.append(item)
            rows += len(item[0])
        return taken, None

    def _serve(self, params: Any, state: Any, device: jax.Device) -> None:
        infer = self.model._inference_fn(False)
        manager = get_workspace_manager()  # this thread's: outputs belong to no workspace
        leftover = None
        while True:
            taken, leftover = self._take(leftover)
            if taken is None:
                return
            try:
                x = np.concatenate([t[0] for t in taken])
                mask = None if taken[0][1] is None else np.concatenate([t[1] for t in taken])
                n = len(x)
                size = _bucket(n, self.batch_limit) if n <= self.batch_limit else n
                if size > n:  # pad to the bucket: no new program for this size
                    x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
                    if mask is not None:
                        mask = np.concatenate([mask, np.zeros((size - n, *mask.shape[1:]), mask.dtype)])
                with manager.scope_out_of_workspaces():
                    out = np.asarray(infer(params, state, jax.device_put(x, device),
                                           None if mask is None else jax.device_put(mask, device)))
                self.executions += 1
                start = 0
                for xi, _, future in taken:
                    future.set_result(out[start:start + len(xi)])
                    start += len(xi)
            except BaseException as e:  # noqa: BLE001 - the callers get it, with its traceback
                for _, _, future in taken:
                    if not future.done():
                        future.set_exception(e)

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
