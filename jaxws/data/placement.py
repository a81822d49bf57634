"""Putting batches on the device without taking over what the caller already placed.

A leaf already where it should be passes through as the same object; every other leaf
is copied into a new device buffer, and only those new buffers belong to jaxws.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxws._internals import ArrayImpl as _ArrayImpl
from jaxws.errors import ConfigurationError

__all__ = ["Placement", "host_leaf"]

_NUMERIC: dict = {}  # dtype -> whether it holds numbers
_SMALL = 1 << 20  # bytes: a leaf this small moves through the jitted call's transfer on the CPU


@functools.cache
def _on_cpu() -> bool:
    """Whether the default backend is the CPU (asked at the first transfer, not at import)."""
    return jax.default_backend() == "cpu"


def _small_host(leaves: list) -> bool:
    """All numpy arrays of at most 1 MiB: what moves through a jitted call's own transfer."""
    return all([isinstance(x, np.ndarray) and x.nbytes <= _SMALL for x in leaves])


@jax.jit
def _forwarded(leaves: list) -> list:
    """``leaves`` (numpy arrays) as device arrays, through a jitted call's own transfer: the
    program returns its inputs, so nothing runs. On the CPU that transfer takes ~15 us for a
    small batch where ``jax.device_put`` takes ~150 (jax 0.10), and the device array may
    read the numpy memory it was given after the call returns: callers pass copies of their
    own (small leaves only, where a second copy costs nothing and device_put's fixed cost
    is most)."""
    return leaves


def host_leaf(x: Any) -> Any:
    """``x`` unchanged if it is a JAX array, else as a numpy array of numbers.

    Lists and scalars become arrays here, so a batch given as nested lists works as numpy
    does; strings and objects are refused with a ConfigurationError (a TypeError).
    """
    if isinstance(x, jax.Array):
        return x
    array = x if isinstance(x, np.ndarray) else np.asarray(x)
    numeric = _NUMERIC.get(array.dtype)
    if numeric is None:  # once per dtype: jnp.issubdtype knows bfloat16 and the other ml_dtypes
        numeric = _NUMERIC[array.dtype] = bool(jnp.issubdtype(array.dtype, jnp.number) or array.dtype == bool)
    if not numeric:
        raise ConfigurationError(
            f"A batch leaf of type {type(x).__name__} (dtype {array.dtype}) is not numeric data; "
            "pass numpy or JAX arrays of numbers (or nested lists of numbers)."
        )
    return array


class Placement:
    """Where batches go: a device, a sharding (global arrays), or anywhere (None, None).

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from jaxws.data.placement import Placement
        >>> x = jnp.ones(3)
        >>> (same, copied), owned = Placement().place((x, np.zeros(2)))
        >>> same is x, [o is copied for o in owned]
        (True, [True])
    """

    __slots__ = ("device", "sharding", "_single", "anywhere")

    def __init__(self, device: jax.Device | None = None, sharding: jax.sharding.Sharding | None = None):
        self.device = device
        self.sharding = sharding
        self._single = None if device is None else jax.sharding.SingleDeviceSharding(device)
        self.anywhere = device is None and sharding is None  # device arrays pass through as they are

    def holds(self, x: Any) -> bool:
        """True if ``x`` is a JAX array already placed here (it then passes through)."""
        if not isinstance(x, jax.Array):
            return False
        if self.sharding is not None:
            return x.sharding.is_equivalent_to(self.sharding, x.ndim)
        return self._single is None or x.sharding == self._single

    def holds_all(self, tree: Any) -> bool:
        leaves = jax.tree.leaves(tree)
        if self.anywhere and all([type(x) is _ArrayImpl for x in leaves]):
            return True  # device arrays pass through: the exact type, without isinstance
        return all(map(self.holds, leaves))

    def place(self, tree: Any, stage: bool = False, copy: bool = True) -> tuple[Any, list[jax.Array]]:
        """``(placed tree, the new device arrays)``; leaves already placed are not copied
        (a tree with nothing to move comes back as the same object). ``stage``: for a
        jitted call that moves the tree as it runs, :meth:`staged`'s ``(tree, [])`` where
        it applies (``copy`` as there): nothing placed."""
        if stage:
            moved = self.staged(tree, copy)
            if moved is not None:
                return moved, []
        if self.holds_all(tree):
            return tree, []
        return self.place_many([tree])[0]

    @property
    def stages(self) -> bool:
        """Whether :meth:`staged` hands small numpy batches to the jitted call as copies
        (anywhere, on the CPU backend) rather than placing them first."""
        return self.anywhere and _on_cpu()

    def staged(self, tree: Any, copy: bool = True) -> Any | None:
        """``tree`` with each leaf copied, for the jitted call that takes it to transfer as
        it runs (the batch then costs no call of its own), or None where it must be placed
        first: a device or sharding named, a backend other than the CPU, a leaf that is
        not a numpy array or is over 1 MiB. The copies are the transfer's own (see
        ``_forwarded``): the caller may refill its arrays while the call still reads them.
        ``copy=False``: ``tree`` itself, for arrays that nobody else holds (a fresh gather).

        Example:
            >>> import jax, numpy as np
            >>> from jaxws.data.placement import Placement
            >>> x = np.zeros(3, np.float32)
            >>> staged = Placement().staged({"x": x})  # None off the CPU backend: placed there
            >>> staged is None or not np.shares_memory(staged["x"], x)
            True
            >>> Placement(jax.devices()[0]).staged({"x": x}) is None  # a device named: place it
            True
        """
        if not self.stages:
            return None
        leaves, treedef = jax.tree.flatten(tree)
        if not _small_host(leaves):
            return None
        return jax.tree.unflatten(treedef, [np.array(x) for x in leaves]) if copy else tree

    def place_many(self, trees: list) -> list[tuple[Any, list[jax.Array]]]:
        """:meth:`place` for each of ``trees``, with one transfer call for all of them
        (a call's fixed cost is paid once for a group of small batches)."""
        flat = [jax.tree.flatten(tree) for tree in trees]
        moved = [(t, i) for t, (leaves, _) in enumerate(flat) for i, x in enumerate(leaves) if not self.holds(x)]
        if self.sharding is not None:
            arrays = [jax.make_array_from_process_local_data(self.sharding, np.asarray(host_leaf(flat[t][0][i])))
                      for t, i in moved]
        elif moved:  # arrays on another device are copied too
            arrays = [host_leaf(flat[t][0][i]) for t, i in moved]
            if self.stages and _small_host(arrays):
                # one copy, as device_put makes: ours, so a late read of it is harmless
                # (the caller may refill its buffer while the steps still read the batch)
                copies: dict[int, list] = {}  # per batch: one program per batch signature
                for (t, _), x in zip(moved, arrays):
                    copies.setdefault(t, []).append(np.array(x))
                arrays = [y for group in copies.values() for y in _forwarded(group)]
            else:
                arrays = jax.device_put(arrays, self.device)
        else:
            arrays = []
        owned: list[list] = [[] for _ in trees]
        for (t, i), y in zip(moved, arrays):
            flat[t][0][i] = y
            owned[t].append(y)
        return [(jax.tree.unflatten(treedef, leaves) if mine else tree, mine)
                for tree, (leaves, treedef), mine in zip(trees, flat, owned)]
