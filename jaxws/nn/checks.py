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

# The smallest and the largest of no label. Not -_NONE for the largest: int32's smallest is a
# label too, and a step of only that one must report it as its largest. ~_LOWEST == _NONE.
_NONE = np.iinfo(np.int32).max
_LOWEST = np.iinfo(np.int32).min
_RECYCLE_BELOW = 2**30  # steps a recycled check may have counted: its int32 counters stay exact


@jax.jit
def _initial() -> jax.Array:
    """A new check's values: one cached program, ~8 us a call (an eager ``jnp.array`` costs
    ~90). Computed, not returned as the program's constant: JAX may forward a constant
    output, and hand one array to two checks that each get donated."""
    values = jnp.array([0, -1, 0, _NONE, _LOWEST], jnp.int32)
    return values + jnp.zeros_like(values)


def _judged(labels: jax.Array, mask: jax.Array | None, classes: int) -> tuple:
    """``(labels as int32, counted (not masked out), bad (counted and out of range))``."""
    labels = labels.astype(jnp.int32)
    counted = jnp.ones(labels.shape, bool) if mask is None else jnp.broadcast_to(
        mask.reshape(mask.shape[: labels.ndim]) > 0, labels.shape)
    return labels, counted, counted & ((labels < 0) | (labels >= classes))


def _stats(labels: jax.Array, counted: jax.Array, bad: jax.Array) -> jax.Array:
    """``[invalid labels, smallest counted label, largest counted label]``. Over labels laid
    across devices each reduction is an all-reduce, which the step waits for; so the smallest
    and the largest are one ``max`` (of ``~labels`` and ``labels``: ``~`` reverses the order
    and, unlike ``-``, cannot overflow), and the count is a float32 sum, which XLA folds into
    the gradients' all-reduce (exact up to 2**24 invalid labels a step): one all-reduce a
    step beyond the gradients', where there were three."""
    extremes = jnp.stack([jnp.where(counted, ~labels, _LOWEST), jnp.where(counted, labels, _LOWEST)])
    extremes = jnp.max(extremes.reshape(2, -1), axis=1)
    return jnp.stack([jnp.sum(bad, dtype=jnp.float32).astype(jnp.int32), ~extremes[0], extremes[1]])


class LabelCheck(NamedTuple):
    """Invalid integer labels seen by a loop's steps, in one device int32[5] (one buffer:
    cheap to donate every step): steps counted, the first step with an invalid label (-1
    if none), invalid labels seen, the smallest and the largest label in such a step."""

    values: Any

    @classmethod
    def init(cls) -> LabelCheck:
        """A fresh check (a new buffer each call: it is donated to the steps)."""
        return cls(_initial())

    @classmethod
    def unmade(cls) -> LabelCheck:
        """A fresh check that the program it is passed to makes (``values`` None): a pass
        of one step saves the dispatch of :meth:`init`."""
        return cls(None)

    def update(self, labels: jax.Array | None, mask: jax.Array | None, classes: int) -> LabelCheck:
        """The check after one step on ``labels`` (traced; None: nothing to check)."""
        return self.after(None if labels is None else self.stats(labels, mask, classes)[None], 1)

    @staticmethod
    def stats(labels: jax.Array, mask: jax.Array | None, classes: int) -> jax.Array:
        """One step's int32[3] (traced): invalid labels counted, the smallest and the largest
        counted label. Vmapped over a stack of k steps it is one pass over all their labels."""
        return _stats(*_judged(labels, mask, classes))

    @staticmethod
    def rows(labels: jax.Array, mask: jax.Array | None, classes: int) -> jax.Array:
        """A whole dataset's int32[4] (traced): :meth:`stats`, then the first example (row)
        with an invalid label, -1 if none."""
        labels, counted, bad = _judged(labels, mask, classes)
        hits = bad.reshape(bad.shape[0], -1).any(axis=1)
        first = jnp.where(jnp.any(hits), jnp.argmax(hits), -1).astype(jnp.int32)
        return jnp.concatenate([_stats(labels, counted, bad), first[None]])

    def after(self, stats: jax.Array | None, steps: int) -> LabelCheck:
        """The check after ``steps`` steps whose :meth:`stats` are ``stats`` ([steps, 3];
        None: steps without class labels). Outside a scanned loop, so k steps cost one
        update, not k."""
        values = _initial() if self.values is None else self.values  # unmade: made here
        if stats is None:
            return LabelCheck(values.at[0].add(steps))
        done, first, count, low, high = (values[i] for i in range(5))
        hits = stats[:, 0] > 0
        hit = jnp.any(hits)
        return LabelCheck(jnp.stack([
            done + steps,
            jnp.where(hit & (first < 0), done + jnp.argmax(hits).astype(jnp.int32), first),
            count + jnp.sum(stats[:, 0]),
            jnp.where(hit, jnp.minimum(low, jnp.min(jnp.where(hits, stats[:, 1], _NONE))), low),
            jnp.where(hit, jnp.maximum(high, jnp.max(jnp.where(hits, stats[:, 2], _LOWEST))), high),
        ]))

    def raise_if_invalid(self, op: str, what: str, classes: int, epoch_starts: list[int] | None = None,
                         where: str = "", offset: int = 0) -> None:
        """Reads the check (one small host transfer) and raises InvalidBatchError if it saw any.
        ``offset``: the steps it counted before the call it reports on (a recycled check,
        valid until then); steps are named from that call's first."""
        steps, first, count, low, high = np.asarray(self.values).tolist()  # 2 us where device_get takes 25
        if count == 0:
            return
        steps, first = steps - offset, first - offset
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


class FitChecks:
    """A fit call's label check (donated each step), its executions and where its epochs
    started (an evaluation pass keeps one too, for the batches it counts on the device).
    ``state`` None: made at the first counted step (a pass may count none). ``offset``: the
    steps a recycled check counted before this call. ``lag``: the steps since its last
    count that it did not count (host batches whose labels the feed judged):
    :meth:`catch_up` adds them before a counted step, so it names steps as fit does."""

    def __init__(self, state: LabelCheck | None = None, offset: int = 0):
        self.state = state
        self.offset = offset
        self.steps = 0
        self.lag = 0
        self.executions = 0
        self.epoch_starts: list[int] = []

    def catch_up(self) -> None:
        """Counts the :attr:`lag` steps on the device (one small op, where judged and counted
        batches alternate in one feed)."""
        self.state, self.lag = LabelCheck(self.state.values.at[0].add(self.lag)), 0

    def counting(self) -> LabelCheck:
        """The check for a step that counts labels, caught up with the judged steps before it."""
        if self.state is None:
            self.state = LabelCheck.init()
        if self.lag:
            self.catch_up()
        return self.state

    def settle(self) -> bool:
        """At the end of a fit call: whether a step counted labels on the device, so the
        check needs its read (caught up first, so that the next call's offset is exact).
        False: only judged steps ran, and the check is as valid as it was."""
        if self.lag == self.steps:
            return False
        if self.lag:
            self.catch_up()
        return True

    @classmethod
    def after(cls, spare: FitChecks | None) -> FitChecks:
        """A new call's: ``spare`` (a call's checks read as valid) donated on with its count
        as the offset, or a new check when there is none or its counters near int32's end."""
        if spare is None or spare.offset + spare.steps >= _RECYCLE_BELOW:
            return cls(LabelCheck.init())
        return cls(spare.state, spare.offset + spare.steps - spare.lag)
