"""ParallelWrapper against a plain-JAX local-SGD reference (numpy averaging)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxws
from jaxws.data import from_iterable
from jaxws import WorkspaceMode
from jaxws._internals import ArrayImpl
from jaxws.nn import Dense, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer
from jaxws.parallel import ParallelWrapper, TrainingMode

D, CLASSES = 5, 3


def make_batches(n, size=8, seed=0, last=None):
    r = np.random.default_rng(seed)
    out = []
    for i in range(n):
        b = last if (last and i == n - 1) else size
        x = r.normal(size=(b, D)).astype(np.float32)
        out.append((x, (np.abs(x[:, :CLASSES]).argmax(1)).astype(np.int32)))
    return out


def network(updater):
    conf = NeuralNetConfiguration(layers=[Dense(8, activation="tanh"), OutputLayer(CLASSES)],
                                  input_shape=(D,), updater=updater, seed=4)
    return MultiLayerNetwork(conf).init()


def loss(params, x, y):
    h = jnp.tanh(x @ params[0]["W"] + params[0]["b"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ params[1]["W"] + params[1]["b"], y).mean()


def reference(params, updater, batches, workers, k, average_updaters=True):
    """Local SGD written out: a loop over workers, optax updates, numpy averaging."""
    params = [jax.tree.map(np.asarray, params) for _ in range(workers)]
    states = [updater.init(p) for p in params]
    rounds = [batches[i:i + workers] for i in range(0, len(batches), workers)]
    for g in range(0, len(rounds), k):
        group = rounds[g:g + k]
        for rnd in group:
            for w, (x, y) in enumerate(rnd):
                grads = jax.grad(loss)(params[w], x, y)
                updates, states[w] = updater.update(grads, states[w], params[w])
                params[w] = optax.apply_updates(params[w], updates)
        active = range(len(group[-1]))  # the workers that had data in the last round

        def mean(trees):
            return jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x) for x in xs]), 0).astype(np.asarray(xs[0]).dtype), *trees)

        consensus = mean([params[w] for w in active])
        params = [consensus] * workers
        if average_updaters:
            states = [mean([states[w] for w in active])] * workers
    return params[0]


def assert_tree_close(a, b, tol=1e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_equals_local_sgd_reference(workers, k):
    batches = make_batches(13, last=5)  # 13 does not divide; the last batch is smaller too
    net = network(optax.adam(1e-2))
    expected = reference(net.params, optax.adam(1e-2), batches, workers, k)
    ParallelWrapper(net, workers=workers, averaging_frequency=k, prefetch_buffer=2).fit(batches)
    assert_tree_close(net.params, expected)
    assert net.iteration == -(-13 // workers)


@pytest.mark.parametrize("updater", [optax.sgd(0.1), optax.adam(1e-2)], ids=["sgd", "adam"])
@pytest.mark.parametrize("average_updaters", [True, False])
def test_updaters_with_and_without_averaging(updater, average_updaters):
    batches = make_batches(16)  # divides evenly into rounds of 4 and groups of 2
    net = network(updater)
    expected = reference(net.params, updater, batches, 4, 2, average_updaters)
    ParallelWrapper(net, workers=4, averaging_frequency=2, average_updaters=average_updaters).fit(batches)
    assert_tree_close(net.params, expected)


def test_one_worker_equals_fit():
    batches = make_batches(7)
    a, b = network(optax.adam(1e-2)), network(optax.adam(1e-2))
    a.fit(batches, progress=False)
    ParallelWrapper(b, workers=1, averaging_frequency=3).fit(batches)
    assert_tree_close(a.params, b.params, 1e-6)


def test_shared_gradients_with_sgd_equals_averaging_every_round():
    batches = make_batches(12)
    a, b = network(optax.sgd(0.2)), network(optax.sgd(0.2))
    ParallelWrapper(a, workers=4, training_mode=TrainingMode.SHARED_GRADIENTS, averaging_frequency=3).fit(batches)
    ParallelWrapper(b, workers=4, averaging_frequency=1).fit(batches)
    assert_tree_close(a.params, b.params, 1e-6)


def test_pmap_equals_sharding():
    batches = make_batches(11)
    a, b = network(optax.adam(1e-2)), network(optax.adam(1e-2))
    ParallelWrapper(a, workers=4, averaging_frequency=2, backend="pmap").fit(batches)
    ParallelWrapper(b, workers=4, averaging_frequency=2).fit(batches)
    assert_tree_close(a.params, b.params, 1e-6)


@pytest.mark.parametrize("k", [1, 4])
def test_one_collective_and_one_dispatch_per_k_rounds(k):
    net = network(optax.adam(1e-2))
    wrapper = ParallelWrapper(net, workers=4, averaging_frequency=k)
    wrapper.fit(make_batches(4 * k))
    program = wrapper._compiled()
    stacked = wrapper._replicate(net._carry)
    group, _ = wrapper._groups(net._feed(make_batches(4 * k), "test", place=False))
    first = next(iter(group))
    text = program.lower(stacked, first).as_text()
    group.close()
    assert text.count("all_reduce") + text.count("all-reduce") == 1
    assert program.compiles == 1 and wrapper.rounds == k  # one program for k rounds


class Watched:
    """A program's own jax.jit (or pmap), noting whether its arguments were computed when
    it was called."""

    def __init__(self, program, ready):
        self.program, self.ready = program, ready

    def __call__(self, *args, **kwargs):
        leaves = jax.tree.leaves((args, kwargs))
        if not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):  # a call, not a trace
            self.ready.append(all(leaf.is_ready() for leaf in leaves if type(leaf) is ArrayImpl))
        return self.program(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.program, name)


@pytest.mark.parametrize("backend", ["sharding", "pmap"])
def test_each_program_over_the_cpu_devices_finds_the_one_before_done(monkeypatch, backend):
    """XLA's CPU all-reduce deadlocks (then aborts the process) when dozens of programs are
    queued on 8 devices: each round's program is dispatched once the one before is done."""
    ready = []
    pmap = jax.pmap
    monkeypatch.setattr(jax, "pmap", lambda *args, **kwargs: Watched(pmap(*args, **kwargs), ready))
    net = network(optax.sgd(0.1))
    wrapper = ParallelWrapper(net, workers=8, averaging_frequency=1, prefetch_buffer=2, backend=backend)
    program = wrapper._compiled()
    if backend == "sharding":
        program._donating = Watched(program._donating, ready)
    batches = make_batches(8 * 12)
    wrapper.fit(batches)
    assert len(ready) == 12 and all(ready)
    expected = reference(network(optax.sgd(0.1)).params, optax.sgd(0.1), batches, 8, 1)
    assert_tree_close(net.params, expected)


def sharded_batches(n, workers=8):
    """Device batches laid over ``workers`` CPU devices (GSPMD data parallelism), the last
    two sharing one label array, with the same batches on the host."""
    sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:workers]), ("data",)), jax.P("data"))
    host = make_batches(n, size=16)
    host[-1] = (host[-1][0], host[-2][1])
    placed = [(jax.device_put(x, sharding), jax.device_put(y, sharding)) for x, y in host[:-1]]
    placed.append((jax.device_put(host[-1][0], sharding), placed[-1][1]))
    return placed, host


def test_passes_over_batches_on_several_cpu_devices_run_one_program_at_a_time(monkeypatch):
    """fit, do_evaluation and score over batches sharded across the CPU devices run as
    plain JAX would, but each program waits for the one before: queued by the dozen,
    XLA's CPU all-reduce deadlocks and aborts the process."""
    from jaxws.eval import Evaluation
    from jaxws.step import WorkspaceFunction

    placed, host = sharded_batches(24)
    reference = network(optax.adam(1e-2))
    reference.fit(host)  # on one device
    ready = []
    init = WorkspaceFunction.__init__

    def watched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._donating = Watched(self._donating, ready)

    monkeypatch.setattr(WorkspaceFunction, "__init__", watched_init)
    net = network(optax.adam(1e-2))  # its programs made from now on
    net.fit(iter(placed), epochs=1)
    assert len(ready) == 24 and all(ready)
    assert_tree_close(net.params, reference.params, tol=1e-5)
    assert len(jax.tree.leaves(net.params)[0].sharding.device_set) == 8

    ready.clear()
    got = net.do_evaluation(iter(placed), Evaluation())[0]
    assert len(ready) == 24 and all(ready)
    expected = net.do_evaluation(host, Evaluation())[0]
    assert got.accuracy() == expected.accuracy() and got.confusion_matrix().tolist() == expected.confusion_matrix().tolist()
    assert net.score(iter(placed)) == pytest.approx(net.score(host), rel=1e-6)
    for (x, y), (hx, hy) in zip(placed, host):  # the user's arrays survive, the shared labels too
        assert not x.is_deleted() and not y.is_deleted()
        np.testing.assert_array_equal(np.asarray(x), hx)
        np.testing.assert_array_equal(np.asarray(y), hy)


def test_fused_steps_and_resident_data_over_several_cpu_devices_equal_one_device():
    placed, host = sharded_batches(24)
    fused, expected = network(optax.adam(1e-2)), network(optax.adam(1e-2))
    fused.fit(placed, steps_per_execution=4)
    expected.fit(host, steps_per_execution=4)
    assert_tree_close(fused.params, expected.params)
    sharding = placed[0][0].sharding
    x = jax.device_put(np.concatenate([h[0] for h in host]), sharding)
    y = jax.device_put(np.concatenate([h[1] for h in host]), sharding)
    resident, expected = network(optax.adam(1e-2)), network(optax.adam(1e-2))
    resident.fit((x, y), batch_size=16, steps_per_execution=6)  # batches taken inside the program
    expected.fit((np.asarray(x), np.asarray(y)), batch_size=16, steps_per_execution=6)
    assert_tree_close(resident.params, expected.params)
    assert not x.is_deleted() and not y.is_deleted() and all(not a.is_deleted() for a in jax.tree.leaves(placed))


def test_a_checked_step_over_sharded_labels_adds_one_all_reduce_to_the_gradients():
    """Each reduction over labels laid across devices is an all-reduce the step waits for:
    the label check's count rides in the gradients' all-reduce and its smallest and largest
    label share one, where there were three of their own."""
    import re

    from jaxws.data import DataSet
    from jaxws.nn.checks import LabelCheck

    placed, _ = sharded_batches(2)
    net = network(optax.adam(1e-2))
    replicated = jax.NamedSharding(placed[0][0].sharding.mesh, jax.P())
    args = jax.device_put((net._carry, LabelCheck.init()), replicated)

    def all_reduces(step, *args):
        return len(re.findall(r"\ball-reduce(?:-start)?\(", jax.jit(step).lower(*args).compile().as_text()))

    plain = all_reduces(net.train_step(), args[0], DataSet(*placed[0]))
    checked = all_reduces(net._checked_step(net.training_workspace_mode), *args, DataSet(*placed[0]))
    assert plain >= 1 and checked == plain + 1


def test_invalid_labels_laid_across_devices_are_reported_with_their_extremes():
    placed, host = sharded_batches(3)
    x, y = host[1]
    y = y.copy()
    y[[2, 13]] = np.iinfo(np.int32).min, 5  # the smallest int32: ``-label`` would overflow
    sharding = placed[0][1].sharding
    placed[1] = (placed[1][0], jax.device_put(y, sharding))
    net = network(optax.adam(1e-2))
    with pytest.raises(jaxws.InvalidBatchError, match=r"batch 1 \(counting from 0 in that call\) was the first with "
                       r"classes outside 0\.\.2 \(found -2147483648\.\.5\); 2 invalid label\(s\) in all, over 3 step"):
        net.fit(iter(placed))


@pytest.mark.parametrize("kind", ["classes", "one-hot with masks"])
def test_a_group_of_batches_alike_stacks_as_the_padded_path_does(kind):
    from jaxws.data import DataSet
    from jaxws.parallel.groups import _stack_padded, stack

    r = np.random.default_rng(0)

    def batch(n=4):
        x = r.normal(size=(n, 3, D)).astype(np.float32)
        if kind == "classes":
            return DataSet(x, r.integers(0, CLASSES, (n, 3)).astype(np.int32))
        return DataSet(x, np.eye(CLASSES, dtype=np.float32)[r.integers(0, CLASSES, (n, 3))],
                       (r.random((n, 3)) > 0.2).astype(np.int32), (r.random((n, 3)) > 0.2).astype(np.float32))

    slots = [[batch() for _ in range(4)] for _ in range(3)]
    fast, padded = stack(slots), _stack_padded(slots)
    assert jax.tree.structure(fast) == jax.tree.structure(padded)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(padded)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    slots[-1][-1] = batch(2)  # a smaller last batch, a missing one: padded and masked
    smaller = stack(slots)
    assert smaller.data.features.shape == (4, 3, 4, 3, D) and smaller.data.labels_mask[3, 2, 2:].sum() == 0
    slots[-1][-1] = None
    assert stack(slots).active[3, 2] == 0


def test_epochs_and_workspace_mode_none():
    batches = make_batches(8)
    a, b = network(optax.sgd(0.1)), network(optax.sgd(0.1))
    expected = reference(a.params, optax.sgd(0.1), batches * 2, 4, 2)
    ParallelWrapper(a, workers=4, averaging_frequency=2, workspace_mode=WorkspaceMode.NONE).fit(batches, epochs=2)
    assert_tree_close(a.params, expected)
    kept = b.params
    ParallelWrapper(b, workers=4, averaging_frequency=2, workspace_mode=WorkspaceMode.SEPARATE).fit(batches, epochs=2)
    assert_tree_close(b.params, expected)
    assert not any(x.is_deleted() for x in jax.tree.leaves(kept))  # the model's own buffers are copied


def laid_out(monkeypatch, wrapper):
    """Counts the times ``wrapper`` lays the model's carry out as replicas."""
    calls = []
    replicate = wrapper._replicate
    monkeypatch.setattr(wrapper, "_replicate", lambda carry: calls.append(1) or replicate(carry))
    return calls


@pytest.mark.parametrize("mode", ["averaging", "averaging, own updaters", "shared gradients", "pmap"])
def test_a_fit_after_a_fit_starts_from_the_replicas_it_ended_with(monkeypatch, mode):
    """Where every replica equals the consensus the model got, the next fit starts from
    them instead of laying the model out again; where they differ (updater state not
    averaged), it lays it out. The same numbers as a new wrapper for each call."""
    first, second = make_batches(16, seed=1), make_batches(13, seed=2, last=5)
    kwargs = {"averaging, own updaters": {"average_updaters": False},
              "shared gradients": {"training_mode": TrainingMode.SHARED_GRADIENTS},
              "pmap": {"backend": "pmap"}}.get(mode, {})
    net, expected = network(optax.adam(1e-2)), network(optax.adam(1e-2))
    wrapper = ParallelWrapper(net, workers=4, averaging_frequency=2, **kwargs)
    calls = laid_out(monkeypatch, wrapper)
    wrapper.fit(first)
    user = jaxws.detach(net.params)  # a copy of the user's
    wrapper.fit(second)
    for batches in (first, second):
        ParallelWrapper(expected, workers=4, averaging_frequency=2, **kwargs).fit(batches)
    assert_tree_close(net.params, expected.params, 1e-6)
    assert len(calls) == (2 if kwargs.get("average_updaters") is False else 1)
    if mode == "averaging":  # and local SGD's over both calls' batches
        assert_tree_close(net.params, reference(network(optax.adam(1e-2)).params, optax.adam(1e-2), first + second, 4, 2))
    assert not any(a.is_deleted() for a in jax.tree.leaves(user))


def test_a_model_changed_between_fits_is_laid_out_again(monkeypatch):
    batches, extra = make_batches(8, seed=1), make_batches(3, seed=2)
    net, expected = network(optax.adam(1e-2)), network(optax.adam(1e-2))
    wrapper = ParallelWrapper(net, workers=4, averaging_frequency=2)
    calls = laid_out(monkeypatch, wrapper)
    wrapper.fit(batches)
    net.fit(extra, progress=False)  # the model trained alone in between
    wrapper.fit(batches)
    ParallelWrapper(expected, workers=4, averaging_frequency=2).fit(batches)
    expected.fit(extra, progress=False)
    ParallelWrapper(expected, workers=4, averaging_frequency=2).fit(batches)
    assert len(calls) == 2
    assert_tree_close(net.params, expected.params, 1e-6)


def test_close_releases_the_kept_replicas(monkeypatch):
    batches = make_batches(8)
    net = network(optax.adam(1e-2))
    with ParallelWrapper(net, workers=4, averaging_frequency=2) as wrapper:
        calls = laid_out(monkeypatch, wrapper)
        wrapper.fit(batches)
        kept = jax.tree.leaves(wrapper._kept[0])
        model = jax.tree.leaves(net._carry)
    assert all(a.is_deleted() for a in kept)  # the wrapper's own buffers, freed at once
    assert not any(a.is_deleted() for a in model)
    wrapper.close()  # idempotent
    wrapper.fit(batches)  # lays the model out again
    assert len(calls) == 2
    expected = network(optax.adam(1e-2))
    ParallelWrapper(expected, workers=4, averaging_frequency=2).fit(batches + batches)
    assert_tree_close(net.params, expected.params, 1e-6)


def test_batches_in_memory_of_one_group_are_stacked_on_the_calling_thread(monkeypatch):
    """Nothing to overlap: a list of one group's batches starts no prefetch thread; a list
    of two groups does (its second group is stacked while the first runs)."""
    from jaxws.data import prefetch

    started = []
    start = prefetch.AsyncDataSetIterator._start
    monkeypatch.setattr(prefetch.AsyncDataSetIterator, "_start", lambda self: started.append(1) or start(self))
    net = network(optax.adam(1e-2))
    wrapper = ParallelWrapper(net, workers=4, averaging_frequency=2, prefetch_buffer=2)
    one, two = make_batches(8, seed=1), make_batches(16, seed=2)
    wrapper.fit(one)
    assert started == []
    wrapper.fit(two)
    assert started == [1]
    assert_tree_close(net.params, reference(network(optax.adam(1e-2)).params, optax.adam(1e-2), one + two, 4, 2))


def test_bad_batch_mid_epoch_raises_and_keeps_the_consensus():
    good = make_batches(8)
    bad = (np.ones((8, D + 1), np.float32), np.zeros(8, np.int32))
    net = network(optax.adam(1e-2))
    expected = reference(net.params, optax.adam(1e-2), good, 4, 2)  # the groups before the failure
    with pytest.raises(jaxws.InvalidBatchError, match=r"expects features of shape \[batch, 5\], received \[8, 6\]"):
        ParallelWrapper(net, workers=4, averaging_frequency=2).fit(from_iterable(lambda: iter(good + [bad] + good)))
    assert_tree_close(net.params, expected)
    assert net.iteration == 2  # the two rounds of the group before the failure
    net.fit(good[:1], progress=False)  # still usable


def test_a_list_with_a_bad_batch_is_refused_before_any_round():
    good = make_batches(8)
    bad = (np.ones((8, D + 1), np.float32), np.zeros(8, np.int32))
    net = network(optax.adam(1e-2))
    before = jaxws.detach(net.params)
    with pytest.raises(jaxws.InvalidBatchError, match=r"received \[8, 6\]\. \(in data\[8\], counting from 0\)"):
        ParallelWrapper(net, workers=4, averaging_frequency=2).fit(good + [bad] + good)
    assert_tree_close(net.params, before, tol=0)
    assert net.iteration == 0


def test_an_exception_in_the_data_surfaces_with_its_cause():
    def loader():
        yield from make_batches(4)
        raise OSError("disk gone")

    net = network(optax.sgd(0.1))
    with pytest.raises(jaxws.AsyncIteratorError) as info:
        ParallelWrapper(net, workers=2, averaging_frequency=1).fit(jaxws.data.from_iterable(loader))
    assert isinstance(info.value.__cause__, OSError)
    assert net.iteration == 2
    assert info.value.batch == 4 and "producing batch 4 (counting from 0)" in str(info.value)  # batches, not rounds


def test_score_reported_after_averaging_is_printed_by_default(capsys):
    net = network(optax.sgd(0.1))
    collect = jaxws.nn.CollectScoresListener(1)
    net.add_listeners(collect)
    wrapper = ParallelWrapper(net, workers=2, averaging_frequency=2, report_score_after_averaging=True)
    wrapper.fit(make_batches(8))
    lines = [line for line in capsys.readouterr().out.splitlines() if "score after averaging" in line]
    assert lines == [f"ParallelWrapper: score after averaging (round {r}): {s:.6f}"
                     for r, s in zip((2, 4), wrapper.scores)]
    assert [i for i, _ in collect.scores] == [2, 4]
    assert [s for _, s in collect.scores] == pytest.approx(wrapper.scores, abs=1e-12)


def test_no_device_to_host_transfer_per_round():
    net = network(optax.sgd(0.1))
    batches = make_batches(16)
    wrapper = ParallelWrapper(net, workers=4, averaging_frequency=2, prefetch_buffer=0)
    wrapper.fit(batches[:8])  # compile first
    with jax.transfer_guard_device_to_host("disallow"):
        wrapper.fit(batches)
    assert wrapper.rounds == 6


@pytest.mark.parametrize("kwargs, fragment", [
    ({"workers": 0}, "workers=0"), ({"workers": 9}, "expected 1..8"),
    ({"averaging_frequency": 0}, "averaging_frequency=0"), ({"prefetch_buffer": -1}, "prefetch_buffer=-1"),
    ({"backend": "mpi"}, "backend='mpi'"), ({"training_mode": "sync"}, "training_mode='sync'"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        ParallelWrapper(network(optax.sgd(0.1)), **kwargs)
    assert fragment in str(info.value)


def test_builder_mirrors_the_guide():
    wrapper = (ParallelWrapper.Builder(network(optax.sgd(0.1)))
               .prefetch_buffer(8).workers(2).averaging_frequency(5)
               .report_score_after_averaging(False).workspace_mode(WorkspaceMode.SINGLE).build())
    assert (wrapper.prefetch_buffer, wrapper.workers, wrapper.averaging_frequency) == (8, 2, 5)
    assert wrapper.workspace_mode is WorkspaceMode.SINGLE and not wrapper.report_score_after_averaging


# -- two processes ---------------------------------------------------------------------------

WORKER = Path(__file__).with_name("parallel_process.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    pytest.importorskip("orbax.checkpoint")  # the processes also save a checkpoint together
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(pid), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    batches = make_batches(16, seed=1)
    net = network(optax.adam(1e-2))
    ParallelWrapper(net, workers=4, averaging_frequency=2).fit(batches)
    for pid in range(2):
        got = np.load(tmp_path / f"params_{pid}.npz")
        expected = jax.tree.leaves(net.params)
        for i, leaf in enumerate(expected):
            np.testing.assert_allclose(got[f"p{i}"], np.asarray(leaf), rtol=1e-5, atol=1e-6)
    with pytest.raises(jaxws.ConfigurationError, match=r"raw optax transformation .*load\(path, conf=\.\.\.\)"):
        MultiLayerNetwork.load(tmp_path / "checkpoint")  # the network was built with optax.adam
    restored = MultiLayerNetwork.load(tmp_path / "checkpoint", conf=net.conf)  # written by two processes, read by one
    assert not [p.name for p in tmp_path.iterdir() if "jaxws" in p.name]  # the replaced one swapped out and removed
    assert restored.iteration == net.iteration
    assert_tree_close(restored.params, net.params)
    assert_tree_close(restored.updater_state, net.updater_state)


def test_one_shot_iterators_cannot_run_two_epochs():
    with pytest.raises(ValueError, match="one-shot iterator"):
        ParallelWrapper(network(optax.sgd(0.1)), workers=2).fit(iter(make_batches(4)), epochs=2)
