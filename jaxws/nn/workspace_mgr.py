"""LayerWorkspaceMgr and ArrayType: where a layer's arrays live, as DL4J's layer API says.

An array type is a ``checkpoint_name`` on the array; the network's workspace mode turns
the names into a rematerialisation policy, and validation reads them from the jaxpr.
"""

from __future__ import annotations

import enum
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxws.errors import ConfigurationError, WorkspaceValidationError

__all__ = ["ArrayType", "LayerWorkspaceMgr", "validate_activations"]


class ArrayType(enum.Enum):
    """DL4J's nine array types; each is a workspace an array can be defined in."""

    INPUT = "INPUT"
    ACTIVATIONS = "ACTIVATIONS"
    ACTIVATION_GRAD = "ACTIVATION_GRAD"
    FF_WORKING_MEM = "FF_WORKING_MEM"
    BP_WORKING_MEM = "BP_WORKING_MEM"
    RNN_FF_LOOP_WORKING_MEM = "RNN_FF_LOOP_WORKING_MEM"
    RNN_BP_LOOP_WORKING_MEM = "RNN_BP_LOOP_WORKING_MEM"
    UPDATER_WORKING_MEM = "UPDATER_WORKING_MEM"
    FF_CACHE = "FF_CACHE"


class LayerWorkspaceMgr:
    """Places a layer's arrays in array types (DL4J's ``LayerWorkspaceMgr``).

    Inside a network every layer gets one; a layer returns its activations through
    ``create(ArrayType.ACTIVATIONS, ...)`` or ``leverage_to(ArrayType.ACTIVATIONS, arr)``.
    Outside a network use :meth:`no_workspaces`, which tags nothing.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxws.nn import ArrayType, LayerWorkspaceMgr
        >>> mgr = LayerWorkspaceMgr()
        >>> def activate(x):
        ...     h = mgr.leverage_to(ArrayType.FF_WORKING_MEM, jnp.tanh(x))
        ...     return mgr.leverage_to(ArrayType.ACTIVATIONS, 2 * h)
        >>> float(activate(jnp.zeros(()))), LayerWorkspaceMgr.no_workspaces().enabled
        (0.0, False)
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @classmethod
    def no_workspaces(cls) -> LayerWorkspaceMgr:
        """A manager that places nothing: for running layers outside a network."""
        return cls(enabled=False)

    def create(self, array_type: ArrayType, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        """A zero array of ``shape`` and ``dtype`` in ``array_type``."""
        return self.leverage_to(array_type, jnp.zeros(shape, dtype))

    def leverage_to(self, array_type: ArrayType, array: jax.Array) -> jax.Array:
        """``array``, placed in ``array_type`` (no copy)."""
        if not isinstance(array_type, ArrayType):
            raise ConfigurationError(f"leverage_to(array_type={array_type!r}): expected a jaxws.nn.ArrayType.")
        return checkpoint_name(array, array_type.value) if self.enabled else array

    def dup(self, array_type: ArrayType, array: jax.Array) -> jax.Array:
        """A copy of ``array`` in ``array_type``."""
        return self.leverage_to(array_type, jnp.copy(array))


def _producer_type(jaxpr: jax.core.Jaxpr, var: Any) -> str | None:
    """The array type (checkpoint name) of the equation that produced ``var``, if any."""
    for eqn in reversed(jaxpr.eqns):
        if any(out is var for out in eqn.outvars):
            if eqn.primitive.name == "name":
                return eqn.params["name"]
            if eqn.primitive.name in ("pjit", "jit", "closed_call", "core_call"):
                inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
                inner = getattr(inner, "jaxpr", inner)
                return _producer_type(inner, inner.outvars[eqn.outvars.index(var)])
            return None
    return None


def _default_label(layer: Any, index: int) -> str:
    return f"Layer {index} ({getattr(layer, 'name', None) or type(layer).__name__}, class {type(layer).__name__})"


def validate_activations(layer: Any, index: int, fn, *args, label: str | None = None) -> None:
    """Raises WorkspaceValidationError unless ``fn(*args)[0]`` is in ArrayType.ACTIVATIONS.

    ``fn`` is traced once (abstractly: nothing runs); the check reads the jaxpr, so it costs
    nothing per step. ``label`` names the layer in the message (default: by ``index``).
    """
    closed = jax.make_jaxpr(fn)(*args)
    out_vars = closed.jaxpr.outvars[: len(jax.tree.leaves(jax.eval_shape(fn, *args)[0]))]
    for var in out_vars:
        found = _producer_type(closed.jaxpr, var)
        if found != ArrayType.ACTIVATIONS.value:
            where = f"ArrayType.{found}" if found else "no workspace (a plain array)"
            raise WorkspaceValidationError(
                f"{label or _default_label(layer, index)} returned activations defined in incorrect workspace: "
                f"expected ArrayType.ACTIVATIONS, found {where}.\n"
                "Fix: return them through the LayerWorkspaceMgr,\n"
                "  wrong:  return jnp.tanh(x @ w), state\n"
                "  right:  return mgr.leverage_to(ArrayType.ACTIVATIONS, jnp.tanh(x @ w)), state"
            )
