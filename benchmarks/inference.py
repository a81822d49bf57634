"""ParallelInference against callers that each call a jitted forward pass themselves.

C caller threads each send R requests of a few rows (numpy, as a server receives them)
and wait for every answer as numpy. Variants, interleaved, best of N:

  * ``plain``: what a JAX user writes without ParallelInference: every caller calls one
    shared ``jax.jit`` of the forward pass (hand-written from the same parameters) and
    reads the result with ``np.asarray``. JAX's dispatch is thread-safe, so the callers
    run it concurrently, one program per request;
  * ``output``: every caller calls ``net.output(x)`` (jaxws, one program per request);
  * ``batched``: ``ParallelInference(net, batch_limit=32)`` (BATCHED): concurrent
    requests merged into padded batches, one program per merged batch;
  * ``sequential``: ``ParallelInference(net, inference_mode=SEQUENTIAL)``: one program per
    request, run by the worker thread.

Then one caller alone (latency: every request waits for its answer before the next is
sent), plain against ``batched``; and DL4J's ``rnnTimeStep`` loop (generation, one step of
one example a call, the LSTM state carried): ``net.rnn_time_step`` against the same step
function under ``jax.jit`` with the state donated, for numpy and device inputs. The model is DESIGN's small MLP (64-64-32-10) or, with
``--width W``, an MLP of two hidden layers of W (where a batch of 32 costs little more to
run than a batch of 4, so merging pays).

    python benchmarks/inference.py [--repeats 5] [--callers 8] [--requests 250] [--rows 4] [--width W] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.parallel import InferenceMode, ParallelInference

from jaxws.nn import LSTM, Dense, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer, RnnOutputLayer
from speed import CLASSES, D, best_of, model


def emit(**fields):
    print(json.dumps({"benchmark": "inference", "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, **fields}), flush=True)


def forward(params, x):
    """The small MLP's forward pass, written by hand (the plain baseline's program)."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["W"] + layer["b"])
    return jax.nn.softmax(x @ params[-1]["W"] + params[-1]["b"])


def concurrently(callers: int, requests: list, answer) -> None:
    """``callers`` threads, each answering its share of ``requests`` one after another
    (``answer(x)`` returns numpy), started together; returns when all are answered."""
    start = threading.Barrier(callers)

    def caller(mine):
        start.wait()
        for x in mine:
            answer(x)

    threads = [threading.Thread(target=caller, args=(requests[i::callers],), name=f"bench-caller-{i}", daemon=True)
               for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=250, help="requests per caller")
    parser.add_argument("--rows", type=int, default=4, help="examples per request")
    parser.add_argument("--width", type=int, default=0, help="hidden width (0: the small MLP)")
    parser.add_argument("--workers", type=int, default=1, help="ParallelInference's worker slots")
    args = parser.parse_args()

    net = model() if not args.width else MultiLayerNetwork(NeuralNetConfiguration(
        layers=[Dense(args.width, activation="relu"), Dense(args.width, activation="relu"), OutputLayer(CLASSES)],
        input_shape=(D,), seed=0)).init()
    params = jax.device_put(jax.tree.map(np.asarray, net.params))  # the baseline's own copy
    fwd = jax.jit(forward)
    r = np.random.default_rng(0)
    total = args.callers * args.requests
    requests = [r.normal(size=(args.rows, D)).astype(np.float32) for _ in range(total)]
    np.testing.assert_allclose(np.asarray(fwd(params, requests[0])), np.asarray(net.output(requests[0])), rtol=1e-5, atol=1e-6)

    batched = ParallelInference(net, batch_limit=32, workers=args.workers)
    sequential = ParallelInference(net, inference_mode=InferenceMode.SEQUENTIAL, workers=args.workers)
    answers = {
        "plain": lambda x: np.asarray(fwd(params, x)),
        "output": lambda x: np.asarray(net.output(x)),
        "batched": batched.output,
        "sequential": sequential.output,
    }
    try:
        for answer in answers.values():  # compile every bucket and warm the threads
            concurrently(args.callers, requests, answer)
        served = batched.executions
        t = best_of(args.repeats, {name: (lambda a=answer: concurrently(args.callers, requests, a))
                                   for name, answer in answers.items()})
        merged = (batched.executions - served) / (total * args.repeats)
        us = {name: seconds / total * 1e6 for name, seconds in t.items()}
        emit(figure=f"{args.callers} concurrent callers, {args.rows} rows a request: throughput / plain (callers calling jax.jit)",
             width=args.width or "64-32", workers=args.workers, callers=args.callers, rows=args.rows, requests=total,
             **{f"{name}_us_per_request": round(v, 1) for name, v in us.items()},
             **{f"{name}_ratio": round(t["plain"] / t[name], 3) for name in ("output", "batched", "sequential")},
             programs_per_request_batched=round(merged, 3))

        alone = requests[: args.requests]
        t = best_of(args.repeats, {name: (lambda a=answers[name]: concurrently(1, alone, a)) for name in ("plain", "batched")})
        emit(figure="one caller: latency / plain", width=args.width or "64-32", requests=len(alone),
             plain_us=round(t["plain"] / len(alone) * 1e6, 1), batched_us=round(t["batched"] / len(alone) * 1e6, 1),
             batched_over_plain=round(t["batched"] / t["plain"], 3))
    finally:
        batched.close()
        sequential.close()
    rnn_figure(args.repeats)


def rnn_figure(repeats: int, calls: int = 500) -> None:
    net = MultiLayerNetwork(NeuralNetConfiguration(layers=[LSTM(32), RnnOutputLayer(CLASSES)], input_shape=(None, 10), seed=0)).init()
    x = np.random.default_rng(0).normal(size=(1, 10)).astype(np.float32)
    xd = jax.device_put(x)
    params, state = jax.device_put(jax.tree.map(np.asarray, (net.params, net._carry.state)))
    step = jax.jit(lambda carried, x: net._dag.rnn(carried, params, state, [x[:, None]]), donate_argnums=0)
    carried = {"state": {str(i): net.layers[i].initial_carry(1) for i in net._dag.recurrent()}}

    def plain(x):
        def run():
            for _ in range(calls):
                outs, carried["state"] = step(carried["state"], x)
            jax.block_until_ready(outs)
        return run

    def ours(x):
        def run():
            for _ in range(calls):
                out = net.rnn_time_step(x)
            jax.block_until_ready(out)
        return run

    variants = {"plain_numpy": plain(x), "rnn_time_step_numpy": ours(x), "plain_device": plain(xd), "rnn_time_step_device": ours(xd)}
    for run in variants.values():
        run()
    us = {k: v / calls * 1e6 for k, v in best_of(repeats, variants).items()}
    emit(figure="rnn_time_step, one step of one example a call / the step under jax.jit",
         **{f"{k}_us": round(v, 1) for k, v in us.items()},
         numpy_ratio=round(us["rnn_time_step_numpy"] / us["plain_numpy"], 3),
         device_ratio=round(us["rnn_time_step_device"] / us["plain_device"], 3))


if __name__ == "__main__":
    main()
