"""Interrupts and concurrent readers (DESIGN invariant 10): a model never loses its state.

A KeyboardInterrupt at a random moment of fit / fused fit / do_evaluation /
ParallelWrapper.fit leaves the model holding exactly the state after some whole number of
steps, with ``iteration`` saying which; readers on other threads see whole versions.
"""

import _thread
import gc
import os
import random
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxws
from jaxws.data import from_iterable
from jaxws.eval import Evaluation
from jaxws.interrupts import guarded
from jaxws.nn import Dense, FunctionalModel, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer, TrainingListener
from jaxws.parallel import ParallelWrapper

TRIALS = 50
D, C = 6, 3


def network():
    conf = NeuralNetConfiguration(layers=[Dense(8, activation="tanh"), OutputLayer(C)], input_shape=(D,),
                                  updater=optax.sgd(0.05), seed=0)
    return MultiLayerNetwork(conf).init()


def batches(n=24, size=8):
    r = np.random.default_rng(1)
    return [(r.normal(size=(size, D)).astype(np.float32), r.integers(0, C, size).astype(np.int32)) for _ in range(n)]


def interrupted(call, delay, how="interrupt_main"):
    """Runs ``call`` with an interrupt ``delay`` seconds in; True if it was interrupted."""
    fire = _thread.interrupt_main if how == "interrupt_main" else (lambda: os.kill(os.getpid(), signal.SIGINT))
    timer = threading.Timer(delay, fire)
    hit = False
    try:
        timer.start()
        call()
        timer.join()  # a late interrupt lands here, inside the try
        for _ in range(1000):
            pass
    except KeyboardInterrupt:
        hit = True
    timer.join()
    return hit


class Trajectory:
    """Parameters after each step of an uninterrupted run: the only states allowed."""

    def __init__(self, data, steps_per_execution=1):
        net = network()
        self.initial = jaxws.detach((net.params, net.updater_state))
        self.params = [jaxws.detach(net.params)]
        for i in range(len(data)):
            net.fit(data[i:i + 1], progress=False)
            self.params.append(jaxws.detach(net.params))

    def reset(self, net):
        net.set_params(self.initial[0])
        net.iteration = 0

    def check(self, net):
        leaves = jax.tree.leaves(net._carry)
        assert not any(a.is_deleted() for a in leaves), "the interrupt destroyed the model's state"
        expected = self.params[net.iteration]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), net.params, expected)


def timed(call):
    call()  # compile
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@pytest.mark.parametrize("how", ["interrupt_main", "SIGINT"])
@pytest.mark.parametrize("variant", ["fit", "fit, prefetched", "fit, steps_per_execution=3"])
def test_fit_interrupted_anywhere_keeps_a_whole_step(variant, how):
    data = batches()
    reference = Trajectory(data)
    net = network()
    kwargs = {"progress": False}
    source = lambda: data  # noqa: E731
    if variant == "fit, prefetched":
        source = lambda: from_iterable(data)  # noqa: E731
    if variant.endswith("=3"):
        kwargs["steps_per_execution"] = 3
    duration = timed(lambda: (reference.reset(net), net.fit(source(), **kwargs)))
    rng = random.Random(0)
    hits = 0
    trials = TRIALS if how == "interrupt_main" else 10
    for _ in range(trials):
        reference.reset(net)
        hits += interrupted(lambda: net.fit(source(), **kwargs), rng.uniform(0, duration * 1.1), how)
        reference.check(net)
        assert 0 <= net.iteration <= len(data)
    assert hits >= trials // 2  # the interrupts really landed inside fit
    net.fit(data, progress=False)  # and the model trains on
    assert net.iteration >= len(data)



@pytest.mark.parametrize("resident", [False, True])
def test_fit_of_an_iterator_interrupted_anywhere_resumes_at_the_first_batch_not_taken(resident):
    from jaxws.data import ArrayDataSetIterator

    data = batches()
    reference = Trajectory(data)
    net = network()
    x, y = (np.concatenate(arrays) for arrays in zip(*data))
    it = ArrayDataSetIterator(x, y, 8, resident=resident)
    duration = timed(lambda: (reference.reset(net), it.reset(), net.fit(it, progress=False)))
    rng = random.Random(4)
    resumed = 0
    for _ in range(TRIALS // 2):
        reference.reset(net)
        it.reset()
        if not interrupted(lambda: net.fit(it, progress=False), rng.uniform(0, duration)):
            continue
        reference.check(net)
        # a resident pass moved the cursor as it took the next batch, so an interrupt after a
        # step left it one batch behind: fit(it) again trained on that batch twice
        assert it.position == 8 * net.iteration
        if net.iteration < len(data):
            net.fit(it, progress=False)  # the rest of the epoch
            resumed += 1
        assert net.iteration == len(data)
        reference.check(net)
    assert resumed >= TRIALS // 8

def test_do_evaluation_interrupted_anywhere_keeps_whole_batches():
    data = batches(40)
    net = network()
    duration = timed(lambda: net.evaluate(data))
    rng = random.Random(1)
    for _ in range(TRIALS):
        ev = Evaluation()
        interrupted(lambda: net.do_evaluation(data, ev), rng.uniform(0, duration * 1.1))
        if ev.state is not None:
            assert not any(a.is_deleted() for a in jax.tree.leaves(ev.state))
            assert int(ev.confusion_matrix().sum()) % 8 == 0  # whole batches only
            net.do_evaluation(data[:2], ev)  # the evaluator goes on counting
    assert not any(a.is_deleted() for a in jax.tree.leaves(net._carry))



def test_an_interrupt_as_rnn_time_step_returns_keeps_the_state_it_made():
    from jaxws.nn import LSTM, RnnOutputLayer

    conf = NeuralNetConfiguration(layers=[LSTM(8), RnnOutputLayer(3)], input_shape=(None, 4))
    net = MultiLayerNetwork(conf).init()
    x = np.random.default_rng(0).normal(size=(2, 6, 4)).astype(np.float32)
    full = np.asarray(net.output(x))
    net.rnn_time_step(x[:, 0])
    program = net._rnn_fn

    class InterruptedAsItReturns:  # the state donated, the new one not yet kept
        def _call_planned(self, *args):
            out = program._call_planned(*args)
            _thread.interrupt_main()
            for _ in range(1000):  # the interrupt arrives here
                pass
            return out

        __call__ = _call_planned

    net._rnn_fn = InterruptedAsItReturns()
    with pytest.raises(KeyboardInterrupt):
        net.rnn_time_step(x[:, 1])
    net._rnn_fn = program
    # before: the state was deleted and every later call raised DeletedArrayError
    assert not any(a.is_deleted() for a in jax.tree.leaves(net._rnn_state))
    for t in range(2, 6):  # the interrupted step's state was kept: the sequence goes on
        np.testing.assert_allclose(net.rnn_time_step(x[:, t]), full[:, t], rtol=1e-5, atol=1e-6)


def test_an_interrupt_as_an_evaluators_update_returns_keeps_the_counts_it_made():
    ev = Evaluation()
    labels, predictions = np.array([0, 1, 2, 1], np.int32), np.eye(3, dtype=np.float32)[[0, 1, 1, 1]]
    ev.eval(labels, predictions)
    update = ev._jit_update

    def interrupted_as_it_returns(*args):  # the state donated, the new one not yet kept
        out = update(*args)
        _thread.interrupt_main()
        for _ in range(1000):  # the interrupt arrives here
            pass
        return out

    ev._jit_update = interrupted_as_it_returns
    with pytest.raises(KeyboardInterrupt):
        ev.eval(labels, predictions)
    ev._jit_update = update
    assert not any(a.is_deleted() for a in jax.tree.leaves(ev.state))  # before: deleted, every call refused
    ev.eval(labels, predictions)
    assert int(ev.confusion_matrix().sum()) == 12 and ev.accuracy() == 0.75

def test_parallel_wrapper_interrupted_anywhere_keeps_a_consensus():
    data = batches(32)
    net = network()
    initial = jaxws.detach(net.params)
    wrapper = ParallelWrapper(net, workers=2, averaging_frequency=2, prefetch_buffer=0)
    consensus = {}  # iteration -> parameters after that many rounds, uninterrupted
    for rounds in range(0, 17, 2):
        net.set_params(initial)
        net.iteration = 0
        wrapper.fit(data[:2 * rounds])  if rounds else None
        consensus[net.iteration] = jaxws.detach(net.params)
    duration = timed(lambda: (net.set_params(initial), wrapper.fit(data)))
    rng = random.Random(2)
    for _ in range(TRIALS):
        net.set_params(initial)
        net.iteration = 0
        interrupted(lambda: wrapper.fit(data), rng.uniform(0, duration * 1.1))
        assert not any(a.is_deleted() for a in jax.tree.leaves(net._carry))
        assert net.iteration in consensus
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
                     net.params, consensus[net.iteration])



def test_a_parallel_wrapper_over_an_iterator_interrupted_anywhere_resumes_where_the_rounds_stopped():
    from jaxws.data import ArrayDataSetIterator

    x, y = (np.concatenate(arrays) for arrays in zip(*batches(32)))
    net = network()
    initial = jaxws.detach(net.params)
    it = ArrayDataSetIterator(x, y, 8)
    wrapper = ParallelWrapper(net, workers=2, averaging_frequency=2)  # prefetched: the ring reads ahead
    wrapper.fit(it)
    whole = jaxws.detach(net.params)
    duration = timed(lambda: (net.set_params(initial), it.reset(), wrapper.fit(it)))
    rng = random.Random(5)
    resumed = 0
    for _ in range(TRIALS // 2):
        net.set_params(initial)
        net.iteration = 0
        it.reset()
        if not interrupted(lambda: wrapper.fit(it), rng.uniform(0, duration)):
            continue
        assert it.position == 16 * net.iteration  # a round: one batch of 8 for each of 2 workers
        if net.iteration < 16:
            wrapper.fit(it)  # the rest of the epoch
            resumed += 1
        assert net.iteration == 16
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), net.params, whole)
    assert resumed >= TRIALS // 8

def test_an_interrupt_inside_a_commit_waits_for_it():
    order = []
    with guarded() as guard:
        with pytest.raises(KeyboardInterrupt):
            with guard:
                _thread.interrupt_main()
                for _ in range(10000):  # the interrupt is pending here, not raised
                    pass
                order.append("committed")
    assert order == ["committed"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_listener_stays_interruptible():
    net = network()

    class Slow(TrainingListener):
        def iteration_done(self, model, iteration, epoch, loss):
            if iteration == 3:
                _thread.interrupt_main()
                time.sleep(5)  # interrupted here, not after

    net.add_listeners(Slow())
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        net.fit(batches(), progress=False)
    assert time.perf_counter() - start < 4
    assert net.iteration == 3
    assert not any(a.is_deleted() for a in jax.tree.leaves(net._carry))



@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_interrupted_checkpoint_save_is_counted_and_rotated(asynchronous, tmp_path):
    from jaxws.nn import CheckpointListener

    data = batches()
    reference = Trajectory(data)
    net = network()
    listener = CheckpointListener(tmp_path, keep_last=2, save_every_n_iterations=1, asynchronous=asynchronous)
    net.add_listeners(listener)
    duration = timed(lambda: (reference.reset(net), net.fit(data, progress=False)))
    rng = random.Random(3)
    for _ in range(20):
        reference.reset(net)
        interrupted(lambda: net.fit(data, progress=False), rng.uniform(0, duration))
        reference.check(net)
        listener.wait()
        # orbax lost count of checkpoints whose save was interrupted: they stayed, past keep_last
        on_disk = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
        assert on_disk == [c.number for c in listener.available_checkpoints()]
        assert len(on_disk) <= 2
        last = listener.load_checkpoint(model=network())
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
                     last.params, reference.params[last.iteration])
    listener.close()


# -- a user's own cycles -------------------------------------------------------------------


def test_a_loop_of_cycles_interrupted_anywhere_is_whole_when_entered_again():
    # an interrupt that arrives during the last call of a `with ws:` body is raised as
    # __exit__ starts, before its first line: the cycle stayed open (gc off for good, and
    # the next `with ws:` nested in it, invalidating nothing)
    manager = jaxws.get_workspace_manager()
    ws = manager.get_workspace_for_current_thread(jaxws.WorkspaceConfiguration(), "USER_LOOP")
    step = jaxws.jit(lambda p, x: (p + x, (p * x).sum()), donate_argnums=0)
    x = jnp.ones(16)

    def loop(p, n=200):
        for _ in range(n):
            with ws:
                p, loss = step(p, x)
                p = jaxws.detach(p)
        return p

    duration = timed(lambda: loop(jnp.zeros(16)))
    rng = random.Random(6)
    for _ in range(100):
        interrupted(lambda: loop(jnp.zeros(16)), rng.uniform(0, duration))
        with ws:  # the cell run again
            y = step(jnp.zeros(16), x)[1]  # the loss: the cycle's own (the carry is carried)
        assert not ws.is_scope_active and manager.current_workspace is None
        assert y.is_deleted()  # the cycle invalidated its outputs: it was not nested in a stale one
    manager.destroy_workspace(ws)
    assert gc.isenabled()


def test_a_cycle_whose_exit_never_ran_ends_when_it_is_entered_again():
    manager = jaxws.get_workspace_manager()
    ws = manager.get_workspace_for_current_thread(jaxws.WorkspaceConfiguration(), "SKIPPED")
    double = jaxws.jit(lambda a: 2 * a)

    def opened_and_interrupted():  # what an interrupt at __exit__'s first instruction leaves
        ws.__enter__()
        return double(jnp.ones(2))

    stale = opened_and_interrupted()
    assert ws.is_scope_active
    with ws:  # from another frame: the opener has returned, so its cycle ends first
        fresh = double(jnp.ones(2))
    assert not ws.is_scope_active and stale.is_deleted() and fresh.is_deleted()
    for i in range(3):  # the same frame at the same statement: a loop that caught the interrupt
        ws.__enter__()
        assert ws._depth == 1
    ws.__exit__(None, None, None)
    with ws:  # nesting in one frame, at another statement, still nests
        with ws:
            assert ws._depth == 2
        kept = double(jnp.ones(2))
    assert kept.is_deleted()

    def paused():  # a generator pauses inside a cycle: that is not an exit skipped
        with ws:
            yield double(jnp.ones(2))

    gen = paused()
    inside = next(gen)
    with ws:
        assert ws._depth == 2
    assert not inside.is_deleted()
    next(gen, None)
    assert not ws.is_scope_active and inside.is_deleted()
    manager.destroy_workspace(ws)

# -- concurrent readers ------------------------------------------------------------------


def counting_model():
    """Params a and b both grow by exactly 1 per step; a version is whole iff a == b."""
    def apply(p, x, training):
        return jnp.stack([jnp.broadcast_to(p["a"], x.shape[:1]), jnp.broadcast_to(p["b"], x.shape[:1])], -1) + 0 * x[:, :2]

    def loss(pred, y, mask):
        return -jnp.mean(pred[:, 0] + pred[:, 1])  # d/da = d/db = -1: SGD(1) adds 1 to each

    return FunctionalModel(apply, {"a": jnp.zeros(()), "b": jnp.zeros(())}, loss=loss, updater=optax.sgd(1.0))


def test_readers_on_other_threads_see_whole_versions_while_fit_runs():
    model = counting_model()
    x = np.ones((4, 3), np.float32)
    data = [(x, np.zeros(4, np.float32))] * 50
    model.fit(data[:1], progress=False)
    model.output(x)
    model.score(data[:10])
    stop = threading.Event()
    errors, outputs, scores = [], [], []

    def reader(kind):
        while not stop.is_set():
            try:
                if kind == "output":
                    outputs.append(np.asarray(model.output(x)))
                else:
                    scores.append(model.score(data[:10]))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return

    threads = [threading.Thread(target=reader, args=(k,)) for k in ("output", "output", "score")]
    for t in threads:
        t.start()
    for _ in range(20):
        model.fit(data, progress=False)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert len(outputs) > 20 and len(scores) > 5
    for out in outputs:
        assert np.all(out[:, 0] == out[:, 1]) and np.all(out == out[0, 0])  # one version per call
    for s in scores:  # the mean over 10 batches of one version is -2a for an integer a
        assert s == -2 * round(-s / 2), s
    assert model.iteration == 1 + 20 * 50
    np.testing.assert_array_equal(model.output(x)[0], [1001.0, 1001.0])
