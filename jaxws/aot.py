"""Ahead-of-time stages of a jaxws step: ``lower()`` / ``compile()`` keep its checks."""

from __future__ import annotations

from typing import Any

import jax

from jaxws.manager import DebugMode, get_workspace_manager
from jaxws.plan import StepPlan, attach_fresh
from jaxws.workspace import _TAG

__all__ = ["Compiled", "Lowered"]


class Lowered:
    """``jax.stages.Lowered`` of a jaxws step; ``compile()`` keeps the donation checks.

    Everything else (``as_text``, ``cost_analysis``, ...) is the wrapped object's.
    """

    def __init__(self, fun: Any, lowered: Any, analysis: tuple, leaves: list):
        self._fun = fun
        self._lowered = lowered
        self._analysis = analysis
        self._leaves = leaves

    def compile(self, *args: Any, **kwargs: Any) -> Compiled:
        """Compiles; raises DonationError if XLA would not reuse every donated byte."""
        plan, compiled = self._fun._finish(self._analysis, lambda: self._lowered.compile(*args, **kwargs), self._leaves)
        return Compiled(self._fun, compiled, plan)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lowered, name)


class Compiled:
    """``jax.stages.Compiled`` of a jaxws step: its calls check and attach as the step's do.

    Called with the dynamic arguments (no static ones), as JAX's compiled objects are.
    """

    def __init__(self, fun: Any, compiled: Any, plan: StepPlan):
        self._fun = fun
        self._compiled = compiled
        self.plan = plan

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fun = self._fun
        leaves = jax.tree.leaves((args, kwargs))
        tags = [getattr(x, _TAG, None) for x in leaves]
        if any(tags):
            fun._check_alive(lambda: fun._leaf_names(args, kwargs, static=False), leaves, tags)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as e:
            fun._explain(e, lambda: fun._leaf_names(args, kwargs, static=False), leaves, self.plan)
            raise
        manager = get_workspace_manager()
        if manager.debug_mode is not DebugMode.BYPASS_EVERYTHING:
            if any(tags):
                fun._attach_inputs(self.plan, leaves, tags, out)
            ws = manager.current_workspace
            if ws is not None and self.plan.fresh:
                attach_fresh(ws, self.plan, out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compiled, name)
