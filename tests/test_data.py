"""DataSet, base iterators, AsyncDataSetIterator: order, ring bound, faults, threads, padding."""

import dataclasses
import gc
import itertools
import logging
import math
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxws
from jaxws.data import (
    ArrayDataSetIterator,
    AsyncDataSetIterator,
    AsyncMultiDataSetIterator,
    AsyncShieldDataSetIterator,
    DataSet,
    MultiDataSet,
    from_iterable,
)
from jaxws.data.dataset import signature


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("jaxws-prefetch")]


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    yield
    gc.collect()
    deadline = time.monotonic() + 2
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prefetch_threads() == []


def arrays(n=50, d=3, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, d)).astype(np.float32), r.integers(0, 4, n).astype(np.int32)


# -- DataSet and base iterators ----------------------------------------------------------


def test_dataset_is_a_pytree_with_split_merge_detach():
    x, y = arrays(10)
    ds = DataSet(x, y)
    assert jax.tree.structure(ds).num_leaves == 2 and ds.num_examples == 10
    parts = ds.split(4)
    assert [p.num_examples for p in parts] == [4, 4, 2]
    merged = DataSet.merge(parts)
    np.testing.assert_array_equal(merged.features, x)
    assert merged.features_mask is None
    kept = DataSet(jnp.asarray(x), jnp.asarray(y)).detach()
    assert not jaxws.is_attached(kept.features)
    with pytest.raises(dataclasses.FrozenInstanceError):  # its own __init__ keeps it frozen
        ds.labels = None
    swapped = dataclasses.replace(ds, labels_mask=np.ones(10))
    assert swapped.features is x and swapped.labels is y and swapped.labels_mask.shape == (10,)
    multi = MultiDataSet((x,), (y,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        multi.labels = ()
    assert jax.tree.structure(multi).num_leaves == 2
    with pytest.raises(ValueError, match="n=0"):
        ds.split(0)


def test_merge_pads_sequences_and_builds_masks():
    a = DataSet(np.ones((2, 3, 1)), np.ones((2, 3, 2)), labels_mask=np.array([[1, 1, 0], [1, 1, 1]]))
    b = DataSet(np.ones((1, 5, 1)), np.ones((1, 5, 2)))
    m = DataSet.merge([a, b])
    assert m.features.shape == (3, 5, 1) and m.labels.shape == (3, 5, 2)
    np.testing.assert_array_equal(m.features_mask.sum(1), [3, 3, 5])
    np.testing.assert_array_equal(m.labels_mask.sum(1), [2, 3, 5])
    assert (m.features[0, 3:] == 0).all()


def test_multidataset():
    m = MultiDataSet(features=(np.ones((6, 2)), np.ones((6, 4))), labels=(np.zeros(6),))
    assert m.num_examples == 6 and [p.num_examples for p in m.split(4)] == [4, 2]


def test_array_iterator_shuffles_per_epoch_and_drops_last():
    x, y = arrays(10)
    it = ArrayDataSetIterator(x, y, 4, shuffle=True, seed=1, drop_last=True)
    first = np.concatenate([b.labels for b in it])
    assert len(first) == 8 and len(it) == 2
    it.reset()
    second = np.concatenate([b.labels for b in it])
    assert not np.array_equal(first, second)
    with pytest.raises(ValueError, match="batch_size=0"):
        ArrayDataSetIterator(x, y, 0)
    with pytest.raises(ValueError, match="x has 10 examples but y has 3"):
        ArrayDataSetIterator(x, y[:3], 2)


def test_from_iterable_accepts_pairs_dicts_and_datasets():
    x, y = arrays(4)
    items = [(x, y), {"features": x, "labels": y}, DataSet(x, y), {"x": x, "y": y}]
    assert all(isinstance(d, DataSet) for d in from_iterable(items))
    gen = from_iterable((b for b in items))
    assert not gen.reset_supported
    list(gen)
    with pytest.raises(ValueError, match="cannot restart"):
        gen.reset()
    with pytest.raises(ValueError, match="unknown keys"):
        next(from_iterable([{"inputs": x}]))


# -- AsyncDataSetIterator ----------------------------------------------------------------


@pytest.mark.parametrize("queue_size", [0, 1, 2, 8, 64])
def test_async_yields_the_base_order_and_contents(queue_size):
    x, y = arrays(53)
    expected = [(b.features, b.labels) for b in ArrayDataSetIterator(x, y, 5, shuffle=True, seed=3)]
    with AsyncDataSetIterator(ArrayDataSetIterator(x, y, 5, shuffle=True, seed=3), queue_size) as it:
        assert it.queue_size == max(2, queue_size)
        got = [(np.asarray(b.features), np.asarray(b.labels)) for b in it]
    assert len(got) == len(expected) == 11
    for (gx, gy), (ex, ey) in zip(got, expected):
        np.testing.assert_array_equal(gx, ex)
        np.testing.assert_array_equal(gy, ey)


def test_device_batches_pass_through_as_they_are_and_host_ones_are_placed():
    """After the first device batch the threads stop and later batches are read inline: a
    device DataSet of a shape seen before comes back as the same object, one of a new
    shape (the smaller last batch) or with a mask too, and a host batch among them is
    still placed by the ring and invalidated when the next is taken."""
    x, y = arrays(23)
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    batches = [DataSet(xd[i:i + 5], yd[i:i + 5]) for i in range(0, 20, 5)]
    masked = DataSet(xd[:5], yd[:5], labels_mask=jnp.ones(5))
    host = DataSet(x[20:], y[20:])
    last = DataSet(xd[20:], yd[20:])
    stream = [*batches, masked, batches[0], host, last, batches[1]]
    with AsyncDataSetIterator(from_iterable(stream), 2) as it:
        got = list(it)
        assert prefetch_threads() == []  # device batches: read on this thread
        placed = got[6]
        assert isinstance(placed.features, jax.Array) and placed.features.is_deleted()  # the ring's: invalidated by the next
        np.testing.assert_array_equal(got[7].features, x[20:])
        for a, b in zip(got[:6] + got[7:], stream[:6] + stream[7:]):
            assert a is b  # passed through: the same DataSet, nothing copied
        learned = it._prepare.shapes  # the slot is sized from every new shape, passed through or not
        assert {signature(batches[0]), signature(masked), signature(last)} <= learned
    for ds in stream:
        if ds is not host:
            assert not any(a.is_deleted() for a in jax.tree.leaves(ds))
    assert not xd.is_deleted() and not yd.is_deleted()


def live_batches(shape):
    """Batches of ``shape`` alive on the device, counted by buffer: a batched ``device_put``
    briefly holds two Array objects over each buffer it makes (the sharded result and
    the array that wraps it), so counting objects would count those batches twice."""
    return len({a.unsafe_buffer_pointer() for a in jax.live_arrays() if a.shape == shape and not a.is_deleted()})


@pytest.mark.parametrize("pause", [0.005, 0.0], ids=["slow consumer", "fast consumer: grouped transfers"])
@pytest.mark.parametrize("queue_size", [2, 5])
def test_ring_bound_holds_with_a_consumer_that_keeps_everything(queue_size, pause):
    shape = (7, 11)
    base = from_iterable(lambda: (np.full(shape, i, np.float32) for i in range(40)))
    held, peak = [], 0
    with AsyncDataSetIterator(base, queue_size) as it:
        for i, batch in enumerate(it):
            held.append(batch)  # the consumer keeps references to every batch
            time.sleep(pause)
            peak = max(peak, live_batches(shape))
            np.testing.assert_array_equal(batch.features, i)
        assert all(b.features.is_deleted() for b in held[:-1])
    assert 1 < peak <= queue_size + 2


def record_transfers(monkeypatch) -> list:
    """The size of each group the ring transfers in one call."""
    from jaxws.data.placement import Placement

    sizes, place_many = [], Placement.place_many

    def recorded(self, trees):
        sizes.append(len(trees))
        return place_many(self, trees)

    monkeypatch.setattr(Placement, "place_many", recorded)
    return sizes


def test_an_in_memory_source_is_transferred_in_groups_in_order(monkeypatch):
    sizes = record_transfers(monkeypatch)
    labels = np.arange(4, dtype=np.int32)  # one label array shared by every batch
    host = [(np.full((4, 3), i, np.float32), labels) for i in range(200)]
    with AsyncDataSetIterator(from_iterable(host), 8) as it:
        for i, batch in enumerate(it):
            np.testing.assert_array_equal(batch.features, i)
            np.testing.assert_array_equal(batch.labels, labels)
    assert sum(sizes) == 200 and max(sizes) <= 9 and len(sizes) < 200  # some calls carried several
    np.testing.assert_array_equal(labels, np.arange(4))  # the caller's arrays: read, never written
    assert all(x[0][0, 0] == i for i, x in enumerate(host))


def test_host_batches_are_copied_onto_the_device_never_aliased():
    # on the CPU a jitted call's own transfer (what placing uses there: ~10x cheaper than
    # device_put) may alias a numpy array instead of copying it; placing copies first, so a
    # loader that refills its buffer while the steps still read the batch changes nothing
    from jaxws.data.placement import Placement

    wide, ints, flags = np.linspace(0, 1, 12).reshape(3, 4), np.arange(3), np.array([True, False, True])
    for _ in range(150):  # without the copy, about 7 in 100 of these read the refilled buffer (jax 0.10, CPU)
        big = np.zeros(1 << 18, np.float32)  # 1 MiB: the largest leaf placed that way
        (placed, *small), owned = Placement().place((big, wide, ints, flags))
        big[:4] = 7
        assert float(placed[0]) == 0.0 and len(owned) == 4 and all(isinstance(a, jax.Array) for a in small)
    for ours, theirs in zip(small, jax.device_put((wide, ints, flags))):  # the same dtypes and values
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)
    assert big[0] == 7 and wide.dtype == np.float64 and ints[2] == 2  # the caller's arrays: as they were


def test_a_slow_loader_gets_each_batch_transferred_as_soon_as_it_is_ready(monkeypatch):
    sizes = record_transfers(monkeypatch)

    def loader():
        for i in range(12):
            time.sleep(0.03)  # far longer than a transfer call: grouping would only delay
            yield np.full((2, 2), i, np.float32), np.zeros(2, np.int32)

    with AsyncDataSetIterator(from_iterable(loader), 8) as it:
        assert [float(b.features[0, 0]) for b in it] == list(range(12))
    assert sizes == [1] * 12


def test_a_transfer_overlaps_the_loading_of_the_next_batch(monkeypatch):
    """Each transfer waits until the loader has begun the next batch: with one thread doing
    both, that never happens and every wait runs out."""
    from jaxws.data.placement import Placement

    begun = [threading.Event() for _ in range(7)]
    overlapped, place_many = [], Placement.place_many

    def loader():
        for i in range(6):
            begun[i].set()
            yield np.full((2, 2), i, np.float32), np.zeros(2, np.int32)
        begun[6].set()  # the end: nothing more to load

    def waiting(self, trees):
        overlapped.append(begun[len(overlapped) + len(trees)].wait(timeout=1.0))
        return place_many(self, trees)

    monkeypatch.setattr(Placement, "place_many", waiting)
    with AsyncDataSetIterator(from_iterable(loader), 8) as it:  # room for all six: no wait for the consumer
        assert [float(b.features[0, 0]) for b in it] == list(range(6))
    assert overlapped and all(overlapped)


@pytest.mark.parametrize("queue_size", [2, 5])
def test_the_loader_stays_at_most_queue_size_plus_one_batches_ahead(queue_size):
    pulled, ahead = [0], []

    def loader():
        for i in range(30):
            pulled[0] += 1
            yield np.full((2,), i, np.float32)

    with AsyncDataSetIterator(from_iterable(loader), queue_size) as it:
        for taken, batch in enumerate(it, 1):
            time.sleep(0.005)  # a slow consumer: the loader runs as far ahead as it may
            ahead.append(pulled[0] - taken)
            np.testing.assert_array_equal(batch.features, taken - 1)
    assert max(ahead) == queue_size + 1


def test_stale_batch_raises_outdated_with_the_iterator_workspace():
    x, y = arrays(20)
    with AsyncDataSetIterator(ArrayDataSetIterator(x, y, 5), 2) as it:
        first = next(it)
        kept = first.detach()
        second = next(it)
        with pytest.raises(jaxws.OutdatedWorkspacePointerError) as info:
            jaxws.detach(first)
        assert f"workspace [{it.id}]" in str(info.value)
        np.testing.assert_array_equal(second.features, x[5:10])
    np.testing.assert_array_equal(kept.features, x[:5])
    with pytest.raises(jaxws.LeakedWorkspacePointerError):  # closed: the ring is destroyed
        jaxws.detach(second)


def test_detached_batch_survives_a_hundred_more():
    base = from_iterable(lambda: (np.full((3,), i, np.float32) for i in range(101)))
    with AsyncDataSetIterator(base) as it:
        kept = next(it).detach()
        assert sum(1 for _ in it) == 100
    np.testing.assert_array_equal(kept.features, 0.0)


@pytest.mark.parametrize("k", [0, 1, 5])
def test_exception_at_batch_k_surfaces_at_batch_k(k):
    def loader():
        for i in range(10):
            if i == k:
                raise KeyError(f"bad record {i}")
            yield np.ones((2, 2)), np.zeros(2)

    it = AsyncDataSetIterator(from_iterable(loader), 4)
    for _ in range(k):
        next(it)
    with pytest.raises(jaxws.AsyncIteratorError, match=f"batch {k}") as info:
        next(it)
    assert isinstance(info.value.__cause__, KeyError)
    assert "loader" in "".join(__import__("traceback").format_tb(info.value.__cause__.__traceback__))
    assert "reset() it" in str(info.value)
    with pytest.raises(StopIteration):  # stopped, as the message says
        next(it)
    it.reset()  # and reset() starts it again, as the message says
    assert [b.num_examples for b in itertools.islice(it, k)] == [2] * k
    it.close()


def test_a_keyboard_interrupt_in_the_loader_stays_a_keyboard_interrupt():
    def loader():
        yield np.ones((2, 2)), np.zeros(2)
        raise KeyboardInterrupt

    with AsyncDataSetIterator(from_iterable(loader), 2) as it:
        next(it)
        with pytest.raises(KeyboardInterrupt):
            next(it)


def test_a_failing_loader_under_steps_per_execution_is_named_by_batch():
    def loader():
        for i in range(10):
            if i == 7:
                raise OSError("record 7 unreadable")
            yield np.ones((4, 3), np.float32), np.zeros(4, np.int32)

    net = small_net()
    with pytest.raises(jaxws.AsyncIteratorError, match="producing batch 7 ") as info:
        net.fit(from_iterable(loader), steps_per_execution=3, progress=False)
    assert isinstance(info.value.__cause__, OSError)


def test_close_closes_a_generator_source():
    finished = []

    def loader():
        try:
            for _ in range(100):
                yield np.ones((2, 2)), np.zeros(2)
        finally:
            finished.append(True)

    gen = loader()
    it = AsyncDataSetIterator(gen, 2)
    next(it)
    it.close()
    assert finished == [True]
    wrapped = AsyncDataSetIterator(from_iterable(loader()), 2)
    next(wrapped)
    wrapped.close()
    assert finished == [True, True]


def test_reset_mid_stream_restarts():
    x, y = arrays(30)
    with AsyncDataSetIterator(ArrayDataSetIterator(x, y, 4), 3) as it:
        next(it), next(it)
        it.reset()
        got = np.concatenate([np.asarray(b.features) for b in it])
    np.testing.assert_array_equal(got, x)


def test_close_is_idempotent_and_leaves_no_thread():
    it = AsyncDataSetIterator(from_iterable(lambda: (np.ones(2) for _ in range(1000))), 2)
    next(it)
    it.close()
    it.close()
    assert prefetch_threads() == []
    with pytest.raises(jaxws.WorkspaceError, match="closed"):
        next(it)


def test_an_abandoned_iterator_is_collected_and_its_threads_joined():
    it = AsyncDataSetIterator(from_iterable(lambda: (np.ones(2) for _ in range(1000))), 2)
    next(it)
    assert sorted(t.name.rsplit("-", 1)[1] for t in prefetch_threads()) == ["load", "put"]
    del it
    gc.collect()
    assert prefetch_threads() == []



@pytest.mark.parametrize("failing", ["load", "put"])
def test_an_interrupt_while_the_threads_start_leaves_no_thread(failing, monkeypatch):
    start = threading.Thread.start

    def interrupted(self):  # as an interrupt landing in start()'s wait for the thread to run
        start(self)
        if self.name.endswith(failing):
            raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        AsyncDataSetIterator(from_iterable(lambda: (np.ones(2) for _ in range(1000))), 2)
    monkeypatch.undo()
    assert prefetch_threads() == []  # stopped and joined at once: before, the loader waited for room forever


def test_an_interrupt_as_a_batch_is_taken_keeps_the_batch_and_the_ring():
    import _thread

    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    it = AsyncDataSetIterator(ArrayDataSetIterator(x, np.zeros(20, np.int32), 2), queue_size=2)
    taken = [float(next(it).features[0, 0])]
    queue = it._queue

    class InterruptedAsItReturns:  # the threads' queue, interrupted as each get() returns
        def get(self, *args, **kwargs):
            item = queue.get(*args, **kwargs)
            _thread.interrupt_main()
            for _ in range(1000):  # the interrupt arrives here
                pass
            return item

    for _ in range(2):
        it._queue = InterruptedAsItReturns()
        with pytest.raises(KeyboardInterrupt):
            next(it)
        it._queue = queue
        taken.append(float(next(it).features[0, 0]))  # the batch the interrupt arrived with
    taken += [float(b.features[0, 0]) for b in it]
    # before: each interrupt lost its batch and a token (three lost, the ring waited for good)
    assert taken == [float(4 * i) for i in range(10)]
    it.close()

def test_larger_batches_grow_the_slot_without_a_warning(caplog):
    sizes = [4, 4, 16, 4, 64]  # 48-byte batches learn a 96-byte slot (limit 1.0), then grow twice
    base = from_iterable([(np.ones((n, 2), np.float32), np.zeros(n, np.float32)) for n in sizes])
    with caplog.at_level(logging.WARNING, logger="jaxws"):
        with AsyncDataSetIterator(base) as it:
            list(it)
            assert it.reallocations == 2 and it.slot_bytes == 2 * 64 * 12
    assert caplog.records == []  # variable sizes are normal: nothing to warn about


def test_variable_length_series_compile_within_the_bound():
    r = np.random.default_rng(0)
    lengths = [5] + list(r.integers(5, 300, size=60))
    base = from_iterable([(np.ones((2, n, 3), np.float32), np.ones((2, n), np.int32)) for n in lengths])
    total = jaxws.jit(lambda ds: jnp.sum(ds.features_mask, axis=1))
    with AsyncDataSetIterator(base, pad_axis=1) as it:
        for n, ds in zip(lengths, it):
            assert ds.features.shape[1] == ds.labels.shape[1] >= n  # a capacity bucket
            np.testing.assert_array_equal(jaxws.detach(total(ds)), [n, n])
            np.testing.assert_array_equal(ds.labels_mask, ds.features_mask)
        bound = math.ceil(math.log2(max(lengths) / min(lengths))) + 1
        assert 1 < it.num_shapes <= bound and total.compiles == it.num_shapes


def test_ten_thousand_small_batches_keep_live_bytes_flat():
    base = from_iterable(lambda: ((np.ones((4, 4), np.float32), np.ones(4, np.int32)) for _ in range(10_000)))
    samples = []
    with AsyncDataSetIterator(base, 4) as it:
        for i, batch in enumerate(it):
            if i % 1000 == 999:
                samples.append(jaxws.memory.live_bytes())
    assert max(samples) - min(samples) <= 6 * 80, samples


def test_sharded_prefetch_over_eight_devices():
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.NamedSharding(mesh, jax.P("data"))
    x, y = arrays(64)
    with AsyncDataSetIterator(ArrayDataSetIterator(x, y, 16), sharding=sharding) as it:
        batch = next(it)
        assert batch.features.sharding == sharding and batch.labels.sharding == sharding
        assert len(batch.features.addressable_shards) == 8
        assert batch.features.addressable_shards[0].data.shape == (2, 3)
        np.testing.assert_array_equal(batch.features, x[:16])


def test_multi_dataset_iterator():
    m = [MultiDataSet(features=(np.ones((2, 3)), np.zeros((2, 1))), labels=(np.ones(2),)) for _ in range(3)]
    with AsyncMultiDataSetIterator(from_iterable(m)) as it:
        got = list(it)
    assert len(got) == 3 and isinstance(got[0], MultiDataSet)


def test_bad_arguments():
    with pytest.raises(ValueError, match="queue_size=-1"):
        AsyncDataSetIterator([], -1)
    with pytest.raises(ValueError, match="not both"):
        AsyncDataSetIterator([], device=jax.devices()[0], sharding=jax.NamedSharding(jax.make_mesh((8,), ("d",)), jax.P()))
    with pytest.raises(ValueError, match="pad_axis=-1"):
        AsyncDataSetIterator([], pad_axis=-1)
    with pytest.raises(jaxws.ConfigurationError, match=r"^AsyncDataSetIterator\(base=<NoneType>\): expected an iterator "
                       r"or iterable of batches"):
        AsyncDataSetIterator(None)
    for source in (None, 3, "xy"):
        with pytest.raises(jaxws.ConfigurationError, match=rf"^from_iterable\(source=<{type(source).__name__}>\): "
                           r"expected .* or a function that makes one"):
            from_iterable(source)
    x, y = arrays(8)
    for kwargs, fragment in (({"shuffle": "yes"}, "shuffle='yes'): expected True or False"),
                             ({"drop_last": 1}, "drop_last=1): expected True or False"),
                             ({"seed": 1.5}, "seed=1.5): expected an int >= 0"),
                             ({"seed": -1}, "seed=-1): expected an int >= 0")):
        with pytest.raises(jaxws.ConfigurationError, match=re.escape(f"ArrayDataSetIterator({fragment}")):
            ArrayDataSetIterator(x, y, 4, **kwargs)
    with pytest.raises(jaxws.ConfigurationError, match=r"ArrayDataSetIterator\(x=<NoneType>\): expected the features"):
        ArrayDataSetIterator(None, y)
    assert len(list(ArrayDataSetIterator(x, y, 4, shuffle=np.True_, seed=np.int64(3)))) == 2  # numpy's own kinds too


# -- fit uses it --------------------------------------------------------------------------


def small_net():
    conf = jaxws.nn.NeuralNetConfiguration(
        layers=[jaxws.nn.Dense(8, activation="tanh"), jaxws.nn.OutputLayer(4)],
        input_shape=(3,), updater=optax.sgd(0.1))
    return jaxws.nn.MultiLayerNetwork(conf).init()


def test_fit_prefetches_iterators_and_equals_in_memory_batches():
    x, y = arrays(40)
    a, b = small_net(), small_net()
    a.fit((x, y), epochs=3, batch_size=8, progress=False)  # ArrayDataSetIterator, async
    b.fit(DataSet(x, y).split(8), epochs=3, progress=False)  # a list: no thread
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-6), a.params, b.params)
    assert a.iteration == b.iteration == 15


def test_fit_reports_bad_batches_from_the_prefetch_thread_plainly():
    x, y = arrays(40)
    net = small_net()
    labels = np.arange(40, dtype=np.int32) % 8
    batches = lambda: ((x[i:i + 8], labels[i:i + 8] % 4 if i < 16 else labels[i:i + 8]) for i in range(0, 40, 8))  # noqa: E731
    with pytest.raises(jaxws.InvalidBatchError, match=r"found classes 0\.\.7, expected 0\.\.3"):
        net.fit(from_iterable(batches), progress=False)
    assert net.iteration == 2  # the batches before the bad one trained


def test_shield_is_never_wrapped():
    x, y = arrays(16)
    seen = []

    def loader():
        for i in range(2):
            seen.append(threading.current_thread().name)
            yield x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]

    net = small_net()
    net.fit(AsyncShieldDataSetIterator(from_iterable(loader)), progress=False)
    assert seen == ["MainThread", "MainThread"]
    seen.clear()
    net.fit(from_iterable(loader), progress=False)
    # the first batch is looked at in the caller (to see where it lives), the rest prefetched
    assert seen[0] == "MainThread" and seen[1].startswith("jaxws-prefetch")
