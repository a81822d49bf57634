"""DL4J's named updaters and learning-rate schedules, building optax transformations.

``Adam(1e-3)`` is a small frozen dataclass: it builds ``optax.adam(1e-3)`` and writes
itself to JSON, so a configuration that uses it can be saved and loaded.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
import optax

from jaxws.errors import ConfigurationError

__all__ = [
    "Updater",
    "Sgd",
    "Nesterovs",
    "Adam",
    "AdaMax",
    "Nadam",
    "AMSGrad",
    "RmsProp",
    "AdaGrad",
    "AdaDelta",
    "Schedule",
    "ExponentialSchedule",
    "StepSchedule",
    "InverseSchedule",
    "PolySchedule",
    "SigmoidSchedule",
    "MapSchedule",
    "updater_from_dict",
]


def _number(owner: str, name: str, value: Any, low: float = 0.0, inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= low if inclusive else value > low)
    if not ok:
        raise ConfigurationError(f"{owner}({name}={value!r}): expected a number {'>=' if inclusive else '>'} {low}.")


# -- schedules -----------------------------------------------------------------------------


class Schedule(abc.ABC):
    """A learning rate as a function of the iteration (DL4J's ISchedule, ScheduleType.ITERATION)."""

    _registry: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Schedule._registry[cls.__name__] = cls

    @abc.abstractmethod
    def __call__(self, count: Any) -> Any:
        """The value at iteration ``count`` (traced: an optax schedule)."""

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **_fields(self)}


@dataclasses.dataclass(frozen=True)
class ExponentialSchedule(Schedule):
    """``initial_value * gamma ** iteration``."""

    initial_value: float
    gamma: float

    def __call__(self, count):
        return self.initial_value * jnp.power(self.gamma, count)


@dataclasses.dataclass(frozen=True)
class StepSchedule(Schedule):
    """``initial_value * decay_rate ** floor(iteration / step)``."""

    initial_value: float
    decay_rate: float
    step: int

    def __post_init__(self):
        _number("StepSchedule", "step", self.step)

    def __call__(self, count):
        return self.initial_value * jnp.power(self.decay_rate, jnp.floor(count / self.step))


@dataclasses.dataclass(frozen=True)
class InverseSchedule(Schedule):
    """``initial_value / (1 + gamma * iteration) ** power``."""

    initial_value: float
    gamma: float
    power: float

    def __call__(self, count):
        return self.initial_value / jnp.power(1.0 + self.gamma * count, self.power)


@dataclasses.dataclass(frozen=True)
class PolySchedule(Schedule):
    """``initial_value * (1 - iteration / max_iter) ** power``, 0 from ``max_iter`` on."""

    initial_value: float
    power: float
    max_iter: int

    def __post_init__(self):
        _number("PolySchedule", "max_iter", self.max_iter)

    def __call__(self, count):
        return self.initial_value * jnp.power(jnp.maximum(1.0 - count / self.max_iter, 0.0), self.power)


@dataclasses.dataclass(frozen=True)
class SigmoidSchedule(Schedule):
    """``initial_value / (1 + exp(-gamma * (iteration - step_size)))``."""

    initial_value: float
    gamma: float
    step_size: int

    def __call__(self, count):
        return self.initial_value / (1.0 + jnp.exp(-self.gamma * (count - self.step_size)))


@dataclasses.dataclass(frozen=True)
class MapSchedule(Schedule):
    """Piecewise constant: ``values[i]`` from iteration ``i`` on (a key 0 is required)."""

    values: tuple

    def __post_init__(self):
        values = self.values.items() if isinstance(self.values, dict) else self.values
        pairs = tuple(sorted((int(k), float(v)) for k, v in values))
        if not pairs or pairs[0][0] != 0:
            raise ConfigurationError(f"MapSchedule(values={self.values!r}): expected {{iteration: value}} with iteration 0.")
        object.__setattr__(self, "values", pairs)

    def __call__(self, count):
        value = jnp.asarray(self.values[0][1])
        for start, v in self.values[1:]:
            value = jnp.where(count >= start, v, value)
        return value

    def to_dict(self) -> dict:
        return {"type": "MapSchedule", "values": [list(p) for p in self.values]}


def _learning_rate(value: Any) -> Any:
    return value if isinstance(value, Schedule) else float(value)


# -- updaters ------------------------------------------------------------------------------


class Updater(abc.ABC):
    """A named updater: ``build()`` gives its optax transformation; ``to_dict()`` its JSON.

    Example:
        >>> from jaxws.nn import Adam, ExponentialSchedule, updater_from_dict
        >>> updater = Adam(ExponentialSchedule(1e-2, 0.99))
        >>> updater_from_dict(updater.to_dict()) == updater
        True
    """

    _registry: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Updater._registry[cls.__name__] = cls

    def __post_init__(self):
        lr = getattr(self, "learning_rate", None)
        if lr is not None and not isinstance(lr, Schedule):
            _number(type(self).__name__, "learning_rate", lr)

    @abc.abstractmethod
    def build(self) -> optax.GradientTransformation:
        """The optax transformation."""

    # optax's interface, so a named updater can stand wherever a transformation does
    def init(self, params: Any) -> Any:
        return self.build().init(params)

    def update(self, updates: Any, state: Any, params: Any = None) -> Any:
        return self.build().update(updates, state, params)

    def to_dict(self) -> dict:
        fields = _fields(self)
        if isinstance(getattr(self, "learning_rate", None), Schedule):
            fields["learning_rate"] = self.learning_rate.to_dict()
        return {"type": type(self).__name__, **fields}


def _fields(obj: Any) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


@dataclasses.dataclass(frozen=True)
class Sgd(Updater):
    """Plain stochastic gradient descent (``optax.sgd``)."""

    learning_rate: Any = 1e-3

    def build(self):
        return optax.sgd(_learning_rate(self.learning_rate))


@dataclasses.dataclass(frozen=True)
class Nesterovs(Updater):
    """SGD with Nesterov momentum (``optax.sgd(..., nesterov=True)``)."""

    learning_rate: Any = 0.1
    momentum: float = 0.9

    def build(self):
        return optax.sgd(_learning_rate(self.learning_rate), momentum=self.momentum, nesterov=True)


@dataclasses.dataclass(frozen=True)
class Adam(Updater):
    """Adam (``optax.adam``)."""

    learning_rate: Any = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8

    def build(self):
        return optax.adam(_learning_rate(self.learning_rate), self.beta1, self.beta2, self.epsilon)


@dataclasses.dataclass(frozen=True)
class AdaMax(Updater):
    """AdaMax (``optax.adamax``)."""

    learning_rate: Any = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8

    def build(self):
        return optax.adamax(_learning_rate(self.learning_rate), self.beta1, self.beta2, self.epsilon)


@dataclasses.dataclass(frozen=True)
class Nadam(Updater):
    """Adam with Nesterov momentum (``optax.nadam``)."""

    learning_rate: Any = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8

    def build(self):
        return optax.nadam(_learning_rate(self.learning_rate), self.beta1, self.beta2, self.epsilon)


@dataclasses.dataclass(frozen=True)
class AMSGrad(Updater):
    """AMSGrad (``optax.amsgrad``)."""

    learning_rate: Any = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8

    def build(self):
        return optax.amsgrad(_learning_rate(self.learning_rate), self.beta1, self.beta2, self.epsilon)


@dataclasses.dataclass(frozen=True)
class RmsProp(Updater):
    """RMSProp (``optax.rmsprop``; ``rms_decay`` is its ``decay``)."""

    learning_rate: Any = 1e-1
    rms_decay: float = 0.95
    epsilon: float = 1e-8

    def build(self):
        return optax.rmsprop(_learning_rate(self.learning_rate), decay=self.rms_decay, eps=self.epsilon)


@dataclasses.dataclass(frozen=True)
class AdaGrad(Updater):
    """AdaGrad (``optax.adagrad``)."""

    learning_rate: Any = 1e-1
    epsilon: float = 1e-6

    def build(self):
        return optax.adagrad(_learning_rate(self.learning_rate), eps=self.epsilon)


@dataclasses.dataclass(frozen=True)
class AdaDelta(Updater):
    """AdaDelta (``optax.adadelta``): no learning rate to tune, as in DL4J."""

    rho: float = 0.95
    epsilon: float = 1e-6

    def build(self):
        return optax.adadelta(learning_rate=1.0, rho=self.rho, eps=self.epsilon)


def updater_from_dict(data: dict) -> Updater:
    """The named updater ``Updater.to_dict`` wrote.

    Raises:
        ConfigurationError: an unknown updater or schedule type.
    """
    data = dict(data)
    kind = data.pop("type", None)
    cls = Updater._registry.get(kind)
    if cls is None:
        known = ", ".join(sorted(Updater._registry))
        raise ConfigurationError(f"updater type {kind!r} is unknown; known: {known}.")
    lr = data.get("learning_rate")
    if isinstance(lr, dict):
        lr = dict(lr)
        schedule = Schedule._registry.get(lr.pop("type", None))
        if schedule is None:
            raise ConfigurationError(f"schedule {data['learning_rate']!r} is unknown; known: {', '.join(sorted(Schedule._registry))}.")
        data["learning_rate"] = schedule(**lr)
    return cls(**data)
