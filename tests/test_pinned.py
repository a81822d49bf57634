"""Page-locked host slots: each layout registered once and reused, values exact, the
caller's arrays untouched, everything unregistered on close, and a clean fallback where
there is no CUDA (this machine: the real cudaHostRegister runs in benchmarks/pinned.py).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxws.data import ArrayDataSetIterator, AsyncDataSetIterator, from_iterable
from jaxws.data.pinned import PinnedStage, cuda_runtime
from jaxws.errors import ConfigurationError
from jaxws.nn import Dense, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer


@pytest.fixture(autouse=True)
def device_memory(monkeypatch):
    """On a CPU, device_put of an aligned numpy array aliases it; a GPU copies it into its own
    memory. The stand-in copies first, as the GPU does (the real transfer: tests at the end)."""
    if PinnedStage.for_device() is None:
        monkeypatch.setattr(PinnedStage, "_transfer", staticmethod(
            lambda staged, device: jax.block_until_ready(jax.device_put([np.array(s) for s in staged], device))))


class FakeRuntime:
    """Records what a CUDA runtime would be asked (device_put copies on CPU, so slots are safe)."""

    def __init__(self, fail=0):
        self.fail = fail
        self.registered: dict = {}
        self.calls = 0

    def cudaHostRegister(self, ptr, size, flags):
        self.calls += 1
        if self.fail:
            return self.fail
        assert ptr % 4096 == 0 and size > 0 and flags == 1
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):
        del self.registered[ptr]
        return 0

    def cudaGetErrorString(self, error):
        return b"out of memory"


def batches(n=6, rows=4, d=3):
    labels = np.arange(rows, dtype=np.int32)  # one label array shared by every batch
    r = np.random.default_rng(0)
    return [(r.normal(size=(rows, d)).astype(np.float32), labels) for _ in range(n)], labels


def test_each_layout_is_registered_once_and_the_values_are_exact():
    runtime = FakeRuntime()
    stage = PinnedStage(runtime=runtime, min_bytes=0)
    data, labels = batches()
    copies = [(x.copy(), y.copy()) for x, y in data]
    placed = [stage.put([x, y]) for x, y in data]
    assert runtime.calls == 2 and len(runtime.registered) == 2  # features and labels, once each
    assert stage.pinned_bytes == data[0][0].nbytes + labels.nbytes
    for (x, y), (px, py) in zip(copies, placed):
        np.testing.assert_array_equal(np.asarray(px), x)  # each batch kept its own values
        np.testing.assert_array_equal(np.asarray(py), y)
    for (x, y), (cx, cy) in zip(data, copies):  # the caller's arrays: read, never written
        np.testing.assert_array_equal(x, cx)
        np.testing.assert_array_equal(y, cy)
    stage.close()
    assert runtime.registered == {} and stage.pinned_bytes == 0
    device = jnp.ones(3)
    x, same = stage.put([data[0][0], device])  # closed: pageable, and device arrays pass as they are
    assert runtime.calls == 2 and not device.is_deleted()
    np.testing.assert_array_equal(np.asarray(x), data[0][0])


def test_the_least_recently_used_layout_is_unregistered_beyond_max_slots():
    runtime = FakeRuntime()
    stage = PinnedStage(runtime=runtime, max_slots=2, min_bytes=0)
    for rows in (1, 2, 3, 2, 4):
        stage.put([np.full((rows, 2), rows, np.float32)])
    assert sorted(runtime.registered.values()) == [16, 32]  # rows 2 (used again) and 4
    assert runtime.calls == 4
    stage.min_bytes = 64
    stage.put([np.ones((1, 2), np.float32)])  # 8 bytes: put as it is, nothing registered
    assert runtime.calls == 4
    stage.close()
    assert runtime.registered == {}


def test_a_failed_registration_falls_back_to_pageable_transfers(caplog):
    runtime = FakeRuntime(fail=2)
    stage = PinnedStage(runtime=runtime, min_bytes=0)
    data, _ = batches(n=3)
    with caplog.at_level(logging.INFO, logger="jaxws"):
        placed = [stage.put([x]) for x, _ in data]
    assert runtime.calls == 1 and "cudaHostRegister failed (b'out of memory')" in caplog.text
    for (x, _), (px,) in zip(data, placed):
        np.testing.assert_array_equal(np.asarray(px), x)


def test_no_stage_without_cuda_and_pinned_true_says_so():
    assert PinnedStage.for_device(jax.devices()[0]) is None  # a CPU
    data, _ = batches()
    with AsyncDataSetIterator(from_iterable(data)) as it:
        assert not it.pinned and len(list(it)) == len(data)
    with pytest.raises(ConfigurationError, match=r"pinned=True\): page-locked slots need one CUDA GPU.*'cpu'.*pinned=None"):
        AsyncDataSetIterator(from_iterable(data), pinned=True)
    with pytest.raises(ConfigurationError, match=r"sharding= lays batches out"):
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        AsyncDataSetIterator(from_iterable(data), sharding=sharding, pinned=True)
    with pytest.raises(ConfigurationError, match=r"pinned='yes'"):
        AsyncDataSetIterator(from_iterable(data), pinned="yes")
    assert cuda_runtime() is None or hasattr(cuda_runtime(), "cudaHostRegister")


@pytest.mark.parametrize("kind", ["numpy", "device", "array_iterator"])
def test_the_ring_stages_through_the_slots_and_keeps_the_callers_arrays(monkeypatch, kind):
    runtime = FakeRuntime()
    monkeypatch.setattr(PinnedStage, "for_device", classmethod(lambda cls, device=None: cls(device, runtime, min_bytes=0)))
    data, labels = batches(n=5)
    if kind == "device":
        data = [(jnp.asarray(x), jnp.asarray(y)) for x, y in data]
        source = from_iterable(data)
    elif kind == "numpy":
        source = from_iterable(data)
    else:
        source = ArrayDataSetIterator(np.concatenate([x for x, _ in data]), np.tile(labels, 5), batch_size=4)
    expected = [(np.asarray(x), np.asarray(y)) for x, y in data]
    it = AsyncDataSetIterator(source, queue_size=2, device=jax.devices()[0])
    assert it.pinned
    for _ in range(2):  # two epochs through the same slots
        got = [(np.asarray(b.features), np.asarray(b.labels)) for b in it]
        assert len(got) == 5
        for (x, y), (gx, gy) in zip(expected, got):
            np.testing.assert_array_equal(gx, x)
            np.testing.assert_array_equal(gy, y)
        it.reset()
    assert runtime.calls == (0 if kind == "device" else 2)
    it.close()
    assert runtime.registered == {}
    for x, y in data:  # the caller's arrays survive: neither deleted nor written
        assert not isinstance(x, jax.Array) or not (x.is_deleted() or y.is_deleted())
    np.testing.assert_array_equal(np.asarray(data[0][1]), labels)


def test_pinned_batches_train_as_pageable_ones(monkeypatch):
    """fit over an async ring with slots gives the numbers of the same ring without them."""
    r = np.random.default_rng(0)
    x, y = r.normal(size=(256, 5)).astype(np.float32), r.integers(0, 3, 256).astype(np.int32)
    nets = []
    for pinned in (False, True):
        runtime = FakeRuntime()
        monkeypatch.setattr(PinnedStage, "for_device", classmethod(lambda cls, device=None: cls(device, runtime, min_bytes=0)))
        conf = NeuralNetConfiguration(layers=[Dense(8, activation="tanh"), OutputLayer(3)], input_shape=(5,),
                                      updater=optax.sgd(0.1), seed=0)
        net = MultiLayerNetwork(conf).init()
        it = AsyncDataSetIterator(ArrayDataSetIterator(x, y, batch_size=32), pinned=pinned)
        net.fit(it, epochs=2)
        it.close()
        assert runtime.calls == (2 if pinned else 0) and runtime.registered == {}
        nets.append(net)
    for a, b in zip(jax.tree.leaves(nets[0].params), jax.tree.leaves(nets[1].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(PinnedStage.for_device() is None, reason="needs a CUDA GPU and its runtime library")
def test_on_a_cuda_gpu_the_real_slots_carry_exact_values():
    r = np.random.default_rng(0)
    labels = np.arange(256, dtype=np.int32)
    data = [(r.normal(size=(256, 1024)).astype(np.float32), labels) for _ in range(12)]
    with AsyncDataSetIterator(from_iterable(data), queue_size=2, pinned=True) as it:
        assert it.pinned
        for (x, y), batch in zip(data, it):
            np.testing.assert_array_equal(np.asarray(batch.features), x)
            np.testing.assert_array_equal(np.asarray(batch.labels), y)
        stage = it._prepare.stage
        assert stage.pinned_bytes == data[0][0].nbytes + labels.nbytes
    assert stage.pinned_bytes == 0
