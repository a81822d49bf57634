"""MultiLayerNetwork: a stack of layers trained and run under workspace modes.

The modes pick donation (all but NONE) and what backprop keeps (SEPARATE: only
ACTIVATIONS, through a ``jax.checkpoint`` name policy per layer).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.data.dataset import DataSet
from jaxws.data.feed import validate
from jaxws.errors import ConfigurationError, InvalidBatchError
from jaxws.manager import get_workspace_manager
from jaxws.memory import format_bytes
from jaxws.nn.checks import LabelCheck
from jaxws.nn.conf import NeuralNetConfiguration
from jaxws.nn.functions import activation as get_activation
from jaxws.nn.layers import LSTM, BaseOutputLayer
from jaxws.nn.model import Model, TrainState
from jaxws.nn.modes import WorkspaceMode
from jaxws.nn.workspace_mgr import ArrayType, LayerWorkspaceMgr, validate_activations
from jaxws.step import jit

__all__ = ["MultiLayerNetwork"]

_DYNAMIC = 16  # stand-in length of a dynamic (None) axis when shapes are inferred


def _policy(choice: str):
    if choice == "recompute":
        return jax.checkpoint_policies.save_only_these_names(ArrayType.ACTIVATIONS.value)
    if choice == "offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=[ArrayType.ACTIVATIONS.value],
            offload_src="device",
            offload_dst="pinned_host",
        )
    return None  # "save": keep what XLA needs


@functools.cache
def _accepts_mask(cls: type) -> bool:
    return "mask" in inspect.signature(cls.activate).parameters


class MultiLayerNetwork(Model):
    """DL4J's MultiLayerNetwork: layers in sequence, trained with an optax updater.

    Example:
        >>> import numpy as np, optax, jaxws
        >>> from jaxws.nn import MultiLayerNetwork, NeuralNetConfiguration, Dense, OutputLayer
        >>> conf = NeuralNetConfiguration(
        ...     layers=[Dense(16, activation="tanh"), OutputLayer(2)], input_shape=(4,),
        ...     updater=optax.adam(1e-2))
        >>> net = MultiLayerNetwork(conf).init()
        >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
        >>> y = (x[:, 0] > 0).astype(np.int32)
        >>> _ = net.fit((x, y), epochs=50, progress=False)
        >>> bool((net.output(x).argmax(-1) == y).mean() > 0.9)
        True
    """

    def __init__(self, conf: NeuralNetConfiguration):
        if not isinstance(conf, NeuralNetConfiguration):
            raise TypeError(f"MultiLayerNetwork(conf={conf!r}): expected a NeuralNetConfiguration.")
        super().__init__(conf.optax_updater(), conf.training_workspace_mode, conf.inference_workspace_mode)
        self.conf = conf
        self.layers = conf.layers
        self.layer_input_shapes: list[tuple] = []
        self.output_shape: tuple = ()
        self._validated: set = set()
        self._rnn_state: dict | None = None
        self._rnn_fn = None

    @classmethod
    def load(cls, path: str, *, load_updater: bool = True, conf: NeuralNetConfiguration | None = None) -> MultiLayerNetwork:
        """The network saved at ``path`` (DL4J's ``restoreMultiLayerNetwork``).

        Args:
            path: a directory written by ``save`` (or a CheckpointListener checkpoint's).
            load_updater: restore the updater state too (to resume training exactly).
            conf: the configuration, when the saved one used a raw optax updater (JSON cannot
                hold it); the architecture must be the saved one.

        Raises:
            CheckpointError: no checkpoint there, an unreadable one, or one of another model.
            ConfigurationError: the saved updater was a raw optax transformation and no
                ``conf`` was given.
        """
        from jaxws.nn.checkpoints import read_meta

        meta = read_meta(path)
        if meta.get("model") != "MultiLayerNetwork":
            from jaxws.errors import CheckpointError

            raise CheckpointError(f"The checkpoint at {path} holds a {meta.get('model')}, not a MultiLayerNetwork.")
        if conf is None:
            conf = NeuralNetConfiguration.from_dict(meta["conf"])
        return cls(conf).init().restore(path, load_updater=load_updater)

    # -- construction ----------------------------------------------------------------------

    def init(self) -> MultiLayerNetwork:
        """Initialises parameters and state from ``conf.seed``; returns self."""
        keys = jax.random.split(jax.random.key(self.conf.seed), len(self.layers))
        shape = self.conf.input_shape
        params, states, shapes = [], [], []
        mgr = LayerWorkspaceMgr.no_workspaces()
        for i, (layer, key) in enumerate(zip(self.layers, keys)):
            shapes.append(shape)
            try:
                p, s = layer.init(key, shape)
                x = jax.ShapeDtypeStruct((1, *(d or _DYNAMIC for d in shape)), jnp.float32)
                out = jax.eval_shape(lambda p, s, x, layer=layer: layer.activate(p, s, x, False, mgr)[0], p, s, x)
            except (ValueError, TypeError) as e:
                raise ConfigurationError(
                    f"Layer {i} ({layer.describe()}, class {type(layer).__name__}) cannot take "
                    f"per-example input of shape {shape}: {e}"
                ) from e
            params.append(p)
            states.append(s)
            dims = out.shape[1:]
            shape = tuple(
                None if j < len(shape) and shape[j] is None and len(dims) == len(shape) else d
                for j, d in enumerate(dims)
            )
        self.layer_input_shapes, self.output_shape = shapes, shape
        self._rng = jax.random.fold_in(jax.random.key(self.conf.seed), len(self.layers))  # output(training=True)
        # buffers the network owns: later fits donate them
        params, states = jax.tree.map(jnp.copy, (params, states))
        self._carry = TrainState(params, states, self._updater.init(params))
        self.rnn_clear_previous_state()
        return self

    # -- the forward pass ------------------------------------------------------------------

    def _run_layer(self, i: int, params, state, x, mask, training: bool, mgr, mode: WorkspaceMode | None):
        layer = self.layers[i]
        kwargs = {"mask": mask} if mask is not None and _accepts_mask(type(layer)) else {}

        def run(p, s, h):
            return layer.activate(p, s, h, training, mgr, **kwargs)

        if training and mode is not None:
            choice = layer.remat or ("recompute" if mode is WorkspaceMode.SEPARATE else "save")
            if choice == "recompute" and self.conf.offload_activations:
                choice = "offload"
            policy = _policy(choice)
            if policy is not None:
                run = jax.checkpoint(run, policy=policy)
        return run(params, state, x)

    def _apply(self, params, state, x, mask, training, mode):
        mgr = LayerWorkspaceMgr()
        if training:
            self._validate(params, state, x, mgr)
        states = []
        for i in range(len(self.layers) - 1):
            x, s = self._run_layer(i, params[i], state[i], x, mask, training, mgr, mode)
            states.append(s)
        out_layer: BaseOutputLayer = self.layers[-1]
        z = mgr.leverage_to(ArrayType.FF_WORKING_MEM, out_layer.preoutput(params[-1], x))
        states.append(state[-1])
        predictions = mgr.leverage_to(ArrayType.ACTIVATIONS, get_activation(out_layer.activation)(z))
        return predictions, z, states

    def _loss_of(self, z, labels, mask):
        return self.layers[-1].compute_loss(z, labels, mask)

    def _validate(self, params, state, x, mgr) -> None:
        """Once per input shape, at trace time: every layer returns ACTIVATIONS."""
        key = (x.shape, x.dtype)
        if key in self._validated:
            return
        h = jax.ShapeDtypeStruct(x.shape, x.dtype)
        for i, layer in enumerate(self.layers):
            fn = functools.partial(lambda l, p, s, h: l.activate(p, s, h, True, mgr), layer)
            validate_activations(layer, i, fn, params[i], state[i], h)
            out = jax.eval_shape(fn, params[i], state[i], h)[0]
            h = jax.ShapeDtypeStruct(out.shape, out.dtype)
        self._validated.add(key)

    # -- input checks (host-side, before anything is donated) ------------------------------

    _NO_LABELS = ("output", "rnn_time_step", "ParallelInference.output")

    def _check_batch(self, ds: DataSet, op: str, shapes: bool = True) -> None:
        """Shapes, ranks, masks and label dtypes (``shapes=False``: already checked for this
        signature), then the values of host class labels."""
        got = tuple(np.shape(ds.features))
        if shapes:
            self._check_shapes(ds, op, got)
        out: BaseOutputLayer = self.layers[-1]
        labels = ds.labels
        if (isinstance(labels, np.ndarray) and labels.size and np.issubdtype(labels.dtype, np.integer)
                and out.loss in ("mcxent", "negativeloglikelihood") and labels.ndim == len(self.output_shape)):
            # host labels are checked here, before the step; device labels in the step itself
            counted = labels if ds.labels_mask is None else labels[np.broadcast_to(
                np.asarray(ds.labels_mask).reshape(np.shape(ds.labels_mask)[: labels.ndim]) > 0, labels.shape)]
            if counted.size:
                low, high = int(counted.min()), int(counted.max())
                if low < 0 or high >= out.n_out:
                    raise InvalidBatchError(
                        f"{op}: labels out of range for {self._labels_what()}: found classes "
                        f"{low}..{high}, expected 0..{out.n_out - 1}."
                    )

    def _check_shapes(self, ds: DataSet, op: str, got: tuple) -> None:
        first = self.layers[0]
        expected = self.conf.input_shape
        sequences = len(expected) == 2
        free = (0,) if sequences and op == "rnn_time_step" else ()  # any number of steps
        fits = len(got) == len(expected) + 1 and all(
            e is None or e == g or j in free for j, (e, g) in enumerate(zip(expected, got[1:])))
        if not fits:
            want = ", ".join(["batch", *("time" if d is None else str(d) for d in expected)])
            hint = ""
            if sequences:
                hint = " Sequences are [batch, time, features]."
                if expected[0] is not None and len(got) == 3 and got[2] == expected[1]:
                    hint += (f" The configuration fixes time at {expected[0]}; declare input_shape="
                             f"(None, {expected[1]}) for sequences of any length.")
            raise InvalidBatchError(
                f"{op}: layer 0 ({first.describe()}, class {type(first).__name__}) expects "
                f"features of shape [{want}], received {list(got)}.{hint}"
            )
        lead = got[:2] if sequences else got[:1]
        self._check_mask(op, "features_mask", ds.features_mask, lead)
        if ds.labels is None:
            if op not in self._NO_LABELS:
                raise InvalidBatchError(
                    f"{op}: the batch has no labels. Pass (features, labels), e.g. "
                    f"{op}((x, y)), or a DataSet(features, labels)."
                )
            return
        out: BaseOutputLayer = self.layers[-1]
        index = len(self.layers) - 1
        out_shape = (got[0], *got[1 : 1 + len(self.output_shape) - 1], out.n_out)
        labels = np.shape(ds.labels)
        sparse = out.loss in ("mcxent", "negativeloglikelihood") and labels == out_shape[:-1]
        if labels != out_shape and not sparse:
            raise InvalidBatchError(
                f"{op}: layer {index} ({out.describe()}, class {type(out).__name__}, loss "
                f"{out.loss}) expects labels of shape {out.labels_shape(out_shape)}, received "
                f"{list(labels)}."
            )
        self._check_mask(op, "labels_mask", ds.labels_mask, out_shape[:-1])
        if sparse and not np.issubdtype(ds.labels.dtype, np.integer):
            raise InvalidBatchError(
                f"{op}: class labels of shape {list(labels)} for layer {index} ({type(out).__name__}) "
                f"must have an integer dtype, got {ds.labels.dtype}; pass y.astype(int) (or one-hot "
                f"labels of shape {list(out_shape)})."
            )

    @staticmethod
    def _check_mask(op: str, name: str, mask: Any, lead: tuple) -> None:
        if mask is None:
            return
        shape = tuple(np.shape(mask))
        if shape not in (lead, (*lead, 1)):
            names = ", ".join(["batch", "time"][: len(lead)])
            raise InvalidBatchError(
                f"{op}: {name} has shape {list(shape)}, expected {list(lead)} ([{names}]: 1 where "
                f"data is real, 0 for padding) for this batch."
            )

    def _class_labels(self, ds: DataSet):
        out: BaseOutputLayer = self.layers[-1]
        labels = ds.labels
        if (out.loss in ("mcxent", "negativeloglikelihood") and labels is not None
                and jnp.issubdtype(labels.dtype, jnp.integer) and labels.ndim == len(self.output_shape)):
            return labels, ds.labels_mask, out.n_out
        return None

    def _labels_what(self) -> str:
        out: BaseOutputLayer = self.layers[-1]
        return f"loss {out.loss} of layer {len(self.layers) - 1} ({type(out).__name__}, n_out={out.n_out})"

    def _num_classes(self) -> int:
        return self.layers[-1].n_out

    def _reseed(self, state: list, key: jax.Array) -> list:
        return [layer.reseed(s, jax.random.fold_in(key, i)) for i, (layer, s) in enumerate(zip(self.layers, state))]

    # -- stateful step-by-step inference ---------------------------------------------------

    def rnn_clear_previous_state(self) -> None:
        """Forgets the RNN state that ``rnn_time_step`` carries."""
        self._rnn_state = None

    def rnn_time_step(self, x: Any) -> jax.Array:
        """Runs ``x`` from the RNN state of the previous call and keeps the new state.

        ``x`` is one step ``[batch, features]`` (returns ``[batch, n_out]``) or any number
        of steps ``[batch, time, features]``, whatever time length the configuration
        declares. The state is carried in buffers donated to each call (unless
        ``inference_workspace_mode`` is NONE); the output is detached.
        """
        self._require_init()
        x = validate(DataSet(x), "rnn_time_step").features
        single = np.ndim(x) == len(self.conf.input_shape)
        seq = self._input(DataSet(x[:, None] if single else x), "rnn_time_step").features
        lstms = [i for i, layer in enumerate(self.layers) if isinstance(layer, LSTM)]
        batch = seq.shape[0]
        if self._rnn_state is None or next(iter(self._rnn_state.values()), (jnp.zeros((batch,)),))[0].shape[0] != batch:
            self._rnn_state = {str(i): self.layers[i].initial_carry(batch) for i in lstms}
        if self._rnn_fn is None:
            def rnn_step(rnn_state, params, state, x):
                mgr = LayerWorkspaceMgr.no_workspaces()
                new = {}
                for i, layer in enumerate(self.layers[:-1]):
                    if isinstance(layer, LSTM):
                        x, new[str(i)] = layer.scan(params[i], x, rnn_state[str(i)], mgr)
                    else:
                        x, _ = layer.activate(params[i], state[i], x, False, mgr)
                out = self.layers[-1]
                return get_activation(out.activation)(out.preoutput(params[-1], x)), new

            rnn_step.__name__ = "MultiLayerNetwork.rnn_time_step"
            donate = (0,) if self.inference_workspace_mode.donates else ()
            self._rnn_fn = jit(rnn_step, donate_argnums=donate)
        with get_workspace_manager().scope_out_of_workspaces(), self._lock:
            carry = self._carry
            out, self._rnn_state = self._rnn_fn(self._rnn_state, carry.params, carry.state, seq)
        return out[:, 0] if single else out

    # -- summary ---------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self._require_init().params))

    def summary(self, batch_size: int = 32) -> str:
        """Layers, parameter counts, and the compiled memory plans of fit and output.

        Plans are for a batch of ``batch_size`` (dynamic axes at 16); compiling them may
        take a moment the first time.
        """
        carry = self._require_init()
        rows = [f"{'#':>3}  {'layer':<22} {'input':<16} {'output':<16} {'params':>10}"]
        rows.append("-" * len(rows[0]))
        shapes = [*self.layer_input_shapes[1:], self.output_shape]
        for i, layer in enumerate(self.layers):
            count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(carry.params[i]))
            rows.append(
                f"{i:>3}  {layer.describe()[:22]:<22} {str(self.layer_input_shapes[i]):<16} "
                f"{str(shapes[i]):<16} {count:>10,}"
            )
        rows.append(f"total parameters: {self.num_params():,}")
        x = jax.ShapeDtypeStruct((batch_size, *(d or _DYNAMIC for d in self.conf.input_shape)), jnp.float32)
        out = self.layers[-1]
        y_shape = (batch_size, *x.shape[1 : len(self.output_shape)], out.n_out)
        ds = DataSet(x, jax.ShapeDtypeStruct(y_shape, jnp.float32))
        mode = self.training_workspace_mode
        plan = self.compiled_step(mode).memory_plan(carry, LabelCheck.init(), ds)
        infer = self._inference_fn(False).memory_plan(carry.params, carry.state, x, None)
        rows.append(f"workspace WS_TRAINING  (fit, {mode.name}, batch {batch_size}): {plan}")
        rows.append(f"workspace WS_INFERENCE (output, batch {batch_size}): {infer}")
        rows.append(f"carry (params + updater + state), donated each step: "
                    f"{format_bytes(sum(a.nbytes for a in jax.tree.leaves(carry)))}")
        text = "\n".join(rows)
        return text
