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
    """Invalid integer labels seen by a loop's steps, in one device int32[5] (one buffer:
    cheap to donate every step): steps counted, the first step with an invalid label (-1
    if none), invalid labels seen, the smallest and the largest label in such a step."""

    values: Any

    @classmethod
    def init(cls) -> LabelCheck:
        return cls(jnp.array([0, -1, 0, _NONE, -_NONE], jnp.int32))

    def update(self, labels: jax.Array | None, mask: jax.Array | None, classes: int) -> LabelCheck:
        """The check after one step on ``labels`` (traced; None: nothing to check)."""
        steps, first, count, low, high = (self.values[i] for i in range(5))
        if labels is None:
            return LabelCheck(self.values.at[0].add(1))
        labels = labels.astype(jnp.int32)
        counted = jnp.ones(labels.shape, bool) if mask is None else jnp.broadcast_to(
            mask.reshape(mask.shape[: labels.ndim]) > 0, labels.shape)
        bad = counted & ((labels < 0) | (labels >= classes))
        n = jnp.sum(bad, dtype=jnp.int32)
        hit = n > 0
        return LabelCheck(jnp.stack([
            steps + 1,
            jnp.where(hit & (first < 0), steps, first),
            count + n,
            jnp.where(hit, jnp.minimum(low, jnp.min(jnp.where(counted, labels, _NONE))), low),
            jnp.where(hit, jnp.maximum(high, jnp.max(jnp.where(counted, labels, -_NONE))), high),
        ]))

    def raise_if_invalid(self, op: str, what: str, classes: int, epoch_starts: list[int] | None = None,
                         where: str = "") -> None:
        """Reads the check (one small host transfer) and raises InvalidBatchError if it saw any."""
        steps, first, count, low, high = (int(v) for v in jax.device_get(self.values))
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
