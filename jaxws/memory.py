"""Memory accounting: compiled memory plans, live bytes by workspace, device statistics.

Plans come from XLA's ``memory_analysis()``; live bytes from the arrays JAX holds.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from jaxws.errors import ConfigurationError

__all__ = [
    "MemoryPlan",
    "compiled_plan",
    "live_bytes",
    "live_bytes_by_workspace",
    "device_memory_stats",
    "peak_bytes_in_use",
    "tree_bytes",
    "residual_bytes",
    "format_bytes",
]


class MemoryPlan(NamedTuple):
    """What XLA plans to hold while a compiled step runs, in bytes.

    ``peak_bytes`` is ``argument + output + temp - alias``: the donated (aliased) bytes are
    counted once, since inputs and outputs share them.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @classmethod
    def from_compiled(cls, compiled: Any) -> MemoryPlan | None:
        """The plan of a ``jax.stages.Compiled``, or None where the backend has none."""
        try:
            stats = compiled.memory_analysis()
        except (AttributeError, RuntimeError):  # a backend without it raises a RuntimeError subclass
            return None
        if stats is None:
            return None
        return cls(
            int(stats.argument_size_in_bytes),
            int(stats.output_size_in_bytes),
            int(stats.alias_size_in_bytes),
            int(stats.temp_size_in_bytes),
            int(stats.generated_code_size_in_bytes),
        )

    def __str__(self) -> str:
        fb = format_bytes
        return (
            f"argument {fb(self.argument_bytes)}, output {fb(self.output_bytes)}, "
            f"alias {fb(self.alias_bytes)}, temp {fb(self.temp_bytes)}, "
            f"peak {fb(self.peak_bytes)}"
        )


def compiled_plan(fun: Callable, *args, **kwargs) -> MemoryPlan | None:
    """The memory plan of ``fun`` (a ``jax.jit`` or ``jaxws.jit`` function) for these args.

    Example:
        >>> import jax, jax.numpy as jnp, jaxws
        >>> step = jax.jit(lambda x: x + 1, donate_argnums=0)
        >>> jaxws.memory.compiled_plan(step, jnp.ones(256)).alias_bytes
        1024
    """
    if not callable(getattr(fun, "lower", None)):
        raise ConfigurationError(
            f"compiled_plan(fun=<{type(fun).__name__}>): expected a jitted function (jax.jit or jaxws.jit)."
        )
    return MemoryPlan.from_compiled(fun.lower(*args, **kwargs).compile())


def tree_bytes(tree: Any) -> int:
    """Bytes of the array leaves of ``tree`` (JAX, numpy or ShapeDtypeStruct)."""
    return sum(
        int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
        if hasattr(x, "shape") and hasattr(x, "dtype")
    )


def residual_bytes(fun: Callable, *primals: Any) -> int:
    """Bytes that backprop of ``fun`` at ``primals`` keeps: the residuals of ``jax.vjp``.

    Each residual buffer counts once, and the primals themselves (alive anyway) not at
    all. Rematerialisation (``jax.checkpoint``) shows here on every backend, where XLA's
    CPU memory plan does not show it. Runs ``fun`` once, eagerly.

    Example:
        >>> import jax.numpy as jnp, jaxws
        >>> jaxws.memory.residual_bytes(lambda x: jnp.sum(jnp.sin(x) ** 2), jnp.ones(256))
        2048
    """
    inputs = {id(x) for x in jax.tree.leaves(primals)}
    residuals = {id(r): r for r in jax.tree.leaves(jax.vjp(fun, *primals)[1]) if id(r) not in inputs}
    return tree_bytes(list(residuals.values()))


def live_bytes(workspace: Any = None) -> int:
    """Bytes of live device arrays: those a workspace owns, or all of them (None)."""
    if workspace is not None:
        return workspace.live_bytes()
    return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


def live_bytes_by_workspace() -> dict[str, int]:
    """Live bytes of each workspace of the calling thread."""
    from jaxws.manager import get_workspace_manager

    return {s.id: s.live_bytes for s in get_workspace_manager().allocation_statistics()}


def device_memory_stats(device: jax.Device | None = None) -> dict[str, int] | None:
    """The allocator statistics of ``device`` (default: the first), or None (CPU)."""
    device = device or jax.devices()[0]
    try:
        return device.memory_stats()
    except (AttributeError, RuntimeError):  # a backend without it raises a RuntimeError subclass
        return None


def peak_bytes_in_use(device: jax.Device | None = None) -> int | None:
    """The device allocator's peak (never reset by XLA), or None where it has none."""
    stats = device_memory_stats(device)
    return None if not stats else stats.get("peak_bytes_in_use")


def format_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"
