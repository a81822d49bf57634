"""Epoch time of a loader that spends L ms per batch feeding a step that spends C ms.

Three pipelines feed the same jitted step: AsyncDataSetIterator, no prefetch (the loader
runs in the training loop), and a hand-written plain-JAX double buffer (a deque of
``device_put`` batches, two ahead). The loader sleeps L ms (I/O: it holds no core); the
step is calibrated to C ms. Then variable-length series: compiles and throughput of
capacity buckets (``pad_axis=1``) against padding every batch to its own length.

A pipeline of n batches cannot beat ``n * max(L, C) + min(L, C)`` (the first batch loads
before any step runs, the last step runs after the last load): ``pipeline_floor`` is that
bound over ``n * max(L, C)``, 1.025 at L = C for 40 batches, 1.01 for the default 100.

    python benchmarks/prefetch.py [--batches 100]
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.data import AsyncDataSetIterator, DataSet, from_iterable

SHAPE = (64, 256)


def make_step(ms: float):
    """A jitted step that spends about ``ms`` on the device, calibrated here."""
    w = jnp.eye(SHAPE[1]) * 0.5

    def build(n):
        @jax.jit
        def step(state, ds):
            def body(_, h):
                return jnp.tanh(h @ w)
            return state + jax.lax.fori_loop(0, n, body, ds.features).sum()
        return step

    state = jnp.zeros(())
    ds = DataSet(jnp.ones(SHAPE))
    probe = build(50)
    jax.block_until_ready(probe(state, ds))
    start = time.perf_counter()
    for _ in range(10):
        state = probe(state, ds)
    jax.block_until_ready(state)
    per_iter = (time.perf_counter() - start) / 10 / 50
    step = build(max(1, round(ms / 1000 / per_iter)))
    jax.block_until_ready(step(jnp.zeros(()), ds))
    return step


def loader(ms: float, n: int):
    def gen():
        rng = np.random.default_rng(0)
        for _ in range(n):
            time.sleep(ms / 1000)
            yield DataSet(rng.normal(size=SHAPE).astype(np.float32))
    return gen


def run(step, batches) -> float:
    state = jnp.zeros(())
    start = time.perf_counter()
    for ds in batches:
        state = step(state, ds)
    jax.block_until_ready(state)
    return time.perf_counter() - start


def double_buffer(gen):
    pending = collections.deque()
    it = gen()
    for item in it:
        pending.append(jax.device_put(item))
        if len(pending) == 2:
            break
    while pending:
        ds = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(jax.device_put(nxt))
        yield ds


def run_synced(step, batches) -> float:
    """A loop that reads the loss every step (as naive logging does): no async overlap."""
    state = jnp.zeros(())
    start = time.perf_counter()
    for ds in batches:
        state = step(state, ds)
        float(state)
    return time.perf_counter() - start


def pipelines(L: float, C: float, n: int, synced: bool = False) -> dict:
    step = make_step(C)
    gen = loader(L, n)
    loop = run_synced if synced else run
    # what L and C really cost here (sleep overshoots, the batch is generated too)
    start = time.perf_counter()
    for _ in gen():
        pass
    l_real = (time.perf_counter() - start) / n
    resident = jax.device_put(DataSet(np.ones(SHAPE, np.float32)))
    c_real = loop(step, [resident] * n) / n
    times = {}
    with AsyncDataSetIterator(from_iterable(gen), 8) as it:
        times["async"] = loop(step, it)
    times["no_prefetch"] = loop(step, (jax.device_put(ds) for ds in gen()))
    times["double_buffer"] = loop(step, double_buffer(gen))
    ideal = max(l_real, c_real) * n
    return {"benchmark": "prefetch", "figure": f"L={L} ms, C={C} ms" + (", loss read every step" if synced else ""),
            "batches": n, "loader_ms": round(l_real * 1e3, 2), "step_ms": round(c_real * 1e3, 2),
            **{f"{k}_ms_per_batch": round(v / n * 1e3, 2) for k, v in times.items()},
            "async_vs_max_l_c": round(times["async"] / ideal, 3),
            "pipeline_floor": round(1 + min(l_real, c_real) / (n * max(l_real, c_real)), 3),
            "async_vs_double_buffer": round(times["async"] / times["double_buffer"], 3),
            "async_vs_no_prefetch": round(times["async"] / times["no_prefetch"], 3),
            "backend": jax.default_backend()}


def variable_length(n: int = 120) -> dict:
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 512, size=n)
    data = [(rng.normal(size=(8, t, 32)).astype(np.float32), np.ones((8, t), np.int32)) for t in lengths]
    w = jnp.ones((32, 32)) / 32

    def step(state, ds):
        h = jnp.tanh(ds.features @ w).sum(-1)
        mask = ds.features_mask if ds.features_mask is not None else jnp.ones(h.shape)
        return state + jnp.sum(h * mask)

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, _, **kw: compiles.append(1) if name == "/jax/core/compile/backend_compile_duration" else None)
    start = time.perf_counter()
    with AsyncDataSetIterator(from_iterable(data), 8, pad_axis=1) as it:
        run(jax.jit(lambda s, d: step(s, d)), it)
        shapes = it.num_shapes
    t_bucket = time.perf_counter() - start
    bucket_compiles, compiles[:] = len(compiles), []
    start = time.perf_counter()
    run(jax.jit(lambda s, d: step(s, d)), (jax.device_put(DataSet(x, y)) for x, y in data))
    t_own = time.perf_counter() - start
    return {"benchmark": "prefetch", "figure": f"variable-length series, {n} batches of length 16..511",
            "bucketed_compiles": bucket_compiles, "bucketed_shapes": shapes,
            "own_length_compiles": len(compiles),
            "bucketed_s": round(t_bucket, 3), "own_length_s": round(t_own, 3),
            "speedup": round(t_own / t_bucket, 2), "backend": jax.default_backend()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    for L, C in ((5, 5), (10, 2), (2, 10)):
        print(json.dumps(pipelines(L, C, args.batches)))
    print(json.dumps(pipelines(5, 5, args.batches, synced=True)))
    print(json.dumps(variable_length()))


if __name__ == "__main__":
    main()
