"""do_evaluation against host-side evaluation of the same counts.

1,000,000 examples x 10 classes in batches of 1,000 through a small network. Three ways
to get a confusion matrix and thresholded one-vs-all ROC counts (100 steps):
``do_evaluation`` (forward pass and both evaluators in one jitted step, no transfer),
the host approach done well (``np.asarray`` of each batch's predictions, counts with
``np.bincount``), and scikit-learn per batch (``confusion_matrix``; its ROC needs all
scores at once, so only the matrix is timed: a lower bound). Then exact-mode ROC. Then
DL4J's per-batch calls (``net.evaluate(ds)``, ``net.score(ds)`` with a fresh evaluator
each call, 200 device batches of 32) against the same work under ``jax.jit`` read back
per call (the confusion matrix of one batch; ``float`` of its loss).

    python benchmarks/evaluation.py [--examples 1000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.metrics import confusion_matrix

from jaxws.eval import Evaluation, ROCMultiClass
from jaxws.nn import Dense, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer

CLASSES, FEATURES, BATCH, STEPS = 10, 20, 1000, 100


def host_counts(net, batches):
    confusion = np.zeros((CLASSES, CLASSES), np.int64)
    pos = np.zeros(CLASSES * (STEPS + 1), np.int64)
    neg = np.zeros(CLASSES * (STEPS + 1), np.int64)
    offsets = np.arange(CLASSES) * (STEPS + 1)
    for x, y in batches:
        p = np.asarray(net.output(x))
        y = np.asarray(y)
        confusion += np.bincount(y * CLASSES + p.argmax(1), minlength=CLASSES * CLASSES).reshape(CLASSES, CLASSES)
        bins = (np.clip(np.floor(p * STEPS), 0, STEPS).astype(np.int64) + offsets).ravel()
        positive = (y[:, None] == np.arange(CLASSES)).ravel()
        pos += np.bincount(bins[positive], minlength=pos.size)
        neg += np.bincount(bins[~positive], minlength=neg.size)
    return confusion, pos, neg


def sklearn_counts(net, batches):
    confusion = np.zeros((CLASSES, CLASSES), np.int64)
    for x, y in batches:
        p = np.asarray(net.output(x))
        confusion += confusion_matrix(np.asarray(y), p.argmax(1), labels=range(CLASSES))
    return confusion


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    conf = NeuralNetConfiguration(layers=[Dense(32, activation="relu"), OutputLayer(CLASSES)],
                                  input_shape=(FEATURES,), updater=optax.sgd(0.1))
    net = MultiLayerNetwork(conf).init()
    r = np.random.default_rng(0)
    n = args.examples // BATCH
    batches = [(jnp.asarray(r.normal(size=(BATCH, FEATURES)), jnp.float32),
                jnp.asarray(r.integers(0, CLASSES, BATCH), jnp.int32)) for _ in range(n)]
    jax.block_until_ready(batches)
    # warm up every path (compiles are not what is compared)
    net.do_evaluation(batches[:2], Evaluation(), ROCMultiClass(STEPS))
    net.do_evaluation(batches[:2], ROCMultiClass())
    host_counts(net, batches[:2])
    sklearn_counts(net, batches[:2])

    def ours():
        ev, roc = net.do_evaluation(batches, Evaluation(), ROCMultiClass(STEPS))
        return ev.confusion_matrix(), roc.state  # the one read at the end

    def forward_only():
        out = [net.output(x) for x, _ in batches]
        return jax.block_until_ready(out)

    _, t_forward = timed(forward_only)
    (cm, roc_state), t_ours = timed(ours)
    (cm_host, pos, neg), t_host = timed(lambda: host_counts(net, batches))
    cm_sk, t_sk = timed(lambda: sklearn_counts(net, batches))
    assert (cm == cm_host).all() and (cm == cm_sk).all()
    np.testing.assert_array_equal(np.asarray(roc_state.positives).ravel(), pos)
    meta = {"examples": n * BATCH, "batch": BATCH, "classes": CLASSES, "backend": jax.default_backend()}
    print(json.dumps({"benchmark": "evaluation", "figure": "Evaluation + ROCMultiClass(100 steps)", **meta,
                      "do_evaluation_s": round(t_ours, 3), "host_numpy_s": round(t_host, 3),
                      "sklearn_per_batch_s": round(t_sk, 3),
                      "speedup_vs_host": round(t_host / t_ours, 2), "speedup_vs_sklearn": round(t_sk / t_ours, 2),
                      "forward_pass_only_s": round(t_forward, 3),
                      "speedup_vs_host_beyond_forward": round((t_host - t_forward) / max(t_ours - t_forward, 1e-9), 2)}))
    (roc,), t_exact = timed(lambda: net.do_evaluation(batches, ROCMultiClass()))
    auc, t_auc = timed(roc.calculate_average_auc)
    print(json.dumps({"benchmark": "evaluation", "figure": "ROCMultiClass exact", **meta,
                      "pass_s": round(t_exact, 3), "auc_on_host_s": round(t_auc, 3),
                      "buffer_reallocations": roc.reallocations, "average_auc": round(auc, 4),
                      "vs_thresholded_pass": round(t_exact / t_ours, 2)}))
    per_call_figure(args.repeats)


def per_call_figure(repeats: int) -> None:
    from jaxws.data import DataSet
    from speed import best_of, data, model

    net = model()
    _, _, epochs = data(1)
    batches = epochs[0]
    classes = net.layers[-1].n_out
    params, state = jax.device_put(jax.tree.map(np.asarray, (net.params, net._carry.state)))
    forward = jax.jit(lambda p, s, x: net._apply(p, s, x, None, False, net.inference_workspace_mode)[0])
    counts = jax.jit(lambda p, s, x, y: jnp.zeros((classes, classes), jnp.int32).at[y, forward(p, s, x).argmax(-1)].add(1))
    loss = jax.jit(lambda p, s, ds: net._loss(p, s, ds, False, net.inference_workspace_mode)[0])
    variants = {
        "evaluate": lambda: [net.evaluate(ds).confusion_matrix() for ds in batches],
        "plain_counts": lambda: [np.asarray(counts(params, state, ds.features, ds.labels)) for ds in batches],
        "score": lambda: [net.score(ds) for ds in batches],
        "plain_loss": lambda: [float(loss(params, state, DataSet(ds.features, ds.labels))) for ds in batches],
    }
    for run in variants.values():
        run()
    us = {k: v / len(batches) * 1e6 for k, v in best_of(repeats, variants).items()}
    print(json.dumps({"benchmark": "evaluation", "figure": "per call (DL4J's loop): evaluate(ds), score(ds) / the same under jax.jit",
                      "backend": jax.default_backend(), **{f"{k}_us": round(v, 1) for k, v in us.items()},
                      "evaluate_ratio": round(us["evaluate"] / us["plain_counts"], 3),
                      "score_ratio": round(us["score"] / us["plain_loss"], 3)}), flush=True)


if __name__ == "__main__":
    main()
