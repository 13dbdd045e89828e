#!/usr/bin/env bash
# The GPU/TPU benchmark as one prepared command, for a machine with no network that already has
# JAX with its accelerator plugin and defuse-jax's other runtime dependencies (pyproject.toml:
# flax, optax, orbax-checkpoint, scikit-learn, matplotlib, pillow, tqdm; tensorflow-datasets is
# not needed) and, optionally, torch: nothing is installed, the checkout is used in place.
#
#   OUT=/some/dir bash scripts/device_bench.sh     # writes info.json, search.json, search.log
#   CHAINS=256,1024 SEARCH_ARGS="--quick --no-torch" bash scripts/device_bench.sh   # a smoke run
#
# The search benchmark takes a few minutes (much of it compilation and the per-point reference
# loops); MIXTURE=1 adds the mixture benchmark's headline rows (scikit-learn runs on the host CPU).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_results/device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

$PY -m defuse_jax.cli info --json >"$OUT/info.json" && cat "$OUT/info.json"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
  --format=csv >"$OUT/gpu.csv"

# The issue's sweep up to 65,536 chains, then two larger sizes an accelerator needs to fill up.
CHAINS=${CHAINS:-256,1024,4096,16384,65536,262144,1048576}
# shellcheck disable=SC2086  # SEARCH_ARGS: extra flags, word-split on purpose
$PY -m defuse_jax.cli bench search --repeats 5 --chains "$CHAINS" ${SEARCH_ARGS:-} \
  --out "$OUT/search.json" 2>&1 | tee "$OUT/search.log" || exit 1

if [ -n "${MIXTURE:-}" ]; then
  $PY -m defuse_jax.cli bench mixture --scaling-n "" --scaling-k "" \
    --out "$OUT/mixture.json" 2>&1 | tee "$OUT/mixture.log"
fi
