"""The feed: DL4J's iterator lifecycle, bad input refused before any step, labels checked.

fit resets an exhausted resettable iterator; evaluation always starts over and covers all
of the data; a call that would process nothing says so; invalid labels never train silently.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxws
from jaxws.data import ArrayDataSetIterator, AsyncDataSetIterator, DataSet, from_iterable
from jaxws.eval import Evaluation
from jaxws.nn import LSTM, Dense, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer, RnnOutputLayer
from jaxws.parallel import ParallelWrapper

D, C = 5, 3


def network(updater=None):
    conf = NeuralNetConfiguration(layers=[Dense(8, activation="tanh"), OutputLayer(C)], input_shape=(D,),
                                  updater=updater or optax.sgd(0.1), seed=0)
    return MultiLayerNetwork(conf).init()


def arrays(n=600, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, D)).astype(np.float32), r.integers(0, C, n).astype(np.int32)


# -- iterator lifecycle, as DL4J defines it ------------------------------------------------


def test_fit_resets_an_exhausted_iterator_and_evaluation_covers_all_data():
    x, y = arrays()
    it = ArrayDataSetIterator(x[:512], y[:512], batch_size=64, shuffle=True)
    test_it = ArrayDataSetIterator(x[512:], y[512:], batch_size=30)
    net = network()
    for epoch in range(4):
        net.fit(it, progress=False)
        assert net.iteration == 8 * (epoch + 1)
        assert int(net.evaluate(test_it).confusion_matrix().sum()) == 88
    net.fit(it, epochs=5, progress=False)
    net.fit(it, epochs=5, progress=False)
    assert net.iteration == 32 + 80


def test_a_partly_consumed_iterator_trains_on_from_where_it_is_and_evaluates_whole():
    x, y = arrays()
    it = ArrayDataSetIterator(x, y, batch_size=100)
    for _ in range(3):
        next(it)
    net = network()
    net.fit(it, progress=False)  # DL4J: only an iterator with no next batch is reset
    assert net.iteration == 3
    it.reset()
    next(it)
    assert int(net.evaluate(it).confusion_matrix().sum()) == 600  # evaluation starts over
    assert net.score(it) == pytest.approx(net.score((x, y)), rel=1e-6)


def test_an_async_iterator_given_by_the_user_is_reset_too():
    x, y = arrays()
    net = network()
    with AsyncDataSetIterator(ArrayDataSetIterator(x, y, batch_size=100), 2) as it:
        net.fit(it, progress=False)
        net.fit(it, progress=False)
        assert net.iteration == 12
        assert int(net.evaluate(it).confusion_matrix().sum()) == 600


def test_parallel_wrapper_resets_an_exhausted_iterator():
    x, y = arrays(256)
    it = ArrayDataSetIterator(x, y, batch_size=32)
    net = network()
    wrapper = ParallelWrapper(net, workers=2, averaging_frequency=2)
    wrapper.fit(it)
    wrapper.fit(it)
    assert wrapper.rounds == 8 and net.iteration == 8
    wrapper.fit(it, epochs=3)
    assert wrapper.rounds == 20


@pytest.mark.parametrize("data, why", [
    ([], "an empty list"),
    (lambda: iter([]), "yields nothing"),
    ((np.zeros((0, D), np.float32), np.zeros(0, np.int32)), "no examples"),
])
def test_a_call_that_would_process_nothing_says_so(data, why):
    net = network()
    data = from_iterable(data) if callable(data) else data
    for call in (lambda: net.fit(data, progress=False), lambda: net.evaluate(data), lambda: net.score(data)):
        with pytest.raises(jaxws.ConfigurationError, match=why):
            call()
    assert net.iteration == 0


def test_an_exhausted_one_shot_iterator_is_an_error_not_a_no_op():
    x, y = arrays(64)
    gen = ((x[i:i + 32], y[i:i + 32]) for i in range(0, 64, 32))
    net = network()
    net.fit(gen, progress=False)
    assert net.iteration == 2
    with pytest.raises(jaxws.ConfigurationError, match="one-shot iterator that is exhausted"):
        net.fit(gen, progress=False)
    with pytest.raises(jaxws.ConfigurationError, match=r"fit\(epochs=2\) got a one-shot iterator"):
        net.fit(iter([(x, y)]), epochs=2, progress=False)


# -- class labels, on the device too -------------------------------------------------------


@pytest.mark.parametrize("how", ["per step", "fused", "evaluate", "resident"])
def test_labels_all_int32s_smallest_are_reported_as_both_extremes(how):
    """The largest of no label is int32's smallest, not ``-max``: labels that are all that
    one value report it as their largest too, not one above it."""
    x, y = arrays(80)
    lowest = np.iinfo(np.int32).min
    labels = jnp.asarray(np.where((np.arange(80) // 20 == 1) | (how == "resident"), lowest, y), jnp.int32)
    batches = [(jnp.asarray(x[i:i + 20]), labels[i:i + 20]) for i in range(0, 80, 20)]  # batch 1: only int32's smallest
    net = network()
    with pytest.raises(jaxws.InvalidBatchError) as caught:
        if how == "resident":  # the whole data judged before the first step
            net.fit((jnp.asarray(x), labels), batch_size=20, steps_per_execution=2, progress=False)
        elif how == "evaluate":
            net.evaluate(iter(batches))
        else:
            net.fit(iter(batches), steps_per_execution=2 if how == "fused" else 1, progress=False)
    found = f"found classes {lowest}..{lowest}, expected" if how == "resident" else f"(found {lowest}..{lowest}); 20 invalid"
    assert found in str(caught.value), str(caught.value)
    assert not labels.is_deleted() and all(not a.is_deleted() for a in jax.tree.leaves(batches))


@pytest.mark.parametrize("bad", [5, -1])
def test_out_of_range_device_labels_never_train_silently(bad):
    x, y = arrays(200)
    labels = jnp.asarray(np.where(np.arange(200) >= 100, bad, y), jnp.int32)  # batches 2 and 3 are bad
    net = network()
    batches = [(jnp.asarray(x[i:i + 50]), labels[i:i + 50]) for i in range(0, 200, 50)]
    with pytest.raises(jaxws.InvalidBatchError, match=rf"batch 2 \(counting from 0 in that call\) was the first with classes outside 0\.\.2 \(found {bad}\.\.{bad}\); 100 invalid"):
        net.fit(iter(batches), progress=False)  # counted in the steps, read once at the end
    with pytest.raises(jaxws.InvalidBatchError, match="labels out of range"):
        net.evaluate((jnp.asarray(x), labels))
    with pytest.raises(jaxws.InvalidBatchError, match="labels out of range"):
        net.score((jnp.asarray(x), labels))


def test_evaluation_counts_on_the_device_only_labels_the_feed_did_not_judge(monkeypatch):
    # host labels are judged by the feed before their batch runs; evaluation and score count
    # only device labels in their programs, name a bad device batch by its place among all
    # the batches, and read no count at all when every batch was judged on the host
    from sklearn.metrics import confusion_matrix

    from jaxws.nn.checks import LabelCheck

    reads = []
    read = LabelCheck.raise_if_invalid
    monkeypatch.setattr(LabelCheck, "raise_if_invalid", lambda self, *a, **k: reads.append(a[0]) or read(self, *a, **k))
    x, y = arrays(120)
    shared = jnp.asarray(y[40:60])  # one device label array in two batches
    host = [DataSet(x[i:i + 20], y[i:i + 20]) for i in (0, 20, 80, 100)]
    device = [DataSet(jnp.asarray(x[40:60]), shared), DataSet(jnp.asarray(x[60:80]), shared)]
    net = network()
    for prefetch in (0, 8):
        ev = net.do_evaluation(iter(host), Evaluation(), prefetch=prefetch)[0]
        predicted = np.concatenate([np.asarray(net.output(ds.features)).argmax(1) for ds in host])
        np.testing.assert_array_equal(ev.confusion_matrix(), confusion_matrix(
            np.concatenate([ds.labels for ds in host]), predicted, labels=range(C)))
    score = net.score(host)
    assert reads == [] and np.isclose(score, np.mean([net.score(ds) for ds in host]), rtol=1e-5)
    mixed = [host[0], host[1], device[0], host[2], DataSet(device[1].features, jnp.full(20, 7, jnp.int32)), device[1]]
    for prefetch in (0, 8):
        with pytest.raises(jaxws.InvalidBatchError, match=r"do_evaluation: labels out of range .*batch 4 \(counting from 0 "
                           r"in that call\) was the first with classes outside 0\.\.2 \(found 7\.\.7\); 20 invalid label\(s\) in all, over 6 step"):
            net.do_evaluation(iter(mixed), Evaluation(), prefetch=prefetch)
    with pytest.raises(jaxws.InvalidBatchError, match=r"score: labels out of range .*batch 4 \(counting"):
        net.score(mixed)
    assert net.score(host + device) > 0 and reads.count("score") == 2  # device labels: counted and read
    for ds in host:  # the user's arrays, as they were
        assert type(ds.features) is np.ndarray and type(ds.labels) is np.ndarray
    np.testing.assert_array_equal(np.asarray(shared), y[40:60])


def test_parallel_wrapper_checks_device_labels_too():
    x, y = arrays(128)
    net = network()
    with pytest.raises(jaxws.InvalidBatchError, match=r"ParallelWrapper.fit: labels out of range .* found classes 2\.\.4, expected 0\.\.2"):
        ParallelWrapper(net, workers=2).fit([(jnp.asarray(x[i:i + 32]), jnp.asarray(y[i:i + 32] + (i == 64) * 2))
                                             for i in range(0, 128, 32)])


def test_the_device_label_check_adds_no_read_per_step():
    x, y = arrays(400)
    batches = [(jnp.asarray(x[i:i + 50]), jnp.asarray(y[i:i + 50])) for i in range(0, 400, 50)]
    net = network()
    net.fit(batches, progress=False)  # compile
    with jax.transfer_guard_device_to_host("disallow"):
        net.fit(batches, epochs=3, progress=False)  # only the final, explicit read of the check
    assert net.iteration == 32


@pytest.mark.parametrize("loss, activation", [("mse", "identity"), ("mcxent", "softmax")])
def test_steps_with_no_class_labels_to_count_carry_no_check(monkeypatch, loss, activation):
    # a regression loss, or one-hot labels: nothing a label check could count, so fit runs
    # the step without one (no buffer in and out per step) and nothing reads one; evaluation
    # and score likewise; training equals the plain-JAX loop and the user's arrays survive
    from sklearn.metrics import mean_squared_error

    from jaxws.eval import RegressionEvaluation
    from jaxws.nn import LabelCheck

    reads = []
    read = LabelCheck.raise_if_invalid
    monkeypatch.setattr(LabelCheck, "raise_if_invalid", lambda self, *a, **k: reads.append(a[0]) or read(self, *a, **k))

    def net():
        layers = [Dense(8, activation="tanh"), OutputLayer(C, loss=loss, activation=activation)]
        conf = NeuralNetConfiguration(layers=layers, input_shape=(D,), updater=optax.sgd(0.1), seed=0)
        return MultiLayerNetwork(conf).init()

    x, y = arrays(128)
    targets = np.eye(C, dtype=np.float32)[y]
    shared = jnp.asarray(targets[:32])  # one device label array in two batches
    batches = [DataSet(jnp.asarray(x[0:32]), shared), DataSet(jnp.asarray(x[32:64]), shared),
               DataSet(jnp.asarray(x[64:96]), jnp.asarray(targets[64:96])), DataSet(x[96:], targets[96:])]
    model, reference = net(), net()
    model.fit(iter(batches), epochs=1, progress=False)
    model.fit(batches, epochs=2, progress=False)
    assert model.compiled_step(losses=False).compiles == 0  # never the step that counts
    assert model.compiled_step(losses=False, checked=False).compiles == 2  # device and host (numpy) batches
    step, carry = jax.jit(reference.train_step()), reference._carry  # the plain-JAX loop
    for ds in batches * 3:
        carry, _ = step(carry, DataSet(*(jnp.asarray(a) for a in (ds.features, ds.labels))))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), model.params, carry.params)
    ev = model.do_evaluation(iter(batches), RegressionEvaluation(C))[0]
    predicted = np.concatenate([np.asarray(model.output(ds.features)) for ds in batches])
    expected = np.concatenate([np.asarray(ds.labels) for ds in batches])
    for col in range(C):
        oracle = mean_squared_error(expected[:, col], predicted[:, col])
        assert ev.mean_squared_error(col) == pytest.approx(oracle, rel=1e-4)
    assert np.isfinite(model.score(batches))
    assert reads == []
    assert not any(ds.features.is_deleted() or ds.labels.is_deleted() for ds in batches[:3])
    np.testing.assert_array_equal(np.asarray(shared), targets[:32])
    assert type(batches[3].labels) is np.ndarray


def test_invalid_labels_are_named_by_epoch_and_batch_and_masked_padding_is_fine():
    x, y = arrays(100)
    labels = jnp.asarray(y).at[60].set(7)
    net = network()
    xd = jnp.asarray(x)
    with pytest.raises(jaxws.InvalidBatchError, match=r"batch 3 of epoch 0"):
        net.fit([(xd[i:i + 20], labels[i:i + 20]) for i in range(0, 100, 20)], epochs=2, progress=False)
    padded = jnp.asarray(y).at[60].set(-1)
    mask = jnp.asarray(np.arange(100) != 60, jnp.float32)
    net.fit(ArrayDataSetIterator(jnp.asarray(x), padded, batch_size=20, labels_mask=mask), progress=False)


@pytest.mark.parametrize("shuffle", [False, True])
def test_device_resident_labels_are_refused_before_any_step(shuffle):
    x, y = arrays(200)
    labels = np.asarray(y).copy()
    labels[130], labels[170] = 5, -1
    net = network()
    before = jaxws.detach(net.params)
    data = ArrayDataSetIterator(jnp.asarray(x), jnp.asarray(labels), batch_size=20, shuffle=shuffle, seed=1)
    with pytest.raises(jaxws.InvalidBatchError, match=r"fit: labels out of range for loss mcxent of layer 1 "
                       r"\(OutputLayer, n_out=3\): found classes -1\.\.5, expected 0\.\.2; 2 invalid label\(s\), "
                       r"the first in example 130 of the data \(counting from 0\)\. Nothing was trained"):
        net.fit(data, epochs=2, steps_per_execution=3, progress=False)
    assert net.iteration == 0 and data.position == 0
    jax.tree.map(np.testing.assert_array_equal, net.params, before)
    masked = jnp.asarray(~np.isin(np.arange(200), [130, 170]), jnp.float32)  # masked out: fine
    net.fit(ArrayDataSetIterator(jnp.asarray(x), jnp.asarray(labels), batch_size=20, shuffle=shuffle,
                                 labels_mask=masked), progress=False)
    assert net.iteration == 10
    host = network()  # host labels are judged by the feed before they are placed, not again on the device
    host.fit((x, y), batch_size=20, steps_per_execution=3, progress=False)
    assert host.iteration == 10 and "labels" not in host._steps and "labels" in net._steps


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.uint32])
def test_host_labels_are_judged_in_every_integer_dtype(dtype):
    # one pass over a host batch's labels, read as unsigned: a negative class is caught as
    # one too large; the message still names the smallest and the largest
    x, y = arrays(40)
    net = network()
    low = 0 if np.dtype(dtype).kind == "u" else -1
    labels = y.astype(dtype)
    labels[[5, 12]] = low, 3 if low else 255
    with pytest.raises(jaxws.InvalidBatchError, match=rf"found classes {low}\.\.{3 if low else 255}, "
                       r"expected 0\.\.2\. \(in data\[0\]"):
        net.fit([DataSet(x[:20], labels[:20]), DataSet(x[20:], labels[20:])], prefetch=0, progress=False)
    assert net.iteration == 0
    masked = np.ones((40,), np.float32)
    masked[[5, 12]] = 0  # masked out: not judged
    net.fit(DataSet(x, labels, labels_mask=masked), progress=False)
    net.fit(DataSet(x, y.astype(dtype)), progress=False)
    assert net.iteration == 2


def test_host_labels_are_refused_before_any_step():
    x, y = arrays(100)
    net = network()
    before = jaxws.detach(net.params)
    with pytest.raises(jaxws.InvalidBatchError, match=r"found classes 0\.\.9, expected 0\.\.2"):
        net.fit((x, np.arange(100, dtype=np.int32) % 10), batch_size=20, progress=False)
    assert net.iteration == 0
    jax.tree.map(np.testing.assert_array_equal, net.params, before)


@pytest.mark.parametrize("how", ["ring", "inline", "list", "array iterator"])
def test_host_batches_judged_by_the_feed_run_a_step_without_the_device_count(how):
    # the feed judged their label values on the host: the step that trains on them carries
    # no label check (one argument and one output fewer per call), and trains the same
    x, y = arrays(120)
    host = [DataSet(x[i:i + 20], y[i:i + 20]) for i in range(0, 120, 20)]
    data = {"ring": lambda: from_iterable(lambda: iter(host)), "inline": lambda: from_iterable(lambda: iter(host)),
            "list": lambda: host,
            "array iterator": lambda: ArrayDataSetIterator(x, y, batch_size=20, resident=False)}[how]
    prefetch = 0 if how == "inline" else 8
    net, reference = network(), network()
    net.fit(data(), epochs=2, prefetch=prefetch, progress=False)
    counted, unchecked = net.compiled_step(losses=False), net.compiled_step(losses=False, checked=False)
    assert counted.compiles == 0 and unchecked.compiles == 1 and net.iteration == 12
    step, carry = jax.jit(reference.train_step()), reference._carry  # the plain-JAX loop
    for ds in host * 2:
        carry, _ = step(carry, DataSet(jnp.asarray(ds.features), jnp.asarray(ds.labels)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), net.params, carry.params)
    assert all(isinstance(ds.features, np.ndarray) for ds in host)  # the user's batches, untouched
    np.testing.assert_array_equal(host[0].labels, y[:20])
    with pytest.raises(jaxws.InvalidBatchError, match=r"found classes 7\.\.7, expected 0\.\.2"):
        net.fit([DataSet(x[:20], np.full(20, 7, np.int32))], prefetch=prefetch, progress=False)
    assert net.iteration == 12


@pytest.mark.parametrize("shuffle", [False, True])
def test_host_batches_a_step_moves_never_share_the_users_memory(shuffle):
    # the step may read a host batch after its call returns: an ArrayDataSetIterator's
    # slices (views of the user's arrays) are copied; its shuffled batches are gathers,
    # new arrays already, and go as they are
    from jaxws.data.feed import Feed

    x, y = arrays(60)
    it = ArrayDataSetIterator(x, y, 20, shuffle=shuffle, resident=False)
    with Feed(it, op="fit", prefetch=0) as feed:
        batches = [ds for ds, _ in feed.signed()]
    rows = it.order() if shuffle else np.arange(60)
    for i, ds in enumerate(batches):
        np.testing.assert_array_equal(ds.features, x[rows[i * 20:(i + 1) * 20]])
        np.testing.assert_array_equal(ds.labels, y[rows[i * 20:(i + 1) * 20]])
        if jax.default_backend() == "cpu":  # host arrays, which the step moves
            assert type(ds.features) is np.ndarray
            assert not (np.shares_memory(ds.features, x) or np.shares_memory(ds.labels, y))


def test_a_loader_that_refills_one_buffer_trains_as_its_batches_say():
    # placed in fit's thread on the CPU, a host batch is moved by the step that takes it; the
    # step may read that memory after the call returns, so fit hands it copies: a loader that
    # refills its one buffer for the next batch (while the step still runs) changes nothing
    r = np.random.default_rng(0)
    x, y = r.normal(size=(8192, 256)).astype(np.float32), r.integers(0, C, 8192).astype(np.int32)
    wide = NeuralNetConfiguration(layers=[Dense(8, activation="tanh"), OutputLayer(C)], input_shape=(256,),
                                  updater=optax.sgd(0.1), seed=0)
    xb, yb = np.empty((1024, 256), np.float32), np.empty(1024, np.int32)  # 1 MiB: the largest moved that way

    def loader():
        for i in range(0, 8192, 1024):
            xb[:], yb[:] = x[i:i + 1024], y[i:i + 1024]
            yield DataSet(xb, yb)

    for _ in range(3):  # without the copies this failed in 3 of 3 runs (jax 0.10, CPU)
        net, reference = MultiLayerNetwork(wide).init(), MultiLayerNetwork(wide).init()
        net.fit(from_iterable(loader), epochs=2, prefetch=0, progress=False)
        step, carry = jax.jit(reference.train_step()), reference._carry  # the plain-JAX loop, on copies
        for _ in range(2):
            for i in range(0, 8192, 1024):
                carry, _ = step(carry, DataSet(jnp.array(x[i:i + 1024]), jnp.array(y[i:i + 1024])))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), net.params, carry.params)
    assert net.iteration == 16 and type(xb) is np.ndarray  # the loader's buffer is still its own


def test_device_batches_after_judged_host_ones_are_named_by_their_step_in_the_call():
    # judged host steps are not counted on the device: the check catches up before a counted
    # step, and a recycled check starts where its device count stopped
    x, y = arrays(100)
    bad = jnp.asarray(np.where(np.arange(20) == 4, 9, y[:20]), jnp.int32)
    shared = jnp.asarray(y[20:40])  # one label array in several device batches
    xd = jnp.asarray(x[:20])
    host = [DataSet(x[i:i + 20], y[i:i + 20]) for i in range(40, 100, 20)]
    net = network()
    net.fit(host, progress=False)  # judged only: the check is recycled untouched
    mixed = [host[0], host[1], DataSet(xd, shared), host[2], DataSet(xd, bad), DataSet(xd, shared)]
    for prefetch in (0, 8):
        with pytest.raises(jaxws.InvalidBatchError, match=r"batch 4 \(counting from 0 in that call\) was the first "
                           r"with classes outside 0\.\.2 \(found 0\.\.9\); 1 invalid label\(s\) in all, over 6 step"):
            net.fit(iter(mixed), prefetch=prefetch, progress=False)
    with pytest.raises(jaxws.InvalidBatchError, match=r"batch 4 of epoch 0 .*; 2 invalid label\(s\) in all, over 10 step"):
        net.fit([host[0], DataSet(xd, shared), host[1]] + [host[2], DataSet(xd, bad)], epochs=2, progress=False)
    net.fit(host, progress=False)
    with pytest.raises(jaxws.InvalidBatchError, match=r"batch 2 \(counting"):
        net.fit([DataSet(xd, shared), host[0], DataSet(xd, bad)], progress=False)
    assert not shared.is_deleted() and not bad.is_deleted() and not xd.is_deleted()
    assert all(isinstance(ds.labels, np.ndarray) for ds in host)


# -- dead arrays are named first, on every path -------------------------------------------


def dead_features(shape=(8, 9)):
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="STALE")
    with ws:
        return jaxws.jit(lambda: jnp.ones(shape))()  # the wrong shape, and dead


@pytest.mark.parametrize("call", [
    lambda net, x: net.output(x),
    lambda net, x: net.fit((x, np.zeros(8, np.int32)), progress=False),
    lambda net, x: net.fit((x, np.zeros(8, np.int32)), batch_size=4, progress=False),
    lambda net, x: net.fit(from_iterable([(x, np.zeros(8, np.int32))]), progress=False),
    lambda net, x: net.evaluate([(x, np.zeros(8, np.int32))]),
    lambda net, x: net.score((x, np.zeros(8, np.int32))),
])
def test_a_dead_array_is_named_before_its_shape_is_judged(call):
    net = network()
    with pytest.raises(jaxws.LeakedWorkspacePointerError, match=r"uses leaked workspace pointer from workspace \[STALE\]"):
        call(net, dead_features())


# -- bad input: a jaxws error naming the argument and the fix, before any step -------------


@pytest.mark.parametrize("call, error, fragment", [
    (lambda net, x, y: net.fit((x, y), batch_size=0), jaxws.ConfigurationError, "fit(batch_size=0): expected an int >= 1"),
    (lambda net, x, y: net.fit((x, y), batch_size=-5), jaxws.ConfigurationError, "fit(batch_size=-5)"),
    (lambda net, x, y: net.fit((x,)), jaxws.ConfigurationError, "a tuple is read as (features, labels"),
    (lambda net, x, y: net.fit(DataSet(x)), jaxws.InvalidBatchError, "fit: the batch has no labels"),
    (lambda net, x, y: net.fit((x, y, np.ones((20, 2)))), jaxws.InvalidBatchError,
     "features_mask has shape [20, 2], expected [20]"),
    (lambda net, x, y: net.fit((x, y, None, np.ones(7))), jaxws.InvalidBatchError,
     "labels_mask has shape [7], expected [20]"),
    (lambda net, x, y: net.fit((x, y.astype(np.float32))), jaxws.InvalidBatchError, "must have an integer dtype"),
    (lambda net, x, y: net.output([["a", "b"]]), TypeError, "(dtype <U1) is not numeric data"),
    (lambda net, x, y: net.fit([(x, y), (x[:, :3], y)]), jaxws.InvalidBatchError, "(in data[1], counting from 0)"),
    (lambda net, x, y: net.output(None), jaxws.InvalidBatchError, "expects features of shape [batch, 5], received None."),
    (lambda net, x, y: net.fit(None), jaxws.ConfigurationError, "fit(data=<NoneType>): expected a DataSet, an (x, y) pair"),
    (lambda net, x, y: net.fit("xy"), jaxws.ConfigurationError, "fit(data=<str>): expected"),
    (lambda net, x, y: net.evaluate(5), jaxws.ConfigurationError, "do_evaluation(data=<int>): expected"),
    (lambda net, x, y: net.fit((x, y), prefetch=-1), jaxws.ConfigurationError, "fit(prefetch=-1): expected an int >= 0"),
    (lambda net, x, y: net.fit(iter([(x, y)]), prefetch=1.5), jaxws.ConfigurationError, "fit(prefetch=1.5)"),
    (lambda net, x, y: net.fit([(x, y), "xy"]), jaxws.InvalidBatchError, "fit: data[1] is not a batch: expected a "
     "DataSet, an (x, y) pair, an array of features or a dict with 'features' and 'labels'; got str"),
])
def test_bad_input_raises_a_clear_error_before_any_step(call, error, fragment):
    x, y = arrays(20)
    net = network()
    before = jaxws.detach(net.params)
    with pytest.raises(error) as info:
        call(net, x, y)
    assert fragment in str(info.value)
    assert net.iteration == 0
    jax.tree.map(np.testing.assert_array_equal, net.params, before)
    net.fit((x, y), progress=False)  # and the network is still usable


@pytest.mark.parametrize("prefetch", [0, 2])
def test_an_iterator_item_that_is_not_a_batch_is_named_and_nothing_after_it_trains(prefetch):
    """From the prefetch thread too: the message names the item, not a loader failure one
    batch later, and the steps before it stand."""
    x, y = arrays(20)
    xd = jnp.asarray(x)
    net = network()
    with pytest.raises(jaxws.InvalidBatchError, match=r"^fit: batch 2 is not a batch: expected a DataSet.*; got int\.$"):
        net.fit(iter([(x, y), (xd, y), 7, (x, y)]), prefetch=prefetch, progress=False)
    assert net.iteration == 2 and not xd.is_deleted()
    net.fit((x, y), progress=False)


def test_nested_lists_are_data():
    x, _ = arrays(4)
    net = network()
    np.testing.assert_allclose(np.asarray(net.output(x.tolist())), np.asarray(net.output(x)), rtol=1e-6)


# -- rnn_time_step and the time axis ----------------------------------------------------


def test_rnn_time_step_takes_any_number_of_steps_whatever_input_shape_fixes():
    conf = NeuralNetConfiguration(layers=[LSTM(6), RnnOutputLayer(2)], input_shape=(12, 3), seed=0)
    net = MultiLayerNetwork(conf).init()
    x = np.random.default_rng(0).normal(size=(4, 12, 3)).astype(np.float32)
    full = np.asarray(net.output(x))
    steps = [net.rnn_time_step(x[:, :1]), net.rnn_time_step(x[:, 1:5]), net.rnn_time_step(x[:, 5])]
    np.testing.assert_allclose(np.concatenate([steps[0], steps[1], steps[2][:, None]], 1), full[:, :6], rtol=1e-5, atol=1e-6)
    with pytest.raises(jaxws.InvalidBatchError, match=r"declare input_shape=\(None, 3\) for sequences of any length"):
        net.output(x[:, :5])


# -- device-resident datasets --------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("k", [1, 4])
def test_a_resident_dataset_trains_to_the_numbers_of_the_host_path(k, drop_last):
    x, y = arrays(203)  # 12 full batches of 16 and one of 11
    resident, host = network(optax.adam(1e-2)), network(optax.adam(1e-2))
    it_r = ArrayDataSetIterator(jnp.asarray(x), jnp.asarray(y), 16, shuffle=True, seed=5, drop_last=drop_last)
    it_h = ArrayDataSetIterator(x, y, 16, shuffle=True, seed=5, drop_last=drop_last, resident=False)
    resident.fit(it_r, epochs=3, steps_per_execution=k, progress=False)
    host.fit(it_h, epochs=3, progress=False)  # the same permutations, batch by batch on the host
    assert resident.iteration == host.iteration == 3 * (12 if drop_last else 13)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), resident.params, host.params)
    assert resident.compiled_step(losses=False).compiles == 0 and 0 < resident.resident_step(losses=False).compiles <= 3


def test_a_resident_epoch_uses_the_callers_arrays_in_place_and_reads_nothing_back():
    x, y = arrays(256)
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    it = ArrayDataSetIterator(xd, yd, 32, shuffle=True)
    data, _ = it.on_device(jaxws.data.placement.Placement())
    assert data.features is xd and data.labels is yd  # no copy
    net = network()
    net.fit(it, steps_per_execution=4, progress=False)  # compile
    with jax.transfer_guard_device_to_host("disallow"):
        net.fit(it, epochs=2, steps_per_execution=4, progress=False)
    assert not xd.is_deleted() and not yd.is_deleted()
    np.testing.assert_array_equal(np.asarray(xd), x)
    assert it.position == 256 and net.iteration == 24  # the iterator is exhausted, as after any fit


def test_a_partly_consumed_resident_iterator_trains_on_from_its_position():
    x, y = arrays(100)
    it = ArrayDataSetIterator(jnp.asarray(x), jnp.asarray(y), 10)
    next(it), next(it)
    net = network()
    net.fit(it, steps_per_execution=3, progress=False)
    assert net.iteration == 8
    net.fit(it, progress=False)  # exhausted: reset, a whole epoch
    assert net.iteration == 18


def test_fit_with_batch_size_on_host_arrays_puts_them_on_the_device_once():
    x, y = arrays(300)
    puts = []
    original = jaxws.data.placement.Placement.place

    def counting(self, tree):
        puts.append(len(jax.tree.leaves(tree)))
        return original(self, tree)

    net = network()
    jaxws.data.placement.Placement.place = counting
    try:
        net.fit((x, y), batch_size=25, epochs=4, steps_per_execution=4, progress=False)
    finally:
        jaxws.data.placement.Placement.place = original
    assert net.iteration == 48 and puts == [2]  # features and labels, once, for all four epochs


@pytest.mark.parametrize("source", ["device list", "numpy iterator", "numpy inline", "device iterator",
                                    "device steps", "numpy steps"])
def test_a_signed_pass_pairs_each_batch_with_its_signature(source):
    from jaxws.data.dataset import signature
    from jaxws.data.feed import Feed, Judged, Steps

    x, y = arrays(40)
    host = [DataSet(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]
    device = [DataSet(jnp.asarray(b.features), jnp.asarray(b.labels)) for b in host]
    data = {"device list": device, "numpy iterator": iter(host), "numpy inline": iter(host),
            "device iterator": iter(device), "device steps": device, "numpy steps": host}[source]
    feed = Feed(data, op="fit", prefetch=2 if source == "numpy iterator" else 0,
                steps=2 if source.endswith("steps") else 1)
    with feed:
        pairs = list(feed.signed())
    if source == "device steps":  # the user's batches, in place: the program stacks them
        assert [type(s) for s, _ in pairs] == [Steps] * 3
        given = [b for s, _ in pairs for b in s.batches]
        assert len(given) == 5 and all(b is d for b, d in zip(given, device))  # the same objects, not copies
        assert [key for _, key in pairs] == [(2, signature(device[0]))] * 2 + [(1, signature(device[0]))]
        assert [s.examples for s, _ in pairs] == [16, 16, 8]
        return
    assert [ds.features.shape[0] for ds, _ in pairs] == ([2, 2, 1] if source == "numpy steps" else [8] * 5)
    # a single host batch's labels were judged by the check on the host: its step need not count them
    judged = source in ("numpy iterator", "numpy inline")
    assert all(key == (Judged(signature(ds)) if judged else signature(ds)) for ds, key in pairs)
    if judged and jax.default_backend() == "cpu":  # copies (in this thread or from the ring), moved by the step
        assert all(type(ds.features) is np.ndarray and type(ds.labels) is np.ndarray for ds, _ in pairs)
        assert not any(np.shares_memory(ds.features, b.features) or np.shares_memory(ds.labels, b.labels)
                       for (ds, _), b in zip(pairs, host))
        assert all(np.array_equal(ds.features, b.features) and np.array_equal(ds.labels, b.labels)
                   for (ds, _), b in zip(pairs, host))
    else:
        assert all(isinstance(ds.features, jax.Array) for ds, _ in pairs)
    assert all((type(key) is Judged) is judged for _, key in pairs)
    if source.startswith("device"):
        assert all(ds is given for (ds, _), given in zip(pairs, device))  # passed through, not copied


@pytest.mark.parametrize("how", ["fused list", "fused iterator"])
def test_invalid_labels_in_fused_steps_are_named_by_their_own_batch(how):
    x, y = arrays(200)
    labels = np.asarray(y).copy()
    labels[4 * 20 + 3], labels[6 * 20] = 5, -1  # batches 4 and 6 of 20 examples
    net, xd, yd = network(), jnp.asarray(x), jnp.asarray(labels)
    data = [(xd[i:i + 20], yd[i:i + 20]) for i in range(0, 200, 20)]
    with pytest.raises(jaxws.InvalidBatchError) as caught:
        net.fit(data if how == "fused list" else iter(data), steps_per_execution=3, progress=False)
    message = str(caught.value)
    assert "2 invalid label(s) in all, over 10 step(s)" in message
    assert "batch 4 (counting from 0 in that call)" in message and "found -1..5" in message


def test_a_check_recycled_after_resident_steps_names_batches_from_its_own_call():
    x, y = arrays(200)
    net, xd = network(), jnp.asarray(x)
    net.fit(ArrayDataSetIterator(xd, jnp.asarray(y), batch_size=20), steps_per_execution=3, progress=False)
    labels = jnp.asarray(y).at[5 * 20].set(9)
    with pytest.raises(jaxws.InvalidBatchError, match=r"batch 5 \(counting from 0 in that call\) was the first .* "
                       r"1 invalid label\(s\) in all, over 10 step\(s\)"):
        net.fit([(xd[i:i + 20], labels[i:i + 20]) for i in range(0, 200, 20)], progress=False)


@pytest.mark.parametrize("program", ["fused", "resident"])
def test_fused_programs_count_labels_beside_the_scanned_loop_not_in_it(program):
    # k steps' labels are counted in one pass after the scan: the int32[5] check is not carried
    # through the loop (on a GPU, two reductions per iteration cost ~3 us a step)
    from jaxws.nn import LabelCheck

    net = network()
    x, y = arrays(60)
    if program == "fused":
        stacked = DataSet(jnp.asarray(x).reshape(3, 20, -1), jnp.asarray(y).reshape(3, 20))
        jaxpr = jax.make_jaxpr(net.compiled_step(fused=True)._fun)(net._carry, LabelCheck.init(), stacked)
    else:
        jaxpr = jax.make_jaxpr(net.resident_step()._fun, static_argnums=(5, 6))(
            net._carry, LabelCheck.init(), DataSet(jnp.asarray(x), jnp.asarray(y)), None, 0, 3, 20)
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    carried = [v.aval for v in scans[0].invars]
    assert not any(a.shape == (5,) and a.dtype == jnp.int32 for a in carried)
    assert any(a.shape == (5,) and a.dtype == jnp.int32 for a in (v.aval for v in jaxpr.jaxpr.outvars))


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_without_the_check_trains_as_the_checked_one_and_donates_only_the_carry(fused):
    from jaxws.nn import LabelCheck

    x, y = arrays(60)
    batch = (DataSet(jnp.asarray(x).reshape(3, 20, -1), jnp.asarray(y).reshape(3, 20)) if fused
             else DataSet(jnp.asarray(x[:20]), jnp.asarray(y[:20])))
    net = network()
    checked, check = net.compiled_step(fused=fused), LabelCheck.init()
    unchecked = net.compiled_step(fused=fused, checked=False)
    assert unchecked is not checked and unchecked is net.compiled_step(fused=fused, checked=False)
    carry = jaxws.detach(net._carry)
    with_check, check, losses = checked(jaxws.detach(carry), check, batch)
    without, no_check_losses = unchecked(carry, batch)
    jax.tree.map(np.testing.assert_array_equal, without, with_check)
    np.testing.assert_array_equal(no_check_losses, losses)
    assert all(a.is_deleted() for a in jax.tree.leaves(carry))  # the carry, donated
    assert not any(a.is_deleted() for a in jax.tree.leaves(batch))  # never the batch
    assert len(net.compiled_step(fused=fused, losses=False, checked=False)(without, batch)) == 1  # (carry,)


@pytest.mark.parametrize("prefetch, memmap", [(0, False), (2, False), (2, True)])
def test_host_data_of_an_array_iterator_is_checked_whole_once_not_per_batch(prefetch, memmap, monkeypatch, tmp_path):
    x, y = arrays(200)
    if memmap:  # data kept on disk, as data too large for the device often is
        stored = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=x.dtype, shape=x.shape)
        stored[:] = x
        x = stored
    net = network()
    calls = []
    check = net._check_batch
    monkeypatch.setattr(net, "_check_batch", lambda ds, op, shapes=True: (calls.append(ds.num_examples), check(ds, op, shapes)))
    it = ArrayDataSetIterator(x, y, batch_size=20, shuffle=True, resident=False)
    net.fit(it, epochs=2, prefetch=prefetch, progress=False)
    assert calls == [200] and net.iteration == 20  # the 200 examples once; 20 batches ran unchecked


def test_fit_on_one_host_batch_places_it_inline_and_starts_no_prefetch_thread(monkeypatch):
    # DL4J's loop over numpy DataSets (fit(ds) per batch): a ring's thread, started and
    # joined per call, cost ~2-3 ms a call against ~0.4 ms inline, with nothing to overlap
    import jaxws.data.feed as feed

    rings = []
    ring = feed.AsyncDataSetIterator
    monkeypatch.setattr(feed, "AsyncDataSetIterator", lambda *a, **k: rings.append(1) or ring(*a, **k))
    x, y = arrays(40)
    net = network()
    for i in range(0, 40, 20):
        net.fit(DataSet(x[i:i + 20], y[i:i + 20]), progress=False)
    net.fit((x[:20], y[:20]), epochs=2, progress=False)
    assert rings == [] and net.iteration == 4
    two = [DataSet(x[:20], y[:20]), DataSet(x[20:], y[20:])]
    net.fit(from_iterable(lambda: iter(two)), progress=False)  # a loader's two: the ring overlaps them
    assert rings == [1] and net.iteration == 6


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="elsewhere the ring overlaps their transfers")
def test_fit_reads_host_data_held_in_memory_in_its_own_thread_on_the_cpu(monkeypatch):
    # on the CPU the step moves each host batch itself: a list of batches or an
    # ArrayDataSetIterator, already in memory, leaves a ring nothing to overlap (DL4J does
    # not prefetch such iterators either); a loader's batches still go through the ring
    import jaxws.data.feed as feed

    rings = []
    ring = feed.AsyncDataSetIterator
    monkeypatch.setattr(feed, "AsyncDataSetIterator", lambda *a, **k: rings.append(1) or ring(*a, **k))
    x, y = arrays(60)
    batches = [DataSet(x[i:i + 20], y[i:i + 20]) for i in range(0, 60, 20)]
    net, reference = network(), network()
    net.fit(batches, epochs=2, progress=False)
    net.fit(ArrayDataSetIterator(x, y, 20, resident=False), progress=False)
    assert rings == [] and net.iteration == 9
    net.fit(from_iterable(lambda: iter(batches)), progress=False)
    net.fit(ArrayDataSetIterator(x, y, 20, resident=False), steps_per_execution=3, progress=False)  # stacked there
    assert rings == [1, 1] and net.iteration == 15
    step, carry = jax.jit(reference.train_step()), reference._carry  # the plain-JAX loop
    for ds in batches * 5:
        carry, _ = step(carry, DataSet(jnp.asarray(ds.features), jnp.asarray(ds.labels)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), net.params, carry.params)
    assert all(type(ds.features) is np.ndarray for ds in batches)  # the user's batches, as they were
    np.testing.assert_array_equal(batches[2].labels, y[40:])


def test_the_ring_hands_fit_host_copies_that_its_steps_move_on_the_cpu(monkeypatch):
    # a loader's batches go through the ring, which on the CPU stages copies for fit's step
    # to move as it runs (as in fit's own thread) instead of placing them in its thread; off
    # the CPU, and for anyone else iterating a ring, it places them as before
    from jaxws.data.placement import Placement

    placed = []
    place_many = Placement.place_many
    monkeypatch.setattr(Placement, "place_many", lambda self, trees: placed.append(len(trees)) or place_many(self, trees))
    x, y = arrays(100)
    shared = y[:20].copy()  # one label array in several batches
    batches = [DataSet(x[i:i + 20], shared if i % 40 else y[i:i + 20]) for i in range(0, 100, 20)]
    before = [(ds.features.copy(), ds.labels.copy()) for ds in batches]
    net, reference = network(), network()
    net.fit(from_iterable(lambda: iter(batches)), epochs=2, progress=False)
    cpu = jax.default_backend() == "cpu"
    assert (placed == []) == cpu and net.iteration == 10
    with AsyncDataSetIterator(iter(batches), 4) as ring:  # iterated by a user: device batches
        seen = [type(ds.features) for ds in ring]
    assert placed and set(seen) == {type(jnp.zeros(1))}
    step, carry = jax.jit(reference.train_step()), reference._carry  # the plain-JAX loop
    for ds in batches * 2:
        carry, _ = step(carry, DataSet(jnp.asarray(ds.features), jnp.asarray(ds.labels)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), net.params, carry.params)
    for ds, (xb, yb) in zip(batches, before):  # the user's arrays, as they were
        assert type(ds.features) is np.ndarray
        np.testing.assert_array_equal(ds.features, xb), np.testing.assert_array_equal(ds.labels, yb)


def test_a_signature_is_judged_once_per_model_and_host_label_values_on_every_call(monkeypatch):
    # DL4J's loop calls net.fit(batch) per batch: shapes are judged once per signature and
    # operation, across calls; the values of host labels on every call, before its step
    x, y = arrays(100)
    net = network()
    judged = []
    check = net._check_shapes
    monkeypatch.setattr(net, "_check_shapes", lambda ds, op, got: (judged.append(op), check(ds, op, got)))
    for i in range(0, 100, 20):
        net.fit(DataSet(jnp.asarray(x[i:i + 20]), jnp.asarray(y[i:i + 20])), progress=False)
    for i in range(0, 100, 20):
        net.fit((x[i:i + 20], y[i:i + 20]), progress=False)
    assert judged == ["fit", "fit"] and net.iteration == 10  # device arrays once, host arrays once
    before = jaxws.detach(net.params)
    with pytest.raises(jaxws.InvalidBatchError, match=r"found classes 0\.\.9, expected 0\.\.2"):
        net.fit((x[:20], np.arange(20, dtype=np.int32) % 10), progress=False)
    with pytest.raises(jaxws.InvalidBatchError, match=r"expects features of shape \[batch, 5\], received \[20, 3\]"):
        net.fit((x[:20, :3], y[:20]), progress=False)  # a new signature is judged
    assert net.iteration == 10
    jax.tree.map(np.testing.assert_array_equal, net.params, before)
    net.score((x[:20], y[:20]))
    assert judged[-1] == "score"  # each operation judges for itself


def test_a_resident_iterator_over_new_host_data_of_a_known_signature_has_its_labels_checked():
    x, y = arrays(100)
    net = network()
    net.fit(ArrayDataSetIterator(x, y, batch_size=20), progress=False)
    bad = y.copy()
    bad[57] = 9
    with pytest.raises(jaxws.InvalidBatchError, match=r"found classes 0\.\.9, expected 0\.\.2"):
        net.fit(ArrayDataSetIterator(x, bad, batch_size=20), progress=False)
    assert net.iteration == 5


def test_out_of_range_host_labels_of_an_array_iterator_stop_fit_before_any_step():
    x, y = arrays(200)
    labels = y.copy()
    labels[157] = 7
    net = network()
    before = jaxws.detach(net.params)
    with pytest.raises(jaxws.InvalidBatchError, match=r"fit: labels out of range .* found classes 0\.\.7, expected 0\.\.2"):
        net.fit(ArrayDataSetIterator(x, labels, batch_size=20, resident=False), progress=False)
    assert net.iteration == 0
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(net.params), jax.tree.leaves(before)))
    assert y[157] != 7 and labels[157] == 7  # the caller's arrays untouched


def test_the_device_key_is_the_signature_of_unattached_device_batches_only():
    # the list check keys a DataSet in one pass over its fields; anything else is checked in full
    from jaxws.data.dataset import signature
    from jaxws.data.feed import _device_key

    x, y = arrays(8)
    mask = np.ones(8, np.float32)
    device = DataSet(jnp.asarray(x), jnp.asarray(y), None, jnp.asarray(mask))
    assert _device_key(device) == signature(device) == (device.features.aval, device.labels.aval, None, device.labels_mask.aval)
    plain = DataSet(jnp.asarray(x), jnp.asarray(y))  # the usual batch: its own short path
    assert _device_key(plain) == signature(plain) == (plain.features.aval, plain.labels.aval, None, None)
    assert _device_key(DataSet(jnp.asarray(x), y)) is None  # a numpy field
    assert _device_key(DataSet(x, jnp.asarray(y))) is None
    assert _device_key(DataSet(jnp.asarray(x))) == (device.features.aval, None, None, None)  # no labels
    assert _device_key((jnp.asarray(x), jnp.asarray(y))) is None  # not a DataSet yet
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="DEVICE_KEY")
    with ws:
        attached = jaxws.jit(lambda a: a * 2)(jnp.asarray(x))  # a cycle's output
        labels = jaxws.jit(lambda a: a + 0)(jnp.asarray(y))
        assert _device_key(DataSet(attached, jnp.asarray(y))) is None  # a workspace's array: named by the full check
        assert _device_key(DataSet(jnp.asarray(x), labels)) is None
        assert _device_key(DataSet(jnp.asarray(x), jnp.asarray(y), None, labels)) is None


def test_the_list_check_names_a_bad_batch_after_a_run_of_good_ones():
    # a run of batches keyed as the one before is not checked again; what breaks the run is
    x, y = arrays(40)
    good = [DataSet(jnp.asarray(x[i:i + 8]), jnp.asarray(y[i:i + 8])) for i in range(0, 40, 8)]
    net = network()
    before = jaxws.detach(net.params)
    narrow = DataSet(jnp.asarray(x[:8, :3]), jnp.asarray(y[:8]))
    with pytest.raises(jaxws.InvalidBatchError, match=r"in data\[3\], counting from 0"):
        net.fit(good[:3] + [narrow] + good[3:], progress=False, steps_per_execution=2)
    with pytest.raises(jaxws.LeakedWorkspacePointerError, match=r"data\[4\]"):
        net.fit(good[:4] + [DataSet(dead_features(), jnp.asarray(y[:8]))] + good[4:], progress=False)
    assert net.iteration == 0
    jax.tree.map(np.testing.assert_array_equal, net.params, before)
    net.fit(good, progress=False, steps_per_execution=2)
    assert net.iteration == 5


def test_each_label_check_is_a_new_buffer_that_its_steps_may_donate():
    from jaxws.nn import LabelCheck

    first, second = LabelCheck.init(), LabelCheck.init()
    assert first.values.unsafe_buffer_pointer() != second.values.unsafe_buffer_pointer()
    jax.jit(lambda c: c.values + 1, donate_argnums=0)(first)
    assert first.values.is_deleted() and not second.values.is_deleted()
    np.testing.assert_array_equal(second.values, [0, -1, 0, np.iinfo(np.int32).max, np.iinfo(np.int32).min])


def test_dl4j_per_batch_loop_recycles_label_checks_read_as_valid_and_names_the_bad_call(monkeypatch):
    # fit(batch) per batch: each call reads the checks of the calls before it that are done, and
    # later calls donate those (valid) checks on, so at most two serve this loop (one per call
    # in flight); a bad label is still named by its own call's step, not by the steps the
    # recycled check counted before
    from jaxws.nn import LabelCheck

    made = []
    init = LabelCheck.init.__func__
    monkeypatch.setattr(LabelCheck, "init", classmethod(lambda cls: made.append(net.iteration) or init(cls)))
    x, y = arrays(160)
    net = network()
    batches = [DataSet(jnp.asarray(x[i:i + 16]), jnp.asarray(y[i:i + 16])) for i in range(0, 160, 16)]
    for ds in batches:
        net.fit(ds, progress=False)
        # done: the next call reads its check (the check's buffer can be ready up to ms after
        # the params' on this CPU, so the test waits for both)
        jax.block_until_ready((net.params, [c.state.values for c in net._pending_checks]))
    assert len(made) <= 2 and net.iteration == 10, made
    labels = np.asarray(y[:16]).copy()
    labels[3] = C + 2
    with pytest.raises(jaxws.InvalidBatchError) as caught:  # read in its own call if done by then, else in the next
        net.fit(DataSet(batches[0].features, jnp.asarray(labels)), progress=False)  # on a recycled check
        jax.block_until_ready((net.params, [c.state.values for c in net._pending_checks]))
        net.fit(batches[1], progress=False)
    message = str(caught.value)
    assert "batch 0 (counting from 0 in that call)" in message, message
    assert f"..{C + 2}); 1 invalid label(s) in all, over 1 step(s)" in message, message
    assert len(made) <= 2, made
    net.fit(batches[2], progress=False)  # training goes on; the bad check is not donated on
    net.score(batches[2])  # reads every pending check: nothing more to report


@pytest.mark.parametrize("guard", [None, "device_to_host", "log", "all"])
def test_the_reads_fit_and_score_are_asked_for_pass_any_transfer_guard_and_leave_it_set(guard):
    from jaxws.arrays import allow_reads

    contexts = {None: contextlib.nullcontext(), "device_to_host": jax.transfer_guard_device_to_host("disallow"),
                "log": jax.transfer_guard_device_to_host("log"), "all": jax.transfer_guard("disallow")}
    x, y = arrays(96)
    y[70] = 99  # batch 2 of 3: out of range for 3 classes
    batches = [DataSet(jnp.asarray(x[i:i + 32]), jnp.asarray(y[i:i + 32])) for i in range(0, 96, 32)]
    net = network()
    net.fit(batches[0], progress=False)
    with contexts[guard]:
        set_here = jax.config.jax_transfer_guard_device_to_host
        with allow_reads():  # where a guard is set, JAX's "allow" context; where none is, nothing
            assert jax.config.jax_transfer_guard_device_to_host == (None if guard is None else "allow")
        assert jax.config.jax_transfer_guard_device_to_host == set_here
        if guard != "all":  # "all" also refuses host-to-device: score's Python scalars
            with pytest.raises(jaxws.InvalidBatchError, match=r"outside 0\.\.2 \(found 0\.\.99\); 1 invalid"):
                for ds in batches:  # DL4J's loop: each call reads the checks of the calls before it
                    net.fit(ds, progress=False)
                net.score(batches[0])  # reads the last one
            assert np.isfinite(net.score(batches[0]))
            assert net.iteration == 4
        assert jax.config.jax_transfer_guard_device_to_host == set_here
