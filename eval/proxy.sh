#!/usr/bin/env bash
# The proxy benchmark: each GPU trains on its share of the record batch (98,304 tokens, seq 2048, no
# accumulation) for PROXY_SECONDS (150) on the proxy corpus, then the full export, roundtrip, sliding-window and
# test-time-training (TTT_MODE) scoring on the proxy val shard; last, one summary line.
#
#   bash eval/proxy.sh [SHARED_DATA_DIR]      (default ../shared/data)
#   NPROC=2 bash eval/proxy.sh                (the global batch scales with the GPUs)
# Any train_gpt.py env var passes through (e.g. LATE_QAT_THRESHOLD=0 for an ablation).
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "error: $*" >&2; exit 2; }
[ $# -le 1 ] || fail "too many arguments (usage: bash eval/proxy.sh [SHARED_DATA_DIR])"
src=${1:-../shared/data}
nproc=${NPROC:-1}
[[ $nproc =~ ^[1-9][0-9]*$ ]] || fail "NPROC=$nproc is not a whole number >= 1"
data=$(bash eval/proxy_data.sh "$src" ${PROXY_DATA_DIR:+"$PROXY_DATA_DIR"})
tokenizer=$(ls "$src"/*.model)

export DATA_PATH=$data TOKENIZER_PATH=$tokenizer
export VOCAB_SIZE=${VOCAB_SIZE:-$(python3 -c "import sentencepiece as s, sys; print(s.SentencePieceProcessor(model_file=sys.argv[1]).vocab_size())" "$tokenizer")}
export TRAIN_BATCH_TOKENS=$((98304 * nproc)) GRAD_ACCUM_STEPS=${GRAD_ACCUM_STEPS:-1}
export MAX_WALLCLOCK_SECONDS=${PROXY_SECONDS:-150} TRAIN_SEQ_LEN=2048
export RUN_ID=${RUN_ID:-proxy_$(date +%Y%m%d_%H%M%S)}
python3 eval/launch.py "$nproc" train_gpt.py
python3 tools/logs.py summary "logs/$RUN_ID.txt"
