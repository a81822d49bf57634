"""Per-step speed: jaxws against hand-written JAX where steps are short (dispatch-bound).

Figures, each against a plain-JAX baseline measured in the same run (variants interleaved,
best of N):
  * jaxws.jit, with one workspace cycle per call, over jax.jit (a tiny donated step);
  * fit(iter(device batches)) over a plain jax.jit(step, donate_argnums=0) loop;
  * fit(batch) called once per batch (DL4J's loop) over the same plain loop;
  * fit(list, steps_per_execution=100) over a hand-written lax.scan over the batches;
  * fit((x, y), batch_size=32, steps_per_execution=100) (device-resident) over the scan,
    and over the plain one-call-per-step loop;
  * fit over host numpy data batch by batch (ArrayDataSetIterator(resident=False); a
    generator of the batches, through the async ring and with prefetch=0; fit(ds) once per
    host batch) over the host loop a user writes (permute, gather, device_put), and over
    one passing numpy batches to its step;
  * AsyncDataSetIterator per batch: device batches (passed through), numpy batches over a
    bare device_put loop.
The model is DESIGN's small MLP (64-64-32-10, batch 32, adam), 200 batches, fresh each epoch.

    python benchmarks/speed.py [--repeats 5]
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
from jaxws.data import ArrayDataSetIterator, AsyncDataSetIterator, DataSet, from_iterable
from jaxws.nn import Dense, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer

BATCH, BATCHES, D, CLASSES = 32, 200, 64, 10


def emit(**fields):
    print(json.dumps({"benchmark": "speed", "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, **fields}), flush=True)


def rotation(names: list, r: int) -> list:
    """The order of round ``r``: it starts at the r-th name. What runs just before a variant
    moves its time (a big program leaves the caches cold for the Python after it), so no
    variant always follows the same one."""
    return names[r % len(names):] + names[:r % len(names)]


def best_of(repeats: int, variants: dict) -> dict:
    """Each variant's best wall time over ``repeats`` interleaved rounds, in :func:`rotation`."""
    best = {name: float("inf") for name in variants}
    for r in range(repeats):
        for name in rotation(list(variants), r):
            start = time.perf_counter()
            variants[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def tiny_steps(calls: int) -> dict:
    """A tiny donated step (``a + 1``) called ``calls`` times, each variant on its own array:
    by ``jax.jit``, by ``jaxws.jit``, by ``jaxws.jit`` in one workspace cycle per call; and
    the empty cycles alone. Each waits for its last result."""
    jf = jax.jit(lambda a: a + 1, donate_argnums=0)
    wf = jaxws.jit(lambda a: a + 1, donate_argnums=0)
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="BENCH")
    state = {"jax": jnp.ones(4), "jaxws": jnp.ones(4), "cycle": jnp.ones(4)}

    def plain():
        a = state["jax"]
        for _ in range(calls):
            a = jf(a)
        state["jax"] = jax.block_until_ready(a)

    def ours():
        a = state["jaxws"]
        for _ in range(calls):
            a = wf(a)
        state["jaxws"] = jax.block_until_ready(a)

    def cycled():
        a = state["cycle"]
        for _ in range(calls):
            with ws:
                a = wf(a)
        state["cycle"] = jax.block_until_ready(a)

    def cycles():
        for _ in range(calls):
            with ws:
                pass

    return {"jax": plain, "jaxws": ours, "cycle": cycled, "empty_cycle": cycles}


def jit_overhead(repeats: int, calls: int = 20000) -> None:
    variants = tiny_steps(calls)
    for run in variants.values():
        run()
    t = {k: v / calls * 1e6 for k, v in best_of(repeats, variants).items()}
    emit(figure="jaxws.jit + one cycle per call over jax.jit (tiny step)", jax_us=round(t["jax"], 2),
         jaxws_us=round(t["jaxws"], 2), jaxws_in_cycle_us=round(t["cycle"], 2), empty_cycle_us=round(t["empty_cycle"], 2),
         overhead_us=round(t["jaxws"] - t["jax"], 2), overhead_in_cycle_us=round(t["cycle"] - t["jax"], 2),
         target_us=8)


def model():
    conf = NeuralNetConfiguration(
        layers=[Dense(64, activation="relu"), Dense(32, activation="relu"), OutputLayer(CLASSES)],
        input_shape=(D,), updater=optax.adam(1e-3), seed=0)
    return MultiLayerNetwork(conf).init()


def data(epochs: int, seed: int = 0):
    """Fresh device batches for each epoch (and the host arrays they came from)."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(BATCHES * BATCH, D)).astype(np.float32)
    y = r.integers(0, CLASSES, BATCHES * BATCH).astype(np.int32)
    order = [r.permutation(len(x)) for _ in range(epochs)]
    epochs_of_batches = [[DataSet(jnp.asarray(x[o[i * BATCH:(i + 1) * BATCH]]), jnp.asarray(y[o[i * BATCH:(i + 1) * BATCH]]))
                          for i in range(BATCHES)] for o in order]
    return x, y, epochs_of_batches


def fit_figures(repeats: int) -> None:
    x, y, epochs = data(repeats + 1)
    nets = {name: model() for name in ("plain", "scan", "fit", "fused", "resident", "per_batch")}
    step = jax.jit(nets["plain"].train_step(), donate_argnums=0)

    def scan_fn(carry, stacked):
        return jax.lax.scan(nets["scan"].train_step(), carry, stacked)

    scan = jax.jit(scan_fn, donate_argnums=0)
    carries = {"plain": jaxws.detach(nets["plain"]._carry), "scan": jaxws.detach(nets["scan"]._carry)}
    stacks = [jax.tree.map(lambda *xs: jnp.stack(xs), *batches) for batches in epochs]
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    epoch = {"i": 0}

    def batches():
        return epochs[epoch["i"] % len(epochs)]

    def plain():
        carry = carries["plain"]
        for ds in batches():
            carry, loss = step(carry, ds)
        carries["plain"] = jax.block_until_ready(carry)

    def hand_scan():
        carry, losses = scan(carries["scan"], stacks[epoch["i"] % len(stacks)])
        carries["scan"] = jax.block_until_ready(carry)

    def fit():
        nets["fit"].fit(iter(batches()), progress=False)
        jax.block_until_ready(nets["fit"]._carry)

    def per_batch():  # DL4J's loop: `while (it.hasNext()) net.fit(it.next())`
        for ds in batches():
            nets["per_batch"].fit(ds, progress=False)
        jax.block_until_ready(nets["per_batch"]._carry)

    def fused():
        nets["fused"].fit(batches(), progress=False, steps_per_execution=100)
        jax.block_until_ready(nets["fused"]._carry)

    def resident():  # a new permutation each epoch, taken on the device
        nets["resident"].fit((xd, yd), batch_size=BATCH, steps_per_execution=100, progress=False)
        jax.block_until_ready(nets["resident"]._carry)

    variants = {"plain": plain, "scan": hand_scan, "fit": fit, "per_batch": per_batch, "fused": fused, "resident": resident}
    for run in variants.values():  # compile
        run()

    def advancing(run):
        def wrapped():
            run()
            epoch["i"] += 1
        return wrapped

    t = best_of(repeats, {k: advancing(v) for k, v in variants.items()})
    us = {k: v / BATCHES * 1e6 for k, v in t.items()}
    common = {"model": "MLP 64-64-32-10, adam", "batch": BATCH, "batches": BATCHES}
    emit(figure="fit(iter(device batches)) / plain jax.jit loop, throughput", **common,
         plain_us_per_step=round(us["plain"], 1), fit_us_per_step=round(us["fit"], 1),
         throughput_ratio=round(t["plain"] / t["fit"], 3), target=0.85)
    emit(figure="fit(batch) called once per batch (DL4J's loop) / plain jax.jit loop, throughput", **common,
         plain_us_per_step=round(us["plain"], 1), fit_us_per_step=round(us["per_batch"], 1),
         throughput_ratio=round(t["plain"] / t["per_batch"], 3))
    emit(figure="fit(list, steps_per_execution=100) / hand-written lax.scan, throughput", **common,
         scan_us_per_step=round(us["scan"], 1), fit_us_per_step=round(us["fused"], 1),
         throughput_ratio=round(t["scan"] / t["fused"], 3), target=0.80)
    emit(figure="fit((x, y), batch_size=32, steps_per_execution=100) resident / hand-written scan", **common,
         scan_us_per_step=round(us["scan"], 1), fit_us_per_step=round(us["resident"], 1),
         throughput_ratio=round(t["scan"] / t["resident"], 3), target=0.85)
    emit(figure="fit((x, y), batch_size=32, steps_per_execution=100) resident / plain one-call-per-step loop", **common,
         plain_us_per_step=round(us["plain"], 1), fit_us_per_step=round(us["resident"], 1),
         speedup=round(t["plain"] / t["resident"], 2), target="5x (GPU)")


def async_variants(n: int) -> dict:
    """``n`` batches (32 x 64 features, int labels) through an AsyncDataSetIterator of queue
    size 8, as numpy batches and as device batches (passed through); a bare ``device_put``
    loop over the numpy ones; and the loop over the device ones alone."""
    r = np.random.default_rng(1)
    host = [(r.normal(size=(BATCH, D)).astype(np.float32), r.integers(0, CLASSES, BATCH).astype(np.int32)) for _ in range(n)]
    device = [(jnp.asarray(a), jnp.asarray(b)) for a, b in host]

    def bare_device_put():
        for a, b in host:
            last = jax.device_put((a, b))
        jax.block_until_ready(last)

    def drain(batches):
        with AsyncDataSetIterator(from_iterable(batches), 8) as it:
            for _ in range(n):
                last = next(it)
            jax.block_until_ready(last.features)  # valid until the ring moves on

    def async_numpy():
        drain(host)

    def async_device():
        drain(device)

    def iterate_only():  # the loop itself: what an iterator costs beyond it
        for a, b in device:
            last = a
        jax.block_until_ready(last)

    return {"device_put": bare_device_put, "numpy": async_numpy, "device": async_device, "loop": iterate_only}


def async_figures(repeats: int, n: int = 400) -> None:
    variants = async_variants(n)
    for run in variants.values():
        run()
    t = {k: v / n * 1e6 for k, v in best_of(repeats, variants).items()}
    emit(figure="AsyncDataSetIterator per batch: device batches (passed through)", batches=n,
         us_per_batch=round(t["device"] - t["loop"], 2), target_us=10)
    emit(figure="AsyncDataSetIterator per batch: numpy batches / bare device_put", batches=n,
         async_us=round(t["numpy"], 2), device_put_us=round(t["device_put"], 2),
         ratio=round(t["numpy"] / t["device_put"], 3), target=1.2)


def host_figures(repeats: int) -> None:
    """fit over host numpy data batch by batch, against the loop a user writes for it:
    permute, gather, device_put, step; and against the same loop passing the numpy batch
    straight to the step (``direct``). ``iterator``: ``ArrayDataSetIterator(resident=False)``
    with fit's default prefetch (on the CPU backend fit reads it in its own thread);
    ``loader``: a generator of the same batches, through the async ring and with
    ``prefetch=0``. ``per_call``: DL4J's loop, ``fit(ds)`` once per gathered host batch."""
    x, y, _ = data(1)
    nets = {name: model() for name in ("plain", "iterator", "ring", "inline", "per_call")}
    step = jax.jit(nets["plain"].train_step(), donate_argnums=0)
    carry = {"plain": jaxws.detach(nets["plain"]._carry)}
    iterator = ArrayDataSetIterator(x, y, BATCH, shuffle=True, resident=False)
    rng = np.random.default_rng(0)

    def loader():  # what a user's generator does: a new permutation each epoch, gathered
        order = rng.permutation(len(x))
        for i in range(0, len(x), BATCH):
            rows = order[i:i + BATCH]
            yield DataSet(x[rows], y[rows])

    def plain():
        c = carry["plain"]
        for ds in loader():
            c, loss = step(c, jax.device_put(ds))
        carry["plain"] = jax.block_until_ready(c)

    carry["direct"] = jaxws.detach(nets["plain"]._carry)

    def direct():  # the numpy batch passed straight to the step: the jitted call transfers it
        c = carry["direct"]
        for ds in loader():
            c, loss = step(c, ds)
        carry["direct"] = jax.block_until_ready(c)

    def fit(name, data, **kwargs):
        def run():
            nets[name].fit(data() if callable(data) else data, progress=False, **kwargs)
            jax.block_until_ready(nets[name]._carry)
        return run

    def per_call():  # DL4J's loop over host batches: fit(ds) per batch
        net = nets["per_call"]
        for ds in loader():
            net.fit(ds, progress=False)
        jax.block_until_ready(net._carry)

    variants = {"plain": plain, "direct": direct, "iterator": fit("iterator", iterator),
                "ring": fit("ring", loader), "inline": fit("inline", loader, prefetch=0), "per_call": per_call}
    for run in variants.values():
        run()
    t = best_of(repeats, variants)
    us = {k: round(v / BATCHES * 1e6, 1) for k, v in t.items()}
    emit(figure="fit over host numpy batches / hand-written host loop (device_put), throughput",
         model="MLP 64-64-32-10, adam", batch=BATCH, batches=BATCHES, plain_us_per_step=us["plain"],
         direct_us_per_step=us["direct"], iterator_us_per_step=us["iterator"], loader_ring_us_per_step=us["ring"],
         loader_prefetch0_us_per_step=us["inline"], per_call_us=us["per_call"],
         iterator_ratio=round(t["plain"] / t["iterator"], 3), loader_ring_ratio=round(t["plain"] / t["ring"], 3),
         loader_prefetch0_ratio=round(t["plain"] / t["inline"], 3), per_call_ratio=round(t["plain"] / t["per_call"], 3),
         iterator_vs_direct=round(t["direct"] / t["iterator"], 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    jit_overhead(args.repeats)
    fit_figures(args.repeats)
    host_figures(args.repeats)
    async_figures(args.repeats)


if __name__ == "__main__":
    main()
