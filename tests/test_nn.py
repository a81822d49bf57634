"""Networks: layers against plain JAX, modes agree, validation, output, rnn_time_step, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxws
from jaxws.data import ArrayDataSetIterator, DataSet
from jaxws import WorkspaceMode
from jaxws.nn import (
    LSTM,
    ArrayType,
    BatchNormalization,
    CollectScoresListener,
    Dense,
    Dropout,
    FunctionalModel,
    Layer,
    LayerWorkspaceMgr,
    MultiLayerNetwork,
    NeuralNetConfiguration,
    OutputLayer,
    RnnOutputLayer,
    ScoreIterationListener,
)

NO_WS = LayerWorkspaceMgr.no_workspaces()
rng = np.random.default_rng(0)


def data(n=64, d=6, classes=3, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, d)).astype(np.float32)
    y = (np.abs(x[:, :classes]).argmax(-1)).astype(np.int32)
    return x, y


def mlp(mode=WorkspaceMode.ENABLED, layers=None, updater=None, **kw):
    conf = NeuralNetConfiguration(
        layers=layers or [Dense(16, activation="tanh"), OutputLayer(3)],
        input_shape=(6,), updater=updater or optax.adam(1e-2), seed=3,
        training_workspace_mode=mode, **kw,
    )
    return MultiLayerNetwork(conf).init()


# -- layers against plain JAX ------------------------------------------------------------


def test_dense_forward_and_gradient():
    layer = Dense(4, activation="relu")
    params, _ = layer.init(jax.random.key(0), (3,))
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)

    def ours(p):
        return jnp.sum(layer.activate(p, {}, x, True, LayerWorkspaceMgr())[0] ** 2)

    def ref(p):
        return jnp.sum(jax.nn.relu(x @ p["W"] + p["b"]) ** 2)

    np.testing.assert_allclose(ours(params), ref(params), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), jax.grad(ours)(params), jax.grad(ref)(params))


def test_dropout_is_inverted_and_off_in_inference():
    layer = Dropout(0.25)
    _, state = layer.init(jax.random.key(1), (1000,))
    x = jnp.ones((4, 1000))
    y, new_state = layer.activate({}, state, x, True, NO_WS)
    keep = jax.random.bernoulli(jax.random.split(jax.random.wrap_key_data(state["key"]))[1], 0.75, x.shape)
    np.testing.assert_allclose(y, np.where(keep, 1 / 0.75, 0.0), rtol=1e-6)
    assert not np.array_equal(new_state["key"], state["key"])
    assert layer.activate({}, state, x, False, NO_WS)[0] is x


def test_batch_normalization_statistics():
    layer = BatchNormalization(decay=0.8)
    params, state = layer.init(jax.random.key(0), (3,))
    x = jnp.asarray(rng.normal(2.0, 3.0, size=(50, 3)), jnp.float32)
    y, new = layer.activate(params, state, x, True, NO_WS)
    ref = (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["mean"], 0.2 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.8 + 0.2 * x.var(0), rtol=1e-5)
    y_inf, same = layer.activate(params, new, x, False, NO_WS)
    np.testing.assert_allclose(y_inf, (x - new["mean"]) / jnp.sqrt(new["var"] + 1e-5), rtol=1e-4, atol=1e-5)
    assert same is new


def lstm_reference(p, x, mask=None):
    n = p["U"].shape[0]
    h = c = jnp.zeros((x.shape[0], n))
    outs = []
    for t in range(x.shape[1]):
        g = x[:, t] @ p["W"] + h @ p["U"] + p["b"]
        i, f, gg, o = jax.nn.sigmoid(g[:, :n]), jax.nn.sigmoid(g[:, n:2*n]), jnp.tanh(g[:, 2*n:3*n]), jax.nn.sigmoid(g[:, 3*n:])
        c2 = f * c + i * gg
        h2 = o * jnp.tanh(c2)
        m = 1.0 if mask is None else mask[:, t:t + 1]
        h, c = m * h2 + (1 - m) * h, m * c2 + (1 - m) * c
        outs.append(h * m)
    return jnp.stack(outs, 1)


def lstm_skipping_reference(p, x, mask):
    """Each sequence on its own, the cell run only on its real steps; zeros elsewhere."""
    n = p["U"].shape[0]
    W, U, b = (np.asarray(p[k], np.float64) for k in ("W", "U", "b"))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    out = np.zeros((x.shape[0], x.shape[1], n))
    for s in range(x.shape[0]):
        h, c = np.zeros(n), np.zeros(n)
        for t in range(x.shape[1]):
            if mask[s, t] == 0:
                continue  # a masked step: nothing happens to the state
            g = x[s, t] @ W + h @ U + b
            c = sig(g[n:2 * n]) * c + sig(g[:n]) * np.tanh(g[2 * n:3 * n])
            h = sig(g[3 * n:]) * np.tanh(c)
            out[s, t] = h
    return out


def test_lstm_masks_with_gaps_in_the_middle_hold_the_state():
    layer = LSTM(4)
    params, _ = layer.init(jax.random.key(1), (None, 3))
    x = rng.normal(size=(3, 9, 3)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 1, 1, 1, 1, 1],   # a gap of two in the middle
                     [1, 0, 1, 0, 1, 0, 1, 0, 1],   # every other step
                     [0, 0, 1, 1, 1, 1, 1, 0, 0]], np.float32)  # leading and trailing padding
    ours = layer.activate(params, {}, jnp.asarray(x), False, NO_WS, mask=jnp.asarray(mask))[0]
    np.testing.assert_allclose(ours, lstm_skipping_reference(params, x, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_lstm_forward_and_gradient(masked):
    layer = LSTM(5)
    params, _ = layer.init(jax.random.key(0), (None, 3))
    assert float(params["b"][5]) == 1.0  # forget-gate bias
    x = jnp.asarray(rng.normal(size=(2, 7, 3)), jnp.float32)
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.float32) if masked else None
    ours = lambda p: layer.activate(p, {}, x, True, LayerWorkspaceMgr(), mask=mask)[0]
    ref = lambda p: lstm_reference(p, x, mask)
    np.testing.assert_allclose(ours(params), ref(params), rtol=1e-5, atol=1e-6)
    g1 = jax.grad(lambda p: jnp.sum(ours(p) ** 2))(params)
    g2 = jax.grad(lambda p: jnp.sum(ref(p) ** 2))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


@pytest.mark.parametrize("loss, act", [("mcxent", "softmax"), ("negativeloglikelihood", "softmax"),
                                       ("mse", "identity"), ("xent", "sigmoid"), ("mae", "tanh")])
def test_output_layer_losses_against_optax(loss, act):
    layer = OutputLayer(4, activation=act, loss=loss)
    params, _ = layer.init(jax.random.key(0), (3,))
    x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    z = layer.preoutput(params, x)
    onehot = jax.nn.one_hot(jnp.arange(6) % 4, 4)
    if loss in ("mcxent", "negativeloglikelihood"):
        ref = optax.softmax_cross_entropy(z, onehot).mean()
        np.testing.assert_allclose(layer.compute_loss(z, jnp.arange(6) % 4, None), ref, rtol=1e-6)
    elif loss == "mse":
        ref = jnp.mean((z - onehot) ** 2)
    elif loss == "xent":
        ref = optax.sigmoid_binary_cross_entropy(z, onehot).sum(-1).mean()
    else:
        ref = jnp.mean(jnp.abs(jnp.tanh(z) - onehot))
    np.testing.assert_allclose(layer.compute_loss(z, onehot, None), ref, rtol=1e-6)


def test_rnn_output_layer_masks_time_steps():
    layer = RnnOutputLayer(3)
    params, _ = layer.init(jax.random.key(0), (None, 2))
    z = layer.preoutput(params, jnp.asarray(rng.normal(size=(2, 4, 2)), jnp.float32))
    labels = jnp.zeros((2, 4), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1], [1, 0, 0, 0]], jnp.float32)
    per = optax.softmax_cross_entropy_with_integer_labels(z, labels)
    np.testing.assert_allclose(layer.compute_loss(z, labels, mask), (per * mask).sum() / 5, rtol=1e-6)


# -- training: a plain-JAX reference, modes, compiles, syncs -------------------------------


def reference_fit(net, x, y, steps, updater):
    """The same MLP trained by a hand-written optax loop."""
    params = jaxws.detach(net.params)
    opt_state = updater.init(params)

    def loss(p):
        h = jnp.tanh(x @ p[0]["W"] + p[0]["b"])
        return optax.softmax_cross_entropy_with_integer_labels(h @ p[1]["W"] + p[1]["b"], y).mean()

    for _ in range(steps):
        grads = jax.grad(loss)(params)
        updates, opt_state = updater.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_fit_equals_a_hand_written_optax_loop():
    x, y = data()
    net = mlp()
    ref = reference_fit(net, x, y, 20, optax.adam(1e-2))
    net.fit([(x, y)] * 20, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), net.params, ref)


def test_modes_give_the_same_parameters():
    x, y = data()
    layers = [Dense(16, activation="relu"), BatchNormalization(), Dropout(0.2), Dense(8, activation="tanh"), OutputLayer(3)]
    results = {}
    for mode in WorkspaceMode:
        net = mlp(mode, layers=layers)
        net.fit((x, y), epochs=20, progress=False)
        results[mode] = (jaxws.detach(net.params), jaxws.detach(net.state))
    base = results[WorkspaceMode.NONE]
    for mode, got in results.items():
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, base)


@pytest.mark.parametrize("mode", list(WorkspaceMode))
def test_modes_with_sgd_and_a_labels_mask_equal_the_plain_jax_loop(mode):
    x, y = data()
    mask = (np.arange(len(y)) % 3 != 0).astype(np.float32)  # a third of the examples do not count
    net = mlp(mode, updater=optax.sgd(0.5))
    params = jaxws.detach(net.params)

    def loss(p):
        h = jnp.tanh(x @ p[0]["W"] + p[0]["b"])
        per = optax.softmax_cross_entropy_with_integer_labels(h @ p[1]["W"] + p[1]["b"], y)
        return jnp.sum(per * mask) / jnp.sum(mask)

    for _ in range(15):
        params = jax.tree.map(lambda a, g: a - 0.5 * g, params, jax.grad(loss)(params))
    net.fit([DataSet(x, y, None, mask)] * 15, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), net.params, params)


def test_separate_saves_fewer_residual_bytes_than_single():
    conf = NeuralNetConfiguration(layers=[LSTM(32), RnnOutputLayer(4)], input_shape=(None, 5))
    net = MultiLayerNetwork(conf).init()
    x = rng.normal(size=(8, 30, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=(8, 30)).astype(np.int32)
    single = net.residual_bytes((x, y), WorkspaceMode.SINGLE)
    separate = net.residual_bytes((x, y), WorkspaceMode.SEPARATE)
    assert separate < 0.35 * single, (separate, single)
    assert net.residual_bytes((x, y), WorkspaceMode.ENABLED) == single


def test_fit_donates_the_carry_and_compiles_once_per_mode_and_shape(compiles):
    x, y = data(n=40)
    net = mlp()
    old = net.params
    net.fit((x, y), epochs=3, batch_size=16, progress=False)  # batches 16, 16, 8: taken on the device
    assert all(a.is_deleted() for a in jax.tree.leaves(old))
    # no listener reads the losses: the programs without them ran, [16] and [8]
    assert net.resident_step(losses=False).compiles == 2 and net.compiled_step(losses=False).compiles == 0
    net.fit(DataSet(x, y).split(16), epochs=3, progress=False)  # the same batches, from a list
    # host batches whose labels the feed judged: the step without the device count, [16] and [8]
    assert net.compiled_step(losses=False, checked=False).compiles == 2 and net.iteration == 18
    assert net.compiled_step().compiles == net.resident_step().compiles == net.compiled_step(losses=False).compiles == 0
    none = mlp(WorkspaceMode.NONE)
    kept = none.params
    none.fit((x, y), epochs=2, progress=False)
    assert not any(a.is_deleted() for a in jax.tree.leaves(kept))
    assert none.compiled_step(losses=False, checked=False).compiles == 1  # a host batch: judged by the feed


def test_fit_adds_no_device_to_host_transfer():
    x, y = data()
    net = mlp()
    batches = [(jnp.asarray(x), jnp.asarray(y))] * 10
    net.fit(batches[:1], progress=False)  # compile first
    with jax.transfer_guard_device_to_host("disallow"):
        net.fit(batches, progress=False)
        net.add_listeners(ScoreIterationListener(1000))
        net.fit(batches, progress=False)
    assert net.iteration == 21


def test_listeners_report_every_n_iterations():
    x, y = data()
    lines = []
    net = mlp()
    collect = CollectScoresListener(2)
    net.set_listeners(ScoreIterationListener(5, printer=lines.append), collect)
    net.fit([(x, y)] * 10, progress=False)
    assert lines[0].startswith("Score at iteration 5 is ") and len(lines) == 2
    assert [i for i, _ in collect.scores] == [2, 4, 6, 8, 10]
    assert collect.scores[-1][1] < collect.scores[0][1]
    before_last = mlp()
    before_last.fit([(x, y)] * 9, progress=False)  # the loss of step 10 is read before its update
    assert collect.scores[-1][1] == pytest.approx(before_last.score((x, y)), rel=1e-5)


def test_without_listeners_fit_runs_programs_that_return_no_losses():
    # nobody reads the loss: the step returns the carry and the check only (one output
    # buffer fewer a call), and nothing fresh is attached to the cycle; a listener added
    # mid-fit gets the program with losses from its next step on
    x, y = data()
    batches = [(jnp.asarray(x[i:i + 16]), jnp.asarray(y[i:i + 16])) for i in range(0, 64, 16)]
    quiet, heard = mlp(), mlp()
    quiet.fit(batches * 2, progress=False)
    without = quiet.compiled_step(losses=False)
    assert without.compiles == 1 and quiet.compiled_step().compiles == 0
    (plan,) = without.plans
    assert plan.fresh == () and len(plan.donated) == len(plan.inherit)  # all in, all back
    collect = CollectScoresListener(1)

    def adds_a_listener_before_step_3():
        for i, ds in enumerate(batches * 2):
            if i == 2:
                heard.add_listeners(collect)
            yield ds

    heard.fit(adds_a_listener_before_step_3(), progress=False)
    assert heard.compiled_step(losses=False).compiles == heard.compiled_step().compiles == 1
    assert [i for i, _ in collect.scores] == [3, 4, 5, 6, 7, 8]
    ref = mlp()  # what the listener saw: the model's score on each batch before its step
    for i, ds in enumerate(batches * 2):
        if i >= 2:
            assert collect.scores[i - 2][1] == pytest.approx(ref.score(ds), rel=1e-5)
        ref.fit(ds, progress=False)
    jax.tree.map(lambda a, b, c: (np.testing.assert_allclose(a, b, rtol=1e-6),
                                  np.testing.assert_allclose(a, c, rtol=1e-6)),
                 quiet.params, heard.params, ref.params)


def test_progress_bars_where_they_show_progress_and_none_per_call_in_dl4j_loop(monkeypatch):
    # as in a terminal: every bar fit makes is recorded (its total, its last count)
    import jaxws.nn.model as model_module

    bars = []

    class Recording:
        def __init__(self, iterable=None, total=None, desc="", leave=True):
            self.iterable, self.total, self.desc, self.n = iterable, total, desc, 0
            bars.append(self)

        def __iter__(self):
            for item in self.iterable:
                yield item
                self.n += 1

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(model_module, "interactive", lambda: True)
    monkeypatch.setattr(model_module, "tqdm_class", lambda: Recording)
    x, y = data()
    batches = [DataSet(jnp.asarray(x[i:i + 16]), jnp.asarray(y[i:i + 16])) for i in range(0, 64, 16)]
    net = mlp()
    for ds in batches:  # DL4J's loop: an epoch of one batch per call, no bar drawn and cleared each time
        net.fit(ds)
    assert bars == []
    net.fit(batches, progress=False)
    assert bars == []
    net.fit(batches)  # one epoch of 4 batches
    assert [(b.desc, b.total, b.n) for b in bars] == [("epoch 5", 4, 4)]
    bars.clear()
    net.fit(batches[0], epochs=3)  # full-batch training: the bar over the epochs only
    assert [(b.desc, b.total, b.n) for b in bars] == [("epochs", None, 3)]
    bars.clear()
    net.fit(iter(batches))  # length unknown: a bar of the epoch, counting
    assert [(b.desc, b.total, b.n) for b in bars] == [("epoch 9", None, 4)]
    assert net.iteration == 19


def test_output_is_detached_and_survives_later_fits():
    x, y = data()
    net = mlp()
    before = net.output(x)
    assert not jaxws.is_attached(before)
    saved = np.asarray(before)
    net.fit((x, y), epochs=5, progress=False)
    np.testing.assert_array_equal(before, saved)
    assert not np.allclose(net.output(x), saved)


def test_output_into_a_workspace():
    x, _ = data()
    net = mlp()
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="INFER")
    with ws:
        y = net.output(x, workspace=ws)
        assert jaxws.is_attached(y)
    assert y.is_deleted()
    with pytest.raises(jaxws.WorkspaceError, match="not open"):
        net.output(x, workspace="INFER")
    none = mlp(inference_workspace_mode=WorkspaceMode.NONE)
    with ws:
        with pytest.raises(jaxws.WorkspaceError, match="inference_workspace_mode is WorkspaceMode.NONE"):
            none.output(x, workspace=ws)


def test_output_of_device_arrays_of_a_known_signature_refuses_dead_and_misfit_ones_all_the_same():
    # device arrays of a signature output judged before are used as they are, the program
    # found by that signature; dead arrays are still refused by name, a new shape is judged,
    # and the values equal the plain-JAX forward pass
    x, _ = data()
    net = mlp()
    xd = jnp.asarray(x)
    forward = jax.jit(lambda p, s, a: net._apply(p, s, a, None, False, net.inference_workspace_mode)[0])
    for a in (xd, jnp.asarray(x[:7]), xd, x):
        np.testing.assert_allclose(net.output(a), forward(net.params, net.state, jnp.asarray(a)), rtol=1e-6)
    # one per shape of device arrays, one for the numpy array (moved by the call itself);
    # every input is looked up by its signature, numpy too
    assert net._inference_fn(False).compiles == 3
    assert len(net._inference_fn(False)._planned) == 3
    assert not xd.is_deleted() and not jaxws.is_attached(xd)
    dead = xd + 0
    dead.delete()
    with pytest.raises(jaxws.DeletedArrayError):
        net.output(dead)
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="OUTPUT_INPUTS")
    with ws:
        stale = jaxws.jit(lambda a: a * 1)(xd)  # attached to the cycle: dies with it
    with pytest.raises((jaxws.LeakedWorkspacePointerError, jaxws.OutdatedWorkspacePointerError), match="output"):
        net.output(stale)
    with pytest.raises(jaxws.InvalidBatchError):
        net.output(jnp.ones((4, 5)))
    np.testing.assert_allclose(net.output(xd), forward(net.params, net.state, xd), rtol=1e-6)


def test_output_of_a_numpy_array_is_not_changed_by_refilling_the_array_after_the_call():
    # output returns before its program has run; the numpy input it was given may be
    # refilled at once (a loader's buffer): the program reads a copy of its own
    conf = NeuralNetConfiguration(layers=[Dense(1024, activation="tanh") for _ in range(6)] + [OutputLayer(3)],
                                  input_shape=(256,), seed=0)
    net = MultiLayerNetwork(conf).init()
    x = np.random.default_rng(0).normal(size=(1024, 256)).astype(np.float32)  # 1 MiB
    expected = np.asarray(net.output(x.copy()))
    for _ in range(3):
        buffer = x.copy()
        out = net.output(buffer)
        buffer[...] = 1e3
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)


def test_rnn_time_step_equals_the_full_sequence():
    conf = NeuralNetConfiguration(layers=[LSTM(8), Dense(6, activation="tanh"), LSTM(5), RnnOutputLayer(3)],
                                  input_shape=(None, 4))
    net = MultiLayerNetwork(conf).init()
    x = rng.normal(size=(2, 9, 4)).astype(np.float32)
    full = np.asarray(net.output(x))
    steps = [np.asarray(net.rnn_time_step(x[:, t])) for t in range(5)]
    chunk = np.asarray(net.rnn_time_step(x[:, 5:]))
    np.testing.assert_allclose(np.concatenate([np.stack(steps, 1), chunk], 1), full, rtol=1e-5, atol=1e-6)
    net.rnn_clear_previous_state()
    np.testing.assert_allclose(net.rnn_time_step(x[:, 0]), full[:, 0], rtol=1e-5, atol=1e-6)
    # another batch size: a zero state, as after rnn_clear_previous_state (one example's own output)
    np.testing.assert_allclose(net.rnn_time_step(x[:1, 0]), full[:1, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.rnn_time_step(x[:1, 1]), full[:1, 1], rtol=1e-5, atol=1e-6)


def test_rnn_time_step_in_a_loop_judges_each_signature_once_and_leaves_the_inputs_alone():
    # DL4J's rnnTimeStep loop (generation): one program per input signature, shapes judged
    # once, the time axis added and dropped inside it; numpy, device and in-cycle inputs
    conf = NeuralNetConfiguration(layers=[LSTM(8), RnnOutputLayer(3)], input_shape=(None, 4))
    net = MultiLayerNetwork(conf).init()
    x = rng.normal(size=(2, 12, 4)).astype(np.float32)
    full = np.asarray(net.output(x))
    judged = []
    check = net._check_batch
    net._check_batch = lambda ds, op, shapes=True: (judged.append(shapes), check(ds, op, shapes))[1]
    xd = jnp.asarray(x)
    steps = [net.rnn_time_step(x[:, t]) for t in range(4)]  # numpy
    steps += [net.rnn_time_step(xd[:, t]) for t in range(4, 8)]  # device arrays
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="RNN_INPUTS")
    for t in range(8, 12):
        with ws:  # an input made in a live cycle: used, not adopted
            step = jaxws.jit(lambda a: a + 0)(xd[:, t])
            steps.append(jaxws.detach(net.rnn_time_step(step)))
    np.testing.assert_allclose(np.stack([np.asarray(s) for s in steps], 1), full, rtol=1e-5, atol=1e-6)
    assert judged.count(True) == 2  # one step of numpy, one of device arrays
    assert net._rnn_fn.compiles == 2  # host and device inputs of one shape
    assert not xd.is_deleted() and not jaxws.is_attached(xd)


def test_set_params_accepts_numpy_and_copies():
    net = mlp()
    new = jax.tree.map(lambda a: np.full(a.shape, 0.5, np.float64), net.params)
    net.set_params(new)
    assert net.params[0]["W"].dtype == jnp.float32 and float(net.params[0]["W"][0, 0]) == 0.5
    with pytest.raises(ValueError, match=r"params\[0\]\['W'\] has shape \(2, 2\), expected \(6, 16\)"):
        bad = jax.tree.map(lambda a: a, new)
        bad[0]["W"] = np.ones((2, 2))
        net.set_params(bad)


def test_summary_lists_layers_and_plans():
    text = mlp().summary()
    assert "OutputLayer" in text and "total parameters: 163" in text
    assert "WS_TRAINING" in text and "alias" in text


def test_functional_model_trains_like_the_reference():
    x, y = data()
    params = {"w": jnp.zeros((6, 3)), "b": jnp.zeros(3)}

    def apply(p, x, training):
        return jax.ad_checkpoint.checkpoint_name(x @ p["w"] + p["b"], "ACTIVATIONS")

    def loss(pred, labels, mask):
        return optax.softmax_cross_entropy_with_integer_labels(pred, labels).mean()

    model = FunctionalModel(apply, params, loss=loss, updater=optax.sgd(0.5),
                            training_workspace_mode=WorkspaceMode.SEPARATE)
    model.fit([(x, y)] * 10, progress=False)
    ref = params
    for _ in range(10):
        g = jax.grad(lambda p: loss(apply(p, x, True), y, None))(ref)
        ref = jax.tree.map(lambda a, b: a - 0.5 * b, ref, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), model.params, ref)
    assert model.output(x).shape == (64, 3) and model.score((x, y)) < float(loss(apply(params, x, 0), y, None))


# -- validation of custom layers --------------------------------------------------------


class Forgetful(Layer):
    def activate(self, params, state, x, training, mgr, mask=None):
        return jnp.tanh(x), state  # forgot mgr.leverage_to(ArrayType.ACTIVATIONS, ...)


class WrongPlace(Layer):
    def activate(self, params, state, x, training, mgr, mask=None):
        return mgr.leverage_to(ArrayType.FF_WORKING_MEM, jnp.tanh(x)), state


class Correct(Layer):
    def activate(self, params, state, x, training, mgr, mask=None):
        h = mgr.create(ArrayType.FF_WORKING_MEM, x.shape) + x
        return mgr.leverage_to(ArrayType.ACTIVATIONS, jnp.tanh(h)), state


@pytest.mark.parametrize("layer, found", [(Forgetful(name="mine"), "no workspace"), (WrongPlace(), "ArrayType.FF_WORKING_MEM")])
def test_custom_layer_in_the_wrong_workspace_fails_validation(layer, found):
    x, y = data()
    net = mlp(layers=[Dense(6), layer, OutputLayer(3)])
    before = jaxws.detach(net.params)
    with pytest.raises(jaxws.WorkspaceValidationError) as info:
        net.fit((x, y), progress=False)
    message = str(info.value)
    assert f"Layer 1 ({layer.name or type(layer).__name__}, class {type(layer).__name__})" in message
    assert "expected ArrayType.ACTIVATIONS" in message and found in message
    jax.tree.map(np.testing.assert_array_equal, net.params, before)  # nothing donated
    assert net.output(x).shape == (64, 3)  # inference does not validate


def test_a_correct_custom_layer_trains():
    x, y = data()
    net = mlp(layers=[Dense(6), Correct(), OutputLayer(3)])
    net.fit((x, y), epochs=2, progress=False)
    assert net.iteration == 2


# -- bad input ----------------------------------------------------------------------------


def test_bad_batches_fail_before_donation_and_leave_the_network_usable():
    x, y = data()
    net = mlp()
    net.fit((x, y), progress=False)
    before = jaxws.detach(net.params)
    with pytest.raises(ValueError, match=r"layer 0 \(Dense, class Dense\) expects features of shape \[batch, 6\], received \[64, 5\]"):
        net.fit((x[:, :5], y), progress=False)
    with pytest.raises(ValueError, match=r"layer 1 \(OutputLayer.*labels of shape \[64, 3\] or integer classes \[64\], received \[64, 2\]"):
        net.fit((x, np.zeros((64, 2), np.float32)), progress=False)
    with pytest.raises(ValueError, match=r"labels out of range .* found classes 0\.\.7, expected 0\.\.2"):
        net.fit((x, np.arange(64, dtype=np.int32) % 8), progress=False)
    with pytest.raises(ValueError, match="received \\[64, 6, 1\\]"):
        net.output(x[..., None])
    jax.tree.map(np.testing.assert_array_equal, net.params, before)
    net.fit((x, y), progress=False)
    assert net.iteration == 2


def test_stale_batches_are_refused_before_anything_is_donated():
    x, y = data()
    net = mlp()
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="DATA")
    with ws:
        features = jaxws.jit(lambda a: a * 1.0)(jnp.asarray(x))
    old = net.params
    with pytest.raises(jaxws.LeakedWorkspacePointerError, match=r"Op \[fit\] data\.features argument uses leaked"):
        net.fit((features, y), progress=False)
    assert not any(a.is_deleted() for a in jax.tree.leaves(old))
    net.fit((x, y), progress=False)


def test_sequence_rank_is_checked():
    conf = NeuralNetConfiguration(layers=[LSTM(4), RnnOutputLayer(2)], input_shape=(None, 3))
    net = MultiLayerNetwork(conf).init()
    with pytest.raises(ValueError, match=r"layer 0 \(LSTM.*\[batch, time, 3\], received \[5, 3\]. Sequences are \[batch, time, features\]"):
        net.fit((np.ones((5, 3), np.float32), np.zeros((5,), np.int32)), progress=False)


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"layers": []}, ValueError, "non-empty list of layers"),
    ({"layers": [Dense(3)]}, ValueError, "put one last"),
    ({"layers": [OutputLayer(3)], "input_shape": (0,)}, ValueError, "input_shape=(0,)"),
    ({"layers": [OutputLayer(3)], "training_workspace_mode": "SINGLE"}, ValueError, "WorkspaceMode.NONE, ENABLED"),
    ({"layers": [OutputLayer(3)], "updater": "adam"}, TypeError, "optax GradientTransformation"),
    ({"layers": ["dense"]}, TypeError, "is not a layer"),
])
def test_bad_configurations(kwargs, error, fragment):
    kwargs = {"input_shape": (4,), **kwargs}
    with pytest.raises(error) as info:
        NeuralNetConfiguration(**kwargs)
    assert fragment in str(info.value)


def test_unknown_activation_and_loss_list_the_valid_names():
    with pytest.raises(ValueError, match="activation='relux' is unknown; valid names: .*relu"):
        Dense(3, activation="relux")
    with pytest.raises(ValueError, match="loss='hinge' is unknown; valid names: mcxent"):
        OutputLayer(3, loss="hinge")
    with pytest.raises(ValueError, match="remat='sometimes'"):
        Dense(3, remat="sometimes")


def test_builder_mirrors_dl4j():
    conf = (NeuralNetConfiguration.builder().seed(7).updater(optax.sgd(0.1)).input_shape(None, 3)
            .training_workspace_mode(WorkspaceMode.SEPARATE).inference_workspace_mode(WorkspaceMode.SINGLE)
            .list(LSTM(4)).layer(RnnOutputLayer(2)).build())
    assert conf.seed == 7 and conf.input_shape == (None, 3) and len(conf.layers) == 2
    assert conf.training_workspace_mode is WorkspaceMode.SEPARATE


def test_digits_reach_95_percent():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y.astype(np.int32), test_size=0.25, random_state=0, stratify=y)
    conf = NeuralNetConfiguration(layers=[Dense(128, activation="relu"), Dense(64, activation="relu"), OutputLayer(10)],
                                  input_shape=(64,), updater=optax.adam(1e-3), seed=1)
    net = MultiLayerNetwork(conf).init()
    net.fit((xtr, ytr), epochs=30, batch_size=32, progress=False)
    assert (np.asarray(net.output(xte)).argmax(-1) == yte).mean() >= 0.95


def test_offloaded_activations_train_the_same():
    x, y = data()
    layers = [Dense(16, activation="relu"), Dense(8, activation="tanh"), OutputLayer(3)]
    base = mlp(WorkspaceMode.SEPARATE, layers=layers)
    offloaded = mlp(WorkspaceMode.SEPARATE, layers=layers, offload_activations=True)
    per_layer = mlp(WorkspaceMode.ENABLED, layers=[Dense(16, activation="relu", remat="offload"),
                                                   Dense(8, activation="tanh", remat="recompute"), OutputLayer(3)])
    for net in (base, offloaded, per_layer):
        net.fit((x, y), epochs=5, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), offloaded.params, base.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), per_layer.params, base.params)


def test_functional_model_evaluates_on_the_device():
    x, y = data()
    model = FunctionalModel(lambda p, x, training: jax.nn.softmax(x @ p["w"]), {"w": jnp.zeros((6, 3))},
                            loss=lambda pred, labels, mask: -jnp.mean(jnp.log(pred[jnp.arange(len(labels)), labels])))
    model.fit((x, y), epochs=20, progress=False)
    (ev,) = model.do_evaluation((x, y), jaxws.eval.Evaluation(), batch_size=16)
    assert ev.confusion_matrix().sum() == 64
    assert ev.accuracy() == pytest.approx(float((np.asarray(model.output(x)).argmax(1) == y).mean()))


@pytest.mark.parametrize("via", ["list", "device list", "async", "resident"])
def test_steps_per_execution_equals_one_step_at_a_time(via):
    x, y = data(n=70)  # batches of 8: 8 full ones and a last of 6, which breaks a group
    a, b = mlp(), mlp()
    seen = {net: CollectScoresListener(1) for net in (a, b)}
    for net in (a, b):
        net.add_listeners(seen[net])
    reference = jaxws.data.DataSet(x, y).split(8)
    a.fit(reference, epochs=2, progress=False)  # one step at a time, batches from a list
    if via == "list":
        b.fit(reference, epochs=2, progress=False, steps_per_execution=3)
    elif via == "device list":  # the user's device batches, stacked by the program that runs them
        on_device = [jaxws.data.DataSet(jnp.asarray(d.features), jnp.asarray(d.labels)) for d in reference]
        b.fit(on_device, epochs=2, progress=False, steps_per_execution=3)
        assert not any(d.features.is_deleted() or d.labels.is_deleted() for d in on_device)
    elif via == "async":  # host batches, prefetched, stacked in the prefetch thread
        b.fit(ArrayDataSetIterator(x, y, 8, resident=False), epochs=2, progress=False, steps_per_execution=3)
    else:  # device-resident: every batch taken inside the program
        b.fit((x, y), epochs=2, batch_size=8, progress=False, steps_per_execution=3)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6), a.params, b.params)
    assert a.iteration == b.iteration == 18
    np.testing.assert_allclose([s for _, s in seen[b].scores], [s for _, s in seen[a].scores], rtol=1e-5)
    if via == "resident":  # (3 steps of 8), (2 steps of 8), (1 step of 6)
        assert b.resident_step().compiles == 3 and b.compiled_step(fused=True).compiles == 0
    else:  # [3, 8, ...], and [1, 8, ...] and [1, 6, ...] for the leftovers
        assert b.compiled_step(fused=True).compiles == 3


def test_steps_per_execution_dispatches_once_per_k_steps_without_host_reads():
    x, y = data(n=64)
    net = mlp()
    batches = [(jnp.asarray(x[i:i + 8]), jnp.asarray(y[i:i + 8])) for i in range(0, 64, 8)]
    net.fit(batches, progress=False, steps_per_execution=4)  # compile
    calls = []
    step = net.compiled_step(fused=True, losses=False)
    original = step._donating
    step._donating = lambda *a, **k: calls.append(1) or original(*a, **k)
    with jax.transfer_guard_device_to_host("disallow"):
        net.fit(batches, progress=False, steps_per_execution=4)
    step._donating = original
    assert len(calls) == 2 and net.iteration == 16
    with pytest.raises(ValueError, match="steps_per_execution=0"):
        net.fit(batches, steps_per_execution=0)


def test_an_equinox_module_trains_like_its_optax_loop():
    eqx = pytest.importorskip("equinox")
    x, y = data()
    module = eqx.nn.MLP(6, 3, width_size=16, depth=1, key=jax.random.key(1))

    def loss(pred, labels, mask):
        return optax.softmax_cross_entropy_with_integer_labels(pred, labels).mean()

    model = FunctionalModel.from_equinox(module, loss=loss, updater=optax.adam(1e-2))
    model.fit([(x, y)] * 10, progress=False)
    ref, opt = module, optax.adam(1e-2)
    state = opt.init(eqx.filter(ref, eqx.is_inexact_array))
    for _ in range(10):
        grads = eqx.filter_grad(lambda m: loss(jax.vmap(m)(x), y, None))(ref)
        updates, state = opt.update(grads, state, eqx.filter(ref, eqx.is_inexact_array))
        ref = eqx.apply_updates(ref, updates)
    trained = model.to_equinox()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 eqx.filter(trained, eqx.is_inexact_array), eqx.filter(ref, eqx.is_inexact_array))
    np.testing.assert_allclose(model.output(x), jax.vmap(trained)(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(jaxws.ConfigurationError, match="from_equinox"):
        FunctionalModel(lambda p, x, t: x, {"w": jnp.zeros(1)}, loss=loss).to_equinox()


def test_output_in_training_mode_draws_fresh_dropout_every_call():
    x, _ = data()
    net = mlp(layers=[Dense(32, activation="tanh"), Dropout(0.5), OutputLayer(3)])
    samples = np.stack([np.asarray(net.output(x, training=True)) for _ in range(5)])
    assert samples.std(axis=0).mean() > 1e-2  # Monte-Carlo dropout: the masks differ
    assert not np.allclose(samples[0], np.asarray(net.output(x)))  # and differ from inference
    key = jax.random.key(3)
    np.testing.assert_array_equal(net.output(x, training=True, key=key), net.output(x, training=True, key=key))
    state = jaxws.detach(net.state)
    net.output(x, training=True)
    jax.tree.map(np.testing.assert_array_equal, net.state, state)  # the training state is untouched
