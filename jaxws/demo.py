"""The main job of ``make demo``: digits under workspace modes, with a table and a chart.

Trains a MultiLayerNetwork on scikit-learn's bundled digits (no download), reports test
accuracy, then a two-input ComputationGraph on the same digits (top and bottom half of
each image, merged after a residual block), then measures the training step under NONE,
ENABLED, SINGLE and SEPARATE.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
import optax

import jaxws
from jaxws.data import ArrayMultiDataSetIterator
from jaxws.nn import (
    Adam,
    ComputationGraph,
    Dense,
    ElementWiseVertex,
    LabelCheck,
    MergeVertex,
    MultiLayerNetwork,
    NeuralNetConfiguration,
    OutputLayer,
    ScoreIterationListener,
)


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y.astype(np.int32), test_size=0.25, random_state=0, stratify=y)


def configuration(mode: jaxws.WorkspaceMode = jaxws.WorkspaceMode.ENABLED) -> NeuralNetConfiguration:
    return (
        NeuralNetConfiguration.builder()
        .seed(1)
        .updater(optax.adam(1e-3))
        .input_shape(64)
        .training_workspace_mode(mode)
        .inference_workspace_mode(jaxws.WorkspaceMode.SINGLE)
        .list(Dense(256, activation="relu"), Dense(128, activation="relu"), OutputLayer(10))
        .build()
    )


def two_halves() -> ComputationGraph:
    """A graph of two inputs (the top and bottom 4 rows of an 8x8 digit), a residual block
    on each, merged into one classifier."""
    b = (NeuralNetConfiguration.builder().seed(1).updater(Adam(1e-3)).graph_builder()
         .add_inputs("top", "bottom"))
    for half in ("top", "bottom"):
        b.add_layer(f"{half}_in", Dense(64, activation="relu"), half)
        b.add_layer(f"{half}_h", Dense(64, activation="relu"), f"{half}_in")
        b.add_vertex(f"{half}_res", ElementWiseVertex("add"), f"{half}_h", f"{half}_in")
    b.add_vertex("merge", MergeVertex(), "top_res", "bottom_res")
    b.add_layer("digit", OutputLayer(10), "merge")
    return ComputationGraph(b.set_outputs("digit").set_input_types((32,), (32,)).build()).init()


def measure_modes(x: np.ndarray, y: np.ndarray, batch: int = 32, steps: int = 200, repeats: int = 3) -> list[dict]:
    """Compiled peak, saved residuals and step time (best of interleaved runs) per mode."""
    ds = (x[:batch], y[:batch])
    nets = {mode: MultiLayerNetwork(configuration(mode)).init() for mode in jaxws.WorkspaceMode}
    best = {mode: float("inf") for mode in nets}
    for net in nets.values():
        net.fit([ds] * 5, progress=False)  # compile and warm up
    for _ in range(repeats):
        for mode, net in nets.items():
            jax.block_until_ready(net.params)
            start = time.perf_counter()
            net.fit([ds] * steps, progress=False)
            jax.block_until_ready(net.params)
            best[mode] = min(best[mode], (time.perf_counter() - start) / steps)
    rows = []
    for mode, net in nets.items():
        plan = net.compiled_step().memory_plan(net._carry, LabelCheck.init(), jaxws.data.DataSet(*map(jax.numpy.asarray, ds)))
        rows.append({
            "mode": mode.name,
            "peak_bytes": plan.peak_bytes,
            "alias_bytes": plan.alias_bytes,
            "residual_bytes": net.residual_bytes(ds, mode),
            "step_us": best[mode] * 1e6,
        })
    return rows


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [r["mode"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title, scale in (
        (axes[0], "peak_bytes", "compiled peak (KiB)", 1024),
        (axes[1], "residual_bytes", "saved for backprop (KiB)", 1024),
        (axes[2], "step_us", "step time (us)", 1),
    ):
        ax.bar(modes, [r[key] / scale for r in rows], color=["#999", "#4a7", "#37a", "#c63"])
        ax.set_title(title)
    fig.suptitle("digits MLP (64-256-128-10, batch 32): the training step under each WorkspaceMode")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out_dir: Path = Path(".")) -> None:
    xtr, xte, ytr, yte = digits()
    net = MultiLayerNetwork(configuration()).init()
    print(net.summary())
    net.add_listeners(ScoreIterationListener(400))
    start = time.perf_counter()
    net.fit((xtr, ytr), epochs=20, batch_size=32)
    elapsed = time.perf_counter() - start
    accuracy = float((np.asarray(net.output(xte)).argmax(-1) == yte).mean())
    print(f"\ntrained {net.iteration} steps in {elapsed:.1f} s; test accuracy {accuracy:.2%}")

    graph = two_halves()
    print("\na ComputationGraph of two inputs, the top and bottom half of each digit:")
    print(graph.summary())
    start = time.perf_counter()
    graph.fit(ArrayMultiDataSetIterator([xtr[:, :32], xtr[:, 32:]], [ytr], batch_size=32, shuffle=True),
              epochs=20, progress=False)
    elapsed = time.perf_counter() - start
    evaluation = graph.evaluate(([xte[:, :32], xte[:, 32:]], [yte]))
    print(f"trained {graph.iteration} steps in {elapsed:.1f} s; test accuracy {evaluation.accuracy():.2%}\n")

    manager = jaxws.get_workspace_manager()
    manager.print_allocation_statistics_for_current_thread()
    with manager.get_and_activate_workspace(id="WS_INFERENCE") as ws:
        probs = net.output(xte, workspace=ws)  # attached: dies with this cycle
    try:
        net.output(probs)
    except jaxws.WorkspaceError as e:
        print(f"\nusing an output after its cycle -> {type(e).__name__}:\n  {str(e).splitlines()[0]}")

    print("\nthe training step under each workspace mode (batch 32):")
    rows = measure_modes(xtr, ytr)
    print(f"{'mode':<9} {'compiled peak':>14} {'donated':>10} {'saved residuals':>16} {'step time':>10}")
    fb = jaxws.memory.format_bytes
    for r in rows:
        print(f"{r['mode']:<9} {fb(r['peak_bytes']):>14} {fb(r['alias_bytes']):>10} "
              f"{fb(r['residual_bytes']):>16} {r['step_us']:>8.0f} us")
    path = out_dir / "jaxws_demo_modes.png"
    chart(rows, path)
    print(f"\nchart written to {path.resolve()}")
    manager.destroy_all_workspaces_for_current_thread()


if __name__ == "__main__":
    main()
