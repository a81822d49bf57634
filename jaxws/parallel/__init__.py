"""Data parallelism and parallel inference: ParallelWrapper, ParallelInference, set-up."""

from jaxws.parallel.distributed import initialize_distributed
from jaxws.parallel.distributed import worker_devices
from jaxws.parallel.inference import InferenceMode
from jaxws.parallel.inference import ParallelInference
from jaxws.parallel.wrapper import ParallelWrapper
from jaxws.parallel.wrapper import TrainingMode

__all__ = [
    "InferenceMode",
    "ParallelInference",
    "ParallelWrapper",
    "TrainingMode",
    "initialize_distributed",
    "worker_devices",
]
