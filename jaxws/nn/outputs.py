"""Inference: ``output`` on the model's committed parameters, detached or into a workspace,
and ``rnn_time_step``'s program.

The forward pass is one jitted program per training flag; device inputs of a signature
judged before go to it as they are, found by that signature, as fit's step is.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax

from jaxws.arrays import check_arrays, leverage_to
from jaxws.data.dataset import DataSet, _device_key
from jaxws.data.dataset import signature as _signature
from jaxws.data.feed import _on_host, prepare
from jaxws.errors import WorkspaceError
from jaxws.interrupts import guarded
from jaxws.manager import get_workspace_manager
from jaxws.nn.modes import WorkspaceMode
from jaxws.step import WorkspaceFunction, jit
from jaxws.workspace import Workspace

__all__ = ["OutputMixin"]


@jax.jit
def _split(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(the model's next key, a key for this call)``: one cached program (~5 us) where an
    eager ``jax.random.split`` takes ~40 (Monte-Carlo dropout calls output per sample)."""
    new, sub = jax.random.split(key)
    return new, sub


class OutputMixin:
    """``output`` for a model with ``_apply``, ``_reseed``, ``_check_batch``, ``_carry``,
    ``_lock``, ``_rng``, ``_infer`` and ``_seen_batches``; and the program of
    ``rnn_time_step`` for one with a ``_dag``, ``_rnn_state`` and ``_rnn_fn``."""

    def _inference_fn(self, training: bool) -> WorkspaceFunction:
        """``infer(params, state, x, mask, key=None)``; ``key`` reseeds stochastic layers."""
        if training not in self._infer:
            def infer(params, state, x, mask, key=None):
                if key is not None:
                    state = self._reseed(state, key)
                return self._apply(params, state, x, mask, training, WorkspaceMode.SINGLE)[0]

            infer.__name__ = f"{type(self).__name__}.output"
            self._infer[training] = jit(infer)
        return self._infer[training]

    def output(
        self,
        x: Any,
        training: bool = False,
        *,
        mask: Any = None,
        key: jax.Array | None = None,
        workspace: Workspace | str | None = None,
    ) -> jax.Array:
        """The network's output for ``x``; safe while another thread runs ``fit``.

        Without ``workspace`` the result is detached: it belongs to no workspace and
        survives any later ``fit``. With an open ``workspace`` (or its id) the result is
        attached to it and dies with its cycle, as DL4J's output into a workspace. It is
        computed from the parameters committed when the call starts.

        ``training=True`` runs the layers as in training (dropout on, batch statistics)
        without changing any state: stochastic layers draw fresh randomness on every call
        (Monte-Carlo dropout), or the randomness of ``key`` (a ``jax.random.key``) when given.

        Raises:
            LeakedWorkspacePointerError, OutdatedWorkspacePointerError: ``x`` is dead.
            InvalidBatchError: ``x`` does not fit the model.
            WorkspaceError: ``workspace`` given while ``inference_workspace_mode`` is NONE,
                or not open.
        """
        self._require_init()
        check_arrays("output", x, "x")  # named as the caller wrote them
        check_arrays("output", mask, "mask")
        ds, signature = self._inference_input(DataSet(x, None, mask))
        return self._run_output(ds.features, ds.features_mask, training, key, workspace, signature)

    def _inference_input(self, ds: Any, op: str = "output", check: Callable | None = None) -> tuple[Any, Any]:
        """``(ds checked and ready for the program, its signature)``. Unattached device
        arrays of a signature checked before are used as they are, checked no more (their
        shapes were; dead ones were refused by the caller's ``check_arrays``). Host arrays
        have their shapes judged once per signature too; on the CPU small ones go to the
        program as copies that its call moves (as fit's host batches do), elsewhere they are
        placed first: no ``jax.device_put`` of a small batch on the CPU (~45 us of Python).
        ``op`` names the caller in errors and keys the signatures seen; ``check(ds, shapes)``
        replaces the model's batch check."""
        signature = _device_key(ds)
        seen = self._seen_batches.setdefault(op, set())
        if signature is not None and signature in seen:
            return ds, signature
        ds = prepare(ds, op, check or (lambda d, shapes=True: self._check_batch(d, op, shapes)), seen=seen, stage=True)
        signature = _device_key(ds)
        if signature is not None:  # placed by us, or unattached and passed through
            seen.add(signature)
        elif _on_host(ds):  # staged: copies, as the program may read them after output returns
            signature = _signature(ds)
        return ds, signature

    def _run_output(self, x: Any, mask: Any, training: bool, key: jax.Array | None,
                    workspace: Workspace | str | None, signature: Any = None) -> Any:
        """The inference program on checked device inputs, detached or into ``workspace``;
        with the inputs' ``signature`` (unattached device arrays), on jaxws.jit's lean path
        (the model's carry and checked inputs: no flatten of the parameters per call)."""
        fn = self._inference_fn(training)
        manager = get_workspace_manager()
        ws = None
        if workspace is not None:
            if self.inference_workspace_mode is WorkspaceMode.NONE:
                raise WorkspaceError(
                    "output(workspace=...) needs an inference workspace, but "
                    "inference_workspace_mode is WorkspaceMode.NONE. Drop workspace= to get a "
                    "detached array, or configure inference_workspace_mode=WorkspaceMode.ENABLED."
                )
            ws = manager.workspace(workspace) if isinstance(workspace, str) else workspace
            if not ws.is_scope_active:
                raise WorkspaceError(f"output(workspace=[{ws.id}]): the workspace is not open; call it inside `with ws:`.")
        # detached: computed outside every workspace; else in the open cycle, then moved to ws
        scope = manager.scope_out_of_workspaces() if ws is None else contextlib.nullcontext()
        with scope, self._lock:  # dispatched before any later step can donate the carry
            if training and key is None:  # the model's own randomness: its key's aval is known
                self._rng, key = _split(self._rng)
            elif training:
                signature = None  # a key of the user's, of any kind: the full path
            carry = self._carry
            args = (carry.params, carry.state, x, mask, key if training else None)
            out = fn(*args) if signature is None else fn._call_planned(signature, args)
        return out if ws is None else leverage_to(ws, out)

    # -- stateful step-by-step inference ---------------------------------------------------

    def _dag_lists(self, params: Any, state: Any) -> tuple[list, list]:
        """The parameters and layer state as the DAG executor takes them: lists by node."""
        return params, state

    def _rnn_outputs(self, xs: tuple, signature: Any, single: tuple, steps_only: bool) -> list:
        """``rnn_time_step``'s outputs for checked inputs ``xs`` (``single``: each given as
        one step, with no time axis; ``steps_only``: outputs lose their time axis), run from
        the carried RNN state, which they replace. The time axis is added and dropped inside
        the program (no eager op per call); inputs of a known ``signature`` go to it as
        ``output``'s do."""
        batch = xs[0].shape[0]
        state = self._rnn_state
        if state is None or (state and next(iter(state.values()))[0].shape[0] != batch):
            state = {str(i): self._dag.nodes[i].op.initial_carry(batch) for i in self._dag.recurrent()}
        fn = self._rnn_fn
        if fn is None:
            def rnn_step(rnn_state, params, layer_state, xs, single, steps_only):
                xs = [x[:, None] if one else x for x, one in zip(xs, single)]
                outs, new = self._dag.rnn(rnn_state, *self._dag_lists(params, layer_state), xs)
                return [o[:, 0] if steps_only and o.ndim == 3 else o for o in outs], new

            rnn_step.__name__ = f"{type(self).__name__}.rnn_time_step"
            donated = (0,) if self.inference_workspace_mode.donates else ()
            fn = self._rnn_fn = jit(rnn_step, donate_argnums=donated, static_argnames=("single", "steps_only"))
        kwargs = {"single": single, "steps_only": steps_only}
        # one commit: an interrupt after the call donated the state and before the new one was
        # kept left the model a deleted state, which every later call refused
        with get_workspace_manager().scope_out_of_workspaces(), self._lock, guarded() as guard, guard:
            carry = self._carry
            args = (state, carry.params, carry.state, tuple(xs))
            outs, self._rnn_state = fn(*args, **kwargs) if signature is None else fn._call_planned(signature, args, kwargs)
        return outs
