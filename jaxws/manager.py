"""Per-thread workspace managers and the process-wide memory manager (gc window).

As in ND4J, each thread has its own manager and its own workspaces; the memory manager
keeps Python's garbage collector out of workspace loops.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import gc
import os
import sys
import threading
import time
import weakref
from typing import ContextManager, Iterator

from jaxws.configuration import WorkspaceConfiguration
from jaxws.errors import ConfigurationError, WorkspaceError
from jaxws.workspace import Workspace, WorkspaceStatistics

__all__ = [
    "DebugMode",
    "WorkspaceManager",
    "MemoryManager",
    "get_workspace_manager",
    "get_memory_manager",
    "print_allocation_statistics_for_current_thread",
]

_NOTHING_OPEN = contextlib.nullcontext()  # scope_out_of_workspaces with no workspace open

DEBUG_ENV = "JAXWS_WORKSPACES_DEBUG"


class DebugMode(enum.Enum):
    """ND4J's workspace debug switch, set with ``JAXWS_WORKSPACES_DEBUG``."""

    DISABLED = "DISABLED"
    SPILL_EVERYTHING = "SPILL_EVERYTHING"  # every step runs outside its workspace
    BYPASS_EVERYTHING = "BYPASS_EVERYTHING"  # workspaces attach, donate, invalidate nothing


def _debug_mode_from_env() -> DebugMode:
    value = os.environ.get(DEBUG_ENV, "DISABLED").strip().upper() or "DISABLED"
    try:
        return DebugMode(value)
    except ValueError:
        valid = ", ".join(m.value for m in DebugMode)
        raise WorkspaceError(f"{DEBUG_ENV}={value!r}: expected one of {valid}.") from None


class WorkspaceManager:
    """The workspaces of one thread (ND4J's ``Nd4j.getWorkspaceManager()``).

    Example:
        >>> import jaxws
        >>> mgr = jaxws.get_workspace_manager()
        >>> with mgr.get_and_activate_workspace(id="LOOP") as ws:
        ...     print(mgr.current_workspace is ws, ws.generation)
        True 1
    """

    def __init__(self):
        self._thread = threading.get_ident()
        self._workspaces: dict[str, Workspace] = {}
        self._stack: list[Workspace | None] = []  # innermost last; None scopes out
        self._active = 0  # open cycles of this thread; the memory manager reads it
        self._loops = 0  # outermost cycles this thread left; the gc window's watcher reads it
        self.debug_mode = _debug_mode_from_env()
        self._memory = _memory_manager  # read by a workspace's enter and exit, per cycle
        _memory_manager._register(self)

    @property
    def current_workspace(self) -> Workspace | None:
        """The innermost open workspace, or None (also inside scope_out_of_workspaces)."""
        return self._stack[-1] if self._stack else None

    def open_workspace_ids(self) -> list[str]:
        return [ws.id for ws in self._stack if ws is not None]

    def workspace(self, id: str) -> Workspace:
        """This thread's workspace ``id``; raises WorkspaceError if there is none."""
        try:
            return self._workspaces[id]
        except KeyError:
            known = ", ".join(sorted(self._workspaces)) or "none"
            raise WorkspaceError(
                f"No workspace [{id}] on this thread (workspaces here: {known}). Create it with "
                "get_workspace_manager().get_workspace_for_current_thread(conf, id)."
            ) from None

    def check_if_workspace_exists(self, id: str) -> bool:
        return id in self._workspaces

    def get_workspace_for_current_thread(
        self, conf: WorkspaceConfiguration | None = None, id: str = "DefaultWorkspace"
    ) -> Workspace:
        """This thread's workspace ``id``, created with ``conf`` on first use.

        Raises:
            WorkspaceError: ``id`` exists with a different configuration.
        """
        ws = self._workspaces.get(id)
        if ws is not None and conf is not None and conf is not ws.config and conf != ws.config:
            raise WorkspaceError(
                f"Workspace [{id}] already exists with {ws.config}; asked for {conf}. Use "
                "another id, or destroy_workspace(ws) first."
            )
        if ws is None:
            if conf is not None and not isinstance(conf, WorkspaceConfiguration):
                raise ConfigurationError(f"conf={conf!r}: expected a jaxws.WorkspaceConfiguration.")
            if not isinstance(id, str) or not id:
                raise ConfigurationError(
                    f"get_workspace_for_current_thread(id={id!r}): expected a workspace name (a non-empty str)."
                )
            ws = self._workspaces[id] = Workspace(self, conf or WorkspaceConfiguration(), id)
        return ws

    def get_and_activate_workspace(
        self, conf: WorkspaceConfiguration | None = None, id: str = "DefaultWorkspace"
    ) -> Workspace:
        """The workspace ``id``, already in a new cycle; ``with ... as ws:`` closes it."""
        return self.get_workspace_for_current_thread(conf, id).activate()

    def destroy_workspace(self, ws: Workspace) -> None:
        """Frees every array ``ws`` owns, at once, and forgets it.

        Its arrays raise LeakedWorkspacePointerError afterwards. With no cycle left open,
        the workspace loop is over: Python's gc state is restored at once.
        """
        if not isinstance(ws, Workspace):
            raise ConfigurationError(
                f"destroy_workspace(ws={ws!r}): expected a Workspace; get one by its id with "
                "get_workspace_manager().workspace(id)."
            )
        ws._check_thread("destroy")
        if ws._destroyed:
            return
        if ws.is_scope_active:
            self._stack = [w for w in self._stack if w is not ws]
            self._scope_closed()
        ws._destroy()
        if self._workspaces.get(ws.id) is ws:
            del self._workspaces[ws.id]
        _memory_manager.end_loop()

    def destroy_all_workspaces_for_current_thread(self) -> None:
        """Frees every buffer the workspaces of this thread own (ND4J's method of that name)."""
        for ws in list(self._workspaces.values()):
            self.destroy_workspace(ws)

    def scope_out_of_workspaces(self) -> ContextManager[None]:
        """Inside, jaxws outputs belong to no workspace (ND4J's ``scopeOutOfWorkspaces``).
        With none open they belong to none already: nothing to enter (a shared no-op, where
        the scope costs a generator a call; output and ParallelInference enter it per call)."""
        return self._out_of_workspaces() if self._stack else _NOTHING_OPEN

    @contextlib.contextmanager
    def _out_of_workspaces(self) -> Iterator[None]:
        self._stack.append(None)
        try:
            yield
        finally:
            self._stack.pop()

    def allocation_statistics(self) -> list[WorkspaceStatistics]:
        """One :class:`WorkspaceStatistics` per workspace of this thread."""
        return [ws.statistics() for ws in self._workspaces.values()]

    def print_allocation_statistics_for_current_thread(self) -> str:
        """Prints (and returns) a table of the thread's workspaces and their compiled plans."""
        from jaxws.memory import format_bytes as fb

        rows = self.allocation_statistics()
        head = f"{'workspace':<20} {'cycles':>7} {'size':>10} {'peak':>10} {'live':>10} " \
               f"{'spilled':>10} {'spills':>6} {'reallocs':>8} {'compiles':>8}"
        lines = [f"Workspaces of thread {threading.current_thread().name}", head, "-" * len(head)]
        for s in rows:
            lines.append(
                f"{s.id[:20]:<20} {s.cycles:>7} {fb(s.current_size):>10} {fb(s.peak_size):>10} "
                f"{fb(s.live_bytes):>10} {fb(s.spilled_bytes):>10} {s.spills:>6} "
                f"{s.reallocations:>8} {s.compiles:>8}"
            )
            for name, cap in s.capacities.items():
                lines.append(f"    capacity {name} = {cap}")
            for name, plan in s.plans.items():
                lines.append(f"    plan {name}: {plan}")
        if not rows:
            lines.append("(no workspaces)")
        text = "\n".join(lines)
        print(text)
        return text

    # called by Workspace's general path (its loop's path has them inline)
    def _scope_entered(self, ws: Workspace) -> None:
        self._stack.append(ws)
        self._active += 1
        if self._active == 1 and not _memory_manager._gc_off:
            _memory_manager._loop_entered()

    def _scope_left(self, ws: Workspace) -> None:
        stack = self._stack
        if stack and stack[-1] is ws:
            stack.pop()
        else:
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is ws:
                    del stack[i]
                    break
        self._active -= 1
        if self._active == 0:
            self._loop_left()

    def _scope_closed(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._loop_left()

    def _loop_left(self) -> None:
        """The thread's outermost cycle ended: counted (the gc window's watcher sees
        idleness in the count), and a young collection if the watcher marked one due.
        ``Workspace.__exit__`` has these lines inline: the loop pays no frame for them."""
        self._loops += 1
        if _memory_manager._collect_due:
            _memory_manager._collect()


class MemoryManager:
    """Keeps Python's gc out of workspace loops (ND4J's ``Nd4j.getMemoryManager()``).

    From the first cycle of a loop, automatic collection is off; at cycle boundaries at
    most one collection of the young generations (``gc.collect(1)``, where everything the
    loop allocated is) runs per window (none with periodic gc toggled off). When no
    cycle has been open for ``idle_restore_ms`` (the loop ended), or every workspace of
    the thread is destroyed, the gc state from before the loop is restored.

    The clock is read by a named daemon thread (which :meth:`close` joins), not by the
    loop: it wakes once a window (or once per ``idle_restore_ms``), marks a collection
    due and sees the loop go idle, so a cycle boundary only counts itself and checks a flag.

    Example:
        >>> import jaxws
        >>> jaxws.get_memory_manager().set_auto_gc_window(5000)
        >>> jaxws.get_memory_manager().auto_gc_window
        5000
    """

    def __init__(self, idle_restore_ms: int = 250):
        self.idle_restore_ms = idle_restore_ms
        self._lock = threading.Lock()  # taken when a loop starts or ends, never per cycle
        self._cond = threading.Condition(self._lock)  # the watcher's waits
        self._managers: weakref.WeakSet = weakref.WeakSet()  # every thread's (their open cycles)
        self._gc_off = False  # True while we hold gc disabled
        self._was_enabled = True
        self._window_ms = 100
        self._periodic = True
        self._last = time.monotonic()  # the last collection
        self._collect_due = False  # the watcher's mark: a window passed, collect at the next boundary
        self._thread: threading.Thread | None = None
        self._closed = False
        self.collections = 0

    @property
    def auto_gc_window(self) -> int:
        return self._window_ms

    @property
    def periodic_gc_enabled(self) -> bool:
        return self._periodic

    def set_auto_gc_window(self, ms: int) -> None:
        """At most one collection every ``ms`` milliseconds at cycle boundaries."""
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise ConfigurationError(f"set_auto_gc_window(ms={ms!r}): expected an int >= 0 (milliseconds).")
        with self._cond:
            self._window_ms = ms
            self._collect_due = self._due(time.monotonic())
            self._cond.notify_all()  # the watcher times the new window

    def toggle_periodic_gc(self, enabled: bool) -> None:
        """False: no collections at all while workspace loops run."""
        if not isinstance(enabled, bool):
            raise ConfigurationError(f"toggle_periodic_gc(enabled={enabled!r}): expected True or False.")
        with self._cond:
            self._periodic = bool(enabled)
            self._collect_due = self._due(time.monotonic())
            self._cond.notify_all()

    def end_loop(self) -> None:
        """Restores the gc state now if no cycle is open (the loop is over)."""
        with self._cond:
            if not self._loop_open():
                self._restore()

    def close(self) -> None:
        """Restores gc and joins the restoring thread; idempotent."""
        with self._cond:
            self._closed = True
            if not self._loop_open():
                self._restore()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _register(self, manager: WorkspaceManager) -> None:
        with self._lock:
            self._managers.add(manager)

    def _loop_open(self) -> bool:
        """Whether a cycle is open on any thread (called with the lock held). Not one whose
        opening frame has returned: an interrupt skipped its ``__exit__``, and until its
        thread enters the workspace again (which ends it) gc is not kept off for it."""
        frames = None
        for manager in list(self._managers):
            if manager._active:
                cycles = [ws for ws in list(manager._stack) if ws is not None]
                frames = frames or sys._current_frames()
                if not cycles or not all(ws._opener_returned(frames.get(ws._owner)) for ws in cycles):
                    return True
        return False

    def _restore(self) -> None:
        if self._gc_off:
            self._gc_off = False
            if self._was_enabled:
                gc.enable()

    def _loop_entered(self) -> None:
        """A loop starts (gc is on): gc off, and the watcher wakes to watch it."""
        with self._lock:
            if not self._gc_off:
                self._was_enabled = gc.isenabled()
                gc.disable()
                self._gc_off = True
                if (self._thread is None or not self._thread.is_alive()) and not self._closed:
                    thread = self._thread = threading.Thread(
                        target=self._restore_when_idle, name="jaxws-gc-window", daemon=True
                    )
                    try:
                        thread.start()  # waits for the thread to run: an interrupt may land here
                    except BaseException:
                        if not thread.is_alive():  # no watcher may ever restore gc: now, then
                            self._restore()
                        raise
                else:
                    self._cond.notify()

    def _collect(self) -> None:
        # the loop's garbage is young (no automatic collection promoted it), so the two
        # young generations catch it in ~1 ms where a full collection takes ~30 ms
        self._collect_due = self._window_ms == 0  # a window of 0: at every boundary
        self._last = time.monotonic()
        self.collections += 1
        gc.collect(1)  # finalizers may enter workspaces

    def _due(self, now: float) -> bool:
        """Whether a window has passed since the last collection (periodic gc on)."""
        return self._periodic and (now - self._last) * 1000.0 >= self._window_ms

    def _restore_when_idle(self) -> None:
        """Sleeps until a loop disables gc; then wakes once a window to mark a collection
        due, and four times per ``idle_restore_ms`` to see whether a cycle ended or is open
        since it last looked (never per cycle). It restores gc once none has for
        ``idle_restore_ms``. A cycle entered just as gc is restored runs with gc on; the
        next one turns it off again."""
        idle = self.idle_restore_ms / 1000.0
        with self._cond:
            seen, quiet_since = -1, 0.0
            while not self._closed:
                if not self._gc_off:
                    self._cond.wait()
                    seen = -1
                    continue
                now = time.monotonic()
                if not self._collect_due and self._due(now):
                    self._collect_due = True
                loops = sum(m._loops for m in self._managers)
                if loops != seen or self._loop_open():
                    seen, quiet_since = loops, now
                elif now - quiet_since >= idle:
                    self._restore()
                    continue
                wait = idle / 4
                if self._periodic and not self._collect_due:
                    wait = min(wait, self._last + self._window_ms / 1000.0 - now)
                self._cond.wait(max(wait, 0.001))


_memory_manager = MemoryManager()
atexit.register(_memory_manager.close)  # restore gc and join the window thread at exit
_local = threading.local()


def get_workspace_manager() -> WorkspaceManager:
    """The calling thread's :class:`WorkspaceManager`."""
    try:
        return _local.manager
    except AttributeError:
        _local.manager = WorkspaceManager()
        return _local.manager


def get_memory_manager() -> MemoryManager:
    """The process's :class:`MemoryManager`."""
    return _memory_manager


def print_allocation_statistics_for_current_thread() -> str:
    """Prints the allocation statistics table of the calling thread's workspaces."""
    return get_workspace_manager().print_allocation_statistics_for_current_thread()
