#!/usr/bin/env bash
# The prepared device run for a session that is lent a GPU (jax 0.11 and optax are on its
# image; run from the repository root). Every benchmark prints JSON lines; they are also
# written under $OUT so they come back. Record the figures in benchmarks/README.md.
set -euo pipefail
export PYTHONPATH=.
out="${OUT:-/tmp/jaxws-gpu}"
mkdir -p "$out"
python -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/devices.txt"
python -m pytest -q -x tests/test_step.py tests/test_workspace.py tests/test_feed.py -p no:cacheprovider 2>&1 | tail -3 | tee "$out/tests.txt"
python benchmarks/speed.py --repeats 5 | tee "$out/speed.jsonl"
python benchmarks/donation.py --state-mib 3072 --steps 20 | tee "$out/donation.jsonl"
python benchmarks/modes.py | tee "$out/modes.jsonl"
python benchmarks/evaluation.py | tee "$out/evaluation.jsonl"
python benchmarks/prefetch.py | tee "$out/prefetch.jsonl"
python benchmarks/parallel.py | tee "$out/parallel.jsonl"
python benchmarks/graph.py --width 2048 --batch 1024 --examples 16384 | tee "$out/graph.jsonl"
# checkpoint.py needs orbax-checkpoint, which the GPU image lacks
