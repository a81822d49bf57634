"""SINGLE vs SEPARATE on activation-heavy models, and fit against a plain-JAX loop.

Models: an LSTM (64 steps) and an MLP of blocks whose hidden layer is 4x wider than the
block's output (a custom layer: the 4x hidden is FF_WORKING_MEM). Saved bytes are the
residuals of ``jax.vjp`` (what backprop keeps; on a GPU also XLA's compiled temp).
``fit`` throughput is compared with a plain ``jax.jit(step, donate_argnums=0)`` loop over
the same pure step, once where dispatch dominates (batch 8) and once where compute does.

    python benchmarks/modes.py
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxws
from jaxws import WorkspaceMode
from jaxws.nn import (
    LSTM,
    ArrayType,
    Dense,
    LabelCheck,
    Layer,
    MultiLayerNetwork,
    NeuralNetConfiguration,
    OutputLayer,
    RnnOutputLayer,
)


@dataclasses.dataclass(frozen=True)
class WideBlock(Layer):
    """d -> 4d (gelu) -> d: the 4x hidden is working memory, the output ACTIVATIONS."""

    n_out: int = 256

    def init(self, key, input_shape):
        k1, k2 = jax.random.split(key)
        d, h = input_shape[-1], 4 * self.n_out
        return {"W1": jax.random.normal(k1, (d, h)) / d**0.5, "W2": jax.random.normal(k2, (h, self.n_out)) / h**0.5}, {}

    def activate(self, params, state, x, training, mgr, mask=None):
        hidden = mgr.leverage_to(ArrayType.FF_WORKING_MEM, jax.nn.gelu(x @ params["W1"]))
        return mgr.leverage_to(ArrayType.ACTIVATIONS, x + hidden @ params["W2"]), state


def mlp(mode, width=256, blocks=4):
    return NeuralNetConfiguration(
        layers=[Dense(width), *[WideBlock(width) for _ in range(blocks)], OutputLayer(10)],
        input_shape=(64,), updater=optax.adam(1e-3), training_workspace_mode=mode)


def lstm(mode, width=128):
    return NeuralNetConfiguration(
        layers=[LSTM(width), LSTM(width), RnnOutputLayer(10)],
        input_shape=(None, 32), updater=optax.adam(1e-3), training_workspace_mode=mode)


def batch_for(kind, n):
    r = np.random.default_rng(0)
    if kind.endswith("mlp"):
        return jnp.asarray(r.normal(size=(n, 64)), jnp.float32), jnp.asarray(r.integers(0, 10, n), jnp.int32)
    return (jnp.asarray(r.normal(size=(n, 64, 32)), jnp.float32),
            jnp.asarray(r.integers(0, 10, (n, 64)), jnp.int32))


def time_fit(net, ds, steps, k=1):
    net.fit([ds] * steps, progress=False, steps_per_execution=k)
    jax.block_until_ready(net.params)


def time_plain(step, carry, ds, steps):
    batch = jaxws.data.DataSet(*ds)
    for _ in range(steps):
        carry, loss = step(carry, batch)
    jax.block_until_ready(carry)
    return carry


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def modes_figure(kind, make, n, steps=20, repeats=3):
    ds = batch_for(kind, n)
    nets = {m: MultiLayerNetwork(make(m)).init() for m in (WorkspaceMode.SINGLE, WorkspaceMode.SEPARATE)}
    saved = {m: net.residual_bytes(ds, m) for m, net in nets.items()}
    for net in nets.values():
        time_fit(net, ds, 2)
    t = {m: best_of(lambda net=net: time_fit(net, ds, steps), repeats) / steps for m, net in nets.items()}
    plan = {m: net.compiled_step().memory_plan(net._carry, LabelCheck.init(), jaxws.data.DataSet(*ds)) for m, net in nets.items()}
    s, p = WorkspaceMode.SINGLE, WorkspaceMode.SEPARATE
    return {"benchmark": "modes", "figure": f"{kind}: SEPARATE vs SINGLE", "batch": n,
            "single_saved_mib": round(saved[s] / 2**20, 2), "separate_saved_mib": round(saved[p] / 2**20, 2),
            "saved_ratio": round(saved[p] / saved[s], 3),
            "single_temp_mib": round(plan[s].temp_bytes / 2**20, 2), "separate_temp_mib": round(plan[p].temp_bytes / 2**20, 2),
            "single_step_ms": round(t[s] * 1e3, 3), "separate_step_ms": round(t[p] * 1e3, 3),
            "time_ratio": round(t[p] / t[s], 3), "backend": jax.default_backend()}


def fit_figure(kind, make, n, steps, repeats=5, k=1):
    ds = batch_for(kind, n)
    net = MultiLayerNetwork(make(WorkspaceMode.ENABLED)).init()
    plain = jax.jit(net.train_step(WorkspaceMode.ENABLED), donate_argnums=0)
    carry = jaxws.detach(net._carry)
    time_fit(net, ds, 3 * k, k)
    carry = time_plain(plain, carry, ds, 3)
    t_fit, t_plain = float("inf"), float("inf")
    for _ in range(repeats):  # interleaved, best of
        t_fit = min(t_fit, best_of(lambda: time_fit(net, ds, steps, k), 1))
        start = time.perf_counter()
        carry = time_plain(plain, carry, ds, steps)
        t_plain = min(t_plain, time.perf_counter() - start)
    label = f"fit(steps_per_execution={k})" if k > 1 else "fit"
    return {"benchmark": "modes", "figure": f"{kind}: {label} vs plain jax.jit loop", "batch": n,
            "fit_step_us": round(t_fit / steps * 1e6, 1), "plain_step_us": round(t_plain / steps * 1e6, 1),
            "fit_vs_plain": round(t_fit / t_plain, 3), "backend": jax.default_backend()}


def main():
    print(json.dumps(modes_figure("mlp", mlp, 256)))
    print(json.dumps(modes_figure("lstm", lstm, 32)))
    small = lambda mode: mlp(mode, width=64, blocks=2)  # noqa: E731 - dispatch dominates
    print(json.dumps(fit_figure("small mlp", small, 8, steps=2000)))
    print(json.dumps(fit_figure("small mlp", small, 8, steps=2000, k=10)))
    print(json.dumps(fit_figure("mlp", mlp, 8, steps=400)))
    print(json.dumps(fit_figure("mlp", mlp, 1024, steps=20)))
    print(json.dumps(fit_figure("lstm", lstm, 4, steps=100)))
    print(json.dumps(fit_figure("lstm", lstm, 64, steps=10)))


if __name__ == "__main__":
    main()
