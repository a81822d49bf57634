"""Ownership (DESIGN invariant 9): jaxws deletes, donates or invalidates only what it made.

Every entry point that receives user arrays gets device arrays, numpy arrays and a label
array shared by several batches, in every form data takes; afterwards they are all alive,
unattached and unchanged.
"""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxws
from jaxws.data import ArrayDataSetIterator, AsyncDataSetIterator, DataSet, from_iterable
from jaxws.eval import Evaluation
from jaxws.nn import CollectScoresListener, Dense, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer
from jaxws.parallel import ParallelInference, ParallelWrapper

N, D, C = 32, 6, 3


def network(mode=jaxws.WorkspaceMode.ENABLED):
    conf = NeuralNetConfiguration(layers=[Dense(8, activation="tanh"), OutputLayer(C)], input_shape=(D,),
                                  updater=optax.adam(1e-2), seed=0, training_workspace_mode=mode)
    return MultiLayerNetwork(conf).init()


class UserArrays:
    """What a user holds: device features per batch, one device label array they all share."""

    def __init__(self):
        r = np.random.default_rng(0)
        self.x_host = r.normal(size=(N, D)).astype(np.float32)
        self.y_host = (np.arange(N) % C).astype(np.int32)
        self.x = jnp.asarray(self.x_host)
        self.y = jnp.asarray(self.y_host)
        self.xs = [jnp.asarray(self.x_host[i:i + 8]) for i in range(0, N, 8)]
        self.shared_y = jnp.asarray(self.y_host[:8])  # every batch's labels: one array
        self.host = [np.array(self.x_host), np.array(self.y_host)]

    def batches(self):
        return [(x, self.shared_y) for x in self.xs]

    def arrays(self):
        return [self.x, self.y, self.shared_y, *self.xs]

    def assert_intact(self):
        for a in self.arrays():
            assert not a.is_deleted(), "jaxws deleted an array the caller owns"
            assert not jaxws.is_attached(a), "jaxws attached an array the caller owns to a workspace"
        np.testing.assert_array_equal(np.asarray(self.x), self.x_host)
        np.testing.assert_array_equal(np.asarray(self.y), self.y_host)
        np.testing.assert_array_equal(np.asarray(self.shared_y), self.y_host[:8])
        for i, x in enumerate(self.xs):
            np.testing.assert_array_equal(np.asarray(x), self.x_host[8 * i:8 * i + 8])
        np.testing.assert_array_equal(self.host[0], self.x_host)  # numpy inputs untouched too
        np.testing.assert_array_equal(self.host[1], self.y_host)


# each form data takes: (data, keyword arguments); made fresh per call (some are one-shot)
FORMS = {
    "numpy pair": lambda u: ((u.host[0], u.host[1]), {}),
    "device pair": lambda u: ((u.x, u.y), {}),
    "device pair, batch_size = len": lambda u: ((u.x, u.y), {"batch_size": N}),
    "device pair, batch_size < len": lambda u: ((u.x, u.y), {"batch_size": 8}),
    "numpy pair, batch_size < len": lambda u: ((u.host[0], u.host[1]), {"batch_size": 8}),
    "list, shared labels": lambda u: (u.batches(), {}),
    "iterator": lambda u: (iter(u.batches()), {}),
    "generator": lambda u: ((b for b in u.batches()), {}),
    "from_iterable": lambda u: (from_iterable(u.batches()), {}),
    "ArrayDataSetIterator, batch = len": lambda u: (ArrayDataSetIterator(u.x, u.y, batch_size=N), {}),
    "ArrayDataSetIterator, batch < len": lambda u: (ArrayDataSetIterator(u.x, u.y, batch_size=8, shuffle=True), {}),
    "ArrayDataSetIterator over numpy, kept on the host": lambda u: (
        ArrayDataSetIterator(u.host[0], u.host[1], batch_size=8, shuffle=True, resident=False), {}),
    "AsyncDataSetIterator over device batches": lambda u: (AsyncDataSetIterator(from_iterable(u.batches()), 2), {}),
}

ENTRY_POINTS = {
    "fit": lambda net, data, kw: net.fit(data, progress=False, **kw),
    "fit, no prefetch": lambda net, data, kw: net.fit(data, progress=False, prefetch=0, **kw),
    "fit, steps_per_execution=2": lambda net, data, kw: net.fit(data, progress=False, steps_per_execution=2, **kw),
    "fit, NONE mode": lambda net, data, kw: net.fit(data, progress=False, **kw),
    "do_evaluation": lambda net, data, kw: net.do_evaluation(data, Evaluation(), **kw),
    "evaluate": lambda net, data, kw: net.evaluate(data, **kw),
    "score": lambda net, data, kw: net.score(data, **kw),
    "ParallelWrapper.fit": lambda net, data, kw: ParallelWrapper(net, workers=2, prefetch_buffer=2).fit(
        DataSet(*data).split(kw["batch_size"]) if kw else data),
}

_nets = {}


def net_for(entry):
    """One network per entry point, reused: the compiled steps are what costs here."""
    if entry not in _nets:
        _nets[entry] = network(jaxws.WorkspaceMode.NONE if entry == "fit, NONE mode" else jaxws.WorkspaceMode.ENABLED)
    return _nets[entry]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_user_arrays_survive_every_entry_point(entry, form):
    u = UserArrays()
    data, kw = FORMS[form](u)
    if isinstance(data, tuple) and entry in ("evaluate", "score", "do_evaluation") and isinstance(data[0], np.ndarray):
        pass  # numpy evaluated as one batch: fine
    net = net_for(entry)
    ENTRY_POINTS[entry](net, data, kw)
    if isinstance(data, AsyncDataSetIterator):
        data.close()
    u.assert_intact()
    net.fit(u.batches(), progress=False)  # the same arrays train again
    u.assert_intact()
    assert all(not a.is_deleted() for a in jax.tree.leaves(net._carry))


def test_a_shared_label_array_trains_every_batch():
    u = UserArrays()
    net = network()
    net.fit(iter(u.batches()), progress=False)
    assert net.iteration == 4
    u.assert_intact()


@pytest.mark.parametrize("kind", ["device", "numpy", "list"])
def test_output_and_set_params_leave_the_arguments_alone(kind):
    u = UserArrays()
    net = network()
    x = {"device": u.x, "numpy": u.host[0], "list": u.x_host.tolist()}[kind]
    np.testing.assert_allclose(np.asarray(net.output(x)), np.asarray(net.output(u.x_host)), rtol=1e-6)
    params = jax.tree.map(lambda a: jnp.asarray(a) if kind == "device" else np.asarray(a), jaxws.detach(net.params))
    net.set_params(params)
    net.fit(u.batches(), progress=False)
    assert not any(getattr(a, "is_deleted", lambda: False)() for a in jax.tree.leaves(params))
    u.assert_intact()


def test_device_batches_pass_through_without_a_thread_or_a_copy():
    u = UserArrays()
    net = network()
    seen = []

    class Spy(jaxws.nn.TrainingListener):
        def iteration_done(self, model, iteration, epoch, loss):
            seen.append(threading.active_count())

    net.add_listeners(Spy())
    before = threading.active_count()
    net.fit(iter(u.batches()), progress=False)
    assert seen and max(seen) == before  # no prefetch thread for batches already on the device
    u.assert_intact()


def test_the_ring_invalidates_only_what_it_placed():
    u = UserArrays()
    mixed = [(x, np.asarray(u.y_host[:8])) for x in u.xs]  # device features, host labels
    with AsyncDataSetIterator(from_iterable(mixed), 2) as it:
        first = next(it)
        assert first.features is u.xs[0]  # passed through: the same object, no copy
        labels = first.labels
        next(it)
    assert labels.is_deleted()  # the ring's own copy of the host labels
    u.assert_intact()


# -- what jaxws hands back to be kept is detached ----------------------------------------


@pytest.mark.parametrize("kind", ["device", "numpy", "list", "device batches"])
def test_parallel_inference_leaves_the_requests_alone(kind):
    # a request is only read: merged with others, padded, moved by the program's own call,
    # whichever caller runs it; the model's own buffers are never the replicas'
    u = UserArrays()
    net = network()
    requests = {"device": [u.x], "numpy": [u.host[0]], "list": [u.x_host.tolist()], "device batches": u.xs}[kind]
    with ParallelInference(net, batch_limit=16, workers=2) as pi:
        answers = [(x, pi.output(x)) for x in requests]
        threads = [threading.Thread(target=lambda x=x: answers.append((x, pi.output(x)))) for x in requests * 3]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(answers) == 4 * len(requests)
    for x, y in answers:
        np.testing.assert_allclose(y, np.asarray(net.output(np.asarray(x, np.float32))), rtol=1e-6)
    u.assert_intact()
    net.fit(u.batches(), progress=False)  # the model's own buffers were never the replicas'
    u.assert_intact()


def test_to_equinox_returns_a_module_that_survives_training():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(D, 2, width_size=4, depth=1, key=jax.random.key(0))
    model = jaxws.nn.FunctionalModel.from_equinox(mlp, loss=lambda p, y, m: jnp.mean((p - y) ** 2),
                                                  updater=optax.sgd(0.1))
    x, y = jnp.ones((4, D)), jnp.zeros((4, 2))
    module = model.to_equinox()
    model.fit((x, y), epochs=3, progress=False)
    assert not any(a.is_deleted() for a in jax.tree.leaves(eqx.filter(module, eqx.is_array)))


def test_parallel_wrapper_scores_and_collected_scores_are_host_values():
    u = UserArrays()
    net = network()
    collected = CollectScoresListener()
    net.add_listeners(collected)
    wrapper = ParallelWrapper(net, workers=2, report_score_after_averaging=True)
    wrapper.fit(u.batches())
    assert wrapper.scores and all(isinstance(s, float) for s in wrapper.scores)
    assert collected.scores and all(isinstance(s, float) for _, s in collected.scores)


def test_a_step_loss_read_after_its_cycle_says_which_workspace_and_how_to_keep_it():
    u = UserArrays()
    net = network()
    kept = []

    class Keep(jaxws.nn.TrainingListener):
        def iteration_done(self, model, iteration, epoch, loss):
            kept.append(loss)

    net.add_listeners(Keep())
    net.fit(u.batches(), progress=False)
    with pytest.raises(jaxws.OutdatedWorkspacePointerError, match=r"Op \[StepLoss\] loss argument uses outdated workspace pointer from workspace \[WS_TRAINING\]"):
        float(kept[0])
    with pytest.raises((jaxws.LeakedWorkspacePointerError, jaxws.OutdatedWorkspacePointerError), match="jaxws.detach"):
        float(kept[-1])


# -- destroying workspaces from inside a loop --------------------------------------------


def test_destroy_all_from_a_listener_frees_memory_and_training_continues():
    u = UserArrays()
    net, reference = network(), network()
    reference.fit(u.batches(), epochs=3, progress=False)
    manager = jaxws.get_workspace_manager()
    cache = manager.get_workspace_for_current_thread(
        jaxws.WorkspaceConfiguration(policy_reset=jaxws.ResetPolicy.ENDOFBUFFER_REACHED, steps_number=1000), "CACHE")
    big = jaxws.jit(lambda x: jnp.zeros((1 << 20,)) + x)
    freed = []

    class Destroyer(jaxws.nn.TrainingListener):
        def iteration_done(self, model, iteration, epoch, loss):
            if iteration == 5:
                with cache:
                    held = big(1.0)  # 4 MiB owned by CACHE's ring of cycles
                assert not held.is_deleted()
                before = jaxws.memory.live_bytes()
                manager.destroy_all_workspaces_for_current_thread()
                freed.append(before - jaxws.memory.live_bytes())

    net.add_listeners(Destroyer())
    net.fit(u.batches(), epochs=3, progress=False)
    assert freed and freed[0] >= 4 << 20
    assert net.iteration == reference.iteration == 12
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), net.params, reference.params)


def test_destroy_all_from_the_data_inside_do_evaluation():
    u = UserArrays()
    net = network()
    manager = jaxws.get_workspace_manager()

    def loader():
        for i, batch in enumerate(u.batches()):
            if i == 2:
                manager.destroy_all_workspaces_for_current_thread()
            yield batch

    ev = net.do_evaluation(from_iterable(loader), Evaluation(), prefetch=0)[0]
    assert int(ev.confusion_matrix().sum()) == N


# -- donating twice ----------------------------------------------------------------------


def test_an_array_donated_twice_in_one_call_is_refused_before_running():
    step = jaxws.jit(lambda a, b: (a + 1, b * 2), donate_argnums=(0, 1))
    a = jnp.ones(3)
    with pytest.raises(jaxws.DonationError, match=r"passed 2 times in this call \(args\[0\] \(donated\), args\[1\] \(donated\)\)"):
        step(a, a)
    tree = jaxws.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)
    with pytest.raises(jaxws.DonationError, match=r"args\[0\]\['p'\] \(donated\), args\[0\]\['q'\] \(donated\)"):
        tree({"p": a, "q": a})
    half = jaxws.jit(lambda a, b: (a + 1, b + 1), donate_argnums=0)
    with pytest.raises(jaxws.DonationError, match=r"args\[0\] \(donated\), args\[1\]\)"):
        half(a, a)
    assert not a.is_deleted() and a.tolist() == [1.0, 1.0, 1.0]
    assert half(a, jaxws.detach(a))[0].tolist() == [2.0, 2.0, 2.0]  # a copy is the fix


def test_one_buffer_behind_two_array_objects_is_refused_too():
    step = jaxws.jit(lambda a, b: (a + 1, b * 2), donate_argnums=(0, 1))
    a = jnp.ones(3)
    alias = jax.device_put(a, jax.devices()[0])  # a second object over the same buffer
    with pytest.raises(jaxws.DonationError, match="passed twice in one call"):
        step(a, alias)
    assert not a.is_deleted()


def test_the_same_evaluator_twice_is_a_configuration_error():
    u = UserArrays()
    ev = Evaluation()
    with pytest.raises(jaxws.ConfigurationError, match=r"evaluations\[1\] is the same Evaluation object"):
        network().do_evaluation(u.batches(), ev, ev)
    assert ev.state is None  # nothing was counted
