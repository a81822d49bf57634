"""Progress bars for fit: drawn only where someone watches (a terminal or a notebook),
redrawn at most every 0.2 s, and nothing at all when off."""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import Any

__all__ = ["NO_BAR", "Bar", "interactive", "tqdm_class"]


def interactive() -> bool:
    """Progress bars only where someone watches them draw: a terminal or a notebook."""
    return "ipykernel" in sys.modules or sys.stderr.isatty()


def tqdm_class() -> Any:
    """tqdm's notebook widget where ipywidgets can draw it, else its text bar (no warning)."""
    if "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


class Bar:
    """A tqdm bar redrawn at most every 0.2 s: per step it costs a clock read."""

    __slots__ = ("bar", "pending", "last")

    def __init__(self, bar: Any):
        self.bar, self.pending, self.last = bar, 0, time.monotonic()

    def update(self, n: int) -> None:
        self.pending += n
        now = time.monotonic()
        if now - self.last >= 0.2:
            self.bar.update(self.pending)
            self.pending, self.last = 0, now

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.update(self.pending)
        self.bar.close()


class _NoBar:
    """What fit updates when progress=False: nothing at all."""

    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc_info) -> None:
        pass


NO_BAR = _NoBar()
