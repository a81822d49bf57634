"""The evaluator protocol: a functional core (init / update / merge / compute) and DL4J's surface.

``update`` is pure and jit-able (no host transfer), so ``do_evaluation`` runs every
evaluator inside the network's jitted step; ``merge`` is associative.
"""

from __future__ import annotations

import abc
import copy
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.errors import EvaluationError
from jaxws.interrupts import guarded

__all__ = ["Evaluator", "flatten_batch"]


def flatten_batch(labels, predictions, mask, *, who: str, sparse_ok: bool = True):
    """``(labels [M] int or [M, C], predictions [M, C], weights [M], sparse)`` of a batch.

    Accepts ``[batch, C]`` and time series ``[batch, time, C]``; integer labels
    ``[batch]`` / ``[batch, time]``; masks ``[batch]``, ``[batch, time]`` (or with a
    trailing 1). Shapes are static, so errors are raised while tracing, before any run.
    """
    predictions = jnp.asarray(predictions)
    labels = jnp.asarray(labels)
    if predictions.ndim < 1:
        raise EvaluationError(f"{who}: predictions must have a class axis; got shape {predictions.shape}.")
    if predictions.ndim == 1:
        predictions = predictions[:, None]
        if labels.ndim == 1 and not jnp.issubdtype(labels.dtype, jnp.integer):
            labels = labels[:, None]
    classes = predictions.shape[-1]
    lead = predictions.shape[:-1]
    sparse = sparse_ok and labels.shape == lead and jnp.issubdtype(labels.dtype, jnp.integer)
    if not sparse and labels.shape != predictions.shape:
        raise EvaluationError(
            f"{who}: labels of shape {labels.shape} do not match predictions of shape "
            f"{predictions.shape}; expected "
            + (f"one-hot labels {predictions.shape} or integer classes {lead}" if sparse_ok
               else f"labels of the predictions' shape {predictions.shape}") + "."
        )
    rows = int(np.prod(lead, dtype=np.int64))
    weights = jnp.ones((rows,), jnp.float32)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape == (*lead, 1):
            mask = mask[..., 0]
        if mask.shape == predictions.shape and not sparse:
            mask = mask.min(axis=-1)  # a per-output mask: count rows fully present
        if mask.shape != lead:
            raise EvaluationError(f"{who}: mask of shape {mask.shape} does not match predictions {predictions.shape}; expected {lead}.")
        weights = mask.reshape(rows).astype(jnp.float32)
    flat_labels = labels.reshape(rows) if sparse else labels.reshape(rows, classes)
    return flat_labels, predictions.reshape(rows, classes).astype(jnp.float32), weights, sparse


_EMPTY: dict = {}  # an evaluator's _init_key -> the jitted init that makes its empty state


class Evaluator(abc.ABC):
    """Base of every evaluator.

    Functional core: ``init() -> state``, ``update(state, labels, predictions, mask=None)
    -> state`` (pure, jit-able), ``merge(a, b) -> state`` (associative), ``compute(state)``.
    DL4J surface: ``eval(labels, predictions, mask=None)``, ``merge(other)`` (folds
    ``other`` into this one), ``reset()``, ``stats()``, ``to_json()`` / ``from_json()``.
    """

    def __init__(self):
        self.state: Any = None
        self._jit_update = None

    # -- functional core -------------------------------------------------------------------

    @abc.abstractmethod
    def init(self) -> Any:
        """An empty state (fixed-size device arrays)."""

    @abc.abstractmethod
    def update(self, state: Any, labels: Any, predictions: Any, mask: Any = None) -> Any:
        """The state with one batch added; pure and jit-able."""

    @abc.abstractmethod
    def merge_states(self, a: Any, b: Any) -> Any:
        """Associative merge of two states (shards, devices, processes)."""

    @abc.abstractmethod
    def compute(self, state: Any) -> dict:
        """The metrics of ``state`` (host values)."""

    def merge(self, a: Any, b: Any = None) -> Any:
        """``merge(a, b)``: the merged state; ``merge(other)``: fold ``other`` into this one."""
        if b is not None:
            return self.merge_states(a, b)
        other = a
        if type(other) is not type(self):
            raise EvaluationError(f"{type(self).__name__}.merge: cannot merge a {type(other).__name__}.")
        if other.state is not None:
            self.state = other.state if self.state is None else self.merge_states(self.state, other.state)
        return self

    # -- sizing: evaluators sized by the first predictions they see --------------------------

    def _configure(self, num_outputs: int) -> None:
        """Called with the width of the predictions before the first update."""

    def _reserve(self, state: Any, rows: int) -> Any:
        """Makes room for ``rows`` more rows (exact ROC); a no-op for fixed-size states."""
        return state

    def _static_key(self) -> tuple:
        """What the compiled update depends on besides shapes."""
        return (type(self),)

    _grows = False  # True: _reserve grows the state, which is then made outside a pass's program

    def _made_in_program(self, predictions_shape: tuple) -> bool:
        """Whether a pass of one batch may make this evaluator's empty state inside its
        program (saving :meth:`_ensure_state`'s dispatch): a fresh evaluator of fixed size
        whose :meth:`_init_key` says what the state depends on. If so, configures it."""
        if self.state is not None or self._grows or self._init_key() is None:
            return False
        self._configure(int(predictions_shape[-1]) if len(predictions_shape) > 1 else 1)
        return True

    def _init_key(self) -> tuple | None:
        """What :meth:`init`'s state depends on, if it can say (hashable): the empty state
        is then made by one cached program (~5 us) instead of eager ``jnp.zeros`` (~30 us
        each). None (the default: an evaluator of your own): made eagerly."""
        return None

    # -- DL4J surface ----------------------------------------------------------------------

    def _ensure_state(self, predictions_shape: tuple) -> None:
        if self.state is None:
            self._configure(int(predictions_shape[-1]) if len(predictions_shape) > 1 else 1)
            key = self._init_key()
            if key is None:
                self.state = self.init()
                return
            make = _EMPTY.get(key)
            if make is None:  # an empty copy's init: the cache holds no evaluator's data
                proto = copy.copy(self)
                proto.state = proto._jit_update = None
                make = _EMPTY[key] = jax.jit(proto.init)
            self.state = make()

    def eval(self, labels: Any, predictions: Any, mask: Any = None) -> None:
        """Adds a batch (arrays of any kind); one jitted update, no host transfer."""
        predictions = jnp.asarray(predictions)
        self._ensure_state(predictions.shape)
        rows = int(np.prod(predictions.shape[:-1])) if predictions.ndim > 1 else predictions.shape[0]
        if self._jit_update is None:
            self._jit_update = jax.jit(self.update, donate_argnums=0)
        labels, mask = jnp.asarray(labels), None if mask is None else jnp.asarray(mask)
        # one commit: an interrupt after the update donated the state and before the new one
        # was kept left a deleted state, which every later call refused
        with guarded() as guard, guard:
            self.state = self._jit_update(self._reserve(self.state, rows), labels, predictions, mask)

    def reset(self) -> None:
        """Forgets everything evaluated so far."""
        self.state = None

    def _require(self) -> dict:
        if self.state is None:
            raise EvaluationError(
                f"{type(self).__name__} has no data: call eval(labels, predictions) or "
                "net.do_evaluation(data, evaluator) first."
            )
        cached = getattr(self, "_computed", None)
        if cached is None or cached[0] is not self.state:  # one host read per state
            self._computed = (self.state, self.compute(self.state))
        return self._computed[1]

    @abc.abstractmethod
    def stats(self) -> str:
        """A human-readable summary in DL4J's layout."""

    def _config(self) -> dict:
        return {}

    def to_json(self) -> str:
        """The configuration and state (a NamedTuple of arrays) as JSON."""
        state = None if self.state is None else {k: np.asarray(v).tolist() for k, v in self.state._asdict().items()}
        return json.dumps({"type": type(self).__name__, "config": self._config(), "state": state})

    @classmethod
    def from_json(cls, text: str) -> Evaluator:
        """The evaluator ``to_json`` wrote."""
        data = json.loads(text)
        if data.get("type") != cls.__name__:
            raise EvaluationError(f"{cls.__name__}.from_json: the JSON holds a {data.get('type')!r}.")
        ev = cls(**data["config"])
        if data["state"] is not None:
            template = ev.init()
            ev.state = type(template)(**{
                k: jnp.asarray(np.asarray(data["state"][k], dtype=getattr(template, k).dtype))
                for k in template._fields
            })
        return ev

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._config().items())})"
