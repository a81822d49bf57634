"""The three things jaxws reads from JAX's private modules, for speed on its hot paths.

Each one has a public fallback. Where a check can run without starting a backend, the
private object is checked at import against the public API it stands for. A JAX release
that moves one makes jaxws slower, not wrong.

- ``ArrayImpl``: the concrete array class. ``type(x) is ArrayImpl`` is the fastest test of
  a leaf; with no such class (None) those tests fail and the slower path runs.
- ``trace_state.value is EVAL_TRACE``: whether the caller is outside every transformation
  (grad, vmap, scan, an outer jit), read from the trace state directly, inline on hot paths.
- ``flatten``: the registry function that ``jax.tree_util.tree_flatten`` calls, one frame fewer.
"""

from __future__ import annotations

import types

import jax

__all__ = ["ArrayImpl", "EVAL_TRACE", "flatten", "trace_state"]  # for jaxws itself: the module is private

try:
    from jax._src.array import ArrayImpl
except ImportError:  # pragma: no cover - a later jax moved it: the slower path still works
    ArrayImpl = None


class _PublicTopTrace:
    """The public stand-in for JAX's trace state: ``value`` is the current top trace."""

    __slots__ = ()

    @property
    def value(self) -> object:
        return _find_top_trace(())


try:  # outside every transformation the current trace is JAX's eval trace
    from jax.extend.core import find_top_trace as _find_top_trace

    EVAL_TRACE = _find_top_trace(())
    try:  # the state find_top_trace reads, read directly: two frames fewer, once per call
        from jax._src.core import trace_state_strong_ref as trace_state

        if trace_state.value is not EVAL_TRACE:
            raise ImportError("not the state find_top_trace reads")
    except (ImportError, AttributeError):  # pragma: no cover - another jax: the public function
        trace_state = _PublicTopTrace()
except ImportError:  # pragma: no cover - older jax: tracers among the leaves tell instead
    EVAL_TRACE = None
    trace_state = types.SimpleNamespace(value=None)


try:
    from jax._src.tree_util import default_registry as _registry

    flatten = _registry.flatten
    if flatten((1, [2])) != jax.tree_util.tree_flatten((1, [2])):
        raise ImportError("not the registry tree_flatten reads")
except (ImportError, AttributeError, TypeError):  # pragma: no cover - another jax: the public function
    flatten = jax.tree_util.tree_flatten
