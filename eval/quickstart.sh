#!/usr/bin/env bash
# The whole job on a laptop CPU in under a minute: challenge-format shards and a 512-token BPE tokenizer made from
# any small text (default: this repo's README.md, one document per paragraph), then the tiny model of
# eval/tiny.env trains, exports its artifact, reloads it alone and scores it (logs/quickstart.txt).
#
#   bash eval/quickstart.sh [TEXT_FILE ...]       (any train_gpt.py env var on top, e.g. ITERATIONS=200)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ $# -gt 0 ] || set -- "$root/README.md"
python3 "$root/data/build_shards.py" --input "$@" --paragraphs --out "$work/shards" --train-tokenizer \
  --vocab-size 512 --val-docs 8 --workers 1
while IFS='=' read -r key value; do  # the tiny config; the caller's own values win
  [[ -z $key || $key == \#* ]] || [ -n "${!key+x}" ] || export "$key=$value"
done < "$root/eval/tiny.env"
export DATA_PATH=$work/shards TOKENIZER_PATH=$work/shards/tokenizer_512_bpe.model VOCAB_SIZE=512
export RUN_ID=${RUN_ID:-quickstart}
python3 "$root/train_gpt.py"
