"""ParallelWrapper: data-parallel workers with per-device replicas and periodic averaging.

Each worker holds a replica of params, updater and layer state on its own device,
stacked on a ``workers`` mesh axis and donated every program. One program runs k rounds
(a ``lax.scan`` inside ``jax.shard_map``) and ends with one fused all-reduce.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxws.data.prefetch import AsyncDataSetIterator
from jaxws.errors import AsyncIteratorError, ConfigurationError
from jaxws.interrupts import guarded
from jaxws.manager import get_workspace_manager
from jaxws.nn.listeners import StepLoss
from jaxws.nn.model import TRAINING_CONF, TRAINING_WORKSPACE, LeftAtTheStepsTaken, Model, TrainState
from jaxws.nn.modes import WorkspaceMode
from jaxws.parallel.distributed import worker_devices
from jaxws.parallel.groups import Group, deal, stack
from jaxws.plan import several_cpu_devices, wait_if_across_cpus
from jaxws.step import jit

__all__ = ["ParallelWrapper", "TrainingMode"]

AXIS = "workers"


class TrainingMode(enum.Enum):
    """How workers combine their progress."""

    AVERAGING = "averaging"  # local steps, parameters averaged every k rounds
    SHARED_GRADIENTS = "shared_gradients"  # gradients averaged every step (synchronous)


def _averaged(leaf: jax.Array) -> bool:
    return not jnp.issubdtype(leaf.dtype, jnp.unsignedinteger)  # PRNG key data is not a number


def _mean_over_workers(leaves: list, weight, extra: list):
    """One all-reduce: the weighted mean of ``leaves`` and the plain sums of ``extra``."""
    pieces = [jnp.ravel(x).astype(jnp.float32) * weight for x in leaves]
    vec = jnp.concatenate(pieces + [jnp.stack([*extra, weight])])
    total = jax.lax.psum(vec, AXIS)
    count = jnp.maximum(total[-1], 1.0)
    out, start = [], 0
    for x in leaves:
        chunk = total[start:start + x.size].reshape(x.shape) / count
        start += x.size
        out.append(jnp.round(chunk).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.integer) else chunk.astype(x.dtype))
    return out, total[start:-1]


_first_rows = jax.jit(lambda tree: jax.tree.map(lambda a: a[0], tree))  # one program for every leaf


class ParallelWrapper:
    """DL4J's ParallelWrapper over JAX devices (and processes).

    Batches are dealt round-robin, batch j to worker j mod workers; a round is one batch
    per worker. Every ``averaging_frequency`` rounds the workers' parameters (and updater
    state with ``average_updaters``) are averaged; the wrapped model ends with the
    consensus. A last round with fewer batches than workers averages over the workers
    that had one. Between calls the wrapper keeps the replicas, as DL4J's workers do: a
    ``fit`` on a model nothing changed since the last one starts from them; ``close()``
    (or leaving a ``with`` block) frees them.

    Args:
        model: a MultiLayerNetwork or FunctionalModel, initialised.
        workers: devices to use (default: all, across processes).
        prefetch_buffer: groups of rounds prefetched as sharded global arrays (0: none).
        averaging_frequency: rounds between averagings; they run as one program.
        average_updaters: average the updater state too.
        report_score_after_averaging: print the averaged score after each averaging (and
            keep it in ``scores``), as DL4J reports it; ``printer`` says where it goes.
        workspace_mode: the workers' training mode (overrides the model's).
        training_mode: AVERAGING or SHARED_GRADIENTS.
        backend: ``"sharding"`` (jax.shard_map) or ``"pmap"`` (legacy).
        mesh: a Mesh with a ``"workers"`` axis (default: one over the workers' devices).
        printer: where reported scores go (default ``print``).

    Example:
        >>> import numpy as np, optax
        >>> from jaxws.nn import MultiLayerNetwork, NeuralNetConfiguration, OutputLayer
        >>> from jaxws.parallel import ParallelWrapper
        >>> net = MultiLayerNetwork(NeuralNetConfiguration(layers=[OutputLayer(2)], input_shape=(3,),
        ...                                                updater=optax.sgd(0.1))).init()
        >>> wrapper = (ParallelWrapper.Builder(net).prefetch_buffer(2).workers(2)
        ...            .averaging_frequency(2).report_score_after_averaging(False).build())
        >>> batches = [(np.ones((4, 3), np.float32), np.zeros(4, np.int32))] * 8
        >>> wrapper.fit(batches).rounds
        4
    """

    def __init__(
        self,
        model: Model,
        *,
        workers: int | None = None,
        prefetch_buffer: int = 8,
        averaging_frequency: int = 1,
        average_updaters: bool = True,
        report_score_after_averaging: bool = False,
        workspace_mode: WorkspaceMode = WorkspaceMode.ENABLED,
        training_mode: TrainingMode = TrainingMode.AVERAGING,
        backend: str = "sharding",
        mesh: Mesh | None = None,
        printer: Callable[[str], None] = print,
    ):
        if not isinstance(model, Model):
            raise ConfigurationError(f"ParallelWrapper(model={model!r}): expected a jaxws.nn Model (MultiLayerNetwork, FunctionalModel).")
        model._require_init()
        devices = list(mesh.devices.flat) if mesh is not None else worker_devices()
        if mesh is not None and AXIS not in mesh.axis_names:
            raise ConfigurationError(f"ParallelWrapper(mesh=...): the mesh needs a {AXIS!r} axis; it has {mesh.axis_names}.")
        workers = len(devices) if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= len(devices):
            raise ConfigurationError(
                f"ParallelWrapper(workers={workers!r}): expected 1..{len(devices)} (the devices "
                f"{'of the mesh' if mesh is not None else 'of all processes'})."
            )
        for name, value, low in (("averaging_frequency", averaging_frequency, 1), ("prefetch_buffer", prefetch_buffer, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"ParallelWrapper({name}={value!r}): expected an int >= {low}.")
        if backend not in ("sharding", "pmap"):
            raise ConfigurationError(f"ParallelWrapper(backend={backend!r}): expected 'sharding' (default) or 'pmap'.")
        if not isinstance(training_mode, TrainingMode):
            raise ConfigurationError(f"ParallelWrapper(training_mode={training_mode!r}): expected TrainingMode.AVERAGING or SHARED_GRADIENTS.")
        if not isinstance(workspace_mode, WorkspaceMode):
            raise ConfigurationError(f"ParallelWrapper(workspace_mode={workspace_mode!r}): expected a WorkspaceMode.")
        if backend == "pmap" and jax.process_count() > 1:
            raise ConfigurationError("ParallelWrapper(backend='pmap') runs in one process; use backend='sharding' across processes.")
        self.model = model
        self.devices = devices[:workers]
        self.workers = workers
        self.prefetch_buffer = prefetch_buffer
        self.averaging_frequency = averaging_frequency
        self.average_updaters = average_updaters
        self.report_score_after_averaging = report_score_after_averaging
        self.printer = printer
        self.workspace_mode = workspace_mode
        self.training_mode = training_mode
        self.backend = backend
        self.mesh = Mesh(np.array(self.devices), (AXIS,)) if mesh is None or workers != len(devices) else mesh
        self.sharding = NamedSharding(self.mesh, P(AXIS))
        self.local_workers = sum(d.process_index == jax.process_index() for d in self.devices)
        self.rounds = 0
        self.scores: list[float] = []  # averaged score of each program, when reported
        self._program = None
        self._broadcast = None  # the program laying the model's carry out as replicas
        self._kept: tuple[TrainState, TrainState] | None = None  # (replicas, the consensus the model got)

    # -- the per-worker program ------------------------------------------------------------

    def _worker(self, carry: TrainState, data, active):
        """k rounds of one worker, then the averaging: ``(carry, score)``."""
        shared = self.training_mode is TrainingMode.SHARED_GRADIENTS

        def body(c, xs):
            ds, a = xs
            if shared:
                def reduce_grads(grads):
                    leaves, tree = jax.tree.flatten(grads)
                    return jax.tree.unflatten(tree, _mean_over_workers(leaves, a, [])[0])

                new, loss = self.model.train_step(self.workspace_mode, reduce_grads)(c, ds)
            else:
                new, loss = self.model.train_step(self.workspace_mode)(c, ds)
                new = jax.tree.map(lambda n, o: jnp.where(a > 0, n, o), new, c)
            return new, loss * a

        carry, losses = jax.lax.scan(body, carry, (data, active))
        parts = [carry.params, carry.state] + ([carry.opt_state] if self.average_updaters else [])
        if shared:
            parts = []  # replicas are identical already
        flat = [jax.tree.flatten(p) for p in parts]
        chosen = [x for leaves, _ in flat for x in leaves if _averaged(x)]
        averaged, (score_sum, steps) = _mean_over_workers(chosen, active[-1], [losses.sum(), active.sum()])
        it = iter(averaged)
        rebuilt = [jax.tree.unflatten(tree, [next(it) if _averaged(x) else x for x in leaves]) for leaves, tree in flat]
        if not shared:
            carry = TrainState(rebuilt[0], rebuilt[1], rebuilt[2] if self.average_updaters else carry.opt_state)
        return carry, score_sum / jnp.maximum(steps, 1.0)

    def _compiled(self):
        if self._program is not None:
            return self._program
        donate = (0,) if self.workspace_mode.donates else ()
        if self.backend == "pmap":
            program = jax.pmap(self._worker, axis_name=AXIS, devices=self.devices, donate_argnums=donate)
            watch = several_cpu_devices()  # as a jaxws.jit plan knows it

            def run(carry, group):
                if watch:
                    wait_if_across_cpus(jax.tree.leaves(carry)[0])
                carry, score = program(carry, group.data, group.active)
                return carry, score[0]

            self._program = run
        else:
            def block(carry, data, active):
                squeeze = lambda t: jax.tree.map(lambda a: a[0], t)  # noqa: E731
                carry, score = self._worker(squeeze(carry), squeeze(data), squeeze(active))
                return jax.tree.map(lambda a: a[None], carry), score

            mapped = jax.shard_map(block, mesh=self.mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS)), out_specs=(P(AXIS), P()))

            def rounds(carry, group: Group):
                return mapped(carry, group.data, group.active)

            rounds.__name__ = "ParallelWrapper.rounds"
            self._program = jit(rounds, donate_argnums=donate)
        return self._program

    # -- replicas --------------------------------------------------------------------------

    def _replicate(self, carry: TrainState) -> TrainState:
        """One replica per worker, stacked on the workers axis (works across processes)."""
        if jax.process_count() == 1:  # device to device, one program: no host round-trip
            if self._broadcast is None:
                workers = self.workers
                self._broadcast = jax.jit(
                    lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (workers, *a.shape)), tree),
                    in_shardings=NamedSharding(self.mesh, P()), out_shardings=self.sharding)
            return self._broadcast(carry)

        def stacked(a):
            shape = (self.workers, *a.shape)
            host = np.asarray(a)
            return jax.make_array_from_callback(shape, self.sharding, lambda idx: np.broadcast_to(host, shape)[idx])

        return jax.tree.map(stacked, carry)

    def _replicas_for(self, carry: TrainState) -> TrainState:
        """The replicas a fit starts from: those the last fit ended with, where the model
        still holds the consensus taken from them (saves laying the carry out again, a
        copy per leaf and device); else ``carry`` laid out anew."""
        kept = self._kept
        if kept is not None and kept[1] is carry and not any(a.is_deleted() for a in jax.tree.leaves(kept[0])):
            self._kept = None  # donated from here on
            return kept[0]
        self.close()  # the model changed since: they are stale
        return self._replicate(carry)

    def _keep(self, stacked: TrainState, consensus: TrainState) -> None:
        """Keeps ``stacked`` for the next fit where every replica equals ``consensus``: the
        last averaging took in all that differs between workers (the updater state too,
        or, sharing gradients, the replicas never differ but in layer state)."""
        if self.training_mode is TrainingMode.SHARED_GRADIENTS:
            agree = not any(_averaged(a) for a in jax.tree.leaves(consensus.state))
        else:
            agree = self.average_updaters
        self._kept = (stacked, consensus) if agree else None

    def close(self) -> None:
        """Releases the replicas kept between fit calls (a model's worth of memory on each
        worker's device); the next ``fit`` lays the model out again. Idempotent.

        Example:
            >>> import numpy as np, optax
            >>> from jaxws.nn import MultiLayerNetwork, NeuralNetConfiguration, OutputLayer
            >>> net = MultiLayerNetwork(NeuralNetConfiguration(layers=[OutputLayer(2)], input_shape=(3,),
            ...                                                updater=optax.sgd(0.1))).init()
            >>> batches = [(np.ones((4, 3), np.float32), np.zeros(4, np.int32))] * 4
            >>> with ParallelWrapper(net, workers=2) as wrapper:  # the second fit starts from the replicas
            ...     wrapper.fit(batches).fit(batches).rounds
            4
        """
        kept, self._kept = self._kept, None
        if kept is not None:
            for a in jax.tree.leaves(kept[0]):
                a.delete()  # the wrapper's own buffers

    def __enter__(self) -> ParallelWrapper:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _consensus(stacked: TrainState) -> TrainState:
        """Replica 0 of this process (all replicas agree after an averaging), in fresh buffers."""
        return _first_rows(jax.tree.map(lambda a: a.addressable_data(0), stacked))

    # -- fit -------------------------------------------------------------------------------

    def _groups(self, feed: Any):
        """Device groups of k rounds from a pass of checked batches; prefetched if asked;
        with the count of examples in each group (a deque filled as they are stacked).

        A source that is itself asynchronous (an AsyncDataSetIterator) is read on this
        thread, which owns it, and so are batches in memory that make one group: there is
        no program to overlap their stacking with, and a thread would only add its start.
        """
        def on_host(ds):  # device batches are read now (a ring reuses its slots)
            if any(isinstance(x, jax.Array) for x in jax.tree.leaves(ds)):
                ds = jax.tree.map(np.asarray, ds)
                self.model._check_batch(ds, "ParallelWrapper.fit", shapes=False)  # their labels' values
            return ds

        def counted(slots):  # the examples of each group, in order, for the model's resume point
            examples.append(sum(ds.num_examples for row in slots for ds in row if ds is not None))
            return stack(slots)

        examples = collections.deque()
        dealt = deal(map(on_host, feed), self.local_workers, self.averaging_frequency)
        one_group = (feed.in_memory or math.inf) <= self.local_workers * self.averaging_frequency
        if self.prefetch_buffer and getattr(feed.source, "async_supported", True) and not one_group:
            sharding = None if self.backend == "pmap" else self.sharding
            return AsyncDataSetIterator(dealt, self.prefetch_buffer, sharding=sharding, collate=counted), examples
        return (jax.tree.map(lambda a: self._place(a), counted(slots)) for slots in dealt), examples

    def _place(self, a: np.ndarray):
        if self.backend == "pmap":
            return a
        return jax.make_array_from_process_local_data(self.sharding, np.asarray(a))

    def fit(self, data: Any, epochs: int = 1) -> ParallelWrapper:
        """Trains the wrapped model data-parallel on ``data`` (an iterable of batches).

        The model keeps its parameters until the end, then takes the consensus of the last
        averaging; a KeyboardInterrupt or an error on the way leaves it the consensus of
        the last completed program, with ``iteration`` counting exactly those rounds, and an
        ArrayDataSetIterator at the first batch those rounds did not take (the position a
        CheckpointListener given ``iterator=`` records too). The batches given are read,
        never deleted.

        Raises:
            InvalidBatchError: a batch does not fit the model; the model keeps the last
                consensus parameters.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigurationError(f"ParallelWrapper.fit(epochs={epochs!r}): expected an int >= 1.")
        model = self.model
        op = "ParallelWrapper.fit"
        feed = model._feed(data, op, epochs=epochs, place=False)
        program = self._compiled()
        with model._lock:
            stacked = self._replicas_for(model._require_init())
        manager = get_workspace_manager()
        with LeftAtTheStepsTaken(feed), guarded() as guard:
            try:
                for _ in range(epochs):
                    groups, examples = self._groups(feed)
                    model._position = feed.origin  # where an ArrayDataSetIterator stands before this pass
                    try:
                        for group in groups:
                            cycle = (manager.get_workspace_for_current_thread(TRAINING_CONF, TRAINING_WORKSPACE)
                                     if self.workspace_mode.donates else contextlib.nullcontext())  # NONE: no cycles
                            with guard, cycle:
                                stacked, score = program(stacked, group)  # over CPU devices: once the last is done
                                rounds = group.active.shape[1]
                                self.rounds += rounds
                                model.iteration += rounds
                                taken = examples.popleft()
                                if model._position is not None:  # the resume point a checkpoint records
                                    model._position["position"] += taken
                                if model.listeners:  # they see (and checkpoint) the averaged model
                                    with model._lock:
                                        model._carry = self._consensus(stacked)
                                with guard.released():
                                    self._report(score)
                    except AsyncIteratorError as e:
                        feed.raise_from_ring(e)
                    finally:
                        if isinstance(groups, AsyncDataSetIterator):
                            groups.close()
                    model.epoch += 1
            finally:
                with guard, model._lock:
                    if not any(a.is_deleted() for a in jax.tree.leaves(stacked)):
                        model._carry = self._consensus(stacked)  # else it keeps its parameters from before fit
                        self._keep(stacked, model._carry)
        return self

    def _report(self, score: jax.Array) -> None:
        if self.report_score_after_averaging:
            value = float(np.asarray(score))
            self.printer(f"ParallelWrapper: score after averaging (round {self.rounds}): {value:.6f}")
            self.scores.append(value)
        loss = StepLoss(score)
        for listener in self.model.listeners:
            listener.iteration_done(self.model, self.model.iteration, self.model.epoch, loss)

    # -- DL4J's builder --------------------------------------------------------------------

    class Builder:
        """``ParallelWrapper.Builder(model).prefetch_buffer(8).workers(2)....build()``."""

        def __init__(self, model: Model):
            self._model = model
            self._kwargs: dict[str, Any] = {}

        def _set(self, name: str, value: Any) -> ParallelWrapper.Builder:
            self._kwargs[name] = value
            return self

        def prefetch_buffer(self, size: int):
            return self._set("prefetch_buffer", size)

        def workers(self, workers: int):
            return self._set("workers", workers)

        def averaging_frequency(self, frequency: int):
            return self._set("averaging_frequency", frequency)

        def average_updaters(self, flag: bool):
            return self._set("average_updaters", flag)

        def report_score_after_averaging(self, flag: bool):
            return self._set("report_score_after_averaging", flag)

        def workspace_mode(self, mode: WorkspaceMode):
            return self._set("workspace_mode", mode)

        def training_mode(self, mode: TrainingMode):
            return self._set("training_mode", mode)

        def backend(self, backend: str):
            return self._set("backend", backend)

        def mesh(self, mesh: Mesh):
            return self._set("mesh", mesh)

        def build(self) -> ParallelWrapper:
            return ParallelWrapper(self._model, **self._kwargs)
