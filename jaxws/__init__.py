"""jaxws: the memory discipline of ND4J workspaces for JAX training and inference loops.

Buffers donated through jitted steps, arrays invalidated at the end of each cycle unless
detached, and loud errors on misuse.
"""

from jaxws import memory
from jaxws.arrays import check_arrays
from jaxws.arrays import detach
from jaxws.arrays import is_attached
from jaxws.arrays import leverage_to
from jaxws.nn.modes import WorkspaceMode
from jaxws.configuration import AllocationPolicy
from jaxws.configuration import LearningPolicy
from jaxws.configuration import ResetPolicy
from jaxws.configuration import SpillPolicy
from jaxws.configuration import WorkspaceConfiguration
from jaxws.errors import AsyncIteratorError
from jaxws.errors import CheckpointError
from jaxws.errors import ConfigurationError
from jaxws.errors import DeletedArrayError
from jaxws.errors import DonationError
from jaxws.errors import DonationWarning
from jaxws.errors import EvaluationError
from jaxws.errors import InvalidBatchError
from jaxws.errors import LeakedWorkspacePointerError
from jaxws.errors import OutdatedWorkspacePointerError
from jaxws.errors import WorkspaceError
from jaxws.errors import WorkspaceFullError
from jaxws.errors import WorkspaceValidationError
from jaxws.manager import DebugMode
from jaxws.manager import MemoryManager
from jaxws.manager import WorkspaceManager
from jaxws.manager import get_memory_manager
from jaxws.manager import get_workspace_manager
from jaxws.manager import print_allocation_statistics_for_current_thread
from jaxws.step import StepPlan
from jaxws.step import WorkspaceFunction
from jaxws.step import jit
from jaxws.workspace import Workspace
from jaxws.workspace import WorkspaceStatistics

from jaxws import data  # noqa: E402  (subpackages, after the core they build on)
from jaxws import eval  # noqa: E402,A004  (not in __all__: a star-import must not shadow eval())
from jaxws import nn  # noqa: E402
from jaxws import parallel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AllocationPolicy",
    "AsyncIteratorError",
    "CheckpointError",
    "ConfigurationError",
    "DebugMode",
    "DeletedArrayError",
    "DonationError",
    "DonationWarning",
    "EvaluationError",
    "InvalidBatchError",
    "LeakedWorkspacePointerError",
    "LearningPolicy",
    "MemoryManager",
    "OutdatedWorkspacePointerError",
    "ResetPolicy",
    "SpillPolicy",
    "StepPlan",
    "Workspace",
    "WorkspaceConfiguration",
    "WorkspaceError",
    "WorkspaceFullError",
    "WorkspaceFunction",
    "WorkspaceManager",
    "WorkspaceMode",
    "WorkspaceStatistics",
    "WorkspaceValidationError",
    "check_arrays",
    "detach",
    "get_memory_manager",
    "get_workspace_manager",
    "is_attached",
    "jit",
    "leverage_to",
    "memory",
    "nn",
    "data",
    "parallel",
    "print_allocation_statistics_for_current_thread",
]
