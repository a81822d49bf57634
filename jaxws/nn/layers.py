"""Layers: Dense, Dropout, BatchNormalization, LSTM, OutputLayer, RnnOutputLayer.

A layer is a small frozen dataclass with ``init(key, input_shape) -> (params, state)`` and
``activate(params, state, x, training, mgr, mask=None) -> (activations, state)``; its
activations are returned in ``ArrayType.ACTIVATIONS``. Sequences are ``[batch, time, features]``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxws.errors import ConfigurationError
from jaxws.nn.functions import activation as get_activation
from jaxws.nn.functions import check_loss, loss_from_preoutput
from jaxws.nn.workspace_mgr import ArrayType, LayerWorkspaceMgr

__all__ = [
    "Layer",
    "Dense",
    "Dropout",
    "BatchNormalization",
    "LSTM",
    "BaseOutputLayer",
    "OutputLayer",
    "RnnOutputLayer",
    "REMAT_CHOICES",
    "layer_from_dict",
    "layer_type_name",
]

REMAT_CHOICES = (None, "save", "recompute", "offload")
Shape = tuple  # per-example shape: no batch axis; None for a dynamic (time) axis


def layer_type_name(cls: type) -> str:
    """The name a layer class is saved under: its class name for jaxws's own layers, the
    module-qualified name for yours (``mypackage.layers.Gated``)."""
    module = cls.__module__
    return cls.__name__ if module.startswith("jaxws.") else f"{module}.{cls.__qualname__}"


def layer_from_dict(data: dict, custom: dict[str, type] | None = None) -> Layer:
    """The layer ``Layer.to_dict`` wrote.

    Raises:
        ConfigurationError: the layer type is not known in this process.
    """
    data = dict(data)
    kind = data.pop("type", None)
    cls = (custom or {}).get(kind) or Layer._registry.get(kind)
    if cls is None:
        raise ConfigurationError(
            f"layer type {kind!r} is unknown in this process. Import the module that defines it "
            f"before loading, or pass it: from_json(text, custom_layers={{{kind!r}: TheClass}})."
        )
    if "remat" in data and isinstance(data["remat"], list):
        data["remat"] = tuple(data["remat"])
    return cls(**data)


def _positive_int(layer: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{layer}({name}={value!r}): expected an int >= 1.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layer(abc.ABC):
    """Base of every layer.

    Attributes:
        name: shown in summaries and error messages.
        remat: what backprop keeps of this layer, overriding the network's workspace mode:
            ``"save"`` everything, ``"recompute"`` all but its ACTIVATIONS, ``"offload"``
            its ACTIVATIONS to pinned host memory and recompute the rest; None follows the
            mode (SEPARATE recomputes, the others save).
    """

    name: str | None = None
    remat: str | None = None

    _registry: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Layer._registry[layer_type_name(cls)] = cls  # a layer defined anywhere can be loaded by name

    def to_dict(self) -> dict:
        """The layer as JSON-ready data: its type and its fields."""
        return {"type": layer_type_name(type(self)),
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def __post_init__(self):
        if self.remat not in REMAT_CHOICES:
            raise ConfigurationError(f"{type(self).__name__}(remat={self.remat!r}): expected one of {REMAT_CHOICES}.")

    def init(self, key: jax.Array, input_shape: Shape) -> tuple[Any, Any]:
        """``(params, state)`` for inputs of per-example shape ``input_shape``."""
        return {}, {}

    @abc.abstractmethod
    def activate(self, params, state, x, training: bool, mgr: LayerWorkspaceMgr, mask=None):
        """``(activations, new_state)``; activations in ``ArrayType.ACTIVATIONS``."""

    def reseed(self, state: Any, key: jax.Array) -> Any:
        """``state`` drawing its randomness from ``key`` (a layer that draws none returns it).

        ``output(x, training=True)`` reseeds every layer per call, so stochastic layers
        draw fresh randomness each time without touching the training state.
        """
        return state

    def describe(self) -> str:
        return self.name or type(self).__name__


def _glorot(key: jax.Array, n_in: int, n_out: int) -> jax.Array:
    return jax.random.normal(key, (n_in, n_out)) * jnp.sqrt(2.0 / (n_in + n_out))


@dataclasses.dataclass(frozen=True)
class Dense(Layer):
    """A fully connected layer on the last axis (time-distributed on sequences).

    Example:
        >>> import jax
        >>> from jaxws.nn import Dense, LayerWorkspaceMgr
        >>> layer = Dense(3, activation="relu")
        >>> params, state = layer.init(jax.random.key(0), (5,))
        >>> y, _ = layer.activate(params, state, jax.numpy.ones((2, 5)), False,
        ...                       LayerWorkspaceMgr.no_workspaces())
        >>> y.shape
        (2, 3)
    """

    n_out: int
    activation: str = "identity"
    use_bias: bool = True

    def __post_init__(self):
        super().__post_init__()
        _positive_int(type(self).__name__, "n_out", self.n_out)
        get_activation(self.activation)

    def init(self, key, input_shape):
        params = {"W": _glorot(key, input_shape[-1], self.n_out)}
        if self.use_bias:
            params["b"] = jnp.zeros(self.n_out)
        return params, {}

    def preoutput(self, params, x):
        z = x @ params["W"]
        return z + params["b"] if self.use_bias else z

    def activate(self, params, state, x, training, mgr, mask=None):
        z = mgr.leverage_to(ArrayType.FF_WORKING_MEM, self.preoutput(params, x))
        return mgr.leverage_to(ArrayType.ACTIVATIONS, get_activation(self.activation)(z)), state


@dataclasses.dataclass(frozen=True)
class Dropout(Layer):
    """Drops each input with probability ``rate`` in training (Keras' convention).

    DL4J's ``dropOut(p)`` takes the probability of *keeping*; here ``rate`` is the
    probability of dropping. The PRNG key is layer state, carried and donated.
    """

    rate: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.rate, (int, float)) and 0.0 <= self.rate < 1.0):
            raise ConfigurationError(f"Dropout(rate={self.rate!r}): expected 0 <= rate < 1 (the drop probability).")

    def init(self, key, input_shape):
        return {}, {"key": jax.random.key_data(key)}

    def reseed(self, state, key):
        return {"key": jax.random.key_data(key)}

    def activate(self, params, state, x, training, mgr, mask=None):
        if not training or self.rate == 0.0:
            return mgr.leverage_to(ArrayType.ACTIVATIONS, x), state
        key, sub = jax.random.split(jax.random.wrap_key_data(state["key"]))
        keep = jax.random.bernoulli(sub, 1.0 - self.rate, x.shape)
        y = jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)
        return mgr.leverage_to(ArrayType.ACTIVATIONS, y), {"key": jax.random.key_data(key)}


@dataclasses.dataclass(frozen=True)
class BatchNormalization(Layer):
    """Normalizes the last axis; running mean and variance are state, donated with params.

    ``decay`` is DL4J's: running = decay * running + (1 - decay) * batch statistic.
    """

    decay: float = 0.9
    eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if not (0.0 <= self.decay < 1.0):
            raise ConfigurationError(f"BatchNormalization(decay={self.decay!r}): expected 0 <= decay < 1.")

    def init(self, key, input_shape):
        n = input_shape[-1]
        return ({"gamma": jnp.ones(n), "beta": jnp.zeros(n)},
                {"mean": jnp.zeros(n), "var": jnp.ones(n)})

    def activate(self, params, state, x, training, mgr, mask=None):
        if training:
            axes = tuple(range(x.ndim - 1))
            mean, var = jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
            d = self.decay
            state = {"mean": d * state["mean"] + (1 - d) * mean, "var": d * state["var"] + (1 - d) * var}
        else:
            mean, var = state["mean"], state["var"]
        xhat = mgr.leverage_to(ArrayType.FF_WORKING_MEM, (x - mean) * jax.lax.rsqrt(var + self.eps))
        return mgr.leverage_to(ArrayType.ACTIVATIONS, xhat * params["gamma"] + params["beta"]), state


@dataclasses.dataclass(frozen=True)
class LSTM(Layer):
    """An LSTM over ``[batch, time, features]`` with a ``lax.scan`` time loop.

    Gates are tagged ``RNN_FF_LOOP_WORKING_MEM``; masked steps (mask 0) keep the previous
    state and output zeros. The forget-gate bias starts at 1.0, as in DL4J.
    """

    n_out: int
    activation: str = "tanh"
    gate_activation: str = "sigmoid"
    forget_gate_bias_init: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _positive_int("LSTM", "n_out", self.n_out)
        get_activation(self.activation)
        get_activation(self.gate_activation)

    def init(self, key, input_shape):
        if len(input_shape) != 2:
            raise ConfigurationError(
                f"LSTM expects sequences [batch, time, features]; got per-example input shape "
                f"{tuple(input_shape)} (needs 2 axes: time, features)."
            )
        k1, k2 = jax.random.split(key)
        n = self.n_out
        b = jnp.zeros(4 * n).at[n : 2 * n].set(self.forget_gate_bias_init)
        return {"W": _glorot(k1, input_shape[-1], 4 * n), "U": _glorot(k2, n, 4 * n), "b": b}, {}

    def initial_carry(self, batch: int, dtype=jnp.float32):
        return (jnp.zeros((batch, self.n_out), dtype), jnp.zeros((batch, self.n_out), dtype))

    def scan(self, params, x, carry, mgr, mask=None):
        """Runs the sequence from ``carry``; returns ``(outputs [B, T, n], final carry)``."""
        act, gate = get_activation(self.activation), get_activation(self.gate_activation)
        xw = jnp.swapaxes(x @ params["W"] + params["b"], 0, 1)  # [T, B, 4n]
        m = jnp.ones(xw.shape[:2], x.dtype) if mask is None else jnp.swapaxes(mask, 0, 1).astype(x.dtype)

        def cell(carry, inputs):
            h, c = carry
            xw_t, m_t = inputs
            gates = mgr.leverage_to(ArrayType.RNN_FF_LOOP_WORKING_MEM, xw_t + h @ params["U"])
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c_new = gate(f) * c + gate(i) * act(g)
            h_new = gate(o) * act(c_new)
            keep = m_t[:, None]
            h_new = keep * h_new + (1 - keep) * h
            c_new = keep * c_new + (1 - keep) * c
            return (h_new, c_new), h_new * keep

        carry, hs = jax.lax.scan(cell, carry, (xw, m))
        return jnp.swapaxes(hs, 0, 1), carry

    def activate(self, params, state, x, training, mgr, mask=None):
        hs, _ = self.scan(params, x, self.initial_carry(x.shape[0], x.dtype), mgr, mask)
        return mgr.leverage_to(ArrayType.ACTIVATIONS, hs), state


@dataclasses.dataclass(frozen=True)
class BaseOutputLayer(Dense):
    """A Dense layer with a loss; the loss is computed from its pre-activations."""

    activation: str = "softmax"
    loss: str = "mcxent"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "loss", check_loss(self.loss))

    def compute_loss(self, z: jax.Array, labels: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Mean loss of pre-activations ``z`` against ``labels``."""
        return loss_from_preoutput(self.loss, self.activation, z, labels, mask)

    def labels_shape(self, out_shape: tuple) -> str:
        """The label shapes accepted for outputs of shape ``out_shape`` (with batch)."""
        lead = ", ".join(str(d) for d in out_shape[:-1])
        sparse = f" or integer classes [{lead}]" if self.loss in ("mcxent", "negativeloglikelihood") else ""
        return f"[{lead}, {self.n_out}]{sparse}"


@dataclasses.dataclass(frozen=True)
class OutputLayer(BaseOutputLayer):
    """The output layer of a feed-forward network: ``[batch, n_in] -> [batch, n_out]``.

    Losses: ``mcxent`` / ``negativeloglikelihood`` (one-hot or integer labels), ``mse``,
    ``l2``, ``mae``, ``l1``, ``xent`` (independent binary labels).
    """


@dataclasses.dataclass(frozen=True)
class RnnOutputLayer(BaseOutputLayer):
    """The output layer of a sequence network: ``[batch, time, n_in] -> [batch, time, n_out]``.

    The loss averages over unmasked time steps (labels mask ``[batch, time]``).
    """

    def init(self, key, input_shape):
        if len(input_shape) != 2:
            raise ConfigurationError(
                f"RnnOutputLayer expects sequences [batch, time, features]; got per-example "
                f"input shape {tuple(input_shape)}."
            )
        return super().init(key, input_shape)
