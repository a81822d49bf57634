"""Workspace policies and their configuration, as ND4J's WorkspaceConfiguration.

A configuration says how a workspace learns its size, how it rounds it up, what happens
when a cycle needs more, and when its arrays are invalidated.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from jaxws.errors import ConfigurationError

__all__ = [
    "LearningPolicy",
    "AllocationPolicy",
    "SpillPolicy",
    "ResetPolicy",
    "WorkspaceConfiguration",
]


class LearningPolicy(enum.Enum):
    """When a workspace learns its size from what its cycles need."""

    FIRST_LOOP = "first_loop"  # size = what the first cycle needed
    OVER_TIME = "over_time"  # size = the most any of the first N cycles needed
    NONE = "none"  # size = initial_size, nothing learned


class AllocationPolicy(enum.Enum):
    """How a learned size or capacity is rounded."""

    STRICT = "strict"  # exactly what was needed
    OVERALLOCATE = "overallocate"  # needed * (1 + overallocation_limit)


class SpillPolicy(enum.Enum):
    """What a cycle does when it needs more than the workspace holds."""

    EXTERNAL = "external"  # run outside the workspace: nothing donated, bytes counted
    REALLOCATE = "reallocate"  # grow the workspace before the call (a new capacity recompiles once)
    FAIL = "fail"  # raise WorkspaceFullError


class ResetPolicy(enum.Enum):
    """When the arrays of a cycle are invalidated."""

    BLOCK_LEFT = "block_left"  # at the end of their cycle
    ENDOFBUFFER_REACHED = "endofbuffer_reached"  # after steps_number cycles (a ring)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkspaceConfiguration:
    """How a workspace sizes itself and when it invalidates its arrays.

    Sizes are bytes. ``initial_size`` is the size before anything is learned (the whole
    size under ``LearningPolicy.NONE``); learned sizes are clamped to
    ``[min_size, max_size]`` (``max_size=0`` means unbounded).

    Example:
        >>> import jaxws
        >>> conf = jaxws.WorkspaceConfiguration(
        ...     policy_allocation=jaxws.AllocationPolicy.OVERALLOCATE,
        ...     overallocation_limit=0.5,
        ...     policy_spill=jaxws.SpillPolicy.REALLOCATE)
        >>> conf.round_up(100)
        150
    """

    initial_size: int = 0
    min_size: int = 0
    max_size: int = 0
    policy_learning: LearningPolicy = LearningPolicy.FIRST_LOOP
    cycles_before_initialization: int = 0
    policy_allocation: AllocationPolicy = AllocationPolicy.OVERALLOCATE
    overallocation_limit: float = 0.3
    policy_spill: SpillPolicy = SpillPolicy.EXTERNAL
    policy_reset: ResetPolicy = ResetPolicy.BLOCK_LEFT
    steps_number: int = 2

    def __post_init__(self):
        for name, enum_type in (
            ("policy_learning", LearningPolicy),
            ("policy_allocation", AllocationPolicy),
            ("policy_spill", SpillPolicy),
            ("policy_reset", ResetPolicy),
        ):
            value = getattr(self, name)
            if not isinstance(value, enum_type):
                valid = ", ".join(f"{enum_type.__name__}.{m.name}" for m in enum_type)
                raise ConfigurationError(
                    f"WorkspaceConfiguration({name}={value!r}): expected one of {valid}."
                )
        for name in ("initial_size", "min_size", "max_size", "cycles_before_initialization"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(
                    f"WorkspaceConfiguration({name}={value!r}): expected an int >= 0 (bytes "
                    "for sizes, a count for cycles_before_initialization)."
                )
        if isinstance(self.steps_number, bool) or not isinstance(self.steps_number, int) or (
            self.steps_number < 1
        ):
            raise ConfigurationError(
                f"WorkspaceConfiguration(steps_number={self.steps_number!r}): expected an int "
                ">= 1, the number of cycles an array stays valid under ENDOFBUFFER_REACHED."
            )
        limit = self.overallocation_limit
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not (
            math.isfinite(limit) and limit >= 0
        ):
            raise ConfigurationError(
                f"WorkspaceConfiguration(overallocation_limit={limit!r}): expected a finite "
                "number >= 0, the fraction added on top of what is needed (0.3 = 30%)."
            )
        if self.max_size and self.max_size < max(self.min_size, self.initial_size):
            raise ConfigurationError(
                f"WorkspaceConfiguration(max_size={self.max_size}) is below min_size="
                f"{self.min_size} or initial_size={self.initial_size}: raise max_size, or "
                "set max_size=0 for no bound."
            )
        if self.policy_learning is LearningPolicy.NONE and self.initial_size == 0:
            raise ConfigurationError(
                "WorkspaceConfiguration(policy_learning=LearningPolicy.NONE, initial_size=0): "
                "a workspace that learns nothing needs its size up front; set initial_size "
                "(bytes) or learn it with LearningPolicy.FIRST_LOOP."
            )
        if self.policy_learning is LearningPolicy.OVER_TIME and (
            self.cycles_before_initialization < 1
        ):
            raise ConfigurationError(
                "WorkspaceConfiguration(policy_learning=LearningPolicy.OVER_TIME, "
                f"cycles_before_initialization={self.cycles_before_initialization}): learning "
                "over time needs the number of cycles to learn from; set it to 1 or more."
            )

    @property
    def learning_cycles(self) -> int:
        """Cycles observed before the size is fixed (0 under LearningPolicy.NONE)."""
        if self.policy_learning is LearningPolicy.NONE:
            return 0
        if self.policy_learning is LearningPolicy.FIRST_LOOP:
            return 1
        return self.cycles_before_initialization

    def allocate(self, needed: int) -> int:
        """What the allocation policy reserves for ``needed``: itself, or more (unclamped)."""
        if self.policy_allocation is AllocationPolicy.OVERALLOCATE:
            return math.ceil(needed * (1.0 + self.overallocation_limit))
        return needed

    def round_up(self, needed: int) -> int:
        """A size in bytes that holds ``needed``, allocated and clamped to min/max size."""
        size = max(self.allocate(needed), self.min_size)
        return min(size, self.max_size) if self.max_size else size
