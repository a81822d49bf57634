"""ParallelWrapper against a hand-written jax.shard_map local-SGD loop, same k.

8 virtual CPU devices (the GPU when there is one: then the devices present). For k in
{1, 2, 5, 10}: rounds per second of ``ParallelWrapper.fit`` (batches dealt, stacked and
prefetched from host numpy) and of a plain loop that stacks the same groups on the host
with ``np.stack`` (in the loop; a second figure takes them stacked before the timing),
places them with ``make_array_from_process_local_data`` and calls a jitted shard_map
program (scan over k steps, then ``lax.pmean`` of params and updater state). Both run the
model's same pure step over 600 rounds. Dispatches and collectives per round are read
from the programs. Then one ``fit`` call of a single program against the loop's one
program (what a call costs beyond its rounds), and ``net.fit`` over batches sharded
across the devices (GSPMD) against a plain ``jax.jit`` loop of the same step.

    python benchmarks/parallel.py
"""

from __future__ import annotations

import json
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # only the CPU backend: a GPU run uses its GPUs

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from jaxws.data import DataSet  # noqa: E402
from jaxws.nn import Dense, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer  # noqa: E402
from jaxws.parallel import ParallelWrapper  # noqa: E402

D, CLASSES, BATCH = 32, 10, 32


def network():
    conf = NeuralNetConfiguration(layers=[Dense(64, activation="relu"), Dense(64, activation="relu"), OutputLayer(CLASSES)],
                                  input_shape=(D,), updater=optax.adam(1e-3), seed=0)
    return MultiLayerNetwork(conf).init()


def batches(n):
    r = np.random.default_rng(0)
    return [(r.normal(size=(BATCH, D)).astype(np.float32), r.integers(0, CLASSES, BATCH).astype(np.int32)) for _ in range(n)]


def best_of(variants, repeats):
    """The best wall time of each variant (a callable), run interleaved ``repeats`` times."""
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, run in variants.items():
            begin = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - begin)
    return best


def fitted(trainer, data):
    """``trainer.fit(data)`` (a ParallelWrapper or a model), waited for."""
    trainer.fit(data)
    model = getattr(trainer, "model", trainer)
    jax.block_until_ready(model.params)


def hand_written(net, data, workers, k):
    """A plain shard_map local-SGD loop, as a user would write it.

    Returns ``run(carry, prestacked)``: one pass over ``data``, stacking each group with
    ``np.stack`` in the loop (or taking the groups stacked before the timing, an upper
    bound), and the all-reduces of one program. The loop waits for a program once the
    next is dispatched: with dozens queued, XLA's CPU all-reduce deadlocks on 8 devices.
    """
    mesh = Mesh(np.array(jax.devices()[:workers]), ("w",))
    sharding = NamedSharding(mesh, P("w"))
    step = net.train_step()

    def block(carry, data):
        carry, data = jax.tree.map(lambda a: a[0], (carry, data))
        carry, losses = jax.lax.scan(lambda c, ds: step(c, ds), carry, data)
        carry = carry._replace(params=jax.lax.pmean(carry.params, "w"), opt_state=jax.lax.pmean(carry.opt_state, "w"))
        return jax.tree.map(lambda a: a[None], carry), jax.lax.pmean(losses.mean(), "w")

    program = jax.jit(jax.shard_map(block, mesh=mesh, in_specs=(P("w"), P("w")), out_specs=(P("w"), P())),
                      donate_argnums=0)
    per_group = workers * k

    def stacked():  # batch r * workers + w goes to worker w in round r: leaves [workers, k, batch, ...]
        for g in range(0, len(data) - per_group + 1, per_group):
            chunk = data[g:g + per_group]
            yield tuple(np.stack([b[i] for b in chunk]).reshape(k, workers, *chunk[0][i].shape).swapaxes(0, 1)
                        for i in (0, 1))

    prestacked = list(stacked())

    def run(carry, before=False):
        previous = None
        for x, y in prestacked if before else stacked():
            placed = DataSet(jax.make_array_from_process_local_data(sharding, x),
                             jax.make_array_from_process_local_data(sharding, y))
            carry, loss = program(carry, placed)
            if previous is not None:
                previous.block_until_ready()
            previous = loss
        return jax.block_until_ready(carry)

    carry = jax.tree.map(lambda a: jax.device_put(jnp.broadcast_to(a, (workers, *a.shape)), sharding), net._carry)
    x, y = prestacked[0]
    text = program.lower(carry, DataSet(jax.make_array_from_process_local_data(sharding, x),
                                        jax.make_array_from_process_local_data(sharding, y))).as_text()
    return run, carry, text.count("all_reduce") + text.count("all-reduce")


def measure(k, workers, rounds=600, repeats=3):
    data = batches(rounds * workers)
    net = network()
    wrapper = ParallelWrapper(net, workers=workers, averaging_frequency=k, prefetch_buffer=4)
    wrapper.fit(data[: workers * k])  # compile
    run, carry, hand_collectives = hand_written(network(), data, workers, k)
    state = [run(carry)]  # compile

    def hand(before=False):
        state[0] = run(state[0], before)

    best = best_of({"wrapper": lambda: fitted(wrapper, data), "hand": hand, "prestacked": lambda: hand(True)}, repeats)
    t_wrapper, t_hand, t_prestacked = best["wrapper"], best["hand"], best["prestacked"]
    groups = wrapper._groups(net._feed(data[: workers * k], "benchmark", place=False))
    group = next(iter(groups))
    groups.close()
    text = wrapper._compiled().lower(wrapper._replicate(net._carry), group).as_text()
    return {"benchmark": "parallel", "figure": f"k={k}", "workers": workers, "rounds": rounds,
            "wrapper_rounds_per_s": round(rounds / t_wrapper, 1), "hand_written_rounds_per_s": round(rounds / t_hand, 1),
            "wrapper_vs_hand_written": round(t_hand / t_wrapper, 3),
            "hand_written_prestacked_rounds_per_s": round(rounds / t_prestacked, 1),
            "wrapper_vs_prestacked": round(t_prestacked / t_wrapper, 3),
            "dispatches_per_round": round(1 / k, 3),
            "wrapper_collectives_per_round": round((text.count("all_reduce") + text.count("all-reduce")) / k, 3),
            "hand_written_collectives_per_round": round(hand_collectives / k, 3),
            "backend": jax.default_backend(), "devices": jax.device_count()}


def gspmd(workers, steps=300, repeats=5):
    """``net.fit`` over batches laid across the devices (GSPMD) against a plain ``jax.jit``
    loop of the model's pure step over the same batches; both wait for the step before
    on the CPU (where XLA's all-reduce deadlocks otherwise), and so does fit itself."""
    r = np.random.default_rng(0)
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:workers]), ("data",)), P("data"))
    data = [(jax.device_put(r.normal(size=(8 * workers, D)).astype(np.float32), sharding),
             jax.device_put(r.integers(0, CLASSES, 8 * workers).astype(np.int32), sharding)) for _ in range(steps)]
    net, reference = network(), network()
    step = jax.jit(reference.train_step(), donate_argnums=0)
    wait = jax.default_backend() == "cpu"

    def plain(carry):
        for x, y in data:
            if wait:
                jax.tree.leaves(carry.params)[0].block_until_ready()
            carry, _ = step(carry, DataSet(x, y))
        return jax.block_until_ready(carry)

    state = [plain(jax.device_put(reference._carry, NamedSharding(sharding.mesh, P())))]
    fitted(net, iter(data))  # compile

    def loop():
        state[0] = plain(state[0])

    best = best_of({"fit": lambda: fitted(net, iter(data)), "plain": loop}, repeats)
    t_fit, t_plain = best["fit"], best["plain"]
    return {"benchmark": "parallel", "figure": "gspmd fit", "workers": workers, "steps": steps,
            "fit_us_per_step": round(t_fit / steps * 1e6, 1), "plain_us_per_step": round(t_plain / steps * 1e6, 1),
            "fit_vs_plain": round(t_plain / t_fit, 3), "backend": jax.default_backend()}


def start(workers, k=10, repeats=20):
    """One ``fit`` call of one program (k rounds) against the hand-written loop's one
    program: what a call costs beyond its rounds (replicas laid out, the list checked,
    the prefetch thread, the consensus taken)."""
    data = batches(workers * k)
    net = network()
    wrapper = ParallelWrapper(net, workers=workers, averaging_frequency=k, prefetch_buffer=4)
    run, carry, _ = hand_written(network(), data, workers, k)
    state = [carry]

    def hand():
        state[0] = run(state[0])

    best = best_of({"fit": lambda: fitted(wrapper, data), "hand": hand}, repeats + 1)  # the first compiles
    t_fit, t_hand = best["fit"], best["hand"]
    return {"benchmark": "parallel", "figure": f"one fit call of one program (k={k})", "workers": workers,
            "fit_ms": round(t_fit * 1e3, 2), "hand_written_ms": round(t_hand * 1e3, 2),
            "fit_vs_hand_written": round(t_hand / t_fit, 3), "backend": jax.default_backend()}


def main():
    workers = min(8, jax.device_count())
    for k in (1, 2, 5, 10):
        print(json.dumps(measure(k, workers)))
    print(json.dumps(start(workers)))
    print(json.dumps(gspmd(workers)))


if __name__ == "__main__":
    main()
