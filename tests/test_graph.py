"""ComputationGraph: against MultiLayerNetwork (the chain), a plain-JAX reference, numpy
references of every vertex, and the parallel, evaluation and checkpoint paths."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import accuracy_score

import jaxws
from jaxws import WorkspaceMode
from jaxws.data import ArrayMultiDataSetIterator, AsyncMultiDataSetIterator, MultiDataSet, from_iterable
from jaxws.errors import ConfigurationError, InvalidBatchError
from jaxws.eval import Evaluation, RegressionEvaluation
from jaxws.nn import (LSTM, ArrayType, BatchNormalization, ComputationGraph, ComputationGraphConfiguration,
                      Dense, Dropout, DuplicateToTimeSeriesVertex, ElementWiseVertex, GraphVertex, InputType,
                      L2Vertex, LastTimeStepVertex, MergeVertex, MultiLayerNetwork, NeuralNetConfiguration,
                      OutputLayer, PreprocessorVertex, ReshapePreprocessor, RnnOutputLayer, ScaleVertex,
                      Sgd, ShiftVertex, StackVertex, SubsetVertex, UnstackVertex)
from jaxws.nn.workspace_mgr import LayerWorkspaceMgr
from jaxws.parallel import ParallelInference, ParallelWrapper

rng = np.random.default_rng(0)


def assert_tree_close(a, b, tol=1e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol), a, b)


def builder(updater=None, mode=WorkspaceMode.ENABLED, seed=3):
    return (NeuralNetConfiguration.builder().seed(seed).updater(updater or optax.adam(1e-2))
            .training_workspace_mode(mode).graph_builder())


# -- a chain graph is a MultiLayerNetwork -------------------------------------------------------

CHAIN = [Dense(8, activation="tanh"), BatchNormalization(), Dropout(0.3), Dense(6, activation="relu"), OutputLayer(3)]


def chain_batches(n=6, size=16):
    r = np.random.default_rng(1)
    return [(r.normal(size=(size, 5)).astype(np.float32), r.integers(0, 3, size).astype(np.int32)) for _ in range(n)]


@pytest.mark.parametrize("mode", list(WorkspaceMode))
def test_a_chain_graph_trains_as_the_multilayer_network(mode):
    net = MultiLayerNetwork(NeuralNetConfiguration(layers=CHAIN, input_shape=(5,), seed=3, updater=optax.adam(1e-2),
                                                   training_workspace_mode=mode)).init()
    b = builder(mode=mode).add_inputs("input")
    for i, layer in enumerate(CHAIN):
        b.add_layer(f"layer{i}", layer, f"layer{i - 1}" if i else "input")
    graph = ComputationGraph(b.set_outputs("layer4").set_input_types((5,)).build()).init()
    assert_tree_close([graph.params[f"layer{i}"] for i in range(5)], net.params, 0)
    batches = chain_batches()
    net.fit(batches, epochs=2, progress=False)
    graph.fit([([x], [y]) for x, y in batches], epochs=2, progress=False)
    assert_tree_close([graph.params[f"layer{i}"] for i in range(5)], net.params, 1e-6)
    assert_tree_close([graph.state[f"layer{i}"] for i in range(5)], net.state, 1e-6)
    x = batches[0][0]
    np.testing.assert_allclose(graph.output_single(x), net.output(x), rtol=1e-6, atol=1e-6)
    assert graph.score([([x], [batches[0][1]])]) == pytest.approx(net.score(batches[:1]), rel=1e-6)


# -- two inputs, two outputs, a merge and a skip, against plain JAX ----------------------------

def two_by_two(updater=None, mode=WorkspaceMode.ENABLED):
    return ComputationGraph(
        builder(updater, mode).add_inputs("a", "b")
        .add_layer("da", Dense(6, activation="tanh"), "a")
        .add_layer("db", Dense(6, activation="tanh"), "b")
        .add_vertex("sum", ElementWiseVertex("add"), "da", "db")
        .add_vertex("merge", MergeVertex(), "sum", "b")
        .add_layer("h", Dense(6, activation="relu"), "merge")
        .add_vertex("skip", ElementWiseVertex("add"), "h", "da")
        .add_layer("classes", OutputLayer(3), "skip")
        .add_layer("value", OutputLayer(1, activation="identity", loss="mse"), "merge")
        .set_outputs("classes", "value").set_input_types(InputType.feed_forward(4), (3,)).build()).init()


def two_by_two_batches(n=5, size=12, seed=2):
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = r.normal(size=(size, 4)).astype(np.float32), r.normal(size=(size, 3)).astype(np.float32)
        out.append(([a, b], [(a[:, 0] > b[:, 0]).astype(np.int32) + (a[:, 1] > 0), (a[:, :1] - b[:, 1:2])]))
    return out


def reference_loss(p, a, b, classes, value):
    dense = lambda q, x: x @ q["W"] + q["b"]  # noqa: E731
    da, db = jnp.tanh(dense(p["da"], a)), jnp.tanh(dense(p["db"], b))
    merge = jnp.concatenate([da + db, b], axis=-1)
    skip = jax.nn.relu(dense(p["h"], merge)) + da
    ce = optax.softmax_cross_entropy_with_integer_labels(dense(p["classes"], skip), classes).mean()
    return ce + jnp.mean((dense(p["value"], merge) - value) ** 2)


@pytest.mark.parametrize("mode", [WorkspaceMode.ENABLED, WorkspaceMode.SEPARATE, WorkspaceMode.NONE])
def test_two_inputs_two_outputs_against_plain_jax(mode):
    graph = two_by_two(optax.adam(1e-2), mode)
    params = jaxws.detach(graph.params)
    opt = optax.adam(1e-2)
    state = opt.init(params)
    batches = two_by_two_batches()
    for (a, b), (c, v) in batches:
        grads = jax.grad(reference_loss)(params, a, b, c, v)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    graph.fit(batches, progress=False)
    assert_tree_close(graph.params, params, 2e-5)
    (a, b), (c, v) = batches[0]
    assert graph.score(MultiDataSet((a, b), (c, v))) == pytest.approx(float(reference_loss(params, a, b, c, v)), rel=1e-4)
    classes, value = graph.output(a, b)
    assert classes.shape == (12, 3) and value.shape == (12, 1)


def test_fit_takes_multidatasets_iterators_and_prefetches_them():
    batches = two_by_two_batches(4)
    a, b = two_by_two(), two_by_two()
    a.fit([MultiDataSet(tuple(x), tuple(y)) for x, y in batches], progress=False)
    b.fit(from_iterable(lambda: iter(batches)), progress=False, prefetch=2)  # wrapped in an async ring
    assert_tree_close(a.params, b.params, 1e-6)
    c = two_by_two()
    c.fit(AsyncMultiDataSetIterator(from_iterable(batches), 2), progress=False)
    assert_tree_close(a.params, c.params, 1e-6)


def test_array_iterator_runs_device_resident_and_matches_batches():
    r = np.random.default_rng(5)
    a, b = r.normal(size=(40, 4)).astype(np.float32), r.normal(size=(40, 3)).astype(np.float32)
    c, v = (a[:, 0] > 0).astype(np.int32), a[:, :1]
    it = ArrayMultiDataSetIterator([a, b], [c, v], batch_size=8, shuffle=True, seed=4)
    batches = [jaxws.detach(ds) for ds in it]
    it.reset()
    resident, batched = two_by_two(), two_by_two()
    resident.fit(ArrayMultiDataSetIterator([a, b], [c, v], batch_size=8, shuffle=True, seed=4), progress=False,
                 steps_per_execution=2)
    batched.fit(batches, progress=False)
    assert_tree_close(resident.params, batched.params, 1e-5)


# -- every vertex against numpy ------------------------------------------------------------------

MGR = LayerWorkspaceMgr()
x1, x2, x3 = (rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3))
seq = rng.normal(size=(4, 6, 5)).astype(np.float32)
seq_mask = (np.arange(6)[None] < np.array([6, 3, 1, 5])[:, None]).astype(np.float32)


@pytest.mark.parametrize("vertex, inputs, masks, expected", [
    (MergeVertex(), [x1, x2[:, :2]], None, np.concatenate([x1, x2[:, :2]], -1)),
    (ElementWiseVertex("add"), [x1, x2, x3], None, x1 + x2 + x3),
    (ElementWiseVertex("subtract"), [x1, x2], None, x1 - x2),
    (ElementWiseVertex("product"), [x1, x2, x3], None, x1 * x2 * x3),
    (ElementWiseVertex("average"), [x1, x2, x3], None, (x1 + x2 + x3) / 3),
    (ElementWiseVertex("max"), [x1, x2, x3], None, np.maximum(np.maximum(x1, x2), x3)),
    (SubsetVertex(1, 3), [x1], None, x1[:, 1:4]),
    (StackVertex(), [x1, x2], None, np.concatenate([x1, x2])),
    (UnstackVertex(1, 2), [np.concatenate([x1, x2])], None, x2),
    (ScaleVertex(2.5), [x1], None, 2.5 * x1),
    (ShiftVertex(-1.0), [x1], None, x1 - 1.0),
    (L2Vertex(eps=0.0), [x1, x2], None, np.linalg.norm(x1 - x2, axis=1, keepdims=True)),
    (LastTimeStepVertex(), [seq], None, seq[:, -1]),
    (LastTimeStepVertex("in"), [seq, seq], [None, seq_mask], seq[np.arange(4), [5, 2, 0, 4]]),
    (DuplicateToTimeSeriesVertex("in"), [x1, seq], None, np.repeat(x1[:, None], 6, axis=1)),
    (PreprocessorVertex(ReshapePreprocessor((6, 5))), [seq.reshape(4, 30)], None, seq),
], ids=lambda v: type(v).__name__ if isinstance(v, GraphVertex) else "")
def test_vertex_forward_against_numpy(vertex, inputs, masks, expected):
    out, _ = vertex.activate({}, {}, [jnp.asarray(x) for x in inputs], False, MGR, masks=masks)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_masks_travel_through_the_graph_to_the_last_real_step():
    graph = ComputationGraph(
        builder().add_inputs("in").add_layer("lstm", LSTM(7), "in")
        .add_vertex("last", LastTimeStepVertex("in"), "lstm")
        .add_layer("out", OutputLayer(2), "last").set_outputs("out").set_input_types((None, 5)).build()).init()
    lengths = [6, 3, 1, 5]
    padded = graph.output(seq, masks=[seq_mask])[0]
    for i, n in enumerate(lengths):  # each example alone, at its true length, without a mask
        np.testing.assert_allclose(padded[i], graph.output(seq[i:i + 1, :n])[0][0], rtol=1e-5, atol=1e-6)


def test_rnn_time_step_equals_the_full_sequence():
    graph = ComputationGraph(
        builder().add_inputs("in", "context").add_layer("lstm", LSTM(7), "in")
        .add_vertex("ctx", DuplicateToTimeSeriesVertex("in"), "context")
        .add_vertex("merge", MergeVertex(), "lstm", "ctx")
        .add_layer("out", RnnOutputLayer(3), "merge").set_outputs("out").set_input_types((None, 5), (2,)).build()).init()
    context = rng.normal(size=(4, 2)).astype(np.float32)
    full = graph.output(seq, context)[0]
    steps = [graph.rnn_time_step(seq[:, t], context)[0] for t in range(6)]
    np.testing.assert_allclose(np.stack(steps, 1), full, rtol=1e-5, atol=1e-6)
    graph.rnn_clear_previous_state()
    first = graph.rnn_time_step(seq[:, :4], context)[0]
    np.testing.assert_allclose(first, full[:, :4], rtol=1e-5, atol=1e-6)


def test_a_custom_vertex_is_validated_like_a_layer():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Plain(GraphVertex):
        def activate(self, params, state, inputs, training, mgr, masks=None):
            return inputs[0] * 2, state  # not through the LayerWorkspaceMgr

    graph = ComputationGraph(builder().add_inputs("in").add_vertex("twice", Plain(), "in")
                             .add_layer("out", OutputLayer(2), "twice").set_outputs("out").set_input_types((5,)).build()).init()
    with pytest.raises(jaxws.WorkspaceValidationError, match=r"Vertex 'twice' \(Plain\) returned activations .* ArrayType.ACTIVATIONS"):
        graph.fit(([x1], [np.zeros(4, np.int32)]), progress=False)
    assert graph.iteration == 0


# -- bad graphs are refused at build(), naming the vertex -----------------------------------------

@pytest.mark.parametrize("make, fragment", [
    (lambda b: b.add_inputs("in").add_layer("d", Dense(3), "nowhere").add_layer("out", OutputLayer(2), "d"),
     "vertex 'd' reads 'nowhere'"),
    (lambda b: b.add_inputs("in").add_layer("a", Dense(3), "in", "b").add_layer("b", Dense(3), "a")
     .add_layer("out", OutputLayer(2), "b"), r"cycle through the vertices \['a', 'b'\]"),
    (lambda b: b.add_inputs("in").add_layer("d", Dense(3), "in").add_layer("spare", Dense(3), "in")
     .add_layer("out", OutputLayer(2), "d"), "vertex 'spare' is not used"),
    (lambda b: b.add_inputs("in", "other").add_layer("out", OutputLayer(2), "in"), "input 'other' is not used"),
    (lambda b: b.add_inputs("in").add_layer("d", Dense(3), "in").add_vertex("m", MergeVertex(), "d")
     .add_layer("out", OutputLayer(2), "m"), r"vertex 'm' \(MergeVertex\) takes at least 2 input"),
    (lambda b: b.add_inputs("in").add_layer("d", Dense(3), "in").add_vertex("e", ElementWiseVertex(), "d", "in")
     .add_layer("out", OutputLayer(2), "e"), r"Vertex 'e' \(ElementWiseVertex\) cannot take .* one shape"),
    (lambda b: b.add_inputs("in").add_layer("d", Dense(3), "in").add_layer("d", Dense(3), "d")
     .add_layer("out", OutputLayer(2), "d"), "the name 'd' is used twice"),
    (lambda b: b.add_inputs("in").add_layer("d", Dense(3), "in").add_layer("out", OutputLayer(2), "d")
     .set_outputs("d"), "output 'd' is Dense"),
    (lambda b: b.add_inputs("in").add_vertex("s", SubsetVertex(2, 9), "in").add_layer("out", OutputLayer(2), "s"),
     r"Vertex 's' \(SubsetVertex\) .* reaches past"),
])
def test_bad_graphs_are_refused_at_build(make, fragment):
    b = make(builder())
    if not b._outputs:
        b.set_outputs("out")
    with pytest.raises(ConfigurationError, match=fragment):
        b.set_input_types(*[(5,)] * len(b._inputs)).build()


def test_bad_batches_name_the_input_or_output():
    graph = two_by_two()
    (a, b), (c, v) = two_by_two_batches(1)[0]
    with pytest.raises(InvalidBatchError, match=r"input 'b' expects features of shape \[batch, 3\]"):
        graph.fit(([a, a], [c, v]), progress=False)
    with pytest.raises(InvalidBatchError, match=r"2 output\(s\) \['classes', 'value'\], the batch 1 label array\(s\); "
                       r"pass one per output, in that order\."):
        graph.fit(([a, b], [c]), progress=False)
    with pytest.raises(InvalidBatchError, match="labels out of range for loss mcxent of output 'classes'"):
        graph.fit(([a, b], [c + 5, v]), progress=False)
    with pytest.raises(InvalidBatchError, match=r"the graph has 2 input\(s\) \['a', 'b'\], the batch 1 feature "
                       r"array\(s\); pass one per input, in that order: \[x_a, x_b\]\."):
        graph.fit((a, c), progress=False)  # a DataSet is a graph's batch of one input and one output
    assert graph.iteration == 0
    graph.fit(([a, b], [c, v]), progress=False)  # still usable
    assert graph.iteration == 1


def test_device_resident_labels_of_a_graph_are_refused_before_any_step():
    (a, b), (c, v) = two_by_two_batches(1, size=48)[0]
    graph = two_by_two()
    before = jax.tree.map(np.array, graph.params)
    data = ArrayMultiDataSetIterator([jnp.asarray(a), jnp.asarray(b)], [jnp.asarray(c).at[40].set(9), jnp.asarray(v)],
                                     batch_size=12)
    with pytest.raises(InvalidBatchError, match=r"labels out of range for loss mcxent of output 'classes' .*found "
                       r"classes 0\.\.9, expected 0\.\.2; 1 invalid label\(s\), the first in example 40 of the data"):
        graph.fit(data, steps_per_execution=2, progress=False)
    assert graph.iteration == 0
    jax.tree.map(np.testing.assert_array_equal, graph.params, before)


def test_a_host_array_iterator_is_checked_whole_before_any_step_and_trains_as_its_batches():
    (a, b), (c, v) = two_by_two_batches(1, size=48)[0]
    graph, reference = two_by_two(), two_by_two()
    bad = c.copy()
    bad[40] = 9
    with pytest.raises(InvalidBatchError, match=r"labels out of range for loss mcxent of output 'classes'.* found classes 0\.\.9"):
        graph.fit(ArrayMultiDataSetIterator([a, b], [bad, v], batch_size=12, resident=False), progress=False)
    assert graph.iteration == 0 and bad[40] == 9  # nothing ran; the caller's arrays untouched
    graph.fit(ArrayMultiDataSetIterator([a, b], [c, v], batch_size=12, resident=False), progress=False)
    reference.fit([MultiDataSet((a[i:i + 12], b[i:i + 12]), (c[i:i + 12], v[i:i + 12])) for i in range(0, 48, 12)],
                  progress=False)
    assert graph.iteration == 4
    assert_tree_close(graph.params, reference.params, 1e-6)


# -- evaluation, parallel, checkpoints, ownership ------------------------------------------------

def test_do_evaluation_per_output_against_sklearn():
    graph = two_by_two()
    batches = two_by_two_batches(3)
    graph.fit(batches, epochs=5, progress=False)
    ev, reg = graph.do_evaluation(batches, {"classes": Evaluation(), "value": RegressionEvaluation()})
    predicted = np.concatenate([np.asarray(graph.output(*x)[0]).argmax(-1) for x, _ in batches])
    truth = np.concatenate([y[0] for _, y in batches])
    assert ev.accuracy() == pytest.approx(accuracy_score(truth, predicted))
    values = np.concatenate([np.asarray(graph.output(*x)[1]) for x, _ in batches])
    assert reg.mean_squared_error(0) == pytest.approx(np.mean((values - np.concatenate([y[1] for _, y in batches])) ** 2), rel=1e-5)
    (again,) = graph.do_evaluation(batches, 0, Evaluation())
    assert again.accuracy() == ev.accuracy()
    with pytest.raises(ConfigurationError, match=r"2 outputs \['classes', 'value'\]; say which"):
        graph.evaluate(batches)


def test_parallel_wrapper_one_worker_equals_fit_and_eight_equal_local_sgd():
    batches = two_by_two_batches(16, size=8)
    a, b = two_by_two(optax.sgd(0.1)), two_by_two(optax.sgd(0.1))
    a.fit(batches, progress=False)
    ParallelWrapper(b, workers=1, averaging_frequency=3).fit(batches)
    assert_tree_close(a.params, b.params, 1e-6)
    graph = two_by_two(optax.sgd(0.1))
    params = [jaxws.detach(graph.params) for _ in range(8)]
    for g in range(2):  # 16 batches: two rounds of 8 workers, averaged after both (k=2)
        for w in range(8):
            (x1_, x2_), (c, v) = batches[g * 8 + w]
            grads = jax.grad(reference_loss)(params[w], x1_, x2_, c, v)
            params[w] = jax.tree.map(lambda p, d: p - 0.1 * d, params[w], grads)
    expected = jax.tree.map(lambda *xs: np.mean(np.stack(xs), 0), *params)
    ParallelWrapper(graph, workers=8, averaging_frequency=2).fit(batches)
    assert_tree_close(graph.params, expected, 1e-5)


def test_parallel_inference_serves_a_graph():
    graph = two_by_two()
    (a, b), _ = two_by_two_batches(1)[0]
    with ParallelInference(graph, batch_limit=8, workers=2) as pi:
        classes, value = pi.output([a[:5], b[:5]])
        expected = graph.output(a[:5], b[:5])
    np.testing.assert_allclose(classes, expected[0], rtol=1e-5, atol=1e-6)  # padded to a bucket of 8
    np.testing.assert_allclose(value, expected[1], rtol=1e-5, atol=1e-6)


def test_save_and_load_resume_to_the_same_numbers(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    batches = two_by_two_batches(6)
    whole = two_by_two(Sgd(0.05))
    whole.fit(batches, progress=False)
    half = two_by_two(Sgd(0.05))
    half.fit(batches[:3], progress=False)
    path = half.save(str(tmp_path / "graph"))
    loaded = ComputationGraph.load(path)
    assert loaded.conf == half.conf and loaded.iteration == 3
    loaded.fit(batches[3:], progress=False)
    assert_tree_close(loaded.params, whole.params, 1e-6)
    assert ComputationGraphConfiguration.from_json(half.conf.to_json()) == half.conf


def test_user_arrays_survive_fit_and_evaluation():
    (a, b), (c, v) = two_by_two_batches(1)[0]
    shared = jnp.asarray(c)  # one device label array shared by every batch
    device = [([jnp.asarray(a), jnp.asarray(b)], [shared, jnp.asarray(v)]) for _ in range(3)]
    host = [([a, b], [c, v]) for _ in range(3)]
    graph = two_by_two()
    for data in (device, host):
        graph.fit(data, epochs=2, progress=False)
        graph.do_evaluation(data, {"classes": Evaluation()})
    assert not any(x.is_deleted() for batch in device for x in jax.tree.leaves(batch))
    np.testing.assert_array_equal(shared, c)


def test_summary_lists_vertices_and_parameters():
    graph = two_by_two()
    text = graph.summary()
    for name in ("da", "db", "sum", "merge", "skip", "classes", "value"):
        assert name in text
    assert f"total parameters: {graph.num_params():,}" in text
    assert graph.num_params() == 4 * 6 + 6 + 3 * 6 + 6 + 9 * 6 + 6 + 6 * 3 + 3 + 9 + 1


def test_sequence_labels_take_their_length_from_the_labels_whatever_input_comes_first():
    graph = ComputationGraph(
        builder().add_inputs("context", "in").add_layer("lstm", LSTM(7), "in")
        .add_vertex("ctx", DuplicateToTimeSeriesVertex("in"), "context")
        .add_vertex("merge", MergeVertex(), "lstm", "ctx")
        .add_layer("out", RnnOutputLayer(3), "merge").set_outputs("out").set_input_types((2,), (None, 5)).build()).init()
    context = rng.normal(size=(4, 2)).astype(np.float32)
    labels = np.zeros((4, 6), np.int32)
    graph.fit(([context, seq], [labels]), progress=False)
    with pytest.raises(InvalidBatchError, match=r"output 'out' .* expects labels of shape \[4, 5, 3\] or integer classes \[4, 5\], received \[4, 5, 2\]"):
        graph.fit(([context, seq[:, :5]], [np.zeros((4, 5, 2), np.float32)]), progress=False)
    assert graph.iteration == 1
