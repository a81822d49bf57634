"""The forward pass as a DAG of named vertices: what MultiLayerNetwork and ComputationGraph share.

A MultiLayerNetwork is the chain case. Each node is a layer (several inputs are concatenated
on the feature axis, as DL4J merges them) or a :class:`GraphVertex`; masks travel with the
activations; an output layer (a BaseOutputLayer that is a network output) yields its
pre-activations for the loss and its activations as the prediction. Under a workspace
mode, each node's backprop policy is a ``jax.checkpoint`` name policy.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxws.errors import ConfigurationError
from jaxws.nn.functions import activation as get_activation
from jaxws.nn.layers import LSTM, BaseOutputLayer
from jaxws.nn.modes import WorkspaceMode
from jaxws.nn.vertices import GraphVertex
from jaxws.nn.workspace_mgr import ArrayType, LayerWorkspaceMgr, validate_activations

__all__ = ["Dag", "Node", "policy"]

_DYNAMIC = (16, 17)  # two stand-in lengths of a dynamic (None) axis: axes that follow them are dynamic


def policy(choice: str):
    """The ``jax.checkpoint`` policy of a node's backprop choice (None: keep what XLA needs)."""
    if choice == "recompute":
        return jax.checkpoint_policies.save_only_these_names(ArrayType.ACTIVATIONS.value)
    if choice == "offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=[ArrayType.ACTIVATIONS.value],
            offload_src="device",
            offload_dst="pinned_host",
        )
    return None


@functools.cache
def _accepts_mask(cls: type) -> bool:
    return "mask" in inspect.signature(cls.activate).parameters


def _first(masks: Sequence[Any]) -> Any:
    return next((m for m in masks if m is not None), None)


class Node(NamedTuple):
    """A vertex of the DAG: ``op`` (a layer or GraphVertex) of the values named ``inputs``
    (a vertex's references last); ``label`` names it in messages."""

    name: str
    op: Any
    inputs: tuple[str, ...]
    label: str


class Dag:
    """Nodes in topological order between named ``inputs`` and ``outputs``."""

    def __init__(self, inputs: Sequence[str], nodes: Sequence[Node], outputs: Sequence[str]):
        self.inputs = tuple(inputs)
        self.nodes = tuple(nodes)
        self.outputs = tuple(outputs)
        self.heads = {name for name in self.outputs if isinstance(self.op(name), BaseOutputLayer)}
        self._validated: set = set()

    @classmethod
    def chain(cls, layers: Sequence[Any]) -> Dag:
        """The DAG of a MultiLayerNetwork: layer i reads layer i - 1."""
        nodes = [Node(f"layer{i}", layer, (f"layer{i - 1}" if i else "input",),
                      f"Layer {i} ({layer.describe()}, class {type(layer).__name__})")
                 for i, layer in enumerate(layers)]
        return cls(["input"], nodes, [nodes[-1].name])

    def op(self, name: str) -> Any:
        return next(node.op for node in self.nodes if node.name == name)

    # -- shapes and parameters -------------------------------------------------------------

    def _fn(self, node: Node, training: bool, mgr: LayerWorkspaceMgr, masks: Sequence[Any] = ()):
        """``fn(params, state, *inputs) -> (activations, state)`` of one node."""
        op = node.op
        if isinstance(op, GraphVertex):
            return lambda p, s, *xs: op.activate(p, s, list(xs), training, mgr, masks=list(masks) or None)
        mask = _first(masks)
        kwargs = {"mask": mask} if mask is not None and _accepts_mask(type(op)) else {}

        def run(p, s, *xs):
            x = xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1)
            return op.activate(p, s, x, training, mgr, **kwargs)

        return run

    def init(self, key: jax.Array, input_shapes: Sequence[tuple]) -> tuple[list, list, dict]:
        """``(params, states, shapes)``: per node, and every value's per-example shape."""
        keys = jax.random.split(key, len(self.nodes))
        shapes = dict(zip(self.inputs, (tuple(s) for s in input_shapes)))
        mgr = LayerWorkspaceMgr.no_workspaces()
        params, states = [], []
        for node, k in zip(self.nodes, keys):
            given = [shapes[name] for name in node.inputs]
            try:
                if isinstance(node.op, GraphVertex):
                    p, s = node.op.init(k, given)
                else:
                    if len({len(g) for g in given}) > 1 or len({g[:-1] for g in given}) > 1:
                        raise ConfigurationError(
                            f"its {len(given)} inputs are merged on the feature axis and must agree "
                            "before it; add a MergeVertex after bringing them to one shape")
                    p, s = node.op.init(k, (*given[0][:-1], sum(g[-1] for g in given)))
                fn = self._fn(node, False, mgr)
                runs = [jax.eval_shape(lambda p, s, *xs: fn(p, s, *xs)[0], p, s, *(
                    jax.ShapeDtypeStruct((1, *(d or n for d in g)), jnp.float32) for g in given)).shape[1:]
                    for n in _DYNAMIC]
            except (ValueError, TypeError, ConfigurationError) as e:
                shown = given[0] if len(given) == 1 else ", ".join(map(str, given))
                raise ConfigurationError(f"{node.label} cannot take per-example input of shape {shown}: {e}") from e
            params.append(p)
            states.append(s)
            shapes[node.name] = tuple(None if a != b else a for a, b in zip(*runs))
        return params, states, shapes

    # -- the forward pass ------------------------------------------------------------------

    def forward(self, params, state, xs: Sequence[Any], masks: Sequence[Any], training: bool,
                mode: WorkspaceMode | None, offload: bool = False):
        """``(values, preoutputs, masks, new_states)``: values, masks by name; the output
        layers' pre-activations (their loss input) by name; states per node."""
        mgr = LayerWorkspaceMgr()
        if training:
            self.validate(params, state, xs, mgr)
        values = dict(zip(self.inputs, xs))
        out_masks = dict(zip(self.inputs, masks))
        z_by_name, states = {}, []
        for i, node in enumerate(self.nodes):
            inputs = [values[name] for name in node.inputs]
            in_masks = [out_masks[name] for name in node.inputs]
            if node.name in self.heads:  # pre-activations for the loss, then the prediction
                x = inputs[0] if len(inputs) == 1 else jnp.concatenate(inputs, axis=-1)
                z = z_by_name[node.name] = mgr.leverage_to(ArrayType.FF_WORKING_MEM, node.op.preoutput(params[i], x))
                out, s = mgr.leverage_to(ArrayType.ACTIVATIONS, get_activation(node.op.activation)(z)), state[i]
            else:
                run = self._fn(node, training, mgr, in_masks)
                if training and mode is not None:
                    choice = node.op.remat or ("recompute" if mode is WorkspaceMode.SEPARATE else "save")
                    chosen = policy("offload" if choice == "recompute" and offload else choice)
                    if chosen is not None:
                        run = jax.checkpoint(run, policy=chosen)
                out, s = run(params[i], state[i], *inputs)
            states.append(s)
            values[node.name] = out
            out_masks[node.name] = self._mask(node, in_masks, out)
        return values, z_by_name, out_masks, states

    @staticmethod
    def _mask(node: Node, masks: list, out: jax.Array) -> Any:
        if isinstance(node.op, GraphVertex):
            return node.op.output_mask(masks, out)
        mask = _first(masks)
        return mask if mask is not None and out.ndim >= 3 and mask.shape[1] == out.shape[1] else None

    def validate(self, params, state, xs: Sequence[Any], mgr: LayerWorkspaceMgr) -> None:
        """Once per input signature, at trace time: every node returns ACTIVATIONS."""
        key = tuple((x.shape, x.dtype) for x in xs)
        if key in self._validated:
            return
        values = {name: jax.ShapeDtypeStruct(x.shape, x.dtype) for name, x in zip(self.inputs, xs)}
        for i, node in enumerate(self.nodes):
            fn = self._fn(node, True, mgr)
            args = [values[name] for name in node.inputs]
            validate_activations(node.op, i, fn, params[i], state[i], *args, label=node.label)
            out = jax.eval_shape(fn, params[i], state[i], *args)[0]
            values[node.name] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        self._validated.add(key)

    # -- stateful step-by-step inference ---------------------------------------------------

    def recurrent(self) -> list[int]:
        """The nodes that carry state from one ``rnn_time_step`` to the next (LSTMs)."""
        return [i for i, node in enumerate(self.nodes) if isinstance(node.op, LSTM)]

    def rnn(self, carries: dict, params, state, xs: Sequence[Any]):
        """The outputs' predictions for sequences ``xs`` run from ``carries`` (by node
        index, as strings), and the new carries."""
        mgr = LayerWorkspaceMgr.no_workspaces()
        values = dict(zip(self.inputs, xs))
        new = {}
        for i, node in enumerate(self.nodes):
            inputs = [values[name] for name in node.inputs]
            if isinstance(node.op, LSTM):
                x = inputs[0] if len(inputs) == 1 else jnp.concatenate(inputs, axis=-1)
                values[node.name], new[str(i)] = node.op.scan(params[i], x, carries[str(i)], mgr)
            elif node.name in self.heads:
                x = inputs[0] if len(inputs) == 1 else jnp.concatenate(inputs, axis=-1)
                values[node.name] = get_activation(node.op.activation)(node.op.preoutput(params[i], x))
            else:
                values[node.name] = self._fn(node, False, mgr)(params[i], state[i], *inputs)[0]
        return [values[name] for name in self.outputs], new
