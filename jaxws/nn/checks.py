"""Class labels checked on the device: counted inside the step, read when the loop syncs.

Integer class labels out of range would train (or evaluate) silently on garbage; the step
counts them in a small donated state, and the host reads it once, when it reads anyway.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.errors import InvalidBatchError

__all__ = ["LabelCheck"]

_NONE = np.iinfo(np.int32).max


class LabelCheck(NamedTuple):
    """Invalid integer labels seen by a loop's steps (device int32 scalars)."""

    steps: Any  # steps counted
    first: Any  # the first step with an invalid label, -1 if none
    count: Any  # invalid labels seen
    low: Any  # the smallest label in a step with invalid labels
    high: Any  # the largest

    @classmethod
    def init(cls) -> LabelCheck:
        return cls(*jnp.array([0, -1, 0, _NONE, -_NONE], jnp.int32))

    def update(self, labels: jax.Array | None, mask: jax.Array | None, classes: int) -> LabelCheck:
        """The check after one step on ``labels`` (traced; None: nothing to check)."""
        if labels is None:
            return self._replace(steps=self.steps + 1)
        labels = labels.astype(jnp.int32)
        counted = jnp.ones(labels.shape, bool) if mask is None else jnp.broadcast_to(
            mask.reshape(mask.shape[: labels.ndim]) > 0, labels.shape)
        bad = counted & ((labels < 0) | (labels >= classes))
        n = jnp.sum(bad, dtype=jnp.int32)
        low = jnp.min(jnp.where(counted, labels, _NONE))
        high = jnp.max(jnp.where(counted, labels, -_NONE))
        hit = n > 0
        return LabelCheck(
            steps=self.steps + 1,
            first=jnp.where(hit & (self.first < 0), self.steps, self.first),
            count=self.count + n,
            low=jnp.where(hit, jnp.minimum(self.low, low), self.low),
            high=jnp.where(hit, jnp.maximum(self.high, high), self.high),
        )

    def raise_if_invalid(self, op: str, what: str, classes: int, epoch_starts: list[int] | None = None,
                         where: str = "") -> None:
        """Reads the check (one small host transfer) and raises InvalidBatchError if it saw any."""
        steps, first, count, low, high = (int(v) for v in jax.device_get(tuple(self)))
        if count == 0:
            return
        batch = f"batch {first}"
        if epoch_starts and len(epoch_starts) > 1:
            epoch = max(i for i, start in enumerate(epoch_starts) if start <= first)
            batch = f"batch {first - epoch_starts[epoch]} of epoch {epoch}"
        raise InvalidBatchError(
            f"{op}: labels out of range for {what}: {where}{batch} (counting from 0 in that call) was the "
            f"first with classes outside 0..{classes - 1} (found {low}..{high}); {count} invalid "
            f"label(s) in all, over {steps} step(s), which ran on them. Fix the labels: one "
            f"integer class in 0..{classes - 1} per example (mask out padding with a labels mask)."
        )
