"""Graph vertices: what a ComputationGraph adds to layers (DL4J's ``GraphVertex`` family).

A vertex is a layer of several inputs: ``init(key, input_shapes) -> (params, state)`` and
``activate(params, state, inputs, training, mgr, masks=None) -> (activations, state)``,
activations in ``ArrayType.ACTIVATIONS`` (validated as a layer's are). A vertex that reads
another vertex besides its inputs names it in ``references``; its value (and mask) comes
after the inputs. Shapes are per example (no batch axis; ``None`` for a dynamic time axis).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp

from jaxws.errors import ConfigurationError
from jaxws.nn.layers import Layer
from jaxws.nn.workspace_mgr import ArrayType, LayerWorkspaceMgr

__all__ = [
    "GraphVertex",
    "MergeVertex",
    "ElementWiseVertex",
    "SubsetVertex",
    "StackVertex",
    "UnstackVertex",
    "ScaleVertex",
    "ShiftVertex",
    "L2Vertex",
    "LastTimeStepVertex",
    "DuplicateToTimeSeriesVertex",
    "PreprocessorVertex",
    "Preprocessor",
    "ReshapePreprocessor",
]

Shape = tuple


def _same_shapes(vertex: GraphVertex, shapes: Sequence[Shape]) -> None:
    if len({tuple(s) for s in shapes}) > 1:
        raise ConfigurationError(
            f"{type(vertex).__name__} needs inputs of one shape; got per-example shapes "
            f"{', '.join(str(tuple(s)) for s in shapes)}. Add a Dense layer (or a "
            "PreprocessorVertex) before it to bring them to one shape."
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraphVertex(Layer):
    """Base of every vertex: a layer that takes a list of inputs.

    Implement ``activate`` (and ``init`` for a vertex with parameters); return the
    activations through ``mgr.leverage_to(ArrayType.ACTIVATIONS, ...)``.

    Example:
        >>> import dataclasses, jax.numpy as jnp
        >>> from jaxws.nn import ArrayType, GraphVertex, LayerWorkspaceMgr
        >>> @dataclasses.dataclass(frozen=True)
        ... class Difference(GraphVertex):
        ...     def activate(self, params, state, inputs, training, mgr, masks=None):
        ...         return mgr.leverage_to(ArrayType.ACTIVATIONS, inputs[0] - inputs[1]), state
        >>> out, _ = Difference().activate({}, {}, [jnp.ones(2), jnp.ones(2)], False, LayerWorkspaceMgr())
        >>> out.tolist()
        [0.0, 0.0]
    """

    n_inputs: ClassVar[tuple[int, int | None]] = (1, None)  # the fewest and most inputs (None: any)

    @property
    def references(self) -> tuple[str, ...]:
        """Vertices or inputs read besides the inputs (their values follow the inputs)."""
        return ()

    def init(self, key: jax.Array, input_shapes: Sequence[Shape]) -> tuple[Any, Any]:
        """``(params, state)`` for inputs of these per-example shapes (references included)."""
        return {}, {}

    @abc.abstractmethod
    def activate(self, params, state, inputs: list, training: bool, mgr: LayerWorkspaceMgr, masks=None):
        """``(activations, new_state)`` of ``inputs`` (references last); ``masks`` per input."""

    def output_mask(self, masks: list, out: jax.Array) -> Any:
        """The mask of the output: the first input mask, while the output is a sequence."""
        mask = next((m for m in masks if m is not None), None)
        return mask if mask is not None and out.ndim >= 3 and mask.shape[1] == out.shape[1] else None

    def _out(self, mgr: LayerWorkspaceMgr, value: jax.Array, state: Any):
        return mgr.leverage_to(ArrayType.ACTIVATIONS, value), state


@dataclasses.dataclass(frozen=True)
class MergeVertex(GraphVertex):
    """Concatenates its inputs on the feature (last) axis (DL4J's MergeVertex)."""

    n_inputs = (2, None)

    def init(self, key, input_shapes):
        lead = {tuple(s[:-1]) for s in input_shapes}
        if len(lead) > 1:
            raise ConfigurationError(
                f"MergeVertex concatenates features (the last axis); its inputs differ before it: "
                f"{', '.join(str(tuple(s)) for s in input_shapes)}."
            )
        return {}, {}

    def activate(self, params, state, inputs, training, mgr, masks=None):
        return self._out(mgr, jnp.concatenate(inputs, axis=-1), state)


_OPS = {
    "add": lambda xs: sum(xs[1:], xs[0]),
    "subtract": lambda xs: xs[0] - xs[1],
    "product": lambda xs: jnp.prod(jnp.stack(xs), axis=0),
    "average": lambda xs: sum(xs[1:], xs[0]) / len(xs),
    "max": lambda xs: jnp.max(jnp.stack(xs), axis=0),
}


@dataclasses.dataclass(frozen=True)
class ElementWiseVertex(GraphVertex):
    """Combines inputs of one shape element by element: ``op`` is add, subtract (two
    inputs), product, average or max (DL4J's ElementWiseVertex)."""

    op: str = "add"
    n_inputs = (2, None)

    def __post_init__(self):
        super().__post_init__()
        if self.op not in _OPS:
            raise ConfigurationError(f"ElementWiseVertex(op={self.op!r}): expected one of {sorted(_OPS)}.")

    def init(self, key, input_shapes):
        _same_shapes(self, input_shapes)
        if self.op == "subtract" and len(input_shapes) != 2:
            raise ConfigurationError(f"ElementWiseVertex(op='subtract') takes exactly 2 inputs, got {len(input_shapes)}.")
        return {}, {}

    def activate(self, params, state, inputs, training, mgr, masks=None):
        return self._out(mgr, _OPS[self.op](list(inputs)), state)


@dataclasses.dataclass(frozen=True)
class SubsetVertex(GraphVertex):
    """Features ``start`` to ``end`` *inclusive* of the last axis (DL4J's ``from``/``to``)."""

    start: int
    end: int
    n_inputs = (1, 1)

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.start, int) and isinstance(self.end, int) and 0 <= self.start <= self.end):
            raise ConfigurationError(f"SubsetVertex(start={self.start!r}, end={self.end!r}): expected 0 <= start <= end (inclusive).")

    def init(self, key, input_shapes):
        if self.end >= input_shapes[0][-1]:
            raise ConfigurationError(
                f"SubsetVertex(start={self.start}, end={self.end}) reaches past the input's "
                f"{input_shapes[0][-1]} features (end is inclusive: at most {input_shapes[0][-1] - 1})."
            )
        return {}, {}

    def activate(self, params, state, inputs, training, mgr, masks=None):
        return self._out(mgr, inputs[0][..., self.start : self.end + 1], state)


@dataclasses.dataclass(frozen=True)
class StackVertex(GraphVertex):
    """Stacks inputs of one shape along the batch axis: ``n`` inputs of ``[b, ...]`` give
    ``[n*b, ...]`` (DL4J's StackVertex: shared weights over several inputs, as in a
    siamese network); UnstackVertex takes them apart."""

    n_inputs = (2, None)

    def init(self, key, input_shapes):
        _same_shapes(self, input_shapes)
        return {}, {}

    def activate(self, params, state, inputs, training, mgr, masks=None):
        return self._out(mgr, jnp.concatenate(inputs, axis=0), state)

    def output_mask(self, masks, out):
        if all(m is None for m in masks):
            return None
        return jnp.concatenate([jnp.ones(out.shape[:2], out.dtype) if m is None else m for m in masks])


@dataclasses.dataclass(frozen=True)
class UnstackVertex(GraphVertex):
    """Part ``index`` of ``stack_size`` equal parts of the batch axis (undoes StackVertex)."""

    index: int
    stack_size: int
    n_inputs = (1, 1)

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.stack_size, int) and self.stack_size >= 1 and isinstance(self.index, int)
                and 0 <= self.index < self.stack_size):
            raise ConfigurationError(f"UnstackVertex(index={self.index!r}, stack_size={self.stack_size!r}): expected 0 <= index < stack_size.")

    def _part(self, x):
        n = x.shape[0] // self.stack_size
        return x[self.index * n : (self.index + 1) * n]

    def activate(self, params, state, inputs, training, mgr, masks=None):
        return self._out(mgr, self._part(inputs[0]), state)

    def output_mask(self, masks, out):
        return None if masks[0] is None else self._part(masks[0])


@dataclasses.dataclass(frozen=True)
class ScaleVertex(GraphVertex):
    """Multiplies its input by ``factor``."""

    factor: float
    n_inputs = (1, 1)

    def activate(self, params, state, inputs, training, mgr, masks=None):
        return self._out(mgr, inputs[0] * self.factor, state)


@dataclasses.dataclass(frozen=True)
class ShiftVertex(GraphVertex):
    """Adds ``shift`` to its input."""

    shift: float
    n_inputs = (1, 1)

    def activate(self, params, state, inputs, training, mgr, masks=None):
        return self._out(mgr, inputs[0] + self.shift, state)


@dataclasses.dataclass(frozen=True)
class L2Vertex(GraphVertex):
    """The Euclidean distance between two inputs, per example: ``[b, 1]``
    (``sqrt(sum((a - b)**2) + eps)``; ``eps`` keeps the gradient finite at 0)."""

    eps: float = 1e-8
    n_inputs = (2, 2)

    def init(self, key, input_shapes):
        _same_shapes(self, input_shapes)
        return {}, {}

    def activate(self, params, state, inputs, training, mgr, masks=None):
        a, b = inputs
        d = (a - b).reshape(a.shape[0], -1)
        return self._out(mgr, jnp.sqrt(jnp.sum(d * d, axis=1, keepdims=True) + self.eps), state)

    def output_mask(self, masks, out):
        return None


@dataclasses.dataclass(frozen=True)
class LastTimeStepVertex(GraphVertex):
    """The last real time step of a sequence: ``[b, t, f] -> [b, f]``.

    The last step is the last one its mask marks real: the mask of ``mask_input`` (a graph
    input, as in DL4J) or, when None, the mask that reached this vertex.
    """

    mask_input: str | None = None
    n_inputs = (1, 1)

    @property
    def references(self):
        return () if self.mask_input is None else (self.mask_input,)

    def init(self, key, input_shapes):
        if len(input_shapes[0]) != 2:
            raise ConfigurationError(
                f"LastTimeStepVertex takes sequences [batch, time, features]; got per-example shape {tuple(input_shapes[0])}."
            )
        return {}, {}

    def activate(self, params, state, inputs, training, mgr, masks=None):
        x = inputs[0]
        masks = masks or [None] * len(inputs)
        mask = masks[-1] if self.mask_input is not None else masks[0]
        if mask is None:
            last = x[:, -1]
        else:
            steps = jnp.arange(x.shape[1])
            index = jnp.max(jnp.where(mask.reshape(mask.shape[:2]) > 0, steps, 0), axis=1)
            last = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
        return self._out(mgr, last, state)

    def output_mask(self, masks, out):
        return None


@dataclasses.dataclass(frozen=True)
class DuplicateToTimeSeriesVertex(GraphVertex):
    """Repeats ``[b, f]`` at every step of the sequence ``input_name``: ``[b, t, f]``
    (its mask goes with it)."""

    input_name: str
    n_inputs = (1, 1)

    @property
    def references(self):
        return (self.input_name,)

    def init(self, key, input_shapes):
        x, series = input_shapes
        if len(x) != 1 or len(series) != 2:
            raise ConfigurationError(
                f"DuplicateToTimeSeriesVertex({self.input_name!r}) takes [batch, features] and "
                f"repeats it over the time of a sequence; got per-example shapes {tuple(x)} and "
                f"{self.input_name!r} {tuple(series)}."
            )
        return {}, {}

    def activate(self, params, state, inputs, training, mgr, masks=None):
        x, series = inputs
        return self._out(mgr, jnp.broadcast_to(x[:, None], (x.shape[0], series.shape[1], x.shape[-1])), state)

    def output_mask(self, masks, out):
        return masks[-1] if masks else None


@dataclasses.dataclass(frozen=True)
class Preprocessor(abc.ABC):
    """Reshapes activations between vertices (DL4J's InputPreProcessor); per example."""

    _registry: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Preprocessor._registry[cls.__name__] = cls

    @abc.abstractmethod
    def __call__(self, x: jax.Array) -> jax.Array:
        """The activations ``x`` (with batch axis), preprocessed."""

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ReshapePreprocessor(Preprocessor):
    """Each example to ``shape`` (``-1`` once for the rest), e.g. ``(4, 8)`` for a sequence."""

    shape: tuple

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))

    def __call__(self, x):
        return x.reshape(x.shape[0], *self.shape)


@dataclasses.dataclass(frozen=True)
class PreprocessorVertex(GraphVertex):
    """Applies a :class:`Preprocessor` (for example ``ReshapePreprocessor((4, 8))``)."""

    preprocessor: Preprocessor
    n_inputs = (1, 1)

    def __post_init__(self):
        super().__post_init__()
        p = self.preprocessor
        if isinstance(p, dict):  # as to_dict wrote it
            p = dict(p)
            cls = Preprocessor._registry.get(p.pop("type", None))
            if cls is None:
                raise ConfigurationError(f"PreprocessorVertex: unknown preprocessor type in {self.preprocessor!r}.")
            object.__setattr__(self, "preprocessor", cls(**p))
        elif not isinstance(p, Preprocessor):
            raise ConfigurationError(f"PreprocessorVertex(preprocessor={p!r}): expected a jaxws.nn.Preprocessor, e.g. ReshapePreprocessor((4, 8)).")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "preprocessor": self.preprocessor.to_dict()}

    def activate(self, params, state, inputs, training, mgr, masks=None):
        return self._out(mgr, self.preprocessor(inputs[0]), state)
