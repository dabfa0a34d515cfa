#!/usr/bin/env bash
# Score an artifact on every visible GPU, reading only the artifact, the tokenizer and the val shards
# (DATA_PATH, TOKENIZER_PATH). With no artifact, run the whole pipeline (train, export, score) with the env it is
# given, so `SEED=1337 bash eval/eval.sh` is the record run.
#
#   bash eval/eval.sh [ARTIFACT]        (NPROC overrides the process count; 1 on a machine without GPUs)
# Paths (ARTIFACT, DATA_PATH, logs/) are relative to the directory it is called from. A bad input ends with one
# `error:` line and exit code 2.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
fail() { echo "error: $*" >&2; exit 2; }
[ $# -le 1 ] || fail "too many arguments (usage: bash eval/eval.sh [ARTIFACT])"
nproc=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
[ -n "${NPROC:-}" ] || [ "${nproc:-0}" -ge 1 ] || nproc=1
[[ $nproc =~ ^[1-9][0-9]*$ ]] || fail "NPROC=$nproc is not a whole number >= 1"
if [ $# -eq 1 ]; then
  [ -f "$1" ] || fail "artifact $1 not found"
  export EVAL_ARTIFACT=$1
fi
exec python3 "$root/eval/launch.py" "$nproc" "$root/train_gpt.py"
