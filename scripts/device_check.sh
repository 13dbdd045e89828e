#!/usr/bin/env bash
# One prepared accelerator check: is defuse-jax correct and fast on this machine?
#
# For a machine with no network that already has JAX with its accelerator plugin, flax, optax,
# orbax-checkpoint, scikit-learn, matplotlib, pillow and tqdm (torch optional; tensorflow-datasets
# not needed). Nothing is installed; the checkout is used in place (PYTHONPATH).
#
#   OUT=/some/dir bash scripts/device_check.sh      # the full check, about 6.5 minutes on one H200
#   QUICK=1 OUT=/tmp/x bash scripts/device_check.sh # CPU smoke run (the test suite runs it)
#   STEPS="digits search" OUT=... bash scripts/device_check.sh  # only these steps (and info)
#
# Steps, each under its own timeout; a failed or timed-out step is recorded and the next runs:
#   info          backend, devices, versions                      -> steps.json ["info"]
#   digits        `defuse-jax run` on digits (MLP models)         -> digits_report.json
#   conv          the same with --image-size 28 (conv models)     -> conv_report.json
#   mixture_100k  mixture benchmark headline, 100k x 16, K=20     -> mixture.json ["100k"]
#   mixture_1m    the same at 1M rows, ours only                  -> mixture.json ["1m"]
#                 (at 100k scikit-learn runs on the host CPU, its time extrapolated from fits
#                 of 1 and 3 iterations)
#   ill_cond      a float32 fit of 200k x 16 rows 1e3 from the origin vs float64 scikit-learn
#                                                                 -> ill_conditioned.json
#   search        search benchmark in float32 and bfloat16        -> search.json
#   train         training benchmark: fit's loop forms against the bare step, 28x28 MLP and
#                 conv models                                     -> train.json
#   profile       only when STEPS names it: where the search's time goes, host parts, device
#                 program, kernels (scripts/profile_search.py)    -> profile.json
# plus steps.json (the info, each step's exit code and seconds) and check.log (everything
# printed): 8 files with the default steps, the most the device tool brings back (with profile,
# leave out ill_cond or both mixture steps).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_results/device_check}
WORK=${WORK:-$(mktemp -d)}
QUICK=${QUICK:-}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DEFUSE_JAX_CACHE_DIR=off
PY=${PYTHON:-python3}
LOG="$OUT/check.log"
TSV="$WORK/steps.tsv"
: >"$LOG"
: >"$TSV"

STEPS="info ${STEPS:-digits conv mixture_100k mixture_1m ill_cond search train}"

step() {  # step NAME TIMEOUT_S COMMAND...: run it, log it, record its exit code and time
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in
    *" $name "*) ;;
    *) echo "=== $name: not in STEPS, skipped" | tee -a "$LOG"; return 0 ;;
  esac
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$TSV"
  echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
}

keep() {  # keep SRC DEST: copy a stage output into $OUT if it exists
  [ -f "$1" ] && cp "$1" "$2"
}

if [ -n "$QUICK" ]; then  # seconds on a CPU: every step runs, on toy sizes
  # (one-epoch models: the oracle misreads their blurry decoded sources, so the quick pipeline
  # searches without the validity constraint, or it would skip every source; and with the
  # unconditional VAE, whose pilot and per-class mixtures would double its CPU time)
  PIPE=(--max-train 300 --max-test 80 --max-sources 16 --vae-epochs 1 --clf-epochs 1
    --search-num-samples 16 --distill-n-components 4 --distill-max-iter 20
    --distill-min-codes 2 --distill-error-samples 8 --grid-samples 2 --correct-epochs 1
    --eval-region-samples 8 --oracle-members 1 --search-validity none --no-vae-conditional)
  CONV=(--vae-channels 4 8 --clf-channels 4 8 --vae-hidden 32 --clf-hidden 32)
  MIX=(--k 5 --iters 10 --repeats 1 --models gmm)
  MIX_N=(2000 4000)
  ILL_N=5000
  SEARCH=(--quick --no-torch --no-modes --models mlp --chains 256 --chunk-sizes 128
    --scaling-devices 1)
  TRAIN=(--quick --kinds mlp --roles classifier --train-size 256)
else
  PIPE=()
  CONV=()
  MIX=(--repeats 3)
  MIX_N=(100000 1000000)
  ILL_N=200000
  SEARCH=(--repeats 2 --chains 65536 1048576 --ref-points 32 --no-modes --decoders phase native
    --scaling-devices 1 2 4 8)
  TRAIN=(--sizes 28 --kinds mlp conv)
fi
MIX_COMMON=(--no-parity --no-pipeline --scaling-n --scaling-k --sklearn-full-max 0
  --sklearn-short-iters 2)

# One process (a JAX start costs seconds): the JSON goes to info.json and, through `cat`, the log.
step info 60 sh -c '"$1" -m defuse_jax.cli info --json >"$2" && cat "$2"' sh "$PY" "$WORK/info.json"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
  --format=csv >>"$LOG" 2>&1

step digits 120 $PY -m defuse_jax.cli run --out "$WORK/digits" --no-progress "${PIPE[@]}"
keep "$WORK/digits/report.json" "$OUT/digits_report.json"

step conv 150 $PY -m defuse_jax.cli run --out "$WORK/conv" --image-size 28 --no-progress \
  "${PIPE[@]}" "${CONV[@]}"
keep "$WORK/conv/report.json" "$OUT/conv_report.json"

step mixture_100k 90 $PY -m defuse_jax.cli bench mixture --n "${MIX_N[0]}" "${MIX_COMMON[@]}" \
  "${MIX[@]}" --json "$WORK/mixture_100k.json"
# scikit-learn's short fits at 1M rows alone took 95 s on the H200's host: ours only there.
step mixture_1m 90 $PY -m defuse_jax.cli bench mixture --n "${MIX_N[1]}" "${MIX_COMMON[@]}" \
  "${MIX[@]}" --no-sklearn --json "$WORK/mixture_1m.json"

step ill_cond 90 $PY - "$ILL_N" "$OUT/ill_conditioned.json" <<'EOF'
"""Rows far from the origin with tiny spreads: float32 on the device vs float64 scikit-learn."""
import json, sys, time, warnings
import jax, numpy as np
from sklearn import mixture as skm
from defuse_jax.mixture import BayesianGaussianMixture, GaussianMixture

n, path = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
centers = 1e3 + rng.normal(size=(3, 16)) * 0.5
scales = rng.uniform(0.005, 0.02, size=(3, 16))
labels = rng.integers(0, 3, n)
x = centers[labels] + rng.normal(size=(n, 16)) * scales[labels]
out = {"n": n, "d": 16, "offset": 1e3, "backend": jax.default_backend(), "rows": []}
for ours_cls, sk_cls in ((GaussianMixture, skm.GaussianMixture),
                         (BayesianGaussianMixture, skm.BayesianGaussianMixture)):
    kw = dict(n_components=3, covariance_type="full", max_iter=50, random_state=0)
    t = time.perf_counter()
    ours = ours_cls(**kw).fit(x)
    t_ours = time.perf_counter() - t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sk_cls(**kw).fit(x)
    row = {"model": ours_cls.__name__, "score_ours_float32": ours.score(x),
           "score_sklearn_float64": ref.score(x), "fit_s_with_compile": t_ours,
           "converged": bool(ours.converged_)}
    row["abs_diff"] = abs(row["score_ours_float32"] - row["score_sklearn_float64"])
    row["ok"] = row["abs_diff"] < 1e-3 and row["converged"]
    out["rows"].append(row)
    print(row)
with open(path, "w") as f:
    json.dump(out, f, indent=1)
sys.exit(0 if all(r["ok"] for r in out["rows"]) else 1)
EOF

step search 300 $PY -m defuse_jax.cli bench search --dtype float32 bfloat16 "${SEARCH[@]}" \
  --json "$OUT/search.json"

step train 150 $PY -m defuse_jax.cli bench train "${TRAIN[@]}" --json "$OUT/train.json"

step profile 150 $PY scripts/profile_search.py --out "$WORK/profile" ${QUICK:+--quick}
keep "$WORK/profile/profile.json" "$OUT/profile.json"

$PY - "$TSV" "$OUT/steps.json" "$WORK" "$OUT/mixture.json" <<'EOF'
import json, os, sys
mixture = {}
for size in ("100k", "1m"):
    path = os.path.join(sys.argv[3], f"mixture_{size}.json")
    if os.path.exists(path):
        mixture[size] = json.load(open(path))
if mixture:  # no empty file: the device tool brings back 8 files at most
    json.dump(mixture, open(sys.argv[4], "w"), indent=1)
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps = [{"step": s, "exit_code": int(rc), "seconds": int(t)} for s, rc, t in rows]
info_path = os.path.join(sys.argv[3], "info.json")
ok_info = os.path.isfile(info_path) and os.path.getsize(info_path)
info = json.load(open(info_path)) if ok_info else None
json.dump({"info": info, "steps": steps, "ok": all(s["exit_code"] == 0 for s in steps)},
          open(sys.argv[2], "w"), indent=1)
print("\n".join(f"{s['step']:<14} exit {s['exit_code']:>3} {s['seconds']:>5}s" for s in steps))
sys.exit(0 if all(s["exit_code"] == 0 for s in steps) else 1)
EOF
