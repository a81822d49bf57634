"""FunctionalModel: your own pure ``apply`` over a params pytree, trained like a network.

It gets the same fit / output / score / do_evaluation, donation and workspace cycles.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxws.arrays import detach
from jaxws.errors import ConfigurationError
from jaxws.nn.checkpoints import checked_path
from jaxws.nn.model import Model, TrainState
from jaxws.nn.modes import WorkspaceMode
from jaxws.nn.updaters import Adam, Updater

__all__ = ["FunctionalModel"]


class FunctionalModel(Model):
    """Your own model (a pure ``apply`` over a params pytree) under the same machinery.

    ``apply(params, x, training) -> predictions``; with ``state``,
    ``apply(params, state, x, training) -> (predictions, state)``. ``loss(predictions,
    labels, mask) -> scalar``. Tag arrays with ``jax.ad_checkpoint.checkpoint_name(a,
    "ACTIVATIONS")`` to keep them in SEPARATE mode, which recomputes everything else.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from jaxws.nn import FunctionalModel
        >>> model = FunctionalModel(
        ...     lambda p, x, training: x @ p["w"], {"w": jnp.zeros((3, 1))},
        ...     loss=lambda pred, y, mask: jnp.mean((pred - y) ** 2), updater=optax.sgd(0.1))
        >>> model.fit((jnp.ones((4, 3)), jnp.ones((4, 1))), epochs=5, progress=False).iteration
        5
    """

    def __init__(
        self,
        apply: Callable,
        params: Any,
        *,
        loss: Callable[[Any, Any, Any], jax.Array],
        updater: optax.GradientTransformation | None = None,
        state: Any = None,
        training_workspace_mode: WorkspaceMode = WorkspaceMode.ENABLED,
        inference_workspace_mode: WorkspaceMode = WorkspaceMode.ENABLED,
    ):
        if not callable(apply) or not callable(loss):
            raise ConfigurationError("FunctionalModel(apply, params, loss=...): apply and loss must be callables.")
        updater = updater or Adam(1e-3)
        super().__init__(updater.build() if isinstance(updater, Updater) else updater,
                         training_workspace_mode, inference_workspace_mode)
        self._user_apply = apply
        self._user_loss = loss
        self._stateful = state is not None
        params = detach(jax.tree.map(jnp.asarray, params))  # buffers the model owns
        state = detach(jax.tree.map(jnp.asarray, state)) if self._stateful else {}
        self._carry = TrainState(params, state, self._updater.init(params))

    def init(self) -> FunctionalModel:
        return self

    @classmethod
    def load(cls, path: str, apply: Callable, params: Any, *, loss: Callable, updater: Any = None,
             state: Any = None, load_updater: bool = True, **kwargs: Any) -> FunctionalModel:
        """A FunctionalModel restored from ``path``: ``apply`` and a ``params`` (and ``state``)
        of the saved structure (its initial values, say) rebuild it; the checkpoint fills it.

        Raises:
            CheckpointError: no checkpoint there, or one of another structure.
        """
        checked_path(path, "FunctionalModel.load(path")
        model = cls(apply, params, loss=loss, updater=updater, state=state, **kwargs)
        return model.restore(path, load_updater=load_updater)

    @classmethod
    def from_equinox(cls, module: Any, *, loss: Callable, batched: bool = False, **kwargs: Any) -> FunctionalModel:
        """Trains an Equinox module: its floating-point arrays are the parameters.

        The module maps one example and is ``jax.vmap``-ed over the batch, unless
        ``batched=True``. ``to_equinox()`` gives the trained module back. Modules that
        need PRNG keys at call time (dropout) are not covered.

        Example:
            >>> import jax, equinox as eqx, jax.numpy as jnp, optax
            >>> from jaxws.nn import FunctionalModel
            >>> mlp = eqx.nn.MLP(3, 1, width_size=8, depth=1, key=jax.random.key(0))
            >>> model = FunctionalModel.from_equinox(
            ...     mlp, loss=lambda p, y, m: jnp.mean((p - y) ** 2), updater=optax.sgd(0.1))
            >>> trained = model.fit((jnp.ones((4, 3)), jnp.zeros((4, 1))), progress=False).to_equinox()
            >>> type(trained).__name__
            'MLP'
        """
        import equinox as eqx

        params, static = eqx.partition(module, eqx.is_inexact_array)

        def apply(p, x, training):
            net = eqx.combine(p, static)
            return net(x) if batched else jax.vmap(net)(x)

        model = cls(apply, params, loss=loss, **kwargs)
        model._equinox_static = static
        return model

    def to_equinox(self) -> Any:
        """The Equinox module with the current parameters (for ``from_equinox`` models).

        Its arrays are detached copies: later ``fit`` calls leave the module intact.
        """
        import equinox as eqx

        static = getattr(self, "_equinox_static", None)
        if static is None:
            raise ConfigurationError("to_equinox(): this model was not made with FunctionalModel.from_equinox.")
        with self._lock:
            return eqx.combine(detach(self.params), static)

    def _apply(self, params, state, x, mask, training, mode):
        def run(params, state, x):
            if self._stateful:
                return self._user_apply(params, state, x, training)
            return self._user_apply(params, x, training), state

        if training and mode is WorkspaceMode.SEPARATE:
            run = jax.checkpoint(run, policy=jax.checkpoint_policies.save_only_these_names("ACTIVATIONS"))
        predictions, state = run(params, state, x)
        return predictions, predictions, state

    def _loss_of(self, loss_input, labels, mask):
        return self._user_loss(loss_input, labels, mask)
