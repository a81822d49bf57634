"""NeuralNetConfiguration and its DL4J-style fluent builder.

A keyword-only, validated dataclass; the builder has one method per field.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import optax

from jaxws.errors import ConfigurationError
from jaxws.nn.layers import BaseOutputLayer, Layer, layer_from_dict
from jaxws.nn.modes import WorkspaceMode
from jaxws.nn.updaters import Adam, Updater, updater_from_dict

__all__ = ["NetworkSettings", "NeuralNetConfiguration", "updater_from_saved", "updater_to_dict"]


def updater_to_dict(updater: Any) -> dict:
    """A named updater as JSON-ready data; a raw optax transformation (a closure) only by name."""
    if isinstance(updater, Updater):
        return updater.to_dict()
    return {"type": "optax", "description": repr(updater)}


def updater_from_saved(saved: dict, updater: Any, what: str) -> Any:
    """The updater to build: ``updater`` if given, else the saved named one.

    Raises:
        ConfigurationError: the saved one was a raw optax transformation and none is given.
    """
    if updater is not None:
        return updater
    if saved.get("type") == "optax":
        raise ConfigurationError(
            f"{what}.from_json: the updater was a raw optax transformation "
            f"({saved.get('description')}), which JSON cannot hold. Pass it again, "
            "from_json(text, updater=optax.adam(1e-3)) (load(path, conf=...) for a "
            "checkpoint), or configure a named updater such as jaxws.nn.Adam(1e-3)."
        )
    return updater_from_dict(saved)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NetworkSettings:
    """What every network configuration holds besides its architecture: the seed, the
    updater and the workspace modes; with DL4J's ``toJson`` / ``fromJson`` (over the
    configuration's own ``to_dict`` / ``from_dict``)."""

    seed: int = 0
    updater: Updater | optax.GradientTransformation = dataclasses.field(default_factory=Adam)
    training_workspace_mode: WorkspaceMode = WorkspaceMode.ENABLED
    inference_workspace_mode: WorkspaceMode = WorkspaceMode.ENABLED
    offload_activations: bool = False

    def _check_settings(self) -> None:
        name = type(self).__name__
        for field in ("training_workspace_mode", "inference_workspace_mode"):
            if not isinstance(getattr(self, field), WorkspaceMode):
                raise ConfigurationError(
                    f"{name}({field}={getattr(self, field)!r}): expected "
                    "WorkspaceMode.NONE, ENABLED, SINGLE or SEPARATE."
                )
        if not (hasattr(self.updater, "init") and hasattr(self.updater, "update")):
            raise ConfigurationError(
                f"{name}(updater={self.updater!r}): expected a named updater such as "
                "jaxws.nn.Adam(1e-3), or an optax GradientTransformation, e.g. optax.adam(1e-3)."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigurationError(f"{name}(seed={self.seed!r}): expected an int.")

    def optax_updater(self) -> optax.GradientTransformation:
        """The updater as an optax transformation (a named updater builds its own)."""
        return self.updater.build() if isinstance(self.updater, Updater) else self.updater

    def _settings_dict(self) -> dict:
        return {
            "seed": self.seed,
            "updater": updater_to_dict(self.updater),
            "training_workspace_mode": self.training_workspace_mode.name,
            "inference_workspace_mode": self.inference_workspace_mode.name,
            "offload_activations": self.offload_activations,
        }

    @classmethod
    def _settings_from(cls, data: dict, updater: Any) -> dict:
        """The settings ``_settings_dict`` wrote, as keyword arguments; ``updater`` replaces the saved one."""
        fmt = f"jaxws.{cls.__name__}"
        if data.get("format") != fmt:
            raise ConfigurationError(
                f"{cls.__name__}.from_json: the data holds {data.get('format')!r}, not a {fmt} "
                "(written by conf.to_json())."
            )
        return {
            "seed": data["seed"],
            "updater": updater_from_saved(data["updater"], updater, cls.__name__),
            "training_workspace_mode": WorkspaceMode[data["training_workspace_mode"]],
            "inference_workspace_mode": WorkspaceMode[data["inference_workspace_mode"]],
            "offload_activations": data["offload_activations"],
        }

    def to_json(self) -> str:
        """DL4J's ``toJson``: the configuration as a JSON string.

        Raises:
            ConfigurationError: a custom layer or vertex holds a field JSON cannot write.

        Example:
            >>> from jaxws.nn import NeuralNetConfiguration, Dense, OutputLayer, Sgd
            >>> conf = NeuralNetConfiguration(layers=[Dense(4), OutputLayer(2)], input_shape=(3,), updater=Sgd(0.1))
            >>> NeuralNetConfiguration.from_json(conf.to_json()) == conf
            True
        """
        try:
            return json.dumps(self.to_dict(), indent=2)
        except TypeError as e:
            raise ConfigurationError(f"{type(self).__name__}.to_json(): {e}; a layer's fields must be JSON values.") from None

    @classmethod
    def from_json(cls, text: str, *, custom_layers: dict[str, type] | None = None, updater: Any = None) -> Any:
        """DL4J's ``fromJson``: the configuration ``to_json`` wrote.

        Args:
            text: the JSON.
            custom_layers: layer classes by saved type name, for layers this process has
                not imported (jaxws's own and any imported Layer subclass are found by name).
            updater: the updater to use instead of the saved one (required when a raw optax
                transformation was saved).

        Raises:
            ConfigurationError: not a configuration, an unknown layer type, or a raw optax
                updater without ``updater=``.
        """
        return cls.from_dict(json.loads(text), custom_layers=custom_layers, updater=updater)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NeuralNetConfiguration(NetworkSettings):
    """What a MultiLayerNetwork is made of and how it uses memory.

    Args:
        layers: the layers, input to output; the last is an OutputLayer or RnnOutputLayer.
        input_shape: the per-example input shape (no batch axis); ``None`` marks a dynamic
            axis, e.g. ``(None, 8)`` for sequences of any length with 8 features.
        seed: seeds parameter initialisation (and dropout).
        updater: a named updater (default ``Adam(1e-3)``; ``Sgd``, ``Nesterovs``,
            ``RmsProp``, ... with learning-rate schedules), which saves with the
            configuration, or any optax GradientTransformation (which JSON cannot hold:
            loading then asks for the configuration).
        training_workspace_mode, inference_workspace_mode: see :class:`WorkspaceMode`.
        offload_activations: in SEPARATE mode, keep the saved ACTIVATIONS in pinned host
            memory (where the backend has that memory kind) instead of on the device.

    Example:
        >>> import optax
        >>> from jaxws.nn import NeuralNetConfiguration, Dense, OutputLayer
        >>> from jaxws import WorkspaceMode
        >>> conf = (NeuralNetConfiguration.builder()
        ...         .seed(42).updater(optax.sgd(0.1)).input_shape(4)
        ...         .training_workspace_mode(WorkspaceMode.SEPARATE)
        ...         .inference_workspace_mode(WorkspaceMode.SINGLE)
        ...         .list(Dense(8, activation="relu"), OutputLayer(3))
        ...         .build())
        >>> len(conf.layers), conf.input_shape
        (2, (4,))
    """

    layers: tuple[Layer, ...]
    input_shape: tuple[int | None, ...]

    def __post_init__(self):
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        if not isinstance(layers, tuple) or not layers:
            raise ConfigurationError(
                f"NeuralNetConfiguration(layers={self.layers!r}): expected a non-empty list of "
                "layers, e.g. layers=[Dense(64, activation='relu'), OutputLayer(10)]."
            )
        for i, layer in enumerate(layers):
            if not (hasattr(layer, "init") and hasattr(layer, "activate")):
                raise ConfigurationError(
                    f"NeuralNetConfiguration: layers[{i}]={layer!r} is not a layer (it needs "
                    "init(key, input_shape) and activate(params, state, x, training, mgr))."
                )
        if not isinstance(layers[-1], BaseOutputLayer):
            raise ConfigurationError(
                f"NeuralNetConfiguration: the last layer is {type(layers[-1]).__name__}; a "
                "network trains against an OutputLayer or RnnOutputLayer, put one last."
            )
        object.__setattr__(self, "layers", layers)
        shape = (self.input_shape,) if isinstance(self.input_shape, int) else self.input_shape
        if (
            not isinstance(shape, (tuple, list)) or not shape
            or not all(d is None or (isinstance(d, int) and d > 0) for d in shape)
        ):
            raise ConfigurationError(
                f"NeuralNetConfiguration(input_shape={self.input_shape!r}): expected the "
                "per-example shape without the batch axis, e.g. (64,) or (None, 8) for "
                "sequences of any length."
            )
        object.__setattr__(self, "input_shape", tuple(shape))
        self._check_settings()

    @staticmethod
    def builder() -> Builder:
        """A DL4J-style fluent builder."""
        return Builder()

    def to_dict(self) -> dict:
        """The configuration as JSON-ready data (DL4J's ``toJson``, as a dict)."""
        return {
            "format": "jaxws.NeuralNetConfiguration",
            "version": 1,
            "layers": [layer.to_dict() for layer in self.layers],
            "input_shape": list(self.input_shape),
            **self._settings_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict, *, custom_layers: dict[str, type] | None = None,
                  updater: Any = None) -> NeuralNetConfiguration:
        """The configuration ``to_dict`` wrote; ``updater`` replaces the saved one."""
        settings = cls._settings_from(data, updater)
        return cls(
            layers=tuple(layer_from_dict(layer, custom_layers) for layer in data["layers"]),
            input_shape=tuple(data["input_shape"]),
            **settings,
        )


class Builder:
    """``NeuralNetConfiguration.builder().seed(1)....list(...).build()``, as in DL4J."""

    def __init__(self):
        self._fields: dict[str, Any] = {}
        self._layers: list[Layer] = []

    def _set(self, name: str, value: Any) -> Builder:
        self._fields[name] = value
        return self

    def seed(self, seed: int) -> Builder:
        return self._set("seed", seed)

    def updater(self, updater: Updater | optax.GradientTransformation) -> Builder:
        return self._set("updater", updater)

    def input_shape(self, *shape: int | None) -> Builder:
        return self._set("input_shape", tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def training_workspace_mode(self, mode: WorkspaceMode) -> Builder:
        return self._set("training_workspace_mode", mode)

    def inference_workspace_mode(self, mode: WorkspaceMode) -> Builder:
        return self._set("inference_workspace_mode", mode)

    def offload_activations(self, flag: bool = True) -> Builder:
        return self._set("offload_activations", flag)

    def list(self, *layers: Layer) -> Builder:
        self._layers.extend(layers)
        return self

    def layer(self, layer: Layer) -> Builder:
        self._layers.append(layer)
        return self

    def build(self) -> NeuralNetConfiguration:
        return NeuralNetConfiguration(layers=tuple(self._layers), **self._fields)

    def graph_builder(self):
        """DL4J's ``graphBuilder()``: a ComputationGraph with this seed, updater and modes.

        Example:
            >>> from jaxws.nn import NeuralNetConfiguration, Dense, OutputLayer
            >>> conf = (NeuralNetConfiguration.builder().seed(7).graph_builder()
            ...         .add_inputs("in").add_layer("hidden", Dense(4), "in")
            ...         .add_layer("out", OutputLayer(2), "hidden")
            ...         .set_outputs("out").set_input_types((3,)).build())
            >>> conf.seed, conf.outputs
            (7, ('out',))
        """
        from jaxws.nn.graph_conf import GraphBuilder

        return GraphBuilder(self._fields)
