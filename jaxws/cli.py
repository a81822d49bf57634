"""Command line: ``jaxws demo`` runs the main job; ``jaxws bench`` the benchmarks.

``python -m jaxws.cli demo`` is what ``make demo`` runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def workspace_demo() -> None:
    """A training loop with donated state in workspace cycles, then the statistics table."""
    import jax
    import jax.numpy as jnp
    import optax

    import jaxws

    opt = optax.adam(1e-2)

    def loss_fn(params, x, y):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (16, 64)) * 0.3,
        "b1": jnp.zeros(64),
        "w2": jax.random.normal(k2, (64, 1)) * 0.3,
        "b2": jnp.zeros(1),
    }
    opt_state = opt.init(params)
    x = jax.random.normal(k3, (256, 16))
    y = jnp.sin(x.sum(axis=1, keepdims=True))

    train_step = jaxws.jit(step, donate_argnums=(0, 1))
    manager = jaxws.get_workspace_manager()
    conf = jaxws.WorkspaceConfiguration(policy_allocation=jaxws.AllocationPolicy.OVERALLOCATE)
    start = time.perf_counter()
    losses = []
    for i in range(500):
        with manager.get_and_activate_workspace(conf, "LOOP_EXTERNAL"):
            params, opt_state, loss = train_step(params, opt_state, x, y)
            if i % 100 == 0 or i == 499:
                losses.append((i, jaxws.detach(loss)))  # kept beyond the cycle
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - start
    for i, kept in losses:
        print(f"step {i:4d}  loss {float(kept):.6f}")
    print(f"500 steps in {elapsed:.2f} s; compiles: {train_step.compiles}; "
          f"carry donated each step (same buffers), per-step outputs freed at each cycle end\n")
    try:
        train_step(params, opt_state, x, loss)  # the last cycle's loss was not detached
    except jaxws.WorkspaceError as e:
        print(f"{type(e).__name__}:\n{str(e).splitlines()[0]}\n")
    manager.print_allocation_statistics_for_current_thread()
    manager.destroy_all_workspaces_for_current_thread()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxws", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="train a small model in workspace cycles and show the statistics")
    bench = sub.add_parser("bench", help="run the benchmark scripts (one JSON line per figure)")
    bench.add_argument("names", nargs="*", help="benchmark names (default: all)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        workspace_demo()
        return 0
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    scripts = [root / f"{n}.py" for n in args.names] or sorted(root.glob("*.py"))
    for script in scripts:
        code = subprocess.call([sys.executable, str(script)])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
