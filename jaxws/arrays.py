"""Array lifetimes at every entry point: stale checks, detach, leverage_to, is_attached.

An attached array carries a tag naming its workspace and cycle; these functions read it.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.errors import (
    ConfigurationError,
    DeletedArrayError,
    LeakedWorkspacePointerError,
    OutdatedWorkspacePointerError,
    WorkspaceError,
)
from jaxws.workspace import _TAG, Workspace

__all__ = ["detach", "leverage_to", "is_attached", "check_arrays", "stale_error"]


_NO_GUARD = (None, "allow")
_UNGUARDED = contextlib.nullcontext()


def allow_reads() -> ContextManager:
    """``jax.transfer_guard_device_to_host("allow")`` for a read jaxws is asked for (a label
    check, a score), where a guard is set; where none is, nothing: entering JAX's context
    costs 3 us, a cost a ``fit(batch)`` loop pays on every call. Internal to jaxws."""
    config = jax.config
    if config.jax_transfer_guard_device_to_host in _NO_GUARD and config.jax_transfer_guard in _NO_GUARD:
        return _UNGUARDED
    return jax.transfer_guard_device_to_host("allow")


def stale_error(op: str, arg: str, array: Any) -> WorkspaceError | None:
    """The error to raise if ``array`` may not be used any more, else None."""
    attachment = getattr(array, _TAG, None)
    if attachment is None:
        if isinstance(array, jax.Array) and array.is_deleted():
            return DeletedArrayError(op, arg, str(array.aval))
        return None
    ws, generation = attachment.workspace, attachment.generation
    if not ws._destroyed and generation > ws._invalid_through:
        return None
    opened = ws._manager.open_workspace_ids()
    if ws._destroyed:
        return LeakedWorkspacePointerError(
            op, arg, ws.id, generation, ws.generation, "the workspace was destroyed", opened
        )
    if generation == ws.generation and not ws.is_scope_active:
        return LeakedWorkspacePointerError(
            op, arg, ws.id, generation, ws.generation,
            "its cycle ended and the workspace is closed", opened,
        )
    reason = "its cycle ended and the array was invalidated"
    if attachment.carried:
        reason += (
            ". It is a loop carry (it came back from a donated step) that was first made "
            "inside a cycle, so it belongs to that cycle; make a carry before the loop, outside "
            "every workspace, or detach it before its first step: params = jaxws.detach(init())"
        )
    return OutdatedWorkspacePointerError(op, arg, ws.id, generation, ws.generation, reason, opened)


def check_arrays(op: str, tree: Any, prefix: str = "") -> None:
    """Raises if any array in ``tree`` is leaked, outdated or deleted.

    Args:
        op: the operation's name, for the message.
        tree: any pytree; non-array leaves are ignored.
        prefix: what the tree is called, for the argument path (``"args"``).

    Raises:
        LeakedWorkspacePointerError, OutdatedWorkspacePointerError, DeletedArrayError.
    """
    leaves = jax.tree.leaves(tree)
    if not any(getattr(x, _TAG, None) is not None or (isinstance(x, jax.Array) and x.is_deleted()) for x in leaves):
        return  # the fast path: nothing attached, nothing deleted
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        error = stale_error(op, prefix + jax.tree_util.keystr(path), leaf)
        if error is not None:
            raise error


def is_attached(x: Any) -> bool:
    """True if ``x`` belongs to a workspace cycle (and so dies with it).

    Example:
        >>> import jax.numpy as jnp, jaxws
        >>> jaxws.is_attached(jnp.ones(2))
        False
    """
    return getattr(x, _TAG, None) is not None


_copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def detach(tree: Any) -> Any:
    """An independent copy of ``tree`` that belongs to no workspace and outlives them all.

    JAX arrays are copied into fresh buffers (one dispatch for the whole tree, shardings
    kept); numpy arrays are copied; other leaves are returned as they are.

    Raises:
        LeakedWorkspacePointerError, OutdatedWorkspacePointerError: a leaf is already invalid.

    Example:
        >>> import jax.numpy as jnp, jaxws
        >>> ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="DETACH")
        >>> double = jaxws.jit(lambda x: 2 * x)
        >>> with ws:
        ...     y = jaxws.detach(double(jnp.ones(2)))
        >>> y.tolist(), jaxws.is_attached(y)
        ([2.0, 2.0], False)
    """
    check_arrays("detach", tree, "tree")
    leaves, treedef = jax.tree.flatten(tree)
    device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    copies = _copy_tree([leaves[i] for i in device]) if device else []
    for i, copy in zip(device, copies):
        leaves[i] = copy
    leaves = [np.array(x, copy=True) if isinstance(x, np.ndarray) else x for x in leaves]
    return jax.tree.unflatten(treedef, leaves)


def leverage_to(target: Workspace | str, tree: Any) -> Any:
    """Moves the arrays of ``tree`` into ``target``'s current cycle (DL4J ``leverageTo``).

    Arrays attached to a workspace are re-registered with ``target``, so they live as long
    as its current cycle; nothing is copied. Arrays attached to no workspace are returned
    as they are (they already outlive every workspace, as in ND4J); numpy and other host
    leaves are put on the device and attached.

    Args:
        target: an open workspace of this thread, or its id.
        tree: arrays to move.

    Returns:
        ``tree``, its device arrays now owned by ``target``.

    Raises:
        WorkspaceError: ``target`` is not open on this thread.
        LeakedWorkspacePointerError, OutdatedWorkspacePointerError: a leaf is already invalid.

    Example:
        >>> import jax.numpy as jnp, jaxws
        >>> mgr = jaxws.get_workspace_manager()
        >>> outer = mgr.get_workspace_for_current_thread(id="OUTER")
        >>> inner = mgr.get_workspace_for_current_thread(id="INNER")
        >>> double = jaxws.jit(lambda x: 2 * x)
        >>> with outer:
        ...     with inner:
        ...         y = jaxws.leverage_to("OUTER", double(jnp.ones(2)))
        ...     print(y.tolist())
        [2.0, 2.0]
    """
    from jaxws.manager import get_workspace_manager

    manager = get_workspace_manager()
    ws = manager.workspace(target) if isinstance(target, str) else target
    if not isinstance(ws, Workspace):
        raise ConfigurationError(f"leverage_to(target={target!r}): expected a Workspace or its id.")
    ws._check_thread("leverage arrays to")
    if not ws.is_scope_active:
        raise WorkspaceError(
            f"leverage_to(target=[{ws.id}]): the workspace is not open. Leverage inside its "
            f"`with` block, or keep the arrays with jaxws.detach(tree)."
        )
    check_arrays("leverage_to", tree, "tree")

    def move(x):
        if isinstance(x, jax.Array):
            if getattr(x, _TAG, None) is not None:
                ws._attach(x, ws.generation)
            return x
        if isinstance(x, np.ndarray):
            y = jax.device_put(x)
            ws._attach(y, ws.generation)
            return y
        return x

    return jax.tree.map(move, tree)
