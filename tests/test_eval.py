"""Evaluators against scikit-learn; merge; do_evaluation against output() batch by batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as skm

import jaxws
from jaxws.eval import (
    ROC,
    Evaluation,
    EvaluationAveraging,
    EvaluationBinary,
    RegressionEvaluation,
    ROCBinary,
    ROCMultiClass,
)

MICRO = EvaluationAveraging.MICRO


def classification_data(seed, classes, n=600, masked=False):
    r = np.random.default_rng(seed)
    y = r.integers(0, classes, n)
    logits = r.normal(size=(n, classes)) + 1.5 * np.eye(classes)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    mask = (r.random(n) > 0.3).astype(np.float32) if masked else None
    return y.astype(np.int32), p.astype(np.float32), mask


def evaluate_in_batches(ev, y, p, mask, batch=128, one_hot=False):
    labels = np.eye(p.shape[1], dtype=np.float32)[y] if one_hot else y
    for i in range(0, len(y), batch):
        ev.eval(labels[i:i + batch], p[i:i + batch], None if mask is None else mask[i:i + batch])
    return ev


@pytest.mark.parametrize("classes", [2, 3, 10])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_evaluation_equals_sklearn(classes, masked, seed):
    y, p, mask = classification_data(seed, classes, masked=masked)
    ev = evaluate_in_batches(Evaluation(), y, p, mask, one_hot=seed % 2 == 0)
    keep = np.ones(len(y), bool) if mask is None else mask > 0
    yt, yp = y[keep], p[keep].argmax(1)
    labels = list(range(classes))
    np.testing.assert_array_equal(ev.confusion_matrix(), skm.confusion_matrix(yt, yp, labels=labels))
    assert ev.accuracy() == pytest.approx(skm.accuracy_score(yt, yp), abs=1e-12)
    for name, ours in (("precision", ev.precision), ("recall", ev.recall), ("f1", ev.f1)):
        sk = getattr(skm, f"{name}_score")
        per = sk(yt, yp, labels=labels, average=None, zero_division=0)
        for c in labels:
            assert ours(c) == pytest.approx(per[c], abs=1e-9)
        assert ours() == pytest.approx(sk(yt, yp, labels=labels, average="macro", zero_division=0), abs=1e-9)
        assert ours(averaging=MICRO) == pytest.approx(sk(yt, yp, labels=labels, average="micro"), abs=1e-9)
    assert ev.matthews_correlation() == pytest.approx(skm.matthews_corrcoef(yt, yp), abs=1e-9)
    assert ev.f_beta(2.0, 0) == pytest.approx(skm.fbeta_score(yt, yp, beta=2.0, labels=labels, average=None)[0], abs=1e-9)


def test_top_n_accuracy_equals_sklearn():
    y, p, _ = classification_data(0, 10)
    ev = evaluate_in_batches(Evaluation(top_n=3), y, p, None)
    assert ev.top_n_accuracy() == pytest.approx(skm.top_k_accuracy_score(y, p, k=3, labels=range(10)))


def test_time_series_with_masks():
    y, p, mask = classification_data(1, 4, n=240, masked=True)
    ev = Evaluation()
    ev.eval(y.reshape(6, 40), p.reshape(6, 40, 4), mask.reshape(6, 40))
    keep = mask > 0
    np.testing.assert_array_equal(ev.confusion_matrix(), skm.confusion_matrix(y[keep], p[keep].argmax(1), labels=range(4)))


def test_binary_threshold_and_cost_array():
    p = np.array([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]], np.float32)
    y = np.array([1, 1, 1])
    ev = Evaluation(binary_decision_threshold=0.65)
    ev.eval(y, p)
    assert ev.confusion_matrix()[1].tolist() == [2, 1]
    ev = Evaluation(cost_array=[1.0, 3.0])
    ev.eval(y, p)
    assert ev.confusion_matrix()[1].tolist() == [0, 3]


def test_macro_averages_follow_scikit_learn_by_default_and_dl4j_on_request():
    # class 2 occurs but is never predicted (0/0 precision); class 3 never occurs at all
    y = np.array([0, 0, 1, 1, 2, 2, 2, 1])
    predicted = np.array([0, 1, 1, 1, 0, 1, 1, 0])
    p = np.eye(4, dtype=np.float32)[predicted]
    default, dl4j = Evaluation(4), Evaluation(4, zero_division="exclude")
    default.eval(y, p)
    dl4j.eval(y, p)
    for name in ("precision", "recall", "f1"):
        sk = getattr(skm, f"{name}_score")
        assert getattr(default, name)() == pytest.approx(sk(y, predicted, average="macro", zero_division=0), abs=1e-12)
        per = sk(y, predicted, labels=range(4), average=None, zero_division=np.nan)
        assert getattr(dl4j, name)() == pytest.approx(np.nanmean(per), abs=1e-12)  # 0/0 classes left out
    assert default.precision() != pytest.approx(dl4j.precision())  # the conventions really differ here
    assert default.excluded_classes() == 1 and dl4j.excluded_classes("precision") == 2
    assert "1 class(es) that never occur excluded" in default.stats()
    assert "2 class(es) with 0/0 precision excluded" in dl4j.stats()
    with pytest.raises(jaxws.EvaluationError, match="zero_division='none'"):
        Evaluation(zero_division="none")


def test_macro_precision_with_a_never_predicted_class_equals_scikit_learn():
    r = np.random.default_rng(7)
    y = r.integers(0, 4, 400)
    logits = r.normal(size=(400, 4)) + 1.2 * np.eye(4)[y]
    logits[:, 3] -= 10  # class 3 is never predicted
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ev = evaluate_in_batches(Evaluation(), y.astype(np.int32), p.astype(np.float32), None)
    yp = p.argmax(1)
    assert 3 not in set(yp)
    assert ev.precision() == pytest.approx(skm.precision_score(y, yp, average="macro", zero_division=0), abs=1e-12)
    assert ev.f1() == pytest.approx(skm.f1_score(y, yp, average="macro", zero_division=0), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_exact_roc_equals_sklearn(seed):
    r = np.random.default_rng(seed)
    y = r.integers(0, 2, 3000)
    s = np.clip(r.normal(0.35 + 0.3 * y, 0.25), 0, 1).round(3).astype(np.float32)  # ties
    roc, trapezoid = ROC(), ROC(auprc="trapezoid")
    for i in range(0, 3000, 500):
        roc.eval(y[i:i + 500], s[i:i + 500])
        trapezoid.eval(y[i:i + 500], s[i:i + 500])
    assert roc.reallocations == 0 and roc.state.scores.shape[0] == 4096  # 3,000 rows fit the first block
    assert roc.calculate_auc() == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert roc.calculate_auprc() == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    precision, recall, _ = skm.precision_recall_curve(y, s)
    area = (getattr(np, "trapezoid", None) or np.trapz)(precision[::-1], recall[::-1])
    assert trapezoid.calculate_auprc() == pytest.approx(area, abs=1e-12)  # DL4J's convention, asked for
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    curve = roc.get_roc_curve()
    np.testing.assert_allclose(curve.fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(curve.tpr, tpr, atol=1e-12)


@pytest.mark.parametrize("steps", [10, 200])
def test_thresholded_curve_points_are_the_counts_at_each_threshold(steps):
    r = np.random.default_rng(steps)
    y = r.integers(0, 2, 2000)
    s = np.clip(r.normal(0.35 + 0.3 * y, 0.25), 0.0005, 0.9995).astype(np.float32)
    s = np.where(np.abs(s * steps - np.round(s * steps)) < 1e-3, s + 2e-3, s)  # off the bin edges
    roc = ROC(threshold_steps=steps)
    roc.eval(y, s)
    curve = roc.get_roc_curve()
    for fpr, tpr, t in zip(curve.fpr[1:], curve.tpr[1:], curve.thresholds[1:]):
        assert tpr == pytest.approx(np.mean(s[y == 1] >= t), abs=1e-12), t
        assert fpr == pytest.approx(np.mean(s[y == 0] >= t), abs=1e-12), t
    assert list(curve.thresholds[1:]) == pytest.approx(list(np.arange(steps, -1, -1) / steps))


def test_exact_buffer_grows_in_blocks_without_host_transfer():
    r = np.random.default_rng(0)
    roc = ROC()
    y = jnp.asarray(r.integers(0, 2, 1000))
    s = jnp.asarray(r.random(1000), jnp.float32)
    roc.eval(y, s)  # compile outside the guard
    with jax.transfer_guard_device_to_host("disallow"):
        for _ in range(20):
            roc.eval(y, s)
    assert roc.reallocations >= 2 and roc.state.scores.shape[0] >= 21000


def test_roc_multiclass_and_binary_equal_sklearn():
    y, p, _ = classification_data(3, 5, n=1000)
    multi = ROCMultiClass()
    evaluate_in_batches(multi, y, p, None)
    onehot = np.eye(5)[y]
    for c in range(5):
        assert multi.calculate_auc(c) == pytest.approx(skm.roc_auc_score(onehot[:, c], p[:, c]), abs=1e-12)
    assert multi.calculate_average_auc() == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-9)
    binary = ROCBinary()
    mask = (np.random.default_rng(1).random(onehot.shape) > 0.2).astype(np.float32)
    binary.eval(onehot, p, mask)
    for c in range(5):
        keep = mask[:, c] > 0
        assert binary.calculate_auc(c) == pytest.approx(skm.roc_auc_score(onehot[keep, c], p[keep, c]), abs=1e-12)


def test_evaluation_binary_equals_sklearn():
    r = np.random.default_rng(0)
    y = (r.random((500, 3)) > 0.5).astype(np.float32)
    p = np.clip(y * 0.4 + r.random((500, 3)) * 0.6, 0, 1).astype(np.float32)
    ev = EvaluationBinary(thresholds=[0.5, 0.4, 0.6])
    ev.eval(y, p)
    for i, t in enumerate([0.5, 0.4, 0.6]):
        pred = p[:, i] >= t
        assert ev.accuracy(i) == pytest.approx(skm.accuracy_score(y[:, i], pred))
        assert ev.precision(i) == pytest.approx(skm.precision_score(y[:, i], pred))
        assert ev.recall(i) == pytest.approx(skm.recall_score(y[:, i], pred))
        assert ev.f1(i) == pytest.approx(skm.f1_score(y[:, i], pred))
        assert ev.matthews_correlation(i) == pytest.approx(skm.matthews_corrcoef(y[:, i], pred))


def test_regression_equals_sklearn():
    r = np.random.default_rng(0)
    y = r.normal(3.0, 2.0, (5000, 2)).astype(np.float32)
    p = (y + r.normal(0, 0.5, y.shape)).astype(np.float32)
    ev = RegressionEvaluation(2)
    for i in range(0, 5000, 700):
        ev.eval(y[i:i + 700], p[i:i + 700])
    for c in range(2):
        assert ev.mean_squared_error(c) == pytest.approx(skm.mean_squared_error(y[:, c], p[:, c]), rel=1e-4)
        assert ev.mean_absolute_error(c) == pytest.approx(skm.mean_absolute_error(y[:, c], p[:, c]), rel=1e-4)
        assert ev.root_mean_squared_error(c) == pytest.approx(np.sqrt(skm.mean_squared_error(y[:, c], p[:, c])), rel=1e-4)
        assert ev.r_squared(c) == pytest.approx(skm.r2_score(y[:, c], p[:, c]), rel=1e-4)
        assert ev.relative_squared_error(c) == pytest.approx(1 - skm.r2_score(y[:, c], p[:, c]), rel=1e-3)
        assert ev.pearson_correlation(c) == pytest.approx(np.corrcoef(y[:, c], p[:, c])[0, 1], rel=1e-4)
    assert ev.average_r_squared() == pytest.approx(skm.r2_score(y, p), rel=1e-4)


@pytest.mark.parametrize("make, kind", [
    (lambda: Evaluation(), "classes"), (lambda: ROC(), "binary"), (lambda: ROC(50), "binary"),
    (lambda: ROCMultiClass(), "classes"), (lambda: ROCMultiClass(20), "classes"),
    (lambda: EvaluationBinary(), "multilabel"), (lambda: RegressionEvaluation(), "regression"),
])
def test_merge_over_shards_equals_one_evaluation(make, kind):
    r = np.random.default_rng(7)
    if kind == "binary":
        y, p = r.integers(0, 2, 900), r.random(900).astype(np.float32)
    elif kind == "classes":
        y, p, _ = classification_data(7, 4, n=900)
    elif kind == "multilabel":
        y, p = (r.random((900, 3)) > 0.5).astype(np.float32), r.random((900, 3)).astype(np.float32)
    else:
        y, p = r.normal(size=(900, 2)).astype(np.float32), r.normal(size=(900, 2)).astype(np.float32)
    whole = make()
    whole.eval(y, p)
    shards = []
    for i in range(3):
        shard = make()
        shard.eval(y[i * 300:(i + 1) * 300], p[i * 300:(i + 1) * 300])
        shards.append(shard)
    merged = shards[0].merge(shards[1]).merge(shards[2])
    a, b = whole.compute(whole.state), merged.compute(merged.state)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)
    roundtrip = type(merged).from_json(merged.to_json())
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), roundtrip.compute(roundtrip.state), b)


def test_functional_merge_is_associative():
    y, p, _ = classification_data(2, 3, n=300)
    ev = Evaluation(3)
    parts = [ev.update(ev.init(), y[i:i + 100], p[i:i + 100]) for i in (0, 100, 200)]
    left = ev.merge(ev.merge(parts[0], parts[1]), parts[2])
    right = ev.merge(parts[0], ev.merge(parts[1], parts[2]))
    np.testing.assert_array_equal(left.confusion, right.confusion)


# -- bad input -----------------------------------------------------------------------------


def test_bad_input_gives_clear_errors():
    ev = Evaluation()
    assert "no data yet" in ev.stats()
    with pytest.raises(jaxws.EvaluationError, match="no data"):
        ev.accuracy()
    with pytest.raises(jaxws.EvaluationError, match=r"labels of shape \(4, 2\) do not match predictions of shape "
                       r"\(4, 3\); expected one-hot labels \(4, 3\) or integer classes \(4,\)\."):
        ev.eval(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(jaxws.EvaluationError, match=r"^RegressionEvaluation: labels of shape \(4, 2\) do not match "
                       r"predictions of shape \(4, 3\); expected labels of the predictions' shape \(4, 3\)\."):
        RegressionEvaluation().eval(np.zeros((4, 2)), np.zeros((4, 3)))  # not one-hot: values
    ev = Evaluation(3)
    with pytest.raises(jaxws.EvaluationError, match="predictions have 4 classes, the evaluation 3"):
        ev.eval(np.zeros(4, np.int32), np.zeros((4, 4)))
    with pytest.raises(jaxws.EvaluationError, match="num_classes=1"):
        Evaluation(1)
    with pytest.raises(jaxws.EvaluationError, match="ROCMultiClass"):
        ROC().eval(np.zeros(4, np.int32), np.zeros((4, 3)))
    with pytest.raises(jaxws.EvaluationError, match="both positive and negative"):
        roc = ROC()
        roc.eval(np.ones(4, np.int32), np.full(4, 0.5))
        roc.calculate_auc()


def test_nan_predictions_are_not_counted_and_reported():
    ev = Evaluation()
    p = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    p[1] = np.nan
    ev.eval(np.array([0, 1, 2, 2]), p)
    assert ev.confusion_matrix().sum() == 3
    assert "1 example(s) had NaN predictions" in ev.stats()


def test_stats_layout_and_large_matrices():
    y, p, _ = classification_data(0, 3)
    text = evaluate_in_batches(Evaluation(labels=["a", "b", "c"]), y, p, None).stats()
    assert "Evaluation Metrics" in text and " Accuracy:" in text and "| 2 = c" in text
    y, p, _ = classification_data(0, 21, n=300)
    assert "not shown for 21 classes > 20" in evaluate_in_batches(Evaluation(), y, p, None).stats()


# -- do_evaluation ------------------------------------------------------------------------


def network(classes=4, d=5):
    conf = jaxws.nn.NeuralNetConfiguration(
        layers=[jaxws.nn.Dense(16, activation="tanh"), jaxws.nn.OutputLayer(classes)],
        input_shape=(d,), updater=optax.adam(1e-2), seed=2)
    return jaxws.nn.MultiLayerNetwork(conf).init()


def test_do_evaluation_equals_output_batch_by_batch():
    r = np.random.default_rng(0)
    x = r.normal(size=(500, 5)).astype(np.float32)
    y = (np.abs(x[:, :4]).argmax(1)).astype(np.int32)
    net = network()
    net.fit((x, y), epochs=3, batch_size=50, progress=False)
    ev, roc = net.do_evaluation((x, y), Evaluation(), ROCMultiClass(), batch_size=64)
    reference, ref_roc = Evaluation(), ROCMultiClass()
    for i in range(0, 500, 64):
        out = net.output(x[i:i + 64])
        reference.eval(y[i:i + 64], out)
        ref_roc.eval(y[i:i + 64], out)
    np.testing.assert_array_equal(ev.confusion_matrix(), reference.confusion_matrix())
    for c in range(4):
        assert roc.calculate_auc(c) == pytest.approx(ref_roc.calculate_auc(c), abs=1e-7)
    assert net.evaluate((x, y)).accuracy() == pytest.approx(ev.accuracy())
    assert isinstance(net.evaluate_roc((x, y), 100), ROCMultiClass)


def test_evaluators_of_one_setting_get_empty_states_of_their_own_from_one_program():
    # DL4J's loop makes a new Evaluation per call: its empty state comes from one cached
    # program per setting, never shared: two alike in one pass are donated side by side
    r = np.random.default_rng(1)
    x = r.normal(size=(96, 5)).astype(np.float32)
    y = r.integers(0, 4, 96).astype(np.int32)
    net = network()
    first, second, roc_a, roc_b = Evaluation(), Evaluation(), ROCMultiClass(), ROCMultiClass()
    net.do_evaluation((x, y), first, second, roc_a, roc_b, batch_size=32)
    np.testing.assert_array_equal(first.confusion_matrix(), second.confusion_matrix())
    assert first.confusion_matrix().sum() == 96
    assert roc_a.calculate_auc(0) == roc_b.calculate_auc(0)
    states = jax.tree.leaves((first.state, second.state, roc_a.state, roc_b.state))
    assert len({a.unsafe_buffer_pointer() for a in states}) == len(states)
    for _ in range(3):  # a fresh evaluator per call, as DL4J's loop makes them
        assert net.evaluate((x[:32], y[:32])).confusion_matrix().sum() == 32
    from jaxws.eval.base import _EMPTY
    assert (Evaluation, 4, 1, None, None) in _EMPTY  # the setting's one program


def test_a_pass_of_one_batch_makes_its_empty_states_inside_its_program(monkeypatch):
    """DL4J's ``evaluate(ds)`` / ``score(ds)`` per batch: the fresh evaluators' empty
    states, the label check and score's total are made by the batch's own program (one
    dispatch a call); an exact ROC, which grows, and a pass of several batches make theirs
    first. The numbers are scikit-learn's either way."""
    from jaxws.data import DataSet
    from jaxws.eval import base, kernel
    from jaxws.nn import checks

    r = np.random.default_rng(3)
    x = jax.device_put(r.normal(size=(40, 5)).astype(np.float32))
    y = jax.device_put(r.integers(0, 4, 40).astype(np.int32))
    net = network()
    made = []
    ensure = base.Evaluator._ensure_state
    monkeypatch.setattr(base.Evaluator, "_ensure_state",
                        lambda ev, shape: (ev.state is None and made.append(type(ev).__name__)) or ensure(ev, shape))
    monkeypatch.setattr(checks.LabelCheck, "init", classmethod(lambda cls: made.append("check") or cls(checks._initial())))
    monkeypatch.setattr(kernel, "_fresh_total", lambda: made.append("total") or jnp.zeros((), jnp.float32))

    predicted = np.asarray(net.output(x)).argmax(1)
    expected = skm.confusion_matrix(np.asarray(y), predicted, labels=range(4))
    for _ in range(2):  # the second call runs the planned program
        ev, roc = net.do_evaluation(DataSet(x, y), Evaluation(), ROCMultiClass())
        np.testing.assert_array_equal(ev.confusion_matrix(), expected)
        assert made == ["ROCMultiClass"]  # exact: sized as rows come, outside the program
        made.clear()
    probabilities = np.asarray(net.output(x))
    assert roc.calculate_auc(1) == pytest.approx(skm.roc_auc_score(np.asarray(y) == 1, probabilities[:, 1]), abs=1e-6)
    for _ in range(2):
        assert net.score(DataSet(x, y)) == pytest.approx(skm.log_loss(np.asarray(y), probabilities, labels=range(4)), rel=1e-5)
        assert made == []

    ev = net.do_evaluation([DataSet(x[:20], y[:20]), DataSet(x[20:], y[20:])], Evaluation())[0]
    np.testing.assert_array_equal(ev.confusion_matrix(), expected)
    assert made == ["Evaluation", "check"]
    made.clear()
    bad = y.at[7].set(9)
    with pytest.raises(jaxws.InvalidBatchError, match=r"batch 0 .* \(found 0\.\.9\); 1 invalid label"):
        net.evaluate(DataSet(x, bad))
    assert made == []


def test_an_exact_roc_growing_inside_a_pass_equals_sklearn():
    # the pass runs on jaxws.jit's lean path, planned by batch signature and the states'
    # avals: an exact ROC's buffers grow mid-pass (4,096 rows a block) and the next batch
    # gets a plan of its own; a second pass starts from the grown states
    r = np.random.default_rng(0)
    x = r.normal(size=(6000, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * r.normal(size=6000) > 0).astype(np.int32)
    net = network(classes=2)
    batches = [(jnp.asarray(x[i:i + 1000]), jnp.asarray(y[i:i + 1000])) for i in range(0, 6000, 1000)]
    roc = ROC()
    net.do_evaluation(batches, roc)
    assert roc.reallocations == 1 and roc.state.scores.shape[0] == 8192
    scores = np.asarray(net.output(x))[:, 1]
    assert roc.calculate_auc() == pytest.approx(skm.roc_auc_score(y, scores), abs=1e-6)
    net.do_evaluation(iter(batches), roc)  # adds the same rows again: 12,000 in all
    assert roc.reallocations == 2 and roc.state.scores.shape[0] == 16384
    assert roc.calculate_auc() == pytest.approx(skm.roc_auc_score(np.tile(y, 2), np.tile(scores, 2)), abs=1e-6)
    assert not any(a.is_deleted() for ds in batches for a in ds)  # the user's batches


def test_do_evaluation_adds_no_device_to_host_transfer():
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(64, 5)), jnp.float32)
    y = jnp.asarray(r.integers(0, 4, 64), jnp.int32)
    net = network()
    batches = [(x, y)] * 10
    net.do_evaluation(batches[:1], Evaluation(), ROCMultiClass(50), ROCMultiClass())  # compile
    evs = (Evaluation(), ROCMultiClass(50), ROCMultiClass(), RegressionEvaluation())
    with jax.transfer_guard_device_to_host("disallow"):
        net.do_evaluation(batches, *evs[:3])
    assert evs[0].confusion_matrix().sum() == 640
    assert evs[0]._jit_update is None  # it never left the fused step


def test_do_evaluation_on_sequences_uses_the_labels_mask():
    conf = jaxws.nn.NeuralNetConfiguration(layers=[jaxws.nn.LSTM(6), jaxws.nn.RnnOutputLayer(3)], input_shape=(None, 2))
    net = jaxws.nn.MultiLayerNetwork(conf).init()
    r = np.random.default_rng(0)
    x = r.normal(size=(4, 7, 2)).astype(np.float32)
    y = r.integers(0, 3, (4, 7)).astype(np.int32)
    mask = np.ones((4, 7), np.float32)
    mask[:, 5:] = 0
    (ev,) = net.do_evaluation(jaxws.data.DataSet(x, y, None, mask), Evaluation())
    assert ev.confusion_matrix().sum() == 20
    ref = Evaluation()
    ref.eval(y, net.output(x), mask)
    np.testing.assert_array_equal(ev.confusion_matrix(), ref.confusion_matrix())


def test_do_evaluation_needs_evaluators():
    net = network()
    with pytest.raises(ValueError, match="at least one evaluator"):
        net.do_evaluation((np.ones((2, 5)), np.zeros(2, np.int32)))
    with pytest.raises(TypeError, match="not a jaxws.eval.Evaluator"):
        net.do_evaluation((np.ones((2, 5)), np.zeros(2, np.int32)), "accuracy")


def test_evaluate_roc_counts_the_first_batch_of_a_one_shot_iterator():
    r = np.random.default_rng(0)
    x = r.normal(size=(40, 5)).astype(np.float32)
    y = r.integers(0, 4, 40).astype(np.int32)
    net = network()
    roc = net.evaluate_roc(iter([(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]))
    assert int(roc.state.count) == 40
