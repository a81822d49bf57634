"""Error classes of jaxws and the messages they carry.

Every error derives from :class:`WorkspaceError` and says what went wrong, with the
offending value, and what to do next.
"""

from __future__ import annotations

from typing import Sequence

__all__ = [
    "WorkspaceError",
    "ConfigurationError",
    "LeakedWorkspacePointerError",
    "OutdatedWorkspacePointerError",
    "DeletedArrayError",
    "WorkspaceFullError",
    "DonationError",
    "WorkspaceValidationError",
    "AsyncIteratorError",
    "InvalidBatchError",
    "EvaluationError",
    "CheckpointError",
    "DonationWarning",
]

_FIX = (
    "Fix: keep a value beyond its cycle with jaxws.detach(x) before the cycle ends,\n"
    "  wrong:  with ws: loss = step(params, batch)\n"
    "          print(loss)                     # loss died with the cycle\n"
    "  right:  with ws: loss = jaxws.detach(step(params, batch))\n"
    "or move it to an outer workspace with jaxws.leverage_to(outer_ws, x)."
)


class WorkspaceError(RuntimeError):
    """Base class of every jaxws error: a workspace was misused."""


class ConfigurationError(WorkspaceError, ValueError, TypeError):
    """An argument or configuration value is invalid; the message names it and the fix.

    Also a ValueError and a TypeError: code that catches either for a bad argument (a
    value out of range, an object of the wrong kind) catches it.
    """


class _StalePointerError(WorkspaceError):
    _kind = ""

    def __init__(
        self,
        op: str,
        arg: str,
        workspace_id: str,
        array_generation: int,
        workspace_generation: int,
        reason: str,
        open_workspaces: Sequence[str],
    ):
        self.op = op
        self.arg = arg
        self.workspace_id = workspace_id
        self.array_generation = array_generation
        self.workspace_generation = workspace_generation
        opened = ", ".join(f"[{w}]" for w in open_workspaces) or "none"
        super().__init__(
            f"Op [{op}] {arg} argument uses {self._kind} workspace pointer from workspace "
            f"[{workspace_id}]\n"
            f"The array was created in generation {array_generation} of workspace "
            f"[{workspace_id}], which is now at generation {workspace_generation}: {reason}.\n"
            f"Open workspaces on this thread: {opened}.\n{_FIX}"
        )


class LeakedWorkspacePointerError(_StalePointerError):
    """An array outlived its workspace: the workspace was closed or destroyed."""

    _kind = "leaked"


class OutdatedWorkspacePointerError(_StalePointerError):
    """An array from an earlier generation (cycle) of a workspace was used."""

    _kind = "outdated"


class DeletedArrayError(WorkspaceError):
    """An array whose buffer was donated to an earlier call was used again."""

    def __init__(self, op: str, arg: str, aval: str):
        super().__init__(
            f"Op [{op}] {arg} argument ({aval}) was deleted: its buffer was donated to an "
            "earlier call, which returned the new value in the same memory.\n"
            "Fix: use what that call returned,\n"
            "  wrong:  step(params, batch); step(params, batch)\n"
            "  right:  params = step(params, batch); params = step(params, batch)\n"
            "or keep a copy first with jaxws.detach(params)."
        )


class WorkspaceFullError(WorkspaceError):
    """A cycle needs more than the workspace holds and its spill policy is FAIL."""

    def __init__(self, workspace_id: str, what: str, required: int, available: int, unit: str):
        self.workspace_id = workspace_id
        self.required = required
        self.available = available
        super().__init__(
            f"Workspace [{workspace_id}] is full: {what} needs {required:,} {unit}, "
            f"{available:,} {unit} available (policy_spill=SpillPolicy.FAIL).\n"
            "Fix: raise initial_size/max_size, or use policy_spill=SpillPolicy.REALLOCATE "
            "(grow) or SpillPolicy.EXTERNAL (run outside the workspace)."
        )


class DonationError(WorkspaceError):
    """A donated input cannot be reused by any output of the step."""


class DonationWarning(UserWarning):
    """A donated leaf is not reused: ``unusable_donation="warn"``, or a step that spilled."""


class WorkspaceValidationError(WorkspaceError):
    """A layer returned an array defined in the wrong workspace (ArrayType)."""


class AsyncIteratorError(WorkspaceError):
    """The base iterator of an async iterator raised; the original is the ``__cause__``."""

    def __init__(self, iterator_id: str, batch: int):
        self.iterator_id = iterator_id
        self.batch = batch
        super().__init__(
            f"The base iterator of [{iterator_id}] raised while producing batch {batch} (counting "
            "from 0) in the prefetch thread; its exception and traceback are chained below. "
            "The iterator has stopped (next() raises StopIteration); fix the loader, then reset() "
            "it to start again from the first batch, or close() it."
        )


class InvalidBatchError(WorkspaceError, ValueError):
    """A batch does not fit the model (shapes, ranks, label range); nothing was donated."""


class EvaluationError(WorkspaceError, ValueError):
    """Labels, predictions or an evaluator's configuration do not fit together."""


class CheckpointError(WorkspaceError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into; the message
    names the file or the leaf, and the model is left as it was."""
