"""Page-locked host slots: numpy batches reach a CUDA GPU by DMA instead of a staged copy.

A transfer from pageable host memory goes through a bounce buffer; from memory that CUDA
has page-locked (``cudaHostRegister``) the copy engine reads it directly. ``PinnedStage``
keeps one registered buffer per batch leaf layout, copies each numpy leaf into it and
puts it on the device, waiting for that transfer before the buffer is written again
(batches under a MiB go as they are: there the wait costs more than the DMA saves).
Where there is no CUDA (CPU, TPU, ROCm, no runtime library) there is no stage and
batches are put as they are.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import jax
import numpy as np

__all__ = ["PinnedStage", "cuda_runtime"]

log = logging.getLogger("jaxws")
_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context, XLA's included
_ALIGN = 4096


@functools.cache
def cuda_runtime() -> ctypes.CDLL | None:
    """The CUDA runtime library (the one JAX's CUDA wheels ship, else the system's), or None."""
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    try:
        import nvidia  # namespace package of NVIDIA's wheels, which jax[cuda] depends on

        for root in nvidia.__path__:
            names += sorted(glob.glob(os.path.join(root, "*", "lib", "libcudart.so*")), reverse=True)
    except ImportError:
        pass
    for name in names:
        try:
            runtime = ctypes.CDLL(name)
        except OSError:
            continue
        runtime.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        runtime.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        runtime.cudaGetErrorString.restype = ctypes.c_char_p
        return runtime
    return None


def _unregister(runtime: Any, slots: dict) -> None:
    for slot in slots.values():
        runtime.cudaHostUnregister(slot.ctypes.data)
    slots.clear()


class PinnedStage:
    """Reusable page-locked buffers for the leaves of the batches one thread transfers.

    One buffer per ``(leaf position, shape, dtype)``, registered once and reused for
    every batch of that layout; at most ``max_slots`` are kept (the least recently used
    is unregistered first). ``put`` returns once the device has its copy, so the buffers
    can be written again: it is meant for a prefetch thread, whose consumer is busy
    with the previous batches meanwhile. Not thread-safe: one stage per thread.

    Args:
        device: the CUDA device batches go to (None: the default device).
        runtime: the CUDA runtime (default: ``cuda_runtime()``).
        max_slots: buffers kept registered at once.
        min_bytes: smaller batches are put as they are, without waiting (JAX stages small
            transfers well; a wait per batch would cost more than the DMA saves).

    Example:
        >>> import jax
        >>> from jaxws.data.pinned import PinnedStage
        >>> stage = PinnedStage.for_device(jax.devices()[0])  # None without CUDA
    """

    def __init__(self, device: jax.Device | None = None, runtime: Any = None, max_slots: int = 32,
                 min_bytes: int = 1 << 20):
        self.device = device
        self.max_slots = max_slots
        self.min_bytes = min_bytes
        self._runtime = runtime if runtime is not None else cuda_runtime()
        self._slots: OrderedDict = OrderedDict()  # (position, shape, dtype) -> registered array
        self._off = False  # closed, or a registration failed: put as pageable from then on
        self._finalizer = weakref.finalize(self, _unregister, self._runtime, self._slots)

    @classmethod
    def for_device(cls, device: jax.Device | None = None, **kwargs: Any) -> "PinnedStage | None":
        """A stage for ``device`` (default: the default device), or None if it is no CUDA GPU."""
        target = device or jax.devices()[0]
        if target.platform != "gpu" or "rocm" in target.client.platform_version.lower():
            return None
        runtime = kwargs.pop("runtime", None) or cuda_runtime()
        return None if runtime is None else cls(device, runtime, **kwargs)

    @property
    def pinned_bytes(self) -> int:
        """Bytes page-locked now."""
        return sum(slot.nbytes for slot in self._slots.values())

    def put(self, leaves: Sequence[Any]) -> list[jax.Array]:
        """``leaves`` on the device, each numpy leaf copied through its page-locked buffer."""
        if sum(leaf.nbytes for leaf in leaves) < self.min_bytes:
            return jax.device_put(list(leaves), self.device)
        return self._transfer([self._stage(i, leaf) for i, leaf in enumerate(leaves)], self.device)

    @staticmethod
    def _transfer(staged: list, device: jax.Device | None) -> list[jax.Array]:
        """The copy to the device, waited for: then the buffers are free again."""
        return jax.block_until_ready(jax.device_put(staged, device))

    def _stage(self, position: int, leaf: np.ndarray) -> np.ndarray:
        if self._off or not isinstance(leaf, np.ndarray) or leaf.nbytes == 0:
            return leaf
        key = (position, leaf.shape, leaf.dtype)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._register(key, leaf)
            if slot is None:
                return leaf
        else:
            self._slots.move_to_end(key)
        np.copyto(slot, leaf)
        return slot

    def _register(self, key: tuple, leaf: np.ndarray) -> np.ndarray | None:
        raw = np.empty(leaf.nbytes + _ALIGN, np.uint8)
        start = -raw.ctypes.data % _ALIGN
        slot = raw[start : start + leaf.nbytes].view(leaf.dtype).reshape(leaf.shape)
        error = self._runtime.cudaHostRegister(slot.ctypes.data, slot.nbytes, _PORTABLE)
        if error:
            self._off = True
            log.info("cudaHostRegister failed (%s): batches go to the device from pageable memory.",
                     self._runtime.cudaGetErrorString(error))
            return None
        while len(self._slots) >= self.max_slots:
            _, old = self._slots.popitem(last=False)
            self._runtime.cudaHostUnregister(old.ctypes.data)
        self._slots[key] = slot
        return slot

    def close(self) -> None:
        """Unregisters every buffer; later batches go pageable. Idempotent (also done when
        the stage is collected)."""
        self._off = True
        self._finalizer()
