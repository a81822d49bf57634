"""ComputationGraph: a ResNet-style MLP graph against a hand-written jax.jit loop.

The graph: a stem Dense, then residual blocks (Dense -> relu -> Dense, added to the
block's input by an ElementWiseVertex), then an OutputLayer. The baseline is the same
function written by hand in JAX with optax.adam, jitted with the carry donated, fed the
same shuffled batches (numpy permutation per epoch, batches cut on the host and put on
the device each step). jaxws is run as the README says: ``fit`` on the iterator users
pass (an ArrayMultiDataSetIterator, fresh order each epoch, one workspace cycle per
step), and on a list of host batches. Variants interleaved, best of ``--repeats``.

Then SEPARATE against SINGLE: bytes backprop saves for one batch (``jax.vjp``
residuals) and the step time through ``fit``.

    python benchmarks/graph.py [--width 512] [--blocks 4] [--batch 256] [--examples 4096]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxws
from jaxws import WorkspaceMode
from jaxws.data import ArrayMultiDataSetIterator, MultiDataSet
from jaxws.nn import Adam, ComputationGraph, Dense, ElementWiseVertex, NeuralNetConfiguration, OutputLayer


def emit(**fields):
    print(json.dumps({"benchmark": "graph", "backend": jax.default_backend(), **fields}), flush=True)


def resnet(width: int, blocks: int, features: int, mode: WorkspaceMode) -> ComputationGraph:
    b = (NeuralNetConfiguration.builder().seed(0).updater(Adam(1e-3)).training_workspace_mode(mode)
         .graph_builder().add_inputs("x").add_layer("stem", Dense(width, activation="relu"), "x"))
    previous = "stem"
    for i in range(blocks):
        b.add_layer(f"b{i}a", Dense(width, activation="relu"), previous)
        b.add_layer(f"b{i}b", Dense(width), f"b{i}a")
        b.add_vertex(f"b{i}", ElementWiseVertex("add"), f"b{i}b", previous)
        previous = f"b{i}"
    b.add_layer("out", OutputLayer(10), previous).set_outputs("out").set_input_types((features,))
    return ComputationGraph(b.build()).init()


def hand_written(blocks: int):
    """The same graph in plain JAX: params by vertex name, as the graph keeps them."""
    dense = lambda p, x: x @ p["W"] + p["b"]  # noqa: E731
    opt = optax.adam(1e-3)

    def loss(params, x, y):
        h = jax.nn.relu(dense(params["stem"], x))
        for i in range(blocks):
            h = dense(params[f"b{i}b"], jax.nn.relu(dense(params[f"b{i}a"], h))) + h
        return optax.softmax_cross_entropy_with_integer_labels(dense(params["out"], h), y).mean()

    def _step(carry, x, y):
        params, state = carry
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(_step, donate_argnums=0)
    return opt, step


def epochs_of(x, y, batch, epochs, seed=0):
    """What a hand-written loop does: a permutation per epoch, batches cut on the host."""
    for e in range(epochs):
        order = np.random.default_rng([seed, e]).permutation(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            rows = order[i:i + batch]
            yield x[rows], y[rows]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    r = np.random.default_rng(0)
    features = 256
    x = r.normal(size=(args.examples, features)).astype(np.float32)
    y = r.integers(0, 10, args.examples).astype(np.int32)
    steps = args.epochs * (args.examples // args.batch)

    graph = resnet(args.width, args.blocks, features, WorkspaceMode.ENABLED)
    opt, step = hand_written(args.blocks)
    carry = (jaxws.detach(graph.params), None)
    carry = (carry[0], opt.init(carry[0]))

    def plain():
        nonlocal carry
        for xb, yb in epochs_of(x, y, args.batch, args.epochs):
            carry = step(carry, jax.device_put(xb), jax.device_put(yb))
        jax.block_until_ready(carry)

    def fit_iterator():
        it = ArrayMultiDataSetIterator([x], [y], args.batch, shuffle=True, drop_last=True)
        graph.fit(it, epochs=args.epochs, progress=False)
        jax.block_until_ready(graph.params)

    host_batches = [MultiDataSet((xb,), (yb,)) for xb, yb in epochs_of(x, y, args.batch, 1)]

    def fit_list():
        graph.fit(host_batches, epochs=args.epochs, progress=False)
        jax.block_until_ready(graph.params)

    variants = {"plain": plain, "fit(iterator)": fit_iterator, "fit(list)": fit_list}
    best = {name: float("inf") for name in variants}
    for fn in variants.values():  # warm-up: compiles
        fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    for name in ("fit(iterator)", "fit(list)"):
        emit(figure=f"ResNet MLP graph: {name} vs hand-written jax.jit loop", width=args.width, blocks=args.blocks,
             batch=args.batch, steps=steps, jaxws_step_ms=round(best[name] / steps * 1e3, 3),
             plain_step_ms=round(best["plain"] / steps * 1e3, 3),
             throughput_ratio=round(best["plain"] / best[name], 3))

    single, separate = (resnet(args.width, args.blocks, features, m) for m in (WorkspaceMode.SINGLE, WorkspaceMode.SEPARATE))
    one = MultiDataSet((x[:args.batch],), (y[:args.batch],))
    saved = {name: g.residual_bytes(one) for name, g in (("single", single), ("separate", separate))}
    times = {"single": float("inf"), "separate": float("inf")}
    for g in (single, separate):
        g.fit(host_batches[:2], progress=False)
    for _ in range(args.repeats):
        for name, g in (("single", single), ("separate", separate)):
            start = time.perf_counter()
            g.fit(host_batches, progress=False)
            jax.block_until_ready(g.params)
            times[name] = min(times[name], (time.perf_counter() - start) / len(host_batches))
    emit(figure="ResNet MLP graph: SEPARATE vs SINGLE", batch=args.batch,
         single_saved_mib=round(saved["single"] / 2**20, 2), separate_saved_mib=round(saved["separate"] / 2**20, 2),
         saved_ratio=round(saved["separate"] / saved["single"], 3),
         single_step_ms=round(times["single"] * 1e3, 3), separate_step_ms=round(times["separate"] * 1e3, 3),
         time_ratio=round(times["separate"] / times["single"], 3))


if __name__ == "__main__":
    main()
