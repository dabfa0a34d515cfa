#!/usr/bin/env bash
# Score an artifact with torchrun on every visible GPU, reading only the artifact, the tokenizer and the val
# shards (DATA_PATH, TOKENIZER_PATH). With no artifact, run the whole pipeline (train, export, score) with the
# env it is given, so `SEED=1337 bash eval/eval.sh` is the record run.
#
#   bash eval/eval.sh [ARTIFACT]        (NPROC overrides the process count; 1 on a machine without GPUs)
# Paths (ARTIFACT, DATA_PATH, logs/) are relative to the directory it is called from.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
nproc=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
[ "${nproc:-0}" -ge 1 ] 2>/dev/null || nproc=1
if [ $# -ge 1 ]; then
  [ -f "$1" ] || { echo "error: artifact $1 not found" >&2; exit 2; }
  export EVAL_ARTIFACT=$1
fi
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$root/train_gpt.py"
