#!/usr/bin/env bash
# A proxy data folder at another vocab (issue 17): a SentencePiece BPE of VOCAB tokens trained on the proxy
# corpus text (training documents only), that corpus as shards, and the proxy val's 901 documents (decoded from
# the sp1024 val shard) re-encoded. data/check_bytes.py must count the same bytes as the sp1024 val shard, or
# nothing is written.
#
#   bash eval/proxy_vocab.sh VOCAB SHARED_DATA_DIR OUT      e.g. bash eval/proxy_vocab.sh 8192 ../shared/data .proxy8192
#
# OUT holds proxy_<VOCAB>_bpe.model, fineweb_val_000000.bin and proxy_train/proxy_train_*.bin.xz, the layout of
# the shared data folder: `bash eval/proxy.sh OUT` trains and scores at that vocab (VOCAB_SIZE follows the
# tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "error: $*" >&2; exit 2; }
[ $# -eq 3 ] || fail "usage: bash eval/proxy_vocab.sh VOCAB SHARED_DATA_DIR OUT"
vocab=$1 src=$2 out=$3
[[ $vocab =~ ^[0-9]+$ ]] || fail "VOCAB=$vocab is not a number"
for need in "$src/proxy_docs/docs.jsonl.xz" "$src/fineweb_val_000000.bin" "$src/fineweb_1024_bpe.model"; do
  [ -f "$need" ] || fail "$need not found (pass the shared data folder)"
done
[ ! -e "$out" ] || fail "$out exists: remove it or choose another"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 data/build_shards.py --input "$src/proxy_docs/docs.jsonl.xz" --val-shard "$src/fineweb_val_000000.bin" \
  --val-tokenizer "$src/fineweb_1024_bpe.model" --out "$work/shards" --train-tokenizer --vocab-size "$vocab"
python3 data/check_bytes.py "$src/fineweb_1024_bpe.model" "$src/fineweb_val_000000.bin" \
  "$work/shards/tokenizer_${vocab}_bpe.model" "$work/shards/fineweb_val_000000.bin" ||
  fail "the val shard at vocab $vocab does not count the sp1024 val's bytes (see above)"
mkdir -p "$work/out/proxy_train"
mv "$work/shards/tokenizer_${vocab}_bpe.model" "$work/out/proxy_${vocab}_bpe.model"
mv "$work/shards/fineweb_val_000000.bin" "$work/out/"
for f in "$work"/shards/fineweb_train_*.bin; do
  xz -T0 -6 -c "$f" > "$work/out/proxy_train/proxy_train_$(basename "$f" .bin | sed 's/^fineweb_train_//').bin.xz"
done
mkdir -p "$(dirname "$out")"
mv "$work/out" "$out"
echo "$out: $(du -sh "$out" | cut -f1) (bash eval/proxy.sh $out)"
