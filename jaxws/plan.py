"""What ``jaxws.jit`` learns per input signature: the StepPlan, and the leaf helpers it
is computed from (leaf keys, per-device bytes, paths to output leaves)."""

from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxws._internals import ArrayImpl as _ArrayImpl
from jaxws.memory import MemoryPlan, tree_bytes

__all__ = ["StepPlan", "attach_fresh", "match_outputs", "several_cpu_devices", "spans_cpu_devices",
           "unusable_donation_message", "unusable_sharding_message", "wait_if_across_cpus"]


class StepPlan(NamedTuple):
    """What jaxws learned about a step for one input signature."""

    donated: tuple[int, ...]  # input leaves donated
    inherit: tuple[tuple[int, int], ...]  # (output leaf, donated input leaf it reuses)
    forwarded: tuple[tuple[int, int], ...]  # (output leaf, the non-donated input it returns)
    fresh: tuple[int, ...]  # output leaves in new buffers: attached to the active cycle
    out_bytes: int  # bytes of the fresh outputs
    memory: MemoryPlan | None  # XLA's plan for the donating executable
    fresh_paths: tuple | None = None  # how to reach each fresh leaf without a flatten (None: flatten)
    temp_bytes: int = 0  # XLA's working memory for the step (memory.temp_bytes)
    watch: bool = False  # donated leaves, and several CPU devices they may span (wait_if_across_cpus)


def match_outputs(infos: list, outs: list, jaxpr: Any) -> tuple:
    """Matches a traced step's donated input leaves to its output leaves as XLA does.

    Returns ``(donated, inherit, forwarded, fresh, unused)``: the donated inputs, the
    ``(output, donated input)`` pairs that share a buffer, the ``(output, input)`` pairs
    where a non-donated input comes back as it is, the outputs in new buffers, and the
    donated inputs no output can reuse (they would cost a copy).
    """
    donated = [i for i, info in enumerate(infos) if info.donated]
    # outputs that are non-donated inputs come back as the input (or over its buffer)
    position = {id(v): i for i, v in enumerate(jaxpr.invars)}
    forwarded = {
        j: position[id(v)] for j, v in enumerate(jaxpr.outvars)
        if id(v) in position and not infos[position[id(v)]].donated
    }
    # XLA aliases each output to the first unused donated input of equal shape and dtype
    free = collections.defaultdict(collections.deque)
    for i in donated:  # ArgInfo's public shape and dtype
        free[(infos[i].shape, infos[i].dtype)].append(i)
    inherit = []
    for j, out in enumerate(outs):
        if j not in forwarded and free.get((out.shape, out.dtype)):
            inherit.append((j, free[(out.shape, out.dtype)].popleft()))
    unused = sorted(i for queue in free.values() for i in queue)
    fresh = tuple(sorted(set(range(len(outs))) - set(forwarded) - {j for j, _ in inherit}))
    return tuple(donated), tuple(inherit), tuple(sorted(forwarded.items())), fresh, unused


def _paths(out_info: Any, indices: tuple[int, ...]) -> tuple | None:
    """``(is_attribute, key)`` steps to each output leaf in ``indices``; None if a node has no keys."""
    flat = jax.tree_util.tree_flatten_with_path(out_info)[0]
    paths = []
    for j in indices:
        steps = []
        for k in flat[j][0]:
            if isinstance(k, jax.tree_util.GetAttrKey):
                steps.append((True, k.name))
            elif isinstance(k, jax.tree_util.SequenceKey):
                steps.append((False, k.idx))
            elif isinstance(k, jax.tree_util.DictKey):
                steps.append((False, k.key))
            else:
                return None
        paths.append(tuple(steps))
    return tuple(paths)


def _pick(out: Any, paths: tuple) -> list:
    """The leaves of ``out`` at ``paths`` (a few getattr / getitem: cheaper than a flatten)."""
    picked = []
    for path in paths:
        node = out
        for attribute, key in path:
            node = getattr(node, key) if attribute else node[key]
        picked.append(node)
    return picked


def attach_fresh(ws: Any, plan: StepPlan, out: Any) -> None:
    """Attaches a call's fresh outputs (``plan.fresh``) to the open cycle of ``ws``."""
    leaves = _pick(out, plan.fresh_paths) if plan.fresh_paths is not None else jax.tree.leaves(out)
    picked = leaves if plan.fresh_paths is not None else [leaves[j] for j in plan.fresh]
    generation = ws.generation
    for leaf in picked:
        ws._attach(leaf, generation)


@functools.cache
def several_cpu_devices() -> bool:
    """Whether this process has several CPU devices (``jax_num_cpu_devices``): only then
    can an array span them. Asked at a step's first call, not at import."""
    try:
        return len(jax.devices("cpu")) > 1
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without it)
        return False


def spans_cpu_devices(x: jax.Array) -> bool:
    """Whether ``x`` is laid over several CPU devices. A loop of programs over such arrays
    runs each once the one before is done: queued by the dozen, XLA's CPU all-reduce
    deadlocks, and aborts the process. The usual array (one device) costs a type test."""
    sharding = x.sharding
    if type(sharding) is jax.sharding.SingleDeviceSharding:
        return False
    devices = sharding.device_set
    return len(devices) > 1 and next(iter(devices)).platform == "cpu"


def wait_if_across_cpus(carry: Any) -> None:
    """Waits for ``carry`` (a loop's: the call before made it) where it spans several CPU
    devices, so that the next program is not queued behind it (see :func:`spans_cpu_devices`)."""
    if type(carry) is _ArrayImpl and spans_cpu_devices(carry):
        carry.block_until_ready()


def unusable_sharding_message(name: str, what: str) -> str:
    """Why XLA would copy donated buffers whose shape and dtype an output matches."""
    return (
        f"Op [{name}]: {what}: some donated buffers match an output's shape and dtype "
        "but not its sharding or memory layout, so XLA would copy them.\n"
        "Fix: give the outputs the inputs' shardings (out_shardings= or "
        "jax.lax.with_sharding_constraint), or stop donating those leaves."
    )


def unusable_donation_message(name: str, names: list[str], infos: list, outs: list, unused: list) -> str:
    """Which donated leaves (``unused``, by path in ``names``) no output can reuse, and the fix."""
    lines = []
    for i in unused:
        info = infos[i]
        same_shape = [f"out{j} {o.dtype}{list(o.shape)}" for j, o in enumerate(outs) if o.shape == info.shape]
        lines.append(
            f"  {names[i]}: {info.dtype}{list(info.shape)} -> no output of that shape and dtype"
            + (f" (same shape: {', '.join(same_shape)})" if same_shape else "")
        )
    return (
        f"Op [{name}] cannot reuse {len(unused)} donated buffer(s); XLA would keep "
        "both the input and the output, silently doubling their memory:\n"
        + "\n".join(lines)
        + "\nFix: return each donated leaf with its input's shape and dtype (e.g. "
        "new.astype(old.dtype): update bf16 params in fp32, store them back as bf16), or "
        "stop donating it. unusable_donation='warn' accepts the extra copy."
    )


def _leaf_key(x: Any) -> Any:
    """What the plan of a leaf depends on: its aval (cached on JAX arrays, typed keys
    included) and, for arrays committed to a sharding, that sharding."""
    if type(x) is _ArrayImpl:
        return (x.aval, x.sharding) if x.committed else x.aval
    if isinstance(x, jax.Array):
        return x.aval
    if isinstance(x, (np.ndarray, np.generic)):
        return (x.shape, x.dtype)
    return type(x)  # a Python scalar: weakly typed, its value does not matter


def _device_bytes(leaf: Any, info: Any) -> int:
    """Bytes of one device's shard: what XLA's per-device memory plan counts."""
    if isinstance(leaf, jax.Array):
        size = int(np.prod(leaf.shape, dtype=np.int64))
        shard = int(np.prod(leaf.sharding.shard_shape(leaf.shape), dtype=np.int64))
        return leaf.nbytes * shard // size if size else 0
    return tree_bytes(info)


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (int, str)):
        return (value,)
    return tuple(value)


def _twice_donated(e: Exception) -> bool:
    text = str(e)
    return "same buffer twice" in text or "previously donated in the same call" in text
