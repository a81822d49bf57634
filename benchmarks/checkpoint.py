"""Checkpoints: save and restore of a model with >= 256 MiB of state, and what a
CheckpointListener costs a training loop.

  * save (``net.save``, synchronous) and restore (``MultiLayerNetwork.load``) times and
    bytes on disk for an MLP of 2048x2048 layers with adam (params + mu + nu);
  * training throughput with ``CheckpointListener(save_every_n_iterations=100)``
    (asynchronous) against none, on a step calibrated to ~10 ms, variants interleaved.

    python benchmarks/checkpoint.py [--layers 6] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxws.nn import Adam, CheckpointListener, Dense, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer


def emit(**fields):
    print(json.dumps({"benchmark": "checkpoint", "backend": jax.default_backend(), **fields}), flush=True)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_restore(layers: int, work: Path, repeats: int = 3) -> None:
    conf = NeuralNetConfiguration(layers=[*[Dense(2048, activation="tanh") for _ in range(layers)], OutputLayer(10)],
                                  input_shape=(2048,), updater=Adam(1e-4))
    net = MultiLayerNetwork(conf).init()
    state = sum(a.nbytes for a in jax.tree.leaves(net._carry))
    saves, loads = [], []
    for i in range(repeats):
        path = work / f"big{i}"
        start = time.perf_counter()
        net.save(path)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        copy = MultiLayerNetwork.load(path)
        jax.block_until_ready(copy._carry)
        loads.append(time.perf_counter() - start)
        size = du(path)
        del copy
        shutil.rmtree(path)
    emit(figure="save and restore", state_mib=round(state / 2**20, 1), on_disk_mib=round(size / 2**20, 1),
         save_s=round(min(saves), 3), restore_s=round(min(loads), 3),
         save_mib_per_s=round(state / 2**20 / min(saves), 1), restore_mib_per_s=round(state / 2**20 / min(loads), 1))


def listener_cost(steps: int, work: Path, repeats: int = 3) -> None:
    conf = NeuralNetConfiguration(layers=[Dense(1024, activation="tanh"), Dense(1024, activation="tanh"), OutputLayer(10)],
                                  input_shape=(512,), updater=Adam(1e-4))
    r = np.random.default_rng(0)
    batch = 128
    x = r.normal(size=(steps * batch, 512)).astype(np.float32)
    y = r.integers(0, 10, steps * batch).astype(np.int32)
    data = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    plain, saving = MultiLayerNetwork(conf).init(), MultiLayerNetwork(conf).init()
    listener = CheckpointListener(work / "every100", keep_last=2, save_every_n_iterations=100)
    saving.add_listeners(listener)
    for net in (plain, saving):
        net.fit(data[:5], progress=False)  # compile
    best = {"none": float("inf"), "listener": float("inf")}
    for _ in range(repeats):
        for name, net in (("none", plain), ("listener", saving)):
            start = time.perf_counter()
            net.fit(data, progress=False)
            jax.block_until_ready(net._carry)
            if name == "listener":
                listener.wait()  # the writes count too
            best[name] = min(best[name], time.perf_counter() - start)
    listener.close()
    state = sum(a.nbytes for a in jax.tree.leaves(plain._carry))
    emit(figure="training with a CheckpointListener every 100 steps vs none", steps=steps,
         state_mib=round(state / 2**20, 1), step_ms=round(best["none"] / steps * 1e3, 2),
         with_listener_step_ms=round(best["listener"] / steps * 1e3, 2),
         throughput_ratio=round(best["none"] / best["listener"], 3), target=0.95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jaxws-checkpoint-bench-"))
    try:
        save_restore(args.layers, work)
        listener_cost(args.steps, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
