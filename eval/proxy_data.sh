#!/usr/bin/env bash
# Unpack the proxy corpus once into a data folder train_gpt.py reads (DATA_PATH): SRC/proxy_train/*.bin.xz ->
# DEST/fineweb_train_*.bin, and SRC's val shard linked in. SRC holds one tokenizer (*.model; the shared folder's
# fineweb_1024_bpe.model, or eval/proxy_vocab.sh's). Shards already there are kept; a half-written one never is
# (written to .tmp, then renamed), so each tokenizer gets its own DEST (default /tmp/proxy_data_<tokenizer>).
# Prints DEST.
#   bash eval/proxy_data.sh SRC [DEST]
set -euo pipefail
fail() { echo "error: $*" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || fail "usage: bash eval/proxy_data.sh SHARED_DATA_DIR [DEST]"
src=$1
[ -f "$src/fineweb_val_000000.bin" ] || fail "$src/fineweb_val_000000.bin not found (pass the shared data folder as the first argument)"
models=("$src"/*.model)
[ ${#models[@]} -eq 1 ] && [ -f "${models[0]}" ] || fail "$src must hold exactly one tokenizer (*.model)"
data=${2:-/tmp/proxy_data_$(basename "${models[0]}" .model)}
ls "$src"/proxy_train/proxy_train_*.bin.xz >/dev/null 2>&1 || fail "no proxy_train/*.bin.xz under $src"
command -v xz >/dev/null || fail "xz is not installed (it unpacks the proxy shards)"
unpack() { [ -s "$2" ] || { xz -dc "$1" > "$2.tmp" && mv -f "$2.tmp" "$2"; }; }
mkdir -p "$data" || fail "cannot create $data"
pids=()
for f in "$src"/proxy_train/proxy_train_*.bin.xz; do
  unpack "$f" "$data/fineweb_train_$(basename "$f" .bin.xz | sed 's/^proxy_train_//').bin" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || fail "could not unpack the proxy shards into $data"; done
ln -sf "$(realpath "$src/fineweb_val_000000.bin")" "$data/fineweb_val_000000.bin"
echo "$data"
