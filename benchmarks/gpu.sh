#!/usr/bin/env bash
# The prepared device run for a session that is lent a GPU (jax 0.11 and optax are on its
# image; run from the repository root). Every benchmark prints JSON lines to stdout and to
# one file under $OUT (a device run brings back only a few files). Record the figures in
# benchmarks/README.md. Each step has its own time limit, so a slow one never costs the rest.
set -uo pipefail
export PYTHONPATH=.
out="${OUT:-/tmp/jaxws-gpu}"
mkdir -p "$out"
log="$out/results.jsonl"
python -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/devices.txt"
# the tests run on the CPU backend with 8 virtual devices, whatever the image's JAX_PLATFORMS says
JAX_PLATFORMS=cpu timeout 120 python -m pytest -q tests/test_step.py tests/test_feed.py tests/test_graph.py -p no:cacheprovider 2>&1 | tail -2
timeout 150 python benchmarks/speed.py --repeats 3 | tee -a "$log"
timeout 100 python benchmarks/graph.py --width 2048 --batch 1024 --examples 16384 | tee -a "$log"
timeout 70 python benchmarks/donation.py --state-mib 3072 --steps 20 | tee -a "$log"
timeout 70 python benchmarks/modes.py | tee -a "$log"
timeout 45 python benchmarks/evaluation.py | tee -a "$log"
timeout 45 python benchmarks/prefetch.py | tee -a "$log"
timeout 60 python benchmarks/parallel.py | tee -a "$log"
# checkpoint.py needs orbax-checkpoint, which the GPU image lacks
