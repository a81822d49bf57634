"""ComputationGraph: DL4J's second network type, a DAG of named layers and vertices.

Several inputs, several outputs, skip connections; trained on MultiDataSets with every
output's loss summed. It runs on MultiLayerNetwork's machinery (the same DAG executor,
feed, donated step, label check, checkpoints and parallel wrappers): a MultiLayerNetwork
is the graph that is a chain.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.arrays import check_arrays
from jaxws.data.dataset import MultiDataSet
from jaxws.errors import ConfigurationError, InvalidBatchError
from jaxws.memory import format_bytes
from jaxws.nn.graph_conf import ComputationGraphConfiguration, GraphBuilder, InputType
from jaxws.nn.model import Model, TrainState
from jaxws.nn.network import check_labels, check_mask, class_labels, labels_in_range
from jaxws.workspace import Workspace

__all__ = ["ComputationGraph", "ComputationGraphConfiguration", "GraphBuilder", "InputType"]


def _masks(masks: Any, n: int) -> tuple:
    return (None,) * n if masks is None else tuple(masks)


class ComputationGraph(Model):
    """DL4J's ComputationGraph: named inputs, layers and vertices, and several outputs.

    ``fit`` takes MultiDataSets, ``(inputs, labels)`` pairs of lists, or iterators of
    either (an ArrayMultiDataSetIterator runs device-resident, as an ArrayDataSetIterator
    does for a MultiLayerNetwork); the loss is the sum of every output's loss. Parameters
    and state are dicts keyed by vertex name.

    Example:
        >>> import numpy as np
        >>> from jaxws.nn import (ComputationGraph, NeuralNetConfiguration, Dense, OutputLayer,
        ...                       MergeVertex, Adam)
        >>> conf = (NeuralNetConfiguration.builder().seed(0).updater(Adam(1e-2)).graph_builder()
        ...         .add_inputs("a", "b")
        ...         .add_layer("da", Dense(8, activation="tanh"), "a")
        ...         .add_layer("db", Dense(8, activation="tanh"), "b")
        ...         .add_vertex("merge", MergeVertex(), "da", "db")
        ...         .add_layer("out", OutputLayer(2), "merge")
        ...         .set_outputs("out").set_input_types((3,), (2,)).build())
        >>> graph = ComputationGraph(conf).init()
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.normal(size=(64, 3)).astype(np.float32), rng.normal(size=(64, 2)).astype(np.float32)
        >>> y = (a[:, 0] + b[:, 1] > 0).astype(np.int32)
        >>> _ = graph.fit(([a, b], [y]), epochs=60, progress=False)
        >>> bool((graph.output_single(a, b).argmax(-1) == y).mean() > 0.9)
        True
    """

    def __init__(self, conf: ComputationGraphConfiguration):
        if not isinstance(conf, ComputationGraphConfiguration):
            raise ConfigurationError(
                f"ComputationGraph(conf={conf!r}): expected a ComputationGraphConfiguration, from "
                "NeuralNetConfiguration.builder()...graph_builder()...build()."
            )
        super().__init__(conf.optax_updater(), conf.training_workspace_mode, conf.inference_workspace_mode)
        self.conf = conf
        self._dag = conf.dag()
        self._names = [node.name for node in self._dag.nodes]
        self._heads = [self._dag.op(name) for name in conf.outputs]
        self.shapes: dict[str, tuple] = {}  # every input's and vertex's per-example shape
        self._checked_output = conf.outputs[0]  # the output whose class labels the step counts
        self._whats = tuple(self._labels_what(i) for i in range(len(conf.outputs)))  # for messages
        self._rnn_state: dict | None = None
        self._rnn_fn = None

    @classmethod
    def load(cls, path: str, *, load_updater: bool = True, conf: ComputationGraphConfiguration | None = None) -> ComputationGraph:
        """The graph saved at ``path`` (DL4J's ``restoreComputationGraph``); as MultiLayerNetwork.load."""
        from jaxws.nn.checkpoints import load_model

        return load_model(cls, ComputationGraphConfiguration, path, load_updater, conf)

    def init(self) -> ComputationGraph:
        """Initialises parameters and state from ``conf.seed``; returns self."""
        params, states, self.shapes = self._dag.init(jax.random.key(self.conf.seed), self.conf.input_shapes)
        self._rng = jax.random.fold_in(jax.random.key(self.conf.seed), len(self._names))
        params, states = jax.tree.map(jnp.copy, (dict(zip(self._names, params)), dict(zip(self._names, states))))
        self._carry = TrainState(params, states, self._updater.init(params))
        self.rnn_clear_previous_state()
        return self

    # -- the forward pass and the loss -----------------------------------------------------

    def _apply(self, params, state, xs, masks, training, mode):
        values, zs, _, states = self._dag.forward(
            [params[n] for n in self._names], [state[n] for n in self._names], xs,
            _masks(masks, len(self.conf.inputs)), training, mode, self.conf.offload_activations)
        outputs = self.conf.outputs
        return tuple(values[o] for o in outputs), tuple(zs[o] for o in outputs), dict(zip(self._names, states))

    def _loss_of(self, zs, labels, masks):
        masks = _masks(masks, len(zs))
        return sum(head.compute_loss(z, y, m) for head, z, y, m in zip(self._heads, zs, labels, masks))

    @staticmethod
    def _request(x: Any, mask: Any) -> MultiDataSet:
        return MultiDataSet(tuple(x), (), None if mask is None else tuple(mask))

    @staticmethod
    def _inputs_of(ds: MultiDataSet) -> tuple:
        return ds.features, ds.features_masks

    @staticmethod
    def _labels_of(ds: MultiDataSet) -> tuple:
        return ds.labels, ds.labels_masks

    def _output_names(self) -> tuple:
        return self.conf.outputs

    def _reseed(self, state: dict, key: jax.Array) -> dict:
        return {n: node.op.reseed(state[n], jax.random.fold_in(key, i))
                for i, (n, node) in enumerate(zip(self._names, self._dag.nodes))}

    # -- data ------------------------------------------------------------------------------

    def _feed(self, data: Any, op: str, **kwargs: Any):
        return super()._feed(data, op, multi=True, **kwargs)

    _NO_LABELS = ("output", "rnn_time_step", "ParallelInference.output")

    def _check_batch(self, ds: Any, op: str, shapes: bool = True) -> None:
        if not isinstance(ds, MultiDataSet):
            raise InvalidBatchError(
                f"{op}: a ComputationGraph takes MultiDataSets or ([inputs...], [labels...]) pairs; got "
                f"{type(ds).__name__}. Pass MultiDataSet((x_a, x_b), (y,)) or ([x_a, x_b], [y])."
            )
        if shapes:
            self._check_shapes(ds, op)
        masks = _masks(ds.labels_masks, len(ds.labels))
        for i, (head, labels, mask) in enumerate(zip(self._heads, ds.labels, masks)):
            labels_in_range(op, labels, mask, head, len(self.shapes[self.conf.outputs[i]]), self._whats[i])

    def _check_shapes(self, ds: MultiDataSet, op: str) -> None:
        inputs, shapes = self.conf.inputs, self.conf.input_shapes
        if len(ds.features) != len(inputs):
            raise InvalidBatchError(
                f"{op}: the graph has {len(inputs)} input(s) {list(inputs)}, the batch {len(ds.features)} "
                f"feature array(s); pass one per input, in that order: [{', '.join(f'x_{n}' for n in inputs)}].")
        batch = np.shape(ds.features[0])[0] if np.ndim(ds.features[0]) else None
        fmasks = _masks(ds.features_masks, len(inputs))
        if len(fmasks) != len(inputs):
            raise InvalidBatchError(f"{op}: {len(fmasks)} features mask(s) for {len(inputs)} input(s); give one per input (None where there is none).")
        for name, expected, x, mask in zip(inputs, shapes, ds.features, fmasks):
            got = tuple(np.shape(x))
            free = (0,) if len(expected) == 2 and op == "rnn_time_step" else ()
            if len(got) != len(expected) + 1 or got[0] != batch or not all(
                    e is None or e == g or j in free for j, (e, g) in enumerate(zip(expected, got[1:]))):
                want = ", ".join(["batch", *("time" if d is None else str(d) for d in expected)])
                raise InvalidBatchError(f"{op}: input {name!r} expects features of shape [{want}] (batch {batch}), received {list(got)}.")
            check_mask(op, f"features mask of {name!r}", mask, got[:2] if len(expected) == 2 else got[:1])
        if not ds.labels:
            if op not in self._NO_LABELS:
                raise InvalidBatchError(f"{op}: the batch has no labels; pass ([inputs...], [labels...]) with one label array per output {list(self.conf.outputs)}.")
            return
        if len(ds.labels) != len(self._heads):
            raise InvalidBatchError(
                f"{op}: the graph has {len(self._heads)} output(s) {list(self.conf.outputs)}, the batch "
                f"{len(ds.labels)} label array(s); pass one per output, in that order.")
        lmasks = _masks(ds.labels_masks, len(ds.labels))
        for i, (name, head, labels, mask) in enumerate(zip(self.conf.outputs, self._heads, ds.labels, lmasks)):
            shape, given = self.shapes[name], np.shape(labels)
            lead = [given[j + 1] if d is None and j + 1 < len(given) else d for j, d in enumerate(shape[:-1])]
            out_shape = (batch, *lead, head.n_out)  # a dynamic (time) axis: as long as the labels say
            check_labels(op, f"output {name!r} ({type(head).__name__}, loss {head.loss})", head, labels, out_shape)
            check_mask(op, f"labels mask of {name!r}", mask, out_shape[:-1])

    def _class_labels(self, ds: MultiDataSet):
        """The first output with integer class labels is counted on the device (host labels
        of every output are checked before the step)."""
        for head, labels, mask, name in zip(self._heads, ds.labels, _masks(ds.labels_masks, len(ds.labels)), self.conf.outputs):
            found = class_labels(head, labels, mask, len(self.shapes[name]))
            if found is not None:
                self._checked_output = name
                return found
        return None

    def _labels_what(self, i: int | None = None) -> str:
        names = self.conf.outputs
        name = names[i] if i is not None else self._checked_output
        head = self._dag.op(name)
        return f"loss {head.loss} of output {name!r} ({type(head).__name__}, n_out={head.n_out})"

    def _num_classes(self) -> int:
        return self._dag.op(self._checked_output).n_out

    # -- inference -------------------------------------------------------------------------

    def output(self, *inputs: Any, training: bool = False, masks: Any = None, key: jax.Array | None = None,
               workspace: Workspace | str | None = None) -> list:
        """The outputs for ``inputs`` (one array per graph input), a list in ``set_outputs``
        order; detached unless ``workspace`` is given (as MultiLayerNetwork.output)."""
        self._require_init()
        check_arrays("output", inputs, "inputs")
        check_arrays("output", masks, "masks")
        ds, signature = self._inference_input(MultiDataSet(tuple(inputs), (), None if masks is None else tuple(masks)))
        return list(self._run_output(ds.features, ds.features_masks, training, key, workspace, signature))

    def output_single(self, *inputs: Any, **kwargs: Any) -> jax.Array:
        """The output of a graph with one output (DL4J's ``outputSingle``)."""
        if len(self.conf.outputs) != 1:
            raise ConfigurationError(f"output_single: the graph has {len(self.conf.outputs)} outputs {list(self.conf.outputs)}; use output(...), which returns a list.")
        return self.output(*inputs, **kwargs)[0]

    def _eval_targets(self, predictions, ds: MultiDataSet, index: int):
        """``(labels, predictions, mask)`` of output ``index`` for the evaluators."""
        prediction = predictions[index]
        mask = _masks(ds.labels_masks, len(ds.labels))[index]
        if mask is None and prediction.ndim == 3:
            mask = next((m for m in _masks(ds.features_masks, len(ds.features)) if m is not None
                         and m.shape[:2] == prediction.shape[:2]), None)
        return ds.labels[index], prediction, mask

    # -- stateful step-by-step inference ---------------------------------------------------

    def rnn_clear_previous_state(self) -> None:
        """Forgets the RNN state that ``rnn_time_step`` carries."""
        self._rnn_state = None

    def rnn_time_step(self, *inputs: Any) -> list:
        """Runs ``inputs`` from the state of the previous call and keeps the new state.

        Each input is one step ``[batch, features]`` or several ``[batch, time, features]``;
        returns the outputs (one step each, or the steps given), detached. A batch of
        another size than the carried state's starts from a zero state, as after
        :meth:`rnn_clear_previous_state`. A KeyboardInterrupt during a call leaves the
        state of before or after it, never a donated one.
        """
        self._require_init()
        ds, signature = self._inference_input(MultiDataSet(tuple(inputs)), "rnn_time_step", self._rnn_check)
        single, several = self._steps_given(ds.features)
        return list(self._rnn_outputs(ds.features, signature, single, any(single) and not any(several)))

    def _steps_given(self, xs: tuple) -> tuple[tuple, tuple]:
        """Per input: given as one step (no time axis), given as several steps."""
        sequences = [len(s) == 2 for s in self.conf.input_shapes]
        return (tuple(seq and np.ndim(x) == 2 for x, seq in zip(xs, sequences)),
                tuple(seq and np.ndim(x) == 3 for x, seq in zip(xs, sequences)))

    def _rnn_check(self, ds: MultiDataSet, shapes: bool = True) -> None:
        """rnn_time_step's batch check: an input of one step is judged as a sequence of one."""
        if shapes:
            single = self._steps_given(ds.features)[0]
            self._check_batch(MultiDataSet(tuple(x[:, None] if one else x for x, one in zip(ds.features, single))),
                              "rnn_time_step")

    def _dag_lists(self, params: dict, state: dict) -> tuple[list, list]:
        return [params[n] for n in self._names], [state[n] for n in self._names]

    # -- summary ---------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self._require_init().params))

    def summary(self) -> str:
        """A table of vertices: kind, inputs, output shape, parameter count."""
        carry = self._require_init()
        rows = [f"{'vertex':<16} {'kind':<22} {'inputs':<24} {'output':<14} {'params':>10}"]
        rows.append("-" * len(rows[0]))
        for name, shape in zip(self.conf.inputs, self.conf.input_shapes):
            rows.append(f"{name[:16]:<16} {'input':<22} {'':<24} {str(shape):<14} {0:>10,}")
        for node in self._dag.nodes:
            count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(carry.params[node.name]))
            rows.append(f"{node.name[:16]:<16} {node.op.describe()[:22]:<22} {', '.join(node.inputs)[:24]:<24} "
                        f"{str(self.shapes[node.name]):<14} {count:>10,}")
        rows.append(f"total parameters: {self.num_params():,}; outputs: {', '.join(self.conf.outputs)}")
        rows.append(f"carry (params + updater + state), donated each step: "
                    f"{format_bytes(sum(a.nbytes for a in jax.tree.leaves(carry)))}")
        return "\n".join(rows)
