#!/usr/bin/env bash
# The prepared device run for a session that is lent a GPU (jax 0.11 and optax are on its
# image; run from the repository root). Every benchmark prints JSON lines to stdout and to
# one file under $OUT (a device run brings back only a few files). Record the figures in
# benchmarks/README.md. Each step has its own time limit, so a slow one never costs the rest;
# their limits add up to under ten minutes.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out="${OUT:-/tmp/jaxws-gpu}"
mkdir -p "$out"
log="$out/results.jsonl"
python -c "import jax; d = jax.devices()[0]; print(jax.__version__, d, d.client.platform_version)" | tee "$out/devices.txt"
# the tests of the per-step path on the CPU backend with 8 virtual devices (this jax version)
JAX_PLATFORMS=cpu timeout 110 python -m pytest -q -x -p no:cacheprovider tests/test_step.py tests/test_feed.py 2>&1 | tail -3 | tee "$out/tests.txt"
timeout 45 python benchmarks/inference.py --repeats 3 | tee -a "$log"
timeout 150 python benchmarks/speed.py --repeats 3 | tee -a "$log"
timeout 90 python benchmarks/breakdown.py --sizes 64:32,1024:1024,4096:4096 --steps 100 | tee -a "$log"
timeout 70 python benchmarks/modes.py | tee -a "$log"
timeout 60 python benchmarks/prefetch.py | tee -a "$log"
timeout 60 python benchmarks/donation.py --state-mib 3072 --steps 20 | tee -a "$log"
# graph.py, evaluation.py (unchanged paths), parallel.py (one device), checkpoint.py and pinned.py
# were recorded in earlier runs; run them by hand if a session has device time to spare
