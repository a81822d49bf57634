"""Activations and losses by DL4J name, computed stably from pre-activations.

Losses average over examples (and over unmasked time steps for sequences), as DL4J does.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxws.errors import ConfigurationError

__all__ = ["ACTIVATIONS", "LOSSES", "activation", "loss_from_preoutput"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "leakyrelu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "gelu": jax.nn.gelu,
    "swish": jax.nn.swish,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "hardsigmoid": jax.nn.hard_sigmoid,
    "softplus": jax.nn.softplus,
    "softsign": jax.nn.soft_sign,
    "softmax": lambda x: jax.nn.softmax(x, axis=-1),
}

LOSSES = ("mcxent", "negativeloglikelihood", "mse", "l2", "mae", "l1", "xent")


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called ``name``; raises ValueError listing the valid names."""
    try:
        return ACTIVATIONS[name.lower()]
    except (KeyError, AttributeError):
        raise ConfigurationError(
            f"activation={name!r} is unknown; valid names: {', '.join(sorted(ACTIVATIONS))}."
        ) from None


def check_loss(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in LOSSES:
        raise ConfigurationError(f"loss={name!r} is unknown; valid names: {', '.join(LOSSES)}.")
    return name.lower()


def loss_from_preoutput(
    loss: str, act: str, z: jax.Array, labels: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """Mean loss of pre-activations ``z`` against ``labels`` (one-hot or integer classes).

    ``z`` is ``[batch, n_out]`` or ``[batch, time, n_out]``; ``mask`` is ``[batch]`` or
    ``[batch, time]`` (1 = counts). Softmax + cross-entropy and sigmoid + xent are computed
    from ``z`` directly (log-sum-exp), not from the probabilities.
    """
    loss, act = loss.lower(), act.lower()
    if labels.ndim == z.ndim - 1:  # integer class labels
        labels = jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    labels = labels.astype(z.dtype)
    if loss in ("mcxent", "negativeloglikelihood"):
        if act == "softmax":
            per = -jnp.sum(labels * jax.nn.log_softmax(z, axis=-1), axis=-1)
        else:
            p = jnp.clip(activation(act)(z), 1e-10, 1.0)
            per = -jnp.sum(labels * jnp.log(p), axis=-1)
    elif loss == "xent":
        if act == "sigmoid":
            per = jnp.sum(optax.sigmoid_binary_cross_entropy(z, labels), axis=-1)
        else:
            p = jnp.clip(activation(act)(z), 1e-7, 1 - 1e-7)
            per = -jnp.sum(labels * jnp.log(p) + (1 - labels) * jnp.log1p(-p), axis=-1)
    else:
        diff = activation(act)(z) - labels
        err = diff**2 if loss in ("mse", "l2") else jnp.abs(diff)
        per = jnp.mean(err, axis=-1) if loss in ("mse", "mae") else jnp.sum(err, axis=-1)
    if mask is None:
        return jnp.mean(per)
    mask = mask.astype(per.dtype)
    return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)
