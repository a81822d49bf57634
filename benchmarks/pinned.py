"""Host-to-device bandwidth: page-locked slots against pageable numpy (a CUDA GPU; elsewhere
it prints that it was skipped).

Figures, variants interleaved in one process, best of N:
  * bare ``jax.device_put`` of pageable numpy batches (the baseline);
  * ``device_put`` from a buffer registered once (``cudaHostRegister``): the ceiling;
  * ``PinnedStage.put``: each batch copied into its page-locked slot, then put;
  * ``AsyncDataSetIterator`` over the same numpy batches, ``pinned=False`` and ``pinned=True``
    (what ``fit`` uses for numpy data on a CUDA GPU).

    python benchmarks/pinned.py [--mib 64] [--batches 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from jaxws.data import AsyncDataSetIterator, from_iterable
from jaxws.data.pinned import PinnedStage


def emit(**fields):
    print(json.dumps({"benchmark": "pinned", "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, **fields}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64, help="MiB per batch")
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if PinnedStage.for_device() is None:
        emit(figure="page-locked slots", skipped=f"no CUDA GPU here ({jax.devices()[0].platform})")
        return
    n, rows = args.batches, args.mib * 2**20 // 4 // 1024
    r = np.random.default_rng(0)
    host = [r.normal(size=(rows, 1024)).astype(np.float32) for _ in range(4)]  # cycled: never the same array twice in a row
    batches = [host[i % 4] for i in range(n)]
    ceiling = PinnedStage()
    ceiling.put([host[0]])  # registers the one slot it then reuses
    slot = ceiling._stage(0, host[0])
    stage = PinnedStage()

    def pageable():
        for x in batches:
            last = jax.device_put(x)
        jax.block_until_ready(last)

    def registered():  # no copy into the slot: the data already lives in page-locked memory
        for _ in batches:
            last = jax.device_put(slot)
        jax.block_until_ready(last)

    def staged():
        for x in batches:
            stage.put([x])

    def ring(pinned):
        def run():
            with AsyncDataSetIterator(from_iterable(batches), 2, pinned=pinned) as it:
                for b in it:
                    last = b
                jax.block_until_ready(last.features)
        return run

    variants = {"pageable": pageable, "registered": registered, "staged": staged,
                "ring_pageable": ring(False), "ring_pinned": ring(True)}
    with AsyncDataSetIterator(from_iterable(batches[:2]), 2, pinned=True) as it:
        np.testing.assert_array_equal(np.asarray(next(it).features), batches[0])  # exact, or no figure
    best = {k: float("inf") for k in variants}
    for run in variants.values():
        run()
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    gbps = {k: n * args.mib * 2**20 / v / 1e9 for k, v in best.items()}
    common = {"mib_per_batch": args.mib, "batches": n}
    emit(figure="device_put from a registered buffer / pageable (ceiling)", **common,
         pageable_gbps=round(gbps["pageable"], 2), registered_gbps=round(gbps["registered"], 2),
         ratio=round(gbps["registered"] / gbps["pageable"], 2))
    emit(figure="PinnedStage.put (copy into the slot, then put) / pageable", **common,
         staged_gbps=round(gbps["staged"], 2), ratio=round(gbps["staged"] / gbps["pageable"], 2))
    emit(figure="AsyncDataSetIterator numpy batches: pinned=True / pinned=False", **common,
         pageable_gbps=round(gbps["ring_pageable"], 2), pinned_gbps=round(gbps["ring_pinned"], 2),
         ratio=round(gbps["ring_pinned"] / gbps["ring_pageable"], 2), target=3.0)
    ceiling.close()
    stage.close()


if __name__ == "__main__":
    main()
