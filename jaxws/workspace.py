"""Workspaces: cycles that own the arrays made in them, and invalidate them at the end.

A workspace is a host-side object. Arrays returned by jaxws entry points inside a cycle are
attached to it (a tag on the array) and deleted when the cycle ends, unless detached.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.configuration import (
    LearningPolicy,
    ResetPolicy,
    SpillPolicy,
    WorkspaceConfiguration,
)
from jaxws.errors import ConfigurationError, DonationWarning, WorkspaceError, WorkspaceFullError

if TYPE_CHECKING:
    from jaxws.manager import WorkspaceManager
    from jaxws.memory import MemoryPlan
    from jaxws.plan import StepPlan

__all__ = ["Workspace", "WorkspaceStatistics"]

_TAG = "_jaxws_attachment"  # attribute set on every attached jax.Array
_get_ident = threading.get_ident
_getframe = sys._getframe
_PAUSES = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR  # frames that pause


class _Attachment:
    """Which workspace cycle an array belongs to; ``carried``: it came back from a donated step."""

    __slots__ = ("workspace", "generation", "carried")

    def __init__(self, workspace: Workspace, generation: int, carried: bool = False):
        self.workspace = workspace
        self.generation = generation
        self.carried = carried


@dataclasses.dataclass(frozen=True)
class WorkspaceStatistics:
    """What a workspace owns and has needed; one row of the allocation statistics."""

    id: str
    cycles: int
    generation: int
    current_size: int
    peak_size: int
    spilled_bytes: int
    spills: int
    reallocations: int
    live_arrays: int
    live_bytes: int
    compiles: int
    capacities: dict[str, int]
    plans: dict[str, MemoryPlan]


class Workspace:
    """A cyclic memory scope; ``with ws:`` is one cycle.

    Arrays that jaxws entry points return inside a cycle belong to it. When the cycle
    ends they are deleted at once (``ResetPolicy.BLOCK_LEFT``) or after ``steps_number``
    cycles (``ResetPolicy.ENDOFBUFFER_REACHED``), unless detached. Buffers donated to a
    step keep their attachment: a carry created outside every workspace (or detached)
    persists across cycles in the same memory.

    Workspaces are made by the thread's manager and belong to that thread.

    Example:
        >>> import jax.numpy as jnp, jaxws
        >>> step = jaxws.jit(lambda p, x: (p - 0.1 * x, (p * x).sum()), donate_argnums=0)
        >>> params = jnp.ones(4)
        >>> ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="DOC")
        >>> for _ in range(3):
        ...     with ws:
        ...         params, loss = step(params, jnp.ones(4))
        ...         kept = jaxws.detach(loss)
        >>> loss.is_deleted(), round(float(kept), 4), ws.cycles
        (True, 3.2, 3)
    """

    def __init__(self, manager: WorkspaceManager, config: WorkspaceConfiguration, id: str):
        self.id = id
        self.config = config
        self._manager = manager
        self._owner = threading.get_ident()
        self.generation = 0  # cycles entered; arrays are tagged with it
        self.cycles = 0  # cycles completed
        self._depth = 0
        self._pending_activation = False
        self._opener, self._opener_at = None, -1  # the frame that opened the cycle, and where
        self._invalid_through = 0  # arrays of generations <= this are invalid
        self._destroyed = False
        self._arrays: dict[int, list[weakref.ref]] = {}
        self._slot: Any = ()  # a ring's current slot (async iterators): strong references
        self.current_size = config.initial_size
        self._initialized = config.policy_learning is LearningPolicy.NONE
        self._learning = not self._initialized  # learns step sizes (policy_learning is not NONE)
        # cycles an array outlives its own: 0 with BLOCK_LEFT, steps_number - 1 for a ring
        self._lag = 0 if config.policy_reset is ResetPolicy.BLOCK_LEFT else config.steps_number - 1
        self._learned = 0
        self.peak_size = 0
        self.spilled_bytes = 0
        self.spills = 0
        self.reallocations = 0
        self.compiles = 0
        self._steps: set = set()  # step signatures whose needs were learned
        self._warned: set = set()  # step signatures already warned about a lost donation
        self.plans: dict[str, MemoryPlan] = {}
        self.capacities: dict[str, int] = {}
        self._cycle_out = 0  # bytes of outputs made inside the workspace this cycle
        self._cycle_temp = 0  # largest working memory of a step this cycle
        self._cycle_need = 0  # what the cycle needed, spilled calls included

    # -- scope -----------------------------------------------------------------------------

    @property
    def is_scope_active(self) -> bool:
        """True inside a cycle."""
        return self._depth > 0

    @property
    def is_destroyed(self) -> bool:
        return self._destroyed

    def activate(self) -> Workspace:
        """Enters a cycle without ``with``; :meth:`close` ends it.

        ``with manager.get_and_activate_workspace(...) as ws:`` uses this: the ``with``
        statement then owns the cycle that activation opened.
        """
        self._enter()
        self._pending_activation = True
        return self

    def close(self) -> None:
        """Leaves one scope level; leaving the outermost one ends the cycle."""
        self._pending_activation = False
        self._exit()

    def __enter__(self) -> Workspace:
        if self._depth == 0 and self._owner == _get_ident() and not self._destroyed:
            # the loop's path, once per step: _enter's outermost case and the manager's
            # _scope_entered, inline
            self._depth = 1
            self.generation += 1
            self._opener = opener = _getframe(1)  # who opened it: see _skipped_exit
            self._opener_at = opener.f_lasti
            manager = self._manager
            manager._active += 1
            try:  # an interrupt raised after the append (or in gc's thread start) ends the cycle
                manager._stack.append(self)
                if manager._active == 1 and not manager._memory._gc_off:
                    manager._memory._loop_entered()
            except BaseException:
                self.__exit__(None, None, None)
                raise
        elif self._pending_activation:
            self._pending_activation = False  # the cycle activate() opened
        elif self._skipped_exit():
            self.__exit__(None, None, None)  # the exit an interrupt skipped: that cycle ends now
            self.__enter__()
            self._opener, self._opener_at = (opener := _getframe(1)), opener.f_lasti
        else:
            self._enter()
        return self

    def _skipped_exit(self) -> bool:
        """Whether the open cycle's ``__exit__`` never ran (an interrupt during a ``with ws:``
        body's last call is raised as ``__exit__`` starts, before its first line): the frame
        that opened it has returned (not a generator's: those pause in cycles), or enters it
        again at the same ``with`` statement (a loop that went on)."""
        if self._depth != 1 or self._opener is None or self._owner != _get_ident() or self._destroyed:
            return False
        caller = _getframe(2)
        if self._opener is caller:
            return caller.f_lasti == self._opener_at
        return self._opener_returned(caller)

    def _opener_returned(self, frame: Any) -> bool:
        """Whether the frame that opened the cycle is off the stack that ``frame`` (the owning
        thread's) tops; False where that cannot tell (none recorded, or a generator's)."""
        opener = self._opener
        if opener is None or opener.f_code.co_flags & _PAUSES:
            return False
        while frame is not None and frame is not opener:
            frame = frame.f_back
        return frame is None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._depth != 1 or self._owner != _get_ident() or self._destroyed:
            self._exit()  # nested, another thread's or destroyed: the checks and their errors
            return
        # the loop's path, once per step, and the one implementation of a cycle's end (_exit
        # comes here for the outermost level); the manager's _scope_left and _loop_left inline
        self._depth = 0
        self._opener = None
        manager = self._manager
        try:  # an interrupt among the deletions still leaves the scope (they are outdated anyway)
            generation = self.generation - self._lag
            if generation == self._invalid_through + 1:  # the usual case: one cycle to invalidate
                refs = self._arrays.pop(generation, None)
                self._invalid_through = generation
                if refs:
                    self._delete(refs, generation)
            else:
                self._invalidate_through(generation)
            need = self._cycle_need
            if need > self.peak_size:
                self.peak_size = need
            self.cycles += 1
            if not self._initialized:
                self._learned = max(self._learned, need)
                if self.cycles >= self.config.learning_cycles:
                    self.current_size = max(self.current_size, self.config.round_up(self._learned))
                    self._initialized = True
            self._cycle_out = self._cycle_temp = self._cycle_need = 0
        finally:
            stack = manager._stack
            if stack and stack[-1] is self:
                stack.pop()
                manager._active -= 1
                if manager._active == 0:  # the manager's _loop_left
                    manager._loops += 1
                    memory = manager._memory
                    if memory._collect_due:
                        memory._collect()
            else:
                manager._scope_left(self)

    def _enter(self) -> None:
        if self._owner != threading.get_ident():
            self._check_thread("enter")
        if self._destroyed:
            raise WorkspaceError(
                f"Workspace [{self.id}] was destroyed; get a new one with "
                "get_workspace_manager().get_workspace_for_current_thread(conf, id)."
            )
        self._depth += 1
        if self._depth == 1:  # re-entering an active workspace nests, as ND4J does
            self.generation += 1
            self._manager._scope_entered(self)

    def _exit(self) -> None:
        if self._owner != threading.get_ident():
            self._check_thread("close")
        if self._destroyed:
            return  # destroyed inside its cycle (destroy_all from a listener): already closed
        if self._depth == 0:
            raise WorkspaceError(f"Workspace [{self.id}] was closed more often than it was entered.")
        if self._depth > 1:
            self._depth -= 1
        else:
            self.__exit__(None, None, None)  # the outermost level: the cycle ends

    def _delete(self, refs: list, generation: int) -> None:
        """Deletes the still-live arrays of ``refs`` that still belong to ``generation`` here."""
        for ref in refs:
            array = ref()
            if array is None or array.is_deleted():
                continue
            attachment = getattr(array, _TAG)  # leverage_to may have moved it (workspace, cycle)
            if attachment.workspace is self and attachment.generation == generation:
                array.delete()

    def _invalidate_through(self, generation: int) -> None:
        for g in range(self._invalid_through + 1, generation + 1):
            refs = self._arrays.pop(g, None)
            if refs:
                self._delete(refs, g)
        self._invalid_through = max(self._invalid_through, generation)

    # a ring (async iterators): one slot per cycle, advanced without opening a scope
    def _release_slot(self) -> None:
        """Invalidates the slot handed out last (the consumer asked for the next one)."""
        if self._owner != threading.get_ident():
            self._check_thread("advance")
        if self.generation > self._invalid_through:
            for array in self._slot:  # the ring's own arrays, held strongly for one slot
                array.delete()
            self._slot = ()
            self._invalid_through = self.generation
            self.cycles += 1

    def _hold_slot(self, arrays: list) -> None:
        """Attaches ``arrays`` as the new slot; they stay valid until the next release."""
        if self._owner != threading.get_ident():
            self._check_thread("advance")
        self.generation += 1
        if arrays:  # none when the batch passed through (the caller's arrays)
            attachment = _Attachment(self, self.generation)  # one tag for the whole slot
            for array in arrays:
                setattr(array, _TAG, attachment)
        self._slot = arrays

    def _destroy(self) -> None:
        self._invalidate_through(self.generation)
        for array in self._slot:
            array.delete()
        self._slot = ()
        self._depth = 0
        self._opener = None
        self._pending_activation = False
        self._destroyed = True

    def _check_thread(self, what: str) -> None:
        if threading.get_ident() != self._owner:
            raise WorkspaceError(
                f"Workspace [{self.id}] belongs to thread {self._owner}; thread "
                f"{threading.get_ident()} tried to {what} it. Workspaces are confined to the "
                "thread that made them: get one for this thread with "
                "jaxws.get_workspace_manager().get_workspace_for_current_thread(conf, id)."
            )

    # -- arrays ----------------------------------------------------------------------------

    def _attach(self, array: jax.Array, generation: int, carried: bool = False) -> None:
        setattr(array, _TAG, _Attachment(self, generation, carried))
        self._arrays.setdefault(generation, []).append(weakref.ref(array))

    def live_arrays(self) -> list[jax.Array]:
        """The arrays this workspace owns that are still alive."""
        live = [ref() for refs in self._arrays.values() for ref in refs] + list(self._slot)
        found = {id(a): a for a in live if a is not None and not a.is_deleted()}
        return [a for a in found.values() if getattr(a, _TAG).workspace is self]

    def live_bytes(self) -> int:
        """Bytes of the arrays this workspace owns that are still alive."""
        return sum(a.nbytes for a in self.live_arrays())

    # -- sizes and capacities --------------------------------------------------------------

    def _admit(self, plan: StepPlan, what: str, spill_all: bool = False) -> bool:
        """Decides whether a step runs inside the workspace (donating) or spills.

        ``plan`` is the step's for this signature: its fresh outputs' bytes and XLA's
        working memory (not counted when ``spill_all``). Sizes are learned per signature:
        a step first seen after the learning cycles is learned then (the workspace grows
        to hold it), so a small first cycle never shrinks a later, larger step into a
        spill. A known step that needs more follows the spill policy; spilling a donating
        step costs its donation, which warns once (DonationWarning) with the sizes and
        the fix.
        """
        out_bytes = plan.out_bytes
        temp_bytes = 0 if spill_all else plan.temp_bytes
        cycle_temp = self._cycle_temp
        need = self._cycle_out + out_bytes + (cycle_temp if cycle_temp > temp_bytes else temp_bytes)
        if need > self._cycle_need:
            self._cycle_need = need
        learning = self._learning
        if not spill_all and (need <= self.current_size or not self._initialized):
            # the loop's path, once per step: it fits (or the workspace is still learning)
            if learning:
                self._steps.add(id(plan))
            self._cycle_out += out_bytes
            if temp_bytes > cycle_temp:
                self._cycle_temp = temp_bytes
            return True
        step = id(plan)  # the signature's identity
        inside = not spill_all
        if inside:  # the workspace learned its size and this cycle needs more
            new_step = learning and step not in self._steps
            policy = SpillPolicy.REALLOCATE if new_step else self.config.policy_spill
            if policy is SpillPolicy.FAIL:
                raise WorkspaceFullError(self.id, what, need, self.current_size, "bytes")
            if policy is SpillPolicy.REALLOCATE:
                # no arena to move in JAX: grow before the call, which then donates as usual
                self.current_size = max(self.current_size, self.config.round_up(need))
                self.reallocations += not new_step
            inside = need <= self.current_size  # max_size may still be too small: spill
        if learning:
            self._steps.add(step)
        if inside:
            self._cycle_out += out_bytes
            self._cycle_temp = max(self._cycle_temp, temp_bytes)
        else:
            self.spills += 1
            self.spilled_bytes += out_bytes + temp_bytes
            if plan.donated and not spill_all and step not in self._warned:
                self._warned.add(step)
                warnings.warn(
                    f"Op [{what}] ran outside workspace [{self.id}] without donation: the cycle "
                    f"needs {need:,} bytes and the workspace holds {self.current_size:,} "
                    f"(policy_spill={self.config.policy_spill}, max_size={self.config.max_size:,}). "
                    "Its donated inputs were copied, not reused: twice their memory while it runs.\n"
                    "Fix: policy_spill=SpillPolicy.REALLOCATE (grow), a larger initial_size / "
                    "max_size, or learn over more cycles (LearningPolicy.OVER_TIME).",
                    DonationWarning, stacklevel=4,
                )
        return inside

    def pad(self, tree: Any, axis: int, *, name: str | None = None, fill: Any = 0):
        """Pads a dynamic axis to the workspace's capacity, so steps do not recompile.

        The capacity of ``name`` (default ``"axis<axis>"``) is learned from the first
        length seen and rounded up by the allocation policy (OVERALLOCATE with limit 1.0
        doubles it). While learning, a longer input grows the capacity; afterwards the
        spill policy applies: EXTERNAL pads nothing and counts the bytes as spilled,
        REALLOCATE grows the capacity to hold it (one recompile downstream), FAIL raises.

        Args:
            tree: arrays (numpy or JAX) that share the length of ``axis``.
            axis: the dynamic axis.
            name: the capacity's name; arrays padded under one name share it.
            fill: the padding value.

        Returns:
            ``(padded_tree, mask)``: the mask is boolean, shaped like the first leaf up to
            and including ``axis``, True where data is real.

        Raises:
            WorkspaceFullError: the input is longer than the capacity under FAIL.
            ConfigurationError: no arrays, an axis they lack, or lengths that disagree.

        Example:
            >>> import numpy as np, jaxws
            >>> ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="PAD")
            >>> with ws:
            ...     x, mask = ws.pad(np.ones((2, 3)), axis=1)
            >>> x.shape, mask.sum(axis=1).tolist(), ws.capacities
            ((2, 4), [3, 3], {'axis1': 4})
        """
        self._check_thread("pad with")
        if self._destroyed:
            raise WorkspaceError(f"Workspace [{self.id}] was destroyed; pad with a new one.")
        leaves, treedef = jax.tree.flatten(tree)
        if not leaves:
            raise ConfigurationError(f"Workspace.pad(tree={tree!r}): no arrays to pad.")
        shapes = [np.shape(x) for x in leaves]
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or any(
                not -len(shape) <= axis < len(shape) for shape in shapes):
            raise ConfigurationError(f"Workspace.pad(axis={axis!r}): expected an axis of every array (shapes "
                                     f"{[list(shape) for shape in shapes[:4]]}).")
        lengths = {shape[axis] for shape in shapes}
        if len(lengths) != 1:
            raise ConfigurationError(f"Workspace.pad(axis={axis}): the arrays disagree on the axis length "
                                     f"({sorted(lengths)}); pad arrays of one length together.")
        length = lengths.pop()
        name = name or f"axis{axis}"
        capacity = self._capacity_for(name, length, leaves)
        padded = [_pad_to(x, axis, capacity, fill) for x in leaves]
        first = leaves[0]
        lead = np.shape(first)[: axis % np.ndim(first)]
        mask = np.broadcast_to(np.arange(capacity) < length, (*lead, capacity))
        return jax.tree.unflatten(treedef, padded), mask

    def _capacity_for(self, name: str, length: int, leaves: list) -> int:
        capacity = self.capacities.get(name)
        if capacity is None or (not self._initialized and length > capacity):
            capacity = self.capacities[name] = self.config.allocate(length)
        elif length > capacity:
            policy = self.config.policy_spill
            if policy is SpillPolicy.FAIL:
                raise WorkspaceFullError(self.id, f"axis {name!r}", length, capacity, "elements")
            if policy is SpillPolicy.EXTERNAL:
                self.spills += 1
                self.spilled_bytes += sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in leaves)
                return length
            capacity = self.capacities[name] = self.config.allocate(length)
            self.reallocations += 1
        return capacity

    def statistics(self) -> WorkspaceStatistics:
        """A snapshot of what the workspace owns and has needed."""
        live = self.live_arrays()
        return WorkspaceStatistics(
            id=self.id, cycles=self.cycles, generation=self.generation, current_size=self.current_size,
            peak_size=self.peak_size, spilled_bytes=self.spilled_bytes, spills=self.spills,
            reallocations=self.reallocations, live_arrays=len(live), live_bytes=sum(a.nbytes for a in live),
            compiles=self.compiles, capacities=dict(self.capacities), plans=dict(self.plans),
        )

    def __repr__(self) -> str:
        state = "destroyed" if self._destroyed else "active" if self._depth else "closed"
        return f"Workspace(id={self.id!r}, generation={self.generation}, {state})"


def _pad_to(x, axis: int, capacity: int, fill):
    extra = capacity - np.shape(x)[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * np.ndim(x)
    widths[axis] = (0, extra)
    if isinstance(x, jax.Array):
        return jnp.pad(x, widths, constant_values=fill)
    return np.pad(np.asarray(x), widths, constant_values=fill)
