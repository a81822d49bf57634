"""Commits that a KeyboardInterrupt cannot split: the donated carry and its replacement.

A step consumes its donated carry; until the new carry is stored, the model owns nothing.
Inside a commit an interrupt (SIGINT, ``_thread.interrupt_main()``) waits until it ends.
"""

from __future__ import annotations

import _signal  # signal's C module: signal.py wraps each call in enum conversions that cost 7 us
import signal
import threading
from typing import ContextManager

__all__ = ["InterruptGuard", "guarded"]


class InterruptGuard:
    """Defers KeyboardInterrupt while a commit is open; ``with guard:`` is one commit.

    Made by :func:`guarded`. Commits nest; the interrupt is raised when the outermost ends
    (or at once, outside commits). Off the main thread no interrupt arrives, and the
    guard only counts.
    """

    __slots__ = ("_depth", "_pending", "_previous")

    def __init__(self, previous=None):
        self._depth = 0
        self._pending = False
        self._previous = previous

    def __enter__(self) -> InterruptGuard:
        self._depth += 1
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._depth -= 1
        if self._depth == 0 and self._pending and exc_type is None:
            self._pending = False
            raise KeyboardInterrupt

    @property
    def pending(self) -> bool:
        """Whether an interrupt arrived inside the open commit (it is raised as that ends)."""
        return self._pending

    def released(self) -> ContextManager[None]:
        """Inside a commit, a stretch that may be interrupted (a listener, a progress bar,
        the model ParallelInference runs)."""
        return _Released(self)

    def _handle(self, signum, frame) -> None:
        if self._depth:
            self._pending = True
        else:
            self._previous(signum, frame)


class _Released:
    """:meth:`InterruptGuard.released`'s context: a class, not a generator (4 us less a call)."""

    __slots__ = ("_guard", "_depth")

    def __init__(self, guard: InterruptGuard):
        self._guard = guard

    def __enter__(self) -> None:
        guard = self._guard
        self._depth, guard._depth = guard._depth, 0
        if guard._pending:  # arrived during the commit: delivered as the stretch opens
            guard._pending = False
            guard._depth = self._depth
            raise KeyboardInterrupt

    def __exit__(self, exc_type, exc, tb) -> None:
        self._guard._depth = self._depth


def guarded() -> ContextManager[InterruptGuard]:
    """An :class:`InterruptGuard` for a loop; installs its SIGINT handler on the main thread.

    The handler replaces a Python-level SIGINT handler (normally the one that raises
    KeyboardInterrupt) for the duration and calls it outside commits; where SIGINT is
    not handled by Python (SIG_DFL, SIG_IGN), or off the main thread, nothing is installed.

    Example:
        >>> from jaxws.interrupts import guarded
        >>> state = {"carry": 1}
        >>> with guarded() as guard:
        ...     with guard:                      # a commit: no interrupt splits these
        ...         state["carry"] = state["carry"] + 1
        >>> state
        {'carry': 2}
    """
    return _Installed()


class _Installed:
    """``guarded()``'s context: a class, not a generator, as DL4J's ``fit(batch)`` loop
    enters one per call (2.2 us where ``contextlib.contextmanager`` took 5)."""

    __slots__ = ("_guard",)

    def __enter__(self) -> InterruptGuard:
        main = threading.current_thread() is threading.main_thread()
        previous = _signal.getsignal(signal.SIGINT) if main else None
        if not callable(previous):
            previous = None  # SIG_DFL, SIG_IGN, or not Python's to handle: nothing installed
        guard = self._guard = InterruptGuard(previous)
        if previous is not None:
            _signal.signal(signal.SIGINT, guard._handle)  # 1 us, where signal.signal takes 7
        return guard

    def __exit__(self, exc_type, exc, tb) -> None:
        guard = self._guard
        if guard._previous is not None:
            _signal.signal(signal.SIGINT, guard._previous)
            if guard._pending:  # arrived in a commit that ended by an exception: deliver it now
                guard._pending = False
                raise KeyboardInterrupt
