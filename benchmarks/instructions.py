"""Host instructions per step, counted by callgrind: where wall time wanders, counts repeat.

On a shared machine a layer of a few microseconds moves by more than itself from one run
to the next; the instructions the main thread executes repeat to within a fraction of a
percent. The main thread is the host side of a loop (Python, jaxws, JAX's dispatch); XLA
runs the steps on its own threads, which are not counted. Figures, each variant counted
over the same calls in one process:
  * a tiny donated step: ``jax.jit``, ``jaxws.jit``, ``jaxws.jit`` in one workspace cycle
    per call, and the empty cycle (``speed.py``'s first figure);
  * fit's layers (``breakdown.py``'s): plain, checked, planned, cycled, fed, fit, and fit(batch)
    called once per batch (DL4J's loop);
  * programs of k steps (``breakdown.py``'s second figure): a hand-written scan over a stack,
    fit's fused program on a stack and on the k batches themselves, and
    ``fit(batches, steps_per_execution=k)`` around that program;
  * an AsyncDataSetIterator over device batches (``speed.py``'s figure), per batch, against
    the loop over the same batches;
  * evaluation per batch: ``do_evaluation(Evaluation())`` and ``score`` over numpy batches
    (``prefetch=0``: the main thread does all of it) and over device batches;
  * ``fit(iter(device batches))`` per step by label kind: integer classes (counted by a
    label check in every step), one-hot labels (nothing to count: no check), and the plain
    loop on the one-hot batches.

    python benchmarks/instructions.py [--calls 2000] [--steps 50] [--k 100] [--width 64] [--batch 32]

Needs valgrind (callgrind) on the PATH: the script runs itself under it, with counting
switched on only around each variant (a few minutes, mostly XLA compiling under valgrind).
Without it, it prints one line that says so and counts nothing.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

_INNER = "JAXWS_INSTRUCTIONS_INNER"  # set in the process that runs under callgrind


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)


def _count(group: str, variants: dict, *args: object) -> None:
    """Runs each variant on ``args`` once to warm it, then once counted: counting on, the
    variant, counting off, a dump named ``group/variant``."""
    import jax

    for run in variants.values():
        jax.block_until_ready(run(*args))
    for name, run in variants.items():
        _control("-i", "on")
        out = run(*args)
        _control("-i", "off")
        jax.block_until_ready(out)
        _control(f"--dump={group}/{name}")


def inner(args: argparse.Namespace) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling scripts
    from breakdown import epochs_of, layers, scan_layers
    from speed import async_variants, tiny_steps

    _count("jit", tiny_steps(args.calls))
    _count("fit", layers(args.width, args.batch), epochs_of(args.batch, args.steps, 1)[0])
    _count("scan", scan_layers(args.width, args.batch, args.k), 1)
    ring = async_variants(args.calls)
    _count("async", {"device": ring["device"], "loop": ring["loop"]})  # the others work in threads
    _count("eval", evaluation(args.width, args.batch, args.steps))
    _count("labels", label_kinds(args.width, args.batch, args.steps))


def evaluation(width: int, batch: int, steps: int) -> dict:
    """do_evaluation and score over ``steps`` numpy batches and the same on the device."""
    import jax.numpy as jnp
    import numpy as np

    from breakdown import epochs_of, model
    from jaxws.data import DataSet
    from jaxws.eval import Evaluation

    net = model(width)
    device = epochs_of(batch, steps, 1)[0]
    host = [DataSet(np.asarray(ds.features), np.asarray(ds.labels)) for ds in device]
    return {"evaluate_numpy": lambda: net.do_evaluation(iter(host), Evaluation(), prefetch=0)[0].state,
            "evaluate_device": lambda: net.do_evaluation(device, Evaluation())[0].state,
            "score_numpy": lambda: jnp.asarray(net.score(host)), "score_device": lambda: jnp.asarray(net.score(device))}


def label_kinds(width: int, batch: int, steps: int) -> dict:
    """fit over ``steps`` device batches with integer class labels and with the same labels
    one-hot, and the plain loop over the one-hot batches."""
    import jax

    import jaxws
    from breakdown import epochs_of, model
    from jaxws.data import DataSet

    classes = epochs_of(batch, steps, 1)[0]
    one_hot = [DataSet(ds.features, jax.nn.one_hot(ds.labels, 10)) for ds in classes]
    nets = {"classes": model(width), "one_hot": model(width)}
    step = jax.jit(model(width).train_step(), donate_argnums=0)
    carry = [jaxws.detach(nets["one_hot"]._carry)]  # the same start, the plain loop's own buffers

    def fit(name, batches):
        def run():
            nets[name].fit(iter(batches), progress=False)
            return nets[name]._carry
        return run

    def plain():
        for ds in one_hot:
            carry[0] = step(carry[0], ds)[0]
        return carry[0]

    return {"classes": fit("classes", classes), "one_hot": fit("one_hot", one_hot), "plain_one_hot": plain}


def _read(folder: str) -> dict:
    """``{group: {variant: main-thread instructions}}`` from the dumps in ``folder``."""
    counts: dict = {}
    for path in glob.glob(os.path.join(folder, "cg.out*")):
        with open(path) as f:
            text = f.read()
        trigger = re.search(r"^desc: Trigger: dump (\w+)/(\w+)$", text, re.M)
        thread = re.search(r"^thread: (\d+)$", text, re.M)
        totals = re.search(r"^totals: (\d+)$", text, re.M)
        if trigger and thread and totals and thread.group(1) == "1":  # thread 1: the main thread
            counts.setdefault(trigger.group(1), {})[trigger.group(2)] = int(totals.group(1))
    return counts


def emit(**fields) -> None:
    print(json.dumps({"benchmark": "instructions", "counter": "callgrind Ir, main thread", **fields}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls of the tiny step per variant")
    parser.add_argument("--steps", type=int, default=50, help="fit steps per variant")
    parser.add_argument("--k", type=int, default=100, help="steps per program in the scan figure")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if os.environ.get(_INNER):
        return inner(args)
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):  # `make bench` goes on to the next
        emit(skipped="needs valgrind and callgrind_control on the PATH (apt install valgrind)")
        return
    with tempfile.TemporaryDirectory() as folder:
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                   f"--callgrind-out-file={folder}/cg.out", sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        run = subprocess.run(command, env={**os.environ, _INNER: "1"}, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"the counted run failed ({run.returncode}):\n{run.stderr[-3000:]}")
        counts = _read(folder)
    jit = {k: v / args.calls / 1000 for k, v in counts["jit"].items()}
    emit(figure="jaxws.jit + one cycle per call over jax.jit (tiny step), k instructions per call",
         calls=args.calls, **{k: round(v, 2) for k, v in jit.items()},
         overhead=round(jit["jaxws"] - jit["jax"], 2), overhead_in_cycle=round(jit["cycle"] - jit["jax"], 2),
         in_cycle_vs_jax=round(jit["cycle"] / jit["jax"], 3))
    fit = {k: v / args.steps / 1000 for k, v in counts["fit"].items()}
    order = ["plain", "checked", "planned", "cycled", "fed", "fit"]
    emit(figure="fit's layers, k instructions per step", width=args.width, batch=args.batch, steps=args.steps,
         per_step={k: round(fit[k], 1) for k in order},
         added={b: round(fit[b] - fit[a], 1) for a, b in zip(order, order[1:])},
         plain_vs_fit=round(fit["plain"] / fit["fit"], 3), per_batch=round(fit["per_batch"], 1),
         plain_vs_per_batch=round(fit["plain"] / fit["per_batch"], 3))
    scan = {k: v / args.k / 1000 for k, v in counts["scan"].items()}
    emit(figure="programs of k steps, k instructions per step", width=args.width, batch=args.batch, k=args.k,
         per_step={k: round(v, 2) for k, v in scan.items()},
         batches_as_arguments=round(scan["steps"] - scan["fused"], 2), fit_around_program=round(scan["fit"] - scan["steps"], 2))
    ring = {k: v / args.calls / 1000 for k, v in counts["async"].items()}
    emit(figure="AsyncDataSetIterator per batch: device batches (passed through), k instructions per batch",
         batches=args.calls, queue_size=8, **{k: round(v, 2) for k, v in ring.items()},
         per_batch=round(ring["device"] - ring["loop"], 2))
    evaluated = {k: v / args.steps / 1000 for k, v in counts["eval"].items()}
    emit(figure="do_evaluation(Evaluation()) and score, k instructions per batch", width=args.width,
         batch=args.batch, batches=args.steps, **{k: round(v, 1) for k, v in evaluated.items()})
    kinds = {k: v / args.steps / 1000 for k, v in counts["labels"].items()}
    emit(figure="fit(iter(device batches)) by label kind, k instructions per step", width=args.width,
         batch=args.batch, steps=args.steps, **{k: round(v, 1) for k, v in kinds.items()},
         plain_vs_one_hot=round(kinds["plain_one_hot"] / kinds["one_hot"], 3))


if __name__ == "__main__":
    main()
