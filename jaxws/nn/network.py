"""MultiLayerNetwork: a stack of layers trained and run under workspace modes.

The modes pick donation (all but NONE) and what backprop keeps (SEPARATE: only
ACTIVATIONS, through a ``jax.checkpoint`` name policy per layer).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.data.dataset import DataSet
from jaxws.errors import ConfigurationError, InvalidBatchError
from jaxws.memory import format_bytes
from jaxws.nn.checks import LabelCheck
from jaxws.nn.conf import NeuralNetConfiguration
from jaxws.nn.dag import Dag
from jaxws.nn.layers import BaseOutputLayer
from jaxws.nn.model import Model, TrainState

__all__ = ["MultiLayerNetwork", "check_labels", "check_mask", "class_labels", "labels_in_range"]

def check_mask(op: str, name: str, mask: Any, lead: tuple) -> None:
    """Raises for a mask whose shape is not ``lead`` (``[batch]`` or ``[batch, time]``)."""
    if mask is None:
        return
    shape = tuple(np.shape(mask))
    if shape not in (lead, (*lead, 1)):
        names = ", ".join(["batch", "time"][: len(lead)])
        raise InvalidBatchError(
            f"{op}: {name} has shape {list(shape)}, expected {list(lead)} ([{names}]: 1 where "
            f"data is real, 0 for padding) for this batch."
        )


def _sparse_loss(head: BaseOutputLayer) -> bool:
    return head.loss in ("mcxent", "negativeloglikelihood")


def check_labels(op: str, what: str, head: BaseOutputLayer, labels: Any, out_shape: tuple) -> None:
    """Raises unless ``labels`` fit output layer ``head`` (named ``what``) of outputs ``out_shape``."""
    shape = tuple(np.shape(labels))
    sparse = _sparse_loss(head) and shape == out_shape[:-1]
    if shape != out_shape and not sparse:
        raise InvalidBatchError(f"{op}: {what} expects labels of shape {head.labels_shape(out_shape)}, received {list(shape)}.")
    if sparse and not np.issubdtype(labels.dtype, np.integer):
        raise InvalidBatchError(
            f"{op}: class labels of shape {list(shape)} for {what} must have an integer dtype, got "
            f"{labels.dtype}; pass y.astype(int) (or one-hot labels of shape {list(out_shape)})."
        )


def labels_in_range(op: str, labels: Any, mask: Any, head: BaseOutputLayer, rank: int, what: str) -> None:
    """Host integer class labels (device ones are counted in the step) within ``head``'s classes."""
    if not (isinstance(labels, np.ndarray) and labels.size and labels.dtype.kind in "iu"  # integers
            and _sparse_loss(head) and labels.ndim == rank):
        return
    counted = labels if mask is None else labels[np.broadcast_to(
        np.asarray(mask).reshape(np.shape(mask)[: labels.ndim]) > 0, labels.shape)]
    # one pass per batch: read as unsigned, a negative class is larger than any valid one
    if counted.size and int(counted.view(f"u{counted.itemsize}").max()) >= head.n_out:
        raise InvalidBatchError(
            f"{op}: labels out of range for {what}: found classes {int(counted.min())}..{int(counted.max())}, "
            f"expected 0..{head.n_out - 1}."
        )


def class_labels(head: BaseOutputLayer, labels: Any, mask: Any, rank: int) -> tuple | None:
    """``(labels, mask, classes)`` when ``labels`` (traced) are integer classes of ``head``."""
    if (_sparse_loss(head) and labels is not None and jnp.issubdtype(labels.dtype, jnp.integer)
            and labels.ndim == rank):
        return labels, mask, head.n_out
    return None



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
            raise ConfigurationError(f"MultiLayerNetwork(conf={conf!r}): expected a NeuralNetConfiguration.")
        super().__init__(conf.optax_updater(), conf.training_workspace_mode, conf.inference_workspace_mode)
        self.conf = conf
        self.layers = conf.layers
        self.layer_input_shapes: list[tuple] = []
        self.output_shape: tuple = ()
        self._dag = Dag.chain(self.layers)
        self._rnn_state: dict | None = None
        self._rnn_fn = None
        self._what = self._labels_what()  # for messages, made once (the host check runs per batch)

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
        from jaxws.nn.checkpoints import load_model

        return load_model(cls, NeuralNetConfiguration, path, load_updater, conf)

    # -- construction ----------------------------------------------------------------------

    def init(self) -> MultiLayerNetwork:
        """Initialises parameters and state from ``conf.seed``; returns self."""
        params, states, shapes = self._dag.init(jax.random.key(self.conf.seed), [self.conf.input_shape])
        names = [node.name for node in self._dag.nodes]
        self.layer_input_shapes = [shapes[node.inputs[0]] for node in self._dag.nodes]
        self.output_shape = shapes[names[-1]]
        self._rng = jax.random.fold_in(jax.random.key(self.conf.seed), len(self.layers))  # output(training=True)
        # buffers the network owns: later fits donate them
        params, states = jax.tree.map(jnp.copy, (params, states))
        self._carry = TrainState(params, states, self._updater.init(params))
        self.rnn_clear_previous_state()
        return self

    # -- the forward pass ------------------------------------------------------------------

    def _apply(self, params, state, x, mask, training, mode):
        values, zs, _, states = self._dag.forward(params, state, [x], [mask], training, mode, self.conf.offload_activations)
        out = self._dag.outputs[0]
        return values[out], zs[out], states

    def _loss_of(self, z, labels, mask):
        return self.layers[-1].compute_loss(z, labels, mask)

    # -- input checks (host-side, before anything is donated) ------------------------------

    _NO_LABELS = ("output", "rnn_time_step", "ParallelInference.output")

    def _check_batch(self, ds: DataSet, op: str, shapes: bool = True) -> None:
        """Shapes, ranks, masks and label dtypes (``shapes=False``: already checked for this
        signature), then the values of host class labels."""
        if not isinstance(ds, DataSet):
            raise InvalidBatchError(
                f"{op}: a MultiLayerNetwork takes DataSets or (features, labels) pairs; got a "
                f"{type(ds).__name__}. Several inputs or outputs need a ComputationGraph."
            )
        if shapes:
            self._check_shapes(ds, op, tuple(np.shape(ds.features)))
        labels_in_range(op, ds.labels, ds.labels_mask, self.layers[-1], len(self.output_shape), self._what)

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
                f"features of shape [{want}], received {'None' if ds.features is None else list(got)}.{hint}"
            )
        lead = got[:2] if sequences else got[:1]
        check_mask(op, "features_mask", ds.features_mask, lead)
        if ds.labels is None:
            if op not in self._NO_LABELS:
                raise InvalidBatchError(
                    f"{op}: the batch has no labels. Pass (features, labels), e.g. "
                    f"{op}((x, y)), or a DataSet(features, labels)."
                )
            return
        out: BaseOutputLayer = self.layers[-1]
        out_shape = (got[0], *got[1 : 1 + len(self.output_shape) - 1], out.n_out)
        what = f"layer {len(self.layers) - 1} ({out.describe()}, class {type(out).__name__}, loss {out.loss})"
        check_labels(op, what, out, ds.labels, out_shape)
        check_mask(op, "labels_mask", ds.labels_mask, out_shape[:-1])

    def _class_labels(self, ds: DataSet):
        return class_labels(self.layers[-1], ds.labels, ds.labels_mask, len(self.output_shape))

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
        ``inference_workspace_mode`` is NONE); the output is detached. Shapes are judged
        once per signature, and inputs go to the program as ``output``'s do. A batch of
        another size than the carried state's starts from a zero state, as after
        :meth:`rnn_clear_previous_state`. A KeyboardInterrupt during a call leaves the
        state of before or after it, never a donated one.
        """
        self._require_init()
        ds, signature = self._inference_input(DataSet(x), "rnn_time_step", self._rnn_check)
        single = np.ndim(ds.features) == len(self.conf.input_shape)
        return self._rnn_outputs((ds.features,), signature, (single,), single)[0]

    def _rnn_check(self, ds: DataSet, shapes: bool = True) -> None:
        """rnn_time_step's batch check: one step is judged as a sequence of one."""
        if shapes:
            x = ds.features
            self._check_batch(DataSet(x[:, None]) if np.ndim(x) == len(self.conf.input_shape) else ds, "rnn_time_step")

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
        x = jax.ShapeDtypeStruct((batch_size, *(d or 16 for d in self.conf.input_shape)), jnp.float32)
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
