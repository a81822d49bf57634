"""Data parallelism: ParallelWrapper over devices and processes, and their set-up."""

from jaxws.parallel.distributed import initialize_distributed
from jaxws.parallel.distributed import worker_devices
from jaxws.parallel.wrapper import ParallelWrapper
from jaxws.parallel.wrapper import TrainingMode

__all__ = [
    "ParallelWrapper",
    "TrainingMode",
    "initialize_distributed",
    "worker_devices",
]
