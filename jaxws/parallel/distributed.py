"""Processes and devices: jax.distributed set-up (gloo on CPU) and the workers' device order.

Workers are numbered process by process, then by local device.
"""

from __future__ import annotations

import jax

from jaxws.errors import ConfigurationError

__all__ = ["initialize_distributed", "worker_devices"]


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, **kwargs) -> None:
    """``jax.distributed.initialize`` with gloo collectives on CPU; call before using JAX.

    Example (two processes on one machine, each with 2 virtual CPU devices)::

        jax.config.update("jax_num_cpu_devices", 2)
        jaxws.parallel.initialize_distributed("127.0.0.1:12345", 2, process_id)
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigurationError(f"initialize_distributed(num_processes={num_processes!r}): expected an int >= 1.")
    if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
        raise ConfigurationError(f"initialize_distributed(process_id={process_id!r}): expected 0..{num_processes - 1}.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def worker_devices() -> list:
    """Every process's devices, process by process, then by local device id."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
