"""Workspace modes of a network: how training and inference use memory.

NONE trades memory for nothing; ENABLED donates and invalidates; SINGLE and SEPARATE
choose what backprop keeps.
"""

from __future__ import annotations

import enum

__all__ = ["WorkspaceMode"]


class WorkspaceMode(enum.Enum):
    """DL4J's WorkspaceMode, the JAX way.

    * ``NONE``: no donation, no invalidation: fresh buffers every step.
    * ``ENABLED`` (default): the carry (params, updater and layer state) is donated
      through every step; per-step outputs die with their cycle. Backprop keeps what XLA
      needs (as SINGLE).
    * ``SINGLE``: ENABLED, and every activation and working array is kept for backprop
      (fastest, most memory).
    * ``SEPARATE``: ENABLED, and backprop keeps only arrays in ``ArrayType.ACTIVATIONS``;
      working memory is recomputed (less memory, somewhat slower), through a
      ``jax.checkpoint`` name policy per layer.
    """

    NONE = "none"
    ENABLED = "enabled"
    SINGLE = "single"
    SEPARATE = "separate"

    # members are singletons compared by identity: hash them so, in C (Enum's own __hash__
    # runs Python, and fit looks its programs up by mode on every call)
    __hash__ = object.__hash__

    @property
    def donates(self) -> bool:
        return self is not WorkspaceMode.NONE
