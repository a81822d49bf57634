"""``jaxws.jit``: ``jax.jit`` that verifies donation and attaches outputs to workspaces.

Checked once per input signature (at trace time, before anything runs): every donated
leaf must be reused by an output, or the step would silently hold two copies.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import operator
import types
import warnings
from typing import Any, Callable, Sequence

import jax

from jaxws._internals import EVAL_TRACE as _EVAL_TRACE
from jaxws._internals import flatten as _flatten
from jaxws._internals import trace_state as _trace_state
from jaxws.aot import Compiled, Lowered
from jaxws.arrays import stale_error
from jaxws.errors import ConfigurationError, DeletedArrayError, DonationError, DonationWarning
from jaxws.manager import DebugMode, get_workspace_manager
from jaxws.manager import _local as _thread_local
from jaxws.memory import MemoryPlan, format_bytes, tree_bytes
from jaxws.plan import (
    StepPlan,
    _as_tuple,
    _device_bytes,
    _leaf_key,
    _paths,
    _twice_donated,
    attach_fresh,
    match_outputs,
    several_cpu_devices,
    unusable_donation_message,
    unusable_sharding_message,
    wait_if_across_cpus,
)
from jaxws.workspace import _TAG

__all__ = ["jit", "WorkspaceFunction", "StepPlan", "Lowered", "Compiled"]


_aval = operator.attrgetter("aval")
_TAGS = itertools.repeat(_TAG)  # map(hasattr, leaves, _TAGS): a tag test per leaf, no frame
_KWARGS = object()  # marks a signature with keyword arguments (no static ones)
_DISABLED = DebugMode.DISABLED


class WorkspaceFunction:
    """A jitted step under jaxws; made by :func:`jaxws.jit`.

    It has ``jax.jit``'s surface: it binds as a method (``self`` static or a pytree),
    and offers ``lower`` / ``trace`` / ``eval_shape`` / ``clear_cache``. Called under
    another transformation (``grad``, ``vmap``, ``scan``, an outer ``jit``,
    ``shard_map``) it is ``jax.jit`` exactly: it inlines, and workspace bookkeeping
    applies only to concrete arrays.
    """

    def __init__(
        self,
        fun: Callable,
        *,
        donate_argnums: int | Sequence[int] = (),
        donate_argnames: str | Sequence[str] = (),
        unusable_donation: str = "raise",
        **jit_kwargs: Any,
    ):
        if unusable_donation not in ("raise", "warn"):
            raise ConfigurationError(
                f"jaxws.jit(unusable_donation={unusable_donation!r}): expected 'raise' (the "
                "default: an undonatable leaf is an error) or 'warn'."
            )
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._name = getattr(fun, "__name__", "step")
        self._unusable_policy = unusable_donation
        self._jit_kwargs = jit_kwargs
        # None, not (): jax maps names to positions (and back) only for what is left None
        self._donating = jax.jit(
            fun,
            donate_argnums=_as_tuple(donate_argnums) or None,
            donate_argnames=_as_tuple(donate_argnames) or None,
            **jit_kwargs,
        )
        self._plain_jit: Callable | None = None  # without donation: spills and bypass
        self._plans: dict[Any, StepPlan] = {}
        self._planned: dict[Any, StepPlan] = {}  # caller-given signature -> plan (_call_planned)
        self._plain_keys: set = set()
        self.compiles = 0
        self._static_nums, self._static_names = self._resolve_static(fun, jit_kwargs)

    @staticmethod
    def _resolve_static(fun: Callable, kw: dict) -> tuple[frozenset, frozenset]:
        nums = set(_as_tuple(kw.get("static_argnums")))
        names = set(_as_tuple(kw.get("static_argnames")))
        try:
            params = list(inspect.signature(fun).parameters.values())
        except (TypeError, ValueError):
            return frozenset(nums), frozenset(names)
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        nums |= {i for i, n in enumerate(positional) if n in names}
        names |= {positional[i] for i in nums if 0 <= i < len(positional)}
        return frozenset(nums), frozenset(names)

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        """Binds as a method, as ``jax.jit`` does: ``obj.step(x)`` calls ``step(obj, x)``."""
        return self if obj is None else types.MethodType(self, obj)

    # -- the call --------------------------------------------------------------------------

    def _split(self, args: tuple, kwargs: dict) -> tuple[tuple, Any]:
        if not (self._static_nums or self._static_names):
            return (args, kwargs), None
        n = len(args)
        nums = {i % n if i < 0 else i for i in self._static_nums if -n <= i < n}
        dyn_args = tuple(a for i, a in enumerate(args) if i not in nums)
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self._static_names}
        static = (
            tuple((i, args[i]) for i in sorted(nums)),
            tuple(sorted((k, v) for k, v in kwargs.items() if k in self._static_names)),
        )
        return (dyn_args, dyn_kwargs), static

    def _leaf_names(self, args: tuple, kwargs: dict, static: bool = True) -> list[str]:
        """The argument path of every dynamic leaf (``static=False``: no static args given)."""
        keystr = jax.tree_util.keystr
        n = len(args)
        nums = {i % n if i < 0 else i for i in self._static_nums if -n <= i < n} if static else set()
        names = []
        for i, a in enumerate(args):
            if i not in nums:
                names += [f"args[{i}]{keystr(p)}" for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
        for k in sorted(kwargs):
            if not static or k not in self._static_names:
                names += [f"{k}{keystr(p)}" for p, _ in jax.tree_util.tree_flatten_with_path(kwargs[k])[0]]
        return names

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # the hot path, once per step: one flatten, one lookup keyed on the leaves' cached
        # avals, per-leaf work in C (map over builtins), the admission's fast path; every
        # Python frame here is paid per step, so the trace and thread lookups are inline
        if self._static_nums or self._static_names or kwargs:
            leaves, treedef, static = self._flat(args, kwargs)
        else:  # the same leaves as (args, {}), flattened cheaper
            leaves, treedef = _flatten(args)
            static = None
        tags = None
        if any(map(hasattr, leaves, _TAGS)):
            tags = [getattr(x, _TAG, None) for x in leaves]
            self._check_alive(lambda: self._leaf_names(args, kwargs), leaves, tags)
        if _trace_state.value is not _EVAL_TRACE:
            return self._donating(*args, **kwargs)  # under grad / vmap / scan / an outer jit
        try:  # one flat tuple: one allocation and one hash fewer than a nested tuple of avals
            key = (treedef, static, *map(_aval, leaves))
        except AttributeError:  # numpy arrays, Python scalars
            key = (treedef, static, *map(_leaf_key, leaves))
        plan = self._plans.get(key)
        try:
            manager = _thread_local.manager  # get_workspace_manager(), a frame fewer
        except AttributeError:
            manager = get_workspace_manager()
        stack = manager._stack
        ws = stack[-1] if stack else None
        if plan is None:
            plan = self._plans[key] = self._make_plan(args, kwargs, leaves)
            if ws is not None:
                ws.compiles += 1
                if plan.memory is not None:
                    ws.plans[self._name] = plan.memory
        if plan.watch:  # XLA's CPU all-reduce deadlocks with dozens of calls queued
            wait_if_across_cpus(leaves[plan.donated[0]])
        debug = manager.debug_mode
        if debug is _DISABLED:
            fun = self._donating
            if ws is not None and not ws._admit(plan, self._name):
                fun = self._plain_for(key)
        elif debug is DebugMode.BYPASS_EVERYTHING:
            return self._run(self._plain_for(key), args, kwargs, leaves)
        else:  # SPILL_EVERYTHING
            if ws is not None:
                ws._admit(plan, self._name, spill_all=True)
            fun = self._plain_for(key)
        try:
            out = fun(*args, **kwargs)
        except Exception as e:
            self._explain(e, lambda: self._leaf_names(args, kwargs), leaves, plan)
            raise
        if tags is not None:
            self._attach_inputs(plan, leaves, tags, out)
        if ws is not None and plan.fresh:
            attach_fresh(ws, plan, out)
        return out

    def _call_planned(self, signature: Any, args: tuple, kwargs: dict | None = None) -> Any:
        """A call whose caller vouches for its arguments: ``signature`` stands for their
        structure and avals, and no argument is attached to a workspace or dead (fit's own
        loop: the model's carry, a checked batch). The first call of a signature goes
        through :meth:`__call__` (the plan, the donation check); later ones skip the flatten
        and the per-leaf checks, and still admit, donate and attach as a call does."""
        kwargs = kwargs or {}
        plan = self._planned.get(signature)
        try:
            manager = _thread_local.manager  # get_workspace_manager(), a frame fewer
        except AttributeError:
            manager = get_workspace_manager()
        if plan is None or manager.debug_mode is not _DISABLED:
            out = self(*args, **kwargs)
            plan = self._plan_of(args, kwargs)  # this call's, whatever other threads called since
            if plan is not None:
                self._planned[signature] = plan
            return out
        if plan.watch:
            wait_if_across_cpus(self._flat(args, kwargs)[0][plan.donated[0]])
        stack = manager._stack
        ws = stack[-1] if stack else None
        fun = self._donating
        if ws is not None and not ws._admit(plan, self._name):
            fun = self._plain_for(("planned", signature))  # a spill: nothing donated
        try:
            out = fun(*args, **kwargs)
        except Exception as e:
            leaves = jax.tree.leaves(self._split(args, kwargs)[0])
            self._explain(e, lambda: self._leaf_names(args, kwargs), leaves, plan)
            raise
        if ws is not None and plan.fresh:
            attach_fresh(ws, plan, out)
        return out

    def _flat(self, args: tuple, kwargs: dict) -> tuple[list, Any, Any]:
        """``(leaves, treedef, static)`` of a call's dynamic arguments, as plans are keyed."""
        if self._static_nums or self._static_names:
            dyn, static = self._split(args, kwargs)
            return (*jax.tree_util.tree_flatten(dyn), static)
        if kwargs:
            return (*jax.tree_util.tree_flatten((args, kwargs)), _KWARGS)
        return (*_flatten(args), None)

    def _plan_of(self, args: tuple, kwargs: dict) -> StepPlan | None:
        """The plan :meth:`__call__` made for these arguments (None where it made none: under
        a trace), looked up by the key it computes (inline there: the per-step path)."""
        leaves, treedef, static = self._flat(args, kwargs)
        try:
            key = (treedef, static, *map(_aval, leaves))
        except AttributeError:
            key = (treedef, static, *map(_leaf_key, leaves))
        return self._plans.get(key)

    def _plain_for(self, key: Any) -> Callable:
        """The non-donating jit (spills, debug modes), counting its compiles."""
        if key not in self._plain_keys:
            self._plain_keys.add(key)
            self.compiles += 1
        return self._plain()

    def _explain(self, e: Exception, names: Callable[[], list], leaves: list, plan: StepPlan | None) -> None:
        """Raises the jaxws error a failed call stands for (a dead input, a twice-donated buffer)."""
        for i, x in enumerate(leaves):
            if isinstance(x, jax.Array) and x.is_deleted():
                raise DeletedArrayError(self._name, names()[i], str(x.aval)) from e
        if _twice_donated(e):
            if plan is not None and plan.donated:
                self._check_donated_once(names, leaves, plan.donated)
            raise DonationError(  # two arrays sharing one buffer: XLA refused before running
                f"Op [{self._name}]: a donated buffer is passed twice in one call ({str(e).splitlines()[0]}). "
                "Pass each donated array once, or a copy (jaxws.detach(x)) for the second use. "
                "Nothing ran and the arrays are intact."
            ) from e

    def _check_alive(self, names: Callable[[], list], leaves: list, tags: list) -> None:
        for i, attachment in enumerate(tags):
            if attachment is not None:
                ws = attachment.workspace
                if ws._destroyed or attachment.generation <= ws._invalid_through:
                    raise stale_error(self._name, names()[i], leaves[i])

    def _run(self, fun: Callable, args: tuple, kwargs: dict, leaves: list) -> Any:
        try:
            return fun(*args, **kwargs)
        except Exception as e:
            self._explain(e, lambda: self._leaf_names(args, kwargs), leaves, None)
            raise

    @staticmethod
    def _attach_inputs(plan: StepPlan, leaves: list, tags: list, out: Any) -> None:
        """Outputs reusing or returning an attached input keep its attachment."""
        out_leaves = jax.tree.leaves(out)
        for j, i in plan.inherit:
            attachment = tags[i]
            if attachment is not None:  # a carry: it came back from a donated step
                attachment.workspace._attach(out_leaves[j], attachment.generation, carried=True)
        for j, i in plan.forwarded:  # JAX returns the input object itself, or a new one over its buffer
            attachment = tags[i]
            if attachment is not None and out_leaves[j] is not leaves[i]:
                attachment.workspace._attach(out_leaves[j], attachment.generation, attachment.carried)

    def _check_donated_once(self, names: Callable[[], list], leaves: list, donated: tuple) -> None:
        """Raises DonationError naming the paths if a donated array also fills another argument."""
        where: dict[int, list[int]] = {}
        for i, x in enumerate(leaves):
            if isinstance(x, jax.Array):
                where.setdefault(id(x), []).append(i)
        for i in donated:
            uses = where.get(id(leaves[i]), [])
            if len(uses) > 1:
                path = names()
                listed = ", ".join(path[j] + (" (donated)" if j in donated else "") for j in uses)
                raise DonationError(
                    f"Op [{self._name}]: one array is passed {len(uses)} times in this call ({listed}) "
                    "and donated, so its buffer would be consumed by one use while another still "
                    "reads it. Nothing ran and the array is intact.\n"
                    "Fix: pass it once, or pass a copy for the other uses:\n"
                    "  wrong:  step(params, params)          # donate_argnums=0\n"
                    "  right:  step(params, jaxws.detach(params))"
                )

    def _plain(self) -> Callable:
        if self._plain_jit is None:
            self._plain_jit = jax.jit(self._fun, **self._jit_kwargs)
        return self._plain_jit

    # -- once per signature ----------------------------------------------------------------

    def _analyse(self, traced: Any, args: tuple, kwargs: dict, leaves: list) -> tuple:
        """Matches donated inputs to outputs as XLA does; raises for a leaf none can reuse."""
        infos = jax.tree.leaves(traced.args_info)
        outs = jax.tree.leaves(traced.out_info)
        jaxpr = traced.jaxpr.jaxpr
        if len(infos) != len(leaves) or len(jaxpr.invars) != len(leaves):
            raise AssertionError(
                f"jaxws.jit({self._name}): {len(leaves)} input leaves but JAX traced "
                f"{len(infos)}; please report this with the call's argument structure."
            )
        donated, inherit, forwarded, fresh, unused = match_outputs(infos, outs, jaxpr)
        if unused:
            self._unusable(unusable_donation_message(self._name, self._leaf_names(args, kwargs), infos, outs, unused))
        return infos, outs, traced.out_info, donated, inherit, forwarded, fresh, bool(unused)

    def _finish(self, analysis: tuple, compile_: Callable[[], Any], leaves: list) -> tuple[StepPlan, Any]:
        """Compiles, checks that XLA reuses every donated byte, and builds the plan."""
        infos, outs, out_info, donated, inherit, forwarded, fresh, unused = analysis
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = compile_()
        self.compiles += 1
        for w in caught:
            if str(w.message).startswith("Some donated buffers were not usable") and not unused:
                self._unusable(unusable_sharding_message(self._name, str(w.message).splitlines()[0]))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        memory = MemoryPlan.from_compiled(compiled)
        reused = sum(_device_bytes(leaves[i], infos[i]) for _, i in inherit)
        if memory is not None and memory.alias_bytes < reused and not unused:
            self._unusable(unusable_sharding_message(
                self._name, f"XLA reuses {format_bytes(memory.alias_bytes)} of the {format_bytes(reused)} donated"))
        plan = StepPlan(
            donated=donated,
            inherit=inherit,
            forwarded=forwarded,
            fresh=fresh,
            out_bytes=sum(tree_bytes(outs[j]) for j in fresh),
            memory=memory,
            fresh_paths=_paths(out_info, fresh),
            temp_bytes=memory.temp_bytes if memory is not None else 0,
            watch=bool(donated) and several_cpu_devices(),
        )
        return plan, compiled

    def _make_plan(self, args: tuple, kwargs: dict, leaves: list) -> StepPlan:
        traced = self._donating.trace(*args, **kwargs)
        analysis = self._analyse(traced, args, kwargs, leaves)
        return self._finish(analysis, lambda: traced.lower().compile(), leaves)[0]

    def _unusable(self, message: str) -> None:
        """Raises, or warns (``unusable_donation='warn'``), that donated bytes would be copied."""
        if self._unusable_policy == "raise":
            raise DonationError(message)
        warnings.warn(message, DonationWarning, stacklevel=5)

    # -- jax.jit's surface -----------------------------------------------------------------

    def lower(self, *args: Any, **kwargs: Any) -> Lowered:
        """Ahead-of-time lowering of the donating step, with jaxws's checks kept.

        Donated leaves that no output can reuse raise DonationError here, before any
        compile; ``.compile()`` checks that XLA reuses every donated byte, and the
        compiled step it returns attaches and validates arrays as a call of this function
        does. AOT calls always donate: workspace spill policies do not apply to them.
        """
        leaves = jax.tree.leaves(self._split(args, kwargs)[0])
        traced = self._donating.trace(*args, **kwargs)
        analysis = self._analyse(traced, args, kwargs, leaves)
        return Lowered(self, traced.lower(), analysis, leaves)

    def trace(self, *args: Any, **kwargs: Any):
        """``jax.jit(...).trace`` of the donating step."""
        return self._donating.trace(*args, **kwargs)

    def eval_shape(self, *args: Any, **kwargs: Any):
        return self._donating.eval_shape(*args, **kwargs)

    def clear_cache(self) -> None:
        """Forgets every compiled program and plan, as ``jax.jit``'s ``clear_cache``."""
        self._donating.clear_cache()
        if self._plain_jit is not None:
            self._plain_jit.clear_cache()
        self._plans.clear()
        self._planned.clear()
        self._plain_keys.clear()

    def memory_plan(self, *args: Any, **kwargs: Any) -> MemoryPlan | None:
        """XLA's memory plan of the donating step for these arguments."""
        return MemoryPlan.from_compiled(self._donating.lower(*args, **kwargs).compile())

    @property
    def plans(self) -> list[StepPlan]:
        """The plans made so far, one per input signature."""
        return list(self._plans.values())

    def __repr__(self) -> str:
        return f"jaxws.jit({self._name})"


def jit(
    fun: Callable | None = None,
    *,
    donate_argnums: int | Sequence[int] = (),
    donate_argnames: str | Sequence[str] = (),
    unusable_donation: str = "raise",
    **jax_jit_kwargs: Any,
) -> WorkspaceFunction | Callable[[Callable], WorkspaceFunction]:
    """A drop-in for ``jax.jit`` that keeps workspace discipline.

    * Donated inputs come back in the same buffers; an output that reuses a donated
      input's buffer, or returns a non-donated input as it is, inherits that input's
      workspace attachment (a carry made outside every workspace, or detached, persists
      across cycles; so does a value that merely passes through).
    * Every other output belongs to the innermost open workspace cycle, if any, and dies
      with it unless detached.
    * Arrays from ended cycles or destroyed workspaces are refused with
      LeakedWorkspacePointerError / OutdatedWorkspacePointerError.
    * Once per input signature, before anything runs, every donated leaf is matched to an
      output of the same shape and dtype, as XLA does; one that matches none raises
      DonationError naming the leaf and both avals. No host sync is added per call.
    * Under another transformation (grad, vmap, scan, an outer jit) it is jax.jit.

    Args:
        fun: the step; may be omitted to use ``jit`` as a decorator factory.
        donate_argnums, donate_argnames: as in ``jax.jit``.
        unusable_donation: ``"raise"`` (default) or ``"warn"`` for a donated leaf that
            cannot be reused.
        **jax_jit_kwargs: passed to ``jax.jit`` (``static_argnums``, shardings, ...).

    Example:
        >>> import jax.numpy as jnp, jaxws
        >>> @jaxws.jit(donate_argnums=0)
        ... def step(w, x):
        ...     return w - 0.1 * x
        >>> w = jnp.zeros(3)
        >>> new_w = step(w, jnp.ones(3))
        >>> w.is_deleted(), new_w.tolist()
        (True, [-0.10000000149011612, -0.10000000149011612, -0.10000000149011612])
    """
    if fun is None:
        return functools.partial(
            jit,
            donate_argnums=donate_argnums,
            donate_argnames=donate_argnames,
            unusable_donation=unusable_donation,
            **jax_jit_kwargs,
        )
    return WorkspaceFunction(
        fun,
        donate_argnums=donate_argnums,
        donate_argnames=donate_argnames,
        unusable_donation=unusable_donation,
        **jax_jit_kwargs,
    )
