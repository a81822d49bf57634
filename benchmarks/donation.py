"""Peak memory and step time of a state-dominated training step, three ways.

`plain` is jax.jit without donation, `donated` a hand-written jax.jit loop with
donate_argnums, `jaxws` the same step through jaxws.jit in workspace cycles (ENABLED).
Each variant runs in a fresh process (the GPU allocator's peak never resets). Prints one
JSON line per figure; ratios are against the variants measured in the same invocation.

    python benchmarks/donation.py [--state-mib 288] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("plain", "donated", "jaxws")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(variant: str, state_mib: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import jaxws

    # adam holds params + mu + nu: state = 3 x params; square layers of `width`
    width = 2048
    layers = max(1, round(state_mib * 2**20 / (3 * 4 * width * width)))
    opt = optax.adam(1e-4)

    def loss_fn(params, x):
        h = x
        for w in params:
            h = jnp.tanh(h @ w)
        return jnp.mean(h**2)

    def step(params, opt_state, x):
        loss, grads = jax.value_and_grad(loss_fn)(params, x)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jax.block_until_ready(jnp.ones(1) + 1)  # the runtime is up: measure from here
    rss_before = rss_bytes()
    keys = jax.random.split(jax.random.key(0), layers)
    params = [jax.random.normal(k, (width, width)) * (1.0 / width**0.5) for k in keys]
    opt_state = opt.init(params)
    x = jnp.ones((8, width))
    jax.block_until_ready((params, opt_state))
    state_bytes = jaxws.memory.tree_bytes((params, opt_state))

    if variant == "plain":
        fn = jax.jit(step)
    elif variant == "donated":
        fn = jax.jit(step, donate_argnums=(0, 1))
    else:
        fn = jaxws.jit(step, donate_argnums=(0, 1))
    plan = jaxws.memory.compiled_plan(fn, params, opt_state, x)
    manager = jaxws.get_workspace_manager()
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        if variant == "jaxws":
            with manager.get_and_activate_workspace(id="TRAIN"):
                params, opt_state, loss = fn(params, opt_state, x)
                jax.block_until_ready(params)
        else:
            params, opt_state, loss = fn(params, opt_state, x)
            jax.block_until_ready(params)
        if i >= 2:
            times.append(time.perf_counter() - start)
    device_peak = jaxws.memory.peak_bytes_in_use()
    return {
        "state_bytes": state_bytes,
        "plan_peak_bytes": plan.peak_bytes,
        "plan_alias_bytes": plan.alias_bytes,
        "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before,
        "device_peak_bytes": device_peak,
        "step_ms": statistics.median(times) * 1e3,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }


def call_overhead(repeats: int = 7, calls: int = 20000) -> dict:
    """Per-call time of a tiny donated step: jax.jit vs jaxws.jit (outside and in a cycle)."""
    import jax
    import jax.numpy as jnp

    import jaxws

    tiny_jax = jax.jit(lambda a: a + 1, donate_argnums=0)
    tiny_ws = jaxws.jit(lambda a: a + 1, donate_argnums=0)
    a, b, c = jnp.ones(4), jnp.ones(4), jnp.ones(4)
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="TINY")
    best = {"jax": float("inf"), "jaxws": float("inf"), "jaxws_in_cycle": float("inf")}
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            a = tiny_jax(a)
        jax.block_until_ready(a)
        best["jax"] = min(best["jax"], (time.perf_counter() - start) / calls)
        start = time.perf_counter()
        for _ in range(calls):
            b = tiny_ws(b)
        jax.block_until_ready(b)
        best["jaxws"] = min(best["jaxws"], (time.perf_counter() - start) / calls)
        with ws:
            start = time.perf_counter()
            for _ in range(calls):
                c = tiny_ws(c)
            jax.block_until_ready(c)
            best["jaxws_in_cycle"] = min(best["jaxws_in_cycle"], (time.perf_counter() - start) / calls)
    return {k: v * 1e6 for k, v in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--state-mib", type=int, default=0, help="0: 288 on CPU, 3072 on GPU")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.state_mib, args.steps)))
        return
    if args.overhead:
        print(json.dumps(call_overhead()))
        return
    if not args.state_mib:
        import jax

        args.state_mib = 3072 if jax.default_backend() == "gpu" else 288

    def child(*extra: str) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, *extra], check=True, capture_output=True, text=True
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    r = {v: child("--variant", v, "--state-mib", str(args.state_mib), "--steps", str(args.steps))
         for v in VARIANTS}
    meta = {"backend": r["jaxws"]["backend"], "device": r["jaxws"]["device"],
            "state_mib": round(r["jaxws"]["state_bytes"] / 2**20, 1)}
    peaks = [("plan_peak_bytes", "compiled plan peak"), ("rss_peak_bytes", "process peak RSS")]
    if r["jaxws"]["device_peak_bytes"]:
        peaks.append(("device_peak_bytes", "device peak_bytes_in_use"))
    for key, what in peaks:
        row = {v: r[v][key] for v in VARIANTS}
        print(json.dumps({"benchmark": "donation", "figure": what, **meta,
                          **{f"{v}_mib": round(b / 2**20, 1) for v, b in row.items()},
                          "jaxws_vs_plain": round(row["jaxws"] / row["plain"], 3),
                          "jaxws_vs_donated": round(row["jaxws"] / row["donated"], 3),
                          "donated_vs_plain": round(row["donated"] / row["plain"], 3)}))
    print(json.dumps({"benchmark": "donation", "figure": "step time", **meta,
                      **{f"{v}_ms": round(r[v]["step_ms"], 2) for v in VARIANTS},
                      "jaxws_vs_donated": round(r["jaxws"]["step_ms"] / r["donated"]["step_ms"], 3)}))
    o = child("--overhead")
    print(json.dumps({"benchmark": "donation", "figure": "per-call time, tiny donated step",
                      **meta, **{f"{k}_us": round(v, 2) for k, v in o.items()},
                      "overhead_us": round(o["jaxws"] - o["jax"], 2),
                      "overhead_in_cycle_us": round(o["jaxws_in_cycle"] - o["jax"], 2)}))


if __name__ == "__main__":
    main()
