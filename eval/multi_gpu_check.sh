#!/usr/bin/env bash
# Multi-process agreement on this machine's GPUs (gloo processes on a CPU machine):
#  1. one artifact scored by 1 and by NPROC processes gives the same val_loss and val_bpb (to 1e-6);
#  2. a short training run on 1 and on NPROC processes with the same global batch logs the same losses.
#   NPROC=2 bash eval/multi_gpu_check.sh ARTIFACT     (DATA_PATH and TOKENIZER_PATH as for eval.sh)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
fail() { echo "error: $*" >&2; exit 2; }
[ $# -eq 1 ] || fail "usage: NPROC=N bash eval/multi_gpu_check.sh ARTIFACT"
[ -f "$1" ] || fail "artifact $1 not found"
n=${NPROC:-2}
[[ $n =~ ^[1-9][0-9]*$ ]] || fail "NPROC=$n is not a whole number >= 1"
artifact=$1
tag=${RUN_ID:-check}
for p in 1 "$n"; do
  NPROC=$p RUN_ID=${tag}_score$p bash "$root/eval/eval.sh" "$artifact" | grep -E "^final_|error" || true
done
for p in 1 "$n"; do  # the global batch is the same: accumulation n on one process, 1 on n processes
  RUN_ID=${tag}_train$p ITERATIONS=${CHECK_STEPS:-10} MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=0 TORCH_COMPILE=0 \
  TRAIN_BATCH_TOKENS=$((n * ${CHECK_LOCAL_TOKENS:-98304})) GRAD_ACCUM_STEPS=$((n / p)) TRAIN_LOG_EVERY=1 \
  COMPRESSOR=zstd EVAL_STRIDE=${EVAL_SEQ_LEN:-2048} \
  python3 "$root/eval/launch.py" "$p" "$root/train_gpt.py" | grep -E "^step:|error" || true
done
python3 - "$root" "$tag" "$n" "${TRAIN_TOLERANCE:-5e-3}" <<'PY'
import sys
sys.path.insert(0, sys.argv[1] + "/tools")
from logs import parse_log
tag, n, tol = sys.argv[2], sys.argv[3], float(sys.argv[4])
try:
    a, b = (parse_log(f"logs/{tag}_score{p}.txt") for p in ("1", n))
    x, y = (parse_log(f"logs/{tag}_train{p}.txt")["train_curve"] for p in ("1", n))
    a["sliding_bpb"], b["sliding_bpb"], x[0], y[0]
except (OSError, KeyError, IndexError) as e:
    sys.exit(f"error: a run did not finish ({type(e).__name__}: {e}); its output is above")
ok = True
for key in ("roundtrip_loss", "roundtrip_bpb", "sliding_loss", "sliding_bpb"):
    diff = abs(a[key] - b[key])
    ok &= diff <= 1e-6
    print(f"score {key}: 1 process {a[key]:.8f}, {n} processes {b[key]:.8f}, |diff| {diff:.2e}")
worst = max(abs(l1 - l2) for (_, _, l1), (_, _, l2) in zip(x, y))
ok &= len(x) == len(y) > 0 and worst <= tol
print(f"train: {len(x)} steps, first loss {x[0][2]:.4f} vs {y[0][2]:.4f}, worst |diff| {worst:.2e} (tolerance {tol:g})")
print("AGREE" if ok else "DISAGREE")
sys.exit(0 if ok else 1)
PY
