"""Training listeners, and the loss they see: read from the device only when asked.

A listener gets a :class:`StepLoss` per step; ``float(loss)`` is the only host sync.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from jaxws.arrays import stale_error
from jaxws.errors import ConfigurationError

__all__ = ["StepLoss", "TrainingListener", "ScoreIterationListener", "CollectScoresListener"]


class StepLoss:
    """The loss of one training step; read from the device only when asked.

    ``float(loss)``, ``loss.item()`` and ``np.asarray(loss)`` read it (one host sync);
    ``loss.value`` is the device scalar. It is live, not detached: it belongs to the
    step's workspace cycle, so keep ``float(loss)`` (or ``jaxws.detach(loss.value)``)
    to use it later; reading it after its cycle ended raises the cycle's
    LeakedWorkspacePointerError / OutdatedWorkspacePointerError, naming the fix.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxws.nn import StepLoss
        >>> float(StepLoss(jnp.array([0.5, 0.25]), 1))
        0.25
    """

    __slots__ = ("_losses", "_index", "_on_read")

    def __init__(self, losses: jax.Array, index: int | None = None, on_read: Callable[[], None] | None = None):
        self._losses = losses
        self._index = index  # None: ``losses`` is the step's scalar; else its row of a fused run
        self._on_read = on_read  # runs when the loss is read on the host (the loop syncs anyway)

    @property
    def value(self) -> jax.Array:
        """The loss as a device scalar (no host sync)."""
        error = stale_error("StepLoss", "loss", self._losses)
        if error is not None:
            raise error
        return self._losses if self._index is None else self._losses[self._index]

    def _read(self) -> np.ndarray:
        value = np.asarray(self.value)
        if self._on_read is not None:
            self._on_read()  # e.g. the label check: raises if a step saw invalid labels
        return value

    def item(self) -> float:
        return float(self._read())

    def __float__(self) -> float:
        return float(self._read())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self._read(), dtype=dtype)

    def __repr__(self) -> str:
        where = "" if self._index is None else f" {self._index} of {self._losses.shape[0]}"
        return f"StepLoss({where.strip() or 'step'})"


class TrainingListener:
    """Base class: override what you need. ``loss`` is a :class:`StepLoss` (no sync until read)."""

    def iteration_done(self, model: Any, iteration: int, epoch: int, loss: StepLoss) -> None:
        """After each training iteration, inside its workspace cycle."""

    def on_epoch_start(self, model: Any, epoch: int) -> None:
        """Before each epoch."""

    def on_epoch_end(self, model: Any, epoch: int) -> None:
        """After each epoch."""


class ScoreIterationListener(TrainingListener):
    """Prints the score every ``print_every`` iterations (DL4J's ScoreIterationListener).

    Example:
        >>> from jaxws.nn import ScoreIterationListener
        >>> listener = ScoreIterationListener(100)
    """

    def __init__(self, print_every: int = 10, printer: Callable[[str], None] = print):
        if isinstance(print_every, bool) or not isinstance(print_every, int) or print_every < 1:
            raise ConfigurationError(f"ScoreIterationListener(print_every={print_every!r}): expected an int >= 1.")
        self.print_every = print_every
        self.printer = printer

    def iteration_done(self, model, iteration, epoch, loss):
        if iteration % self.print_every == 0:
            self.printer(f"Score at iteration {iteration} is {float(loss):.6f}")


class CollectScoresListener(TrainingListener):
    """Keeps ``(iteration, score)`` every ``frequency`` iterations in ``self.scores`` (floats)."""

    def __init__(self, frequency: int = 1):
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ConfigurationError(f"CollectScoresListener(frequency={frequency!r}): expected an int >= 1.")
        self.frequency = frequency
        self.scores: list[tuple[int, float]] = []

    def iteration_done(self, model, iteration, epoch, loss):
        if iteration % self.frequency == 0:
            self.scores.append((iteration, float(loss)))
