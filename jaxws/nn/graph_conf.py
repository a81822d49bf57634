"""ComputationGraphConfiguration and DL4J's graph builder: a DAG validated when it is built."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxws.errors import ConfigurationError
from jaxws.nn.conf import NetworkSettings
from jaxws.nn.dag import Dag, Node
from jaxws.nn.layers import BaseOutputLayer, Layer, layer_from_dict
from jaxws.nn.vertices import GraphVertex

__all__ = ["ComputationGraphConfiguration", "GraphBuilder", "InputType"]


class InputType:
    """DL4J's ``InputType``: per-example input shapes for ``set_input_types``."""

    @staticmethod
    def feed_forward(size: int) -> tuple:
        """``[batch, size]`` inputs."""
        return (size,)

    @staticmethod
    def recurrent(size: int, length: int | None = None) -> tuple:
        """Sequences ``[batch, time, size]`` (``length`` None: any length)."""
        return (length, size)


def _shape(value: Any, where: str) -> tuple:
    shape = (value,) if isinstance(value, int) else value
    if not isinstance(shape, (tuple, list)) or not shape or not all(
            d is None or (isinstance(d, int) and not isinstance(d, bool) and d > 0) for d in shape):
        raise ConfigurationError(
            f"{where}={value!r}: expected a per-example shape without the batch axis, e.g. (64,) "
            "or (None, 8) for sequences of any length (InputType.feed_forward(64), InputType.recurrent(8))."
        )
    return tuple(shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputationGraphConfiguration(NetworkSettings):
    """What a ComputationGraph is made of; built by ``NeuralNetConfiguration.builder().graph_builder()``.

    Validated when made: every name known and used, no cycles, one loss-bearing output
    layer per output, and every vertex's input shapes accepted (shape inference from
    ``input_shapes``). Errors name the vertex.

    Args:
        inputs: the names of the graph's inputs, in the order data gives them.
        vertices: ``(name, layer_or_vertex, input_names)`` triples.
        outputs: the names of the output layers, in the order labels are given.
        input_shapes: one per-example shape per input.
        seed, updater, training_workspace_mode, inference_workspace_mode,
        offload_activations: as for NeuralNetConfiguration.

    Example:
        >>> from jaxws.nn import NeuralNetConfiguration, Dense, OutputLayer, MergeVertex, Sgd
        >>> conf = (NeuralNetConfiguration.builder().seed(1).updater(Sgd(0.1)).graph_builder()
        ...         .add_inputs("a", "b")
        ...         .add_layer("da", Dense(4, activation="tanh"), "a")
        ...         .add_vertex("merge", MergeVertex(), "da", "b")
        ...         .add_layer("out", OutputLayer(2), "merge")
        ...         .set_outputs("out").set_input_types((3,), (2,)).build())
        >>> [name for name, *_ in conf.vertices], conf.outputs
        (['da', 'merge', 'out'], ('out',))
    """

    inputs: tuple[str, ...]
    vertices: tuple[tuple[str, Layer, tuple[str, ...]], ...]
    outputs: tuple[str, ...]
    input_shapes: tuple[tuple, ...]

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        put("inputs", tuple(self.inputs))
        put("outputs", tuple(self.outputs))
        put("vertices", tuple((name, op, tuple(ins)) for name, op, ins in self.vertices))
        if not self.inputs:
            raise ConfigurationError("graph_builder(): no inputs; call add_inputs('input_name', ...) first.")
        if len(self.input_shapes) != len(self.inputs):
            raise ConfigurationError(
                f"set_input_types: {len(self.input_shapes)} shape(s) for the {len(self.inputs)} input(s) "
                f"{list(self.inputs)}; give one per-example shape per input, in that order."
            )
        put("input_shapes", tuple(_shape(s, f"set_input_types({name!r})") for name, s in zip(self.inputs, self.input_shapes)))
        self._check_settings()
        self._check_names()
        order = self._order()
        dag = Dag(self.inputs, [self._node(i) for i in order], self.outputs)
        jax.eval_shape(lambda key: dag.init(key, self.input_shapes)[:2], jax.random.key(self.seed))  # shape inference

    def _node(self, i: int) -> Node:
        name, op, inputs = self.vertices[i]
        return Node(name, op, (*inputs, *getattr(op, "references", ())), f"Vertex {name!r} ({type(op).__name__})")

    def _check_names(self) -> None:
        known = list(self.inputs)
        for i, (name, op, inputs) in enumerate(self.vertices):
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"graph_builder: vertex {i} has name {name!r}; give every vertex a non-empty string name.")
            if name in known:
                raise ConfigurationError(f"graph_builder: the name {name!r} is used twice; vertex and input names must be unique.")
            known.append(name)
            if not (hasattr(op, "init") and hasattr(op, "activate")):
                raise ConfigurationError(f"graph_builder: vertex {name!r} is {op!r}, not a layer or GraphVertex.")
            if not inputs:
                raise ConfigurationError(f"graph_builder: vertex {name!r} has no inputs; add_layer(name, layer, 'input_name').")
            low, high = getattr(op, "n_inputs", (1, None))
            if len(inputs) < low or (high is not None and len(inputs) > high):
                want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
                raise ConfigurationError(
                    f"graph_builder: vertex {name!r} ({type(op).__name__}) takes {want} input(s), got {len(inputs)}: {list(inputs)}."
                )
        names = set(known)
        for name, op, inputs in self.vertices:
            for source in (*inputs, *getattr(op, "references", ())):
                if source not in names:
                    raise ConfigurationError(
                        f"graph_builder: vertex {name!r} reads {source!r}, which is neither an input nor a "
                        f"vertex of this graph (known: {sorted(names)})."
                    )
        if not self.outputs:
            raise ConfigurationError("graph_builder: no outputs; call set_outputs('output_layer_name', ...).")
        ops = {name: op for name, op, _ in self.vertices}
        for name in self.outputs:
            if not isinstance(ops.get(name), BaseOutputLayer):
                what = "an input" if name in self.inputs else "unknown" if name not in ops else type(ops[name]).__name__
                raise ConfigurationError(
                    f"graph_builder: output {name!r} is {what}; outputs must be output layers (OutputLayer, "
                    "RnnOutputLayer) that carry the loss."
                )
        read = {source for name, op, inputs in self.vertices for source in (*inputs, *getattr(op, "references", ()))}
        for name in known:
            if name not in read and name not in self.outputs:
                kind = "input" if name in self.inputs else "vertex"
                raise ConfigurationError(
                    f"graph_builder: {kind} {name!r} is not used: nothing reads it and it is not an output. "
                    f"Remove it, feed it to a vertex, or add it to set_outputs."
                )

    def _order(self) -> list[int]:
        """Vertex indices in topological order (Kahn's, in the order added); cycles raise."""
        done = set(self.inputs)
        pending = list(range(len(self.vertices)))
        order = []
        while pending:
            ready = [i for i in pending if all(s in done for s in (*self.vertices[i][2], *getattr(self.vertices[i][1], "references", ())))]
            if not ready:  # what is left reads itself; drop what only hangs off the cycle
                stuck = [self.vertices[i][0] for i in pending]
                while True:
                    read = {s for i in pending if self.vertices[i][0] in stuck
                            for s in (*self.vertices[i][2], *getattr(self.vertices[i][1], "references", ()))}
                    kept = [name for name in stuck if name in read]
                    if kept == stuck:
                        break
                    stuck = kept
                raise ConfigurationError(
                    f"graph_builder: the graph has a cycle through the vertices {stuck}; a vertex cannot "
                    "read its own output, directly or through others."
                )
            for i in ready:
                order.append(i)
                done.add(self.vertices[i][0])
            pending = [i for i in pending if i not in ready]
        return order

    def dag(self) -> Dag:
        """The graph's executor: nodes in topological order."""
        return Dag(self.inputs, [self._node(i) for i in self._order()], self.outputs)

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": "jaxws.ComputationGraphConfiguration",
            "version": 1,
            "inputs": list(self.inputs),
            "vertices": [{"name": name, "op": op.to_dict(), "inputs": list(inputs)} for name, op, inputs in self.vertices],
            "outputs": list(self.outputs),
            "input_shapes": [list(s) for s in self.input_shapes],
            **self._settings_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict, *, custom_layers: dict[str, type] | None = None,
                  updater: Any = None) -> ComputationGraphConfiguration:
        settings = cls._settings_from(data, updater)
        return cls(
            inputs=tuple(data["inputs"]),
            vertices=tuple((v["name"], layer_from_dict(v["op"], custom_layers), tuple(v["inputs"])) for v in data["vertices"]),
            outputs=tuple(data["outputs"]),
            input_shapes=tuple(tuple(s) for s in data["input_shapes"]),
            **settings,
        )


class GraphBuilder:
    """DL4J's ``graphBuilder()``: ``add_inputs``, ``add_layer``, ``add_vertex``, ``set_outputs``,
    ``set_input_types``, ``build``."""

    def __init__(self, fields: dict[str, Any] | None = None):
        self._fields = dict(fields or {})
        self._fields.pop("input_shape", None)
        self._inputs: list[str] = []
        self._vertices: list[tuple] = []
        self._outputs: list[str] = []
        self._shapes: list = []

    def add_inputs(self, *names: str) -> GraphBuilder:
        self._inputs.extend(names)
        return self

    def add_layer(self, name: str, layer: Layer, *inputs: str) -> GraphBuilder:
        self._vertices.append((name, layer, inputs))
        return self

    def add_vertex(self, name: str, vertex: GraphVertex, *inputs: str) -> GraphBuilder:
        self._vertices.append((name, vertex, inputs))
        return self

    def set_outputs(self, *names: str) -> GraphBuilder:
        self._outputs = list(names)
        return self

    def set_input_types(self, *shapes: Any) -> GraphBuilder:
        self._shapes = list(shapes)
        return self

    def build(self) -> ComputationGraphConfiguration:
        return ComputationGraphConfiguration(inputs=tuple(self._inputs), vertices=tuple(self._vertices),
                                             outputs=tuple(self._outputs), input_shapes=tuple(self._shapes),
                                             **self._fields)
