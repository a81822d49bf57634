"""Training listeners: report scores without a host sync on the other iterations.

A listener sees the loss as a device array; only reading it (``float``) syncs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jaxws.errors import ConfigurationError

__all__ = ["TrainingListener", "ScoreIterationListener", "CollectScoresListener"]


class TrainingListener:
    """Base class: override what you need. ``loss`` is a device scalar (no sync until read)."""

    def iteration_done(self, model: Any, iteration: int, epoch: int, loss: jax.Array) -> None:
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
    """Keeps ``(iteration, score)`` every ``frequency`` iterations in ``self.scores``."""

    def __init__(self, frequency: int = 1):
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ConfigurationError(f"CollectScoresListener(frequency={frequency!r}): expected an int >= 1.")
        self.frequency = frequency
        self.scores: list[tuple[int, float]] = []

    def iteration_done(self, model, iteration, epoch, loss):
        if iteration % self.frequency == 0:
            self.scores.append((iteration, float(loss)))
