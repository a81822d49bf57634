"""Where fit's per-step time goes: each layer of the training loop added to a plain one.

Per step, variants interleaved, best of N, wall time and host time (the loop before its
final wait: equal to the wall time where the loop is host-bound):
  * ``plain``: the hand-written loop, ``jax.jit`` of the train step with the carry donated;
  * ``checked``: ``jax.jit`` of the step ``fit`` compiles (the train step that also counts
    invalid labels), carry and check donated: the plain loop's own cost plus the check;
  * ``planned``: the same program through ``jaxws.jit``'s planned path, without the loss
    output (what ``fit`` calls while no listener reads the loss: one buffer fewer);
  * ``cycled``: that, with one workspace cycle per step;
  * ``fed``: that, on the batches of fit's feed (``Feed.signed()`` over the iterator);
  * ``fit``: ``net.fit(iter(batches))``, which adds its own loop body;
  * ``per_batch``: ``net.fit(batch)`` called once per batch (DL4J's loop), which adds fit's
    set-up and its label check's start and read to every step.
An MLP (width-width-10, adam) on fresh device batches; ``--sizes`` lists width:batch pairs.
Then, for the first size, per step inside one program of 100 steps: a hand-written scan,
the label check counted in every iteration, fit's fused program (the check counted once,
beside the loop) on a stack, on the 100 device batches themselves (stacked inside), and
``fit(batches, steps_per_execution=100)`` around that last program (its list check and loop).

    python benchmarks/breakdown.py [--sizes 64:32,1024:256] [--steps 200] [--repeats 5]
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
from jaxws.data import DataSet
from jaxws.data.feed import Steps
from jaxws.nn import Dense, LabelCheck, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer

from speed import rotation  # a sibling script: benchmarks/ is on the path


def emit(**fields):
    print(json.dumps({"benchmark": "breakdown", "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, **fields}), flush=True)


def model(width: int) -> MultiLayerNetwork:
    conf = NeuralNetConfiguration(layers=[Dense(width, activation="relu"), Dense(width, activation="relu"), OutputLayer(10)],
                                  input_shape=(64,), updater=optax.adam(1e-3), seed=0)
    return MultiLayerNetwork(conf).init()


def epochs_of(batch: int, steps: int, count: int = 3) -> list:
    """``count`` epochs of ``steps`` fresh device batches (x: [batch, 64], y: 10 classes)."""
    r = np.random.default_rng(0)
    return [[DataSet(jnp.asarray(r.normal(size=(batch, 64)).astype(np.float32)),
                     jnp.asarray(r.integers(0, 10, batch).astype(np.int32))) for _ in range(steps)]
            for _ in range(count)]


def layers(width: int, batch: int) -> dict:
    """fit's layers, each an epoch on its own carry: ``run(batches)`` trains on them and
    returns what to wait for (``fit`` has already waited for its label check)."""
    net = model(width)
    plain = jax.jit(net.train_step(), donate_argnums=0)
    checked = jax.jit(net._checked_step(net.training_workspace_mode), donate_argnums=(0, 1))
    planned = net.compiled_step(losses=False)
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="BREAKDOWN")
    state = {k: [jaxws.detach(net._carry), LabelCheck.init()] for k in ("plain", "checked", "planned", "cycled", "fed")}
    fitted, per_batch_net = model(width), model(width)

    def epoch(name, steps_of):
        """A variant: ``steps_of(batches, carry, check)`` runs an epoch on the variant's own carry and check."""
        def run(batches):
            state[name] = list(steps_of(batches, *state[name]))
            return state[name]
        return run

    def loop(call, cycle):
        def steps_of(batches, carry, check):
            for ds in batches:
                if cycle:
                    with ws:
                        carry, check = call(carry, check, ds)[:2]
                else:
                    carry, check = call(carry, check, ds)[:2]
            return carry, check
        return steps_of

    def lean(carry, check, ds):  # fit's call: the plan looked up by the batch signature
        return planned._call_planned(("breakdown", batch), (carry, check, ds))

    def unchecked(carry, check, ds):  # the hand-written step: no label check
        carry, loss = plain(carry, ds)
        return carry, check, loss

    def fed(batches, carry, check):  # the cycled lean call on the batches of fit's feed, without fit's loop body
        with net._feed(iter(batches), "fit", prefetch=8) as feed:
            for ds, signature in feed.signed():
                with ws:
                    carry, check = planned._call_planned(signature, (carry, check, ds))
        return carry, check

    def fit(batches):
        fitted.fit(iter(batches), progress=False)  # waits for its label check at the end
        return fitted._carry

    def per_batch(batches):
        for ds in batches:
            per_batch_net.fit(ds, progress=False)
        return per_batch_net._carry

    return {"plain": epoch("plain", loop(unchecked, False)), "checked": epoch("checked", loop(checked, False)),
            "planned": epoch("planned", loop(lean, False)), "cycled": epoch("cycled", loop(lean, True)),
            "fed": epoch("fed", fed), "fit": fit, "per_batch": per_batch}


def measure(width: int, batch: int, steps: int, repeats: int) -> None:
    epochs = epochs_of(batch, steps)
    host: dict = {}

    def timed(name, run):
        """``run`` with its host time kept: until it returns, before the wait for the device."""
        def timed_run(batches):
            start = time.perf_counter()
            out = run(batches)
            host[name] = min(host.get(name, float("inf")), time.perf_counter() - start)
            jax.block_until_ready(out)
        return timed_run

    variants = {name: timed(name, run) for name, run in layers(width, batch).items()}
    for run in variants.values():
        run(epochs[0])
    best = {k: float("inf") for k in variants}
    for i in range(repeats):
        for name in rotation(list(variants), i):
            start = time.perf_counter()
            variants[name](epochs[i % 3])
            best[name] = min(best[name], time.perf_counter() - start)
    us = {k: round(v / steps * 1e6, 1) for k, v in best.items()}
    emit(width=width, batch=batch, steps=steps, wall_us_per_step=us,
         host_us_per_step={k: round(v / steps * 1e6, 1) for k, v in host.items()},
         label_check_us=round(us["checked"] - us["plain"], 1), planned_path_us=round(us["planned"] - us["checked"], 1),
         cycle_us=round(us["cycled"] - us["planned"], 1), feed_us=round(us["fed"] - us["cycled"], 1),
         fit_loop_us=round(us["fit"] - us["fed"], 1), fit_vs_checked=round(us["fit"] / us["checked"], 3),
         fit_vs_plain=round(us["fit"] / us["plain"], 3), per_batch_vs_plain=round(us["per_batch"] / us["plain"], 3))


def scan_layers(width: int, batch: int, k: int) -> dict:
    """Programs of k steps, each on its own carry: ``run(i)`` runs one on the i-th of three
    groups of k fresh device batches and returns what to wait for. A hand-written scan of
    the train step, the label check counted in every iteration (how it was), fit's fused
    program (the check beside the loop) on a stack, the same on the k device batches
    themselves (Steps: stacked inside the program), and ``fit`` of those k batches with
    ``steps_per_execution=k``, which runs that program once around its list check,
    label-check read and loop."""
    groups = epochs_of(batch, k)
    stacks = [jax.tree.map(lambda *xs: jnp.stack(xs), *g) for g in groups]
    net = model(width)
    train, checked = net.train_step(), net._checked_step(net.training_workspace_mode)

    def scan(carry, check, stacked):  # the check passes through untouched
        carry, losses = jax.lax.scan(train, carry, stacked)
        return carry, check, losses

    def in_loop(carry, check, stacked):
        def body(c, ds):
            carry, check, loss = checked(*c, ds)
            return (carry, check), loss
        (carry, check), losses = jax.lax.scan(body, (carry, check), stacked)
        return carry, check, losses

    programs = {"scan": jax.jit(scan, donate_argnums=(0, 1)),
                "check_in_loop": jax.jit(in_loop, donate_argnums=(0, 1)),
                "fused": jax.jit(net.compiled_step(fused=True)._fun, donate_argnums=(0, 1))}
    state = {name: [jaxws.detach(net._carry), LabelCheck.init()] for name in [*programs, "steps"]}
    fitted, per_batch_net = model(width), model(width)

    def program(name, call, inputs):
        def run(i):
            state[name] = list(call(*state[name], inputs[i % 3])[:2])
            return state[name]
        return run

    def fit(i):  # the same k batches through fit: its feed, check and loop around that program
        fitted.fit(groups[i % 3], steps_per_execution=k, progress=False)
        return fitted._carry

    steps = [Steps(tuple(g)) for g in groups]  # the fused program on the batches themselves
    return {**{name: program(name, call, stacks) for name, call in programs.items()},
            "steps": program("steps", programs["fused"], steps), "fit": fit}


def measure_scan(width: int, batch: int, k: int, repeats: int) -> None:
    """Per step inside one program of k steps (:func:`scan_layers`); ``fit_vs_steps``: what
    fit costs around the program it runs."""
    variants = scan_layers(width, batch, k)
    best = {name: float("inf") for name in variants}
    for run in variants.values():
        jax.block_until_ready(run(0))
    for i in range(repeats * 5):
        for name in rotation(list(best), i):
            start = time.perf_counter()
            jax.block_until_ready(variants[name](i))
            best[name] = min(best[name], time.perf_counter() - start)
    us = {name: round(v / k * 1e6, 2) for name, v in best.items()}
    emit(figure="per step in one program of k steps", width=width, batch=batch, k=k, wall_us_per_step=us,
         check_in_loop_us=round(us["check_in_loop"] - us["scan"], 2), check_beside_us=round(us["fused"] - us["scan"], 2),
         fused_vs_scan=round(us["scan"] / us["fused"], 3), steps_vs_scan=round(us["scan"] / us["steps"], 3),
         fit_vs_steps=round(us["steps"] / us["fit"], 3), fit_vs_scan=round(us["scan"] / us["fit"], 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="64:32,1024:256", help="width:batch pairs")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for pair in args.sizes.split(","):
        width, batch = map(int, pair.split(":"))
        measure(width, batch, args.steps, args.repeats)
    width, batch = map(int, args.sizes.split(",")[0].split(":"))
    measure_scan(width, batch, 100, args.repeats)


if __name__ == "__main__":
    main()
