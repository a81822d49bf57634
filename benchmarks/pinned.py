"""Host-to-device bandwidth: would page-locked host slots pay? (a CUDA GPU; elsewhere it
prints that it was skipped).

The async ring could copy each numpy batch into a buffer page-locked once with
``cudaHostRegister`` (through ctypes on the CUDA runtime JAX ships) and put it from there.
This measures, variants interleaved, best of N:
  * bare ``jax.device_put`` of pageable numpy batches (what the ring does);
  * ``device_put`` from a registered buffer, with no copy into it: the ceiling;
  * the slot design: ``np.copyto`` into the registered buffer, ``device_put``, wait.
On an H200 with jax 0.11.2 pageable transfers already run at 38-39 GB/s, the ceiling is
1.4x that, and the slot design 0.15x (the host copy into the slot is the bottleneck), so
jaxws does not stage through page-locked slots (benchmarks/README.md).

    python benchmarks/pinned.py [--mib 64] [--batches 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import time

import jax
import numpy as np


def emit(**fields):
    print(json.dumps({"benchmark": "pinned", "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, **fields}), flush=True)


def cuda_runtime() -> ctypes.CDLL | None:
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    try:
        import nvidia  # the namespace package of NVIDIA's wheels, which jax[cuda] depends on

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
        return runtime
    return None


def registered(runtime, like: np.ndarray) -> np.ndarray:
    """A page-aligned buffer shaped like ``like``, page-locked for every CUDA context."""
    raw = np.empty(like.nbytes + 4096, np.uint8)
    start = -raw.ctypes.data % 4096
    slot = raw[start:start + like.nbytes].view(like.dtype).reshape(like.shape)
    error = runtime.cudaHostRegister(slot.ctypes.data, slot.nbytes, 1)  # cudaHostRegisterPortable
    if error:
        raise RuntimeError(f"cudaHostRegister failed with CUDA error {error}")
    return slot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64, help="MiB per batch")
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runtime = cuda_runtime() if jax.devices()[0].platform == "gpu" else None
    if runtime is None:
        emit(figure="page-locked slots", skipped=f"no CUDA GPU and runtime here ({jax.devices()[0].platform})")
        return
    n, rows = args.batches, args.mib * 2**20 // 4 // 1024
    r = np.random.default_rng(0)
    host = [r.normal(size=(rows, 1024)).astype(np.float32) for _ in range(4)]  # cycled, as fresh batches would be
    batches = [host[i % 4] for i in range(n)]
    slot = registered(runtime, host[0])
    np.copyto(slot, host[1])
    np.testing.assert_array_equal(np.asarray(jax.device_put(slot)), host[1])  # exact, or no figure

    def pageable():
        for x in batches:
            last = jax.device_put(x)
        jax.block_until_ready(last)

    def from_registered():  # the data already lives in page-locked memory
        for _ in batches:
            last = jax.device_put(slot)
        jax.block_until_ready(last)

    def slots():  # the ring's would-be design: copy in, put, wait before the next copy
        for x in batches:
            np.copyto(slot, x)
            jax.block_until_ready(jax.device_put(slot))

    variants = {"pageable": pageable, "registered": from_registered, "slots": slots}
    best = {k: float("inf") for k in variants}
    for run in variants.values():
        run()
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    runtime.cudaHostUnregister(slot.ctypes.data)
    gbps = {k: round(n * args.mib * 2**20 / v / 1e9, 2) for k, v in best.items()}
    common = {"mib_per_batch": args.mib, "batches": n, "pageable_gbps": gbps["pageable"]}
    emit(figure="device_put from a registered buffer / pageable (the ceiling)", **common,
         registered_gbps=gbps["registered"], ratio=round(gbps["registered"] / gbps["pageable"], 2))
    emit(figure="copy into a registered slot, put, wait / pageable (the slot design)", **common,
         slots_gbps=gbps["slots"], ratio=round(gbps["slots"] / gbps["pageable"], 2), target=3.0)


if __name__ == "__main__":
    main()
