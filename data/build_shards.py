"""Build challenge-format shards from local documents.

    python3 data/build_shards.py --input docs.jsonl.xz --out data/datasets/mine_sp1024 \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model [--val-docs 50000] [--shard-tokens 100000000]
    python3 data/build_shards.py --input texts/ --out data/datasets/mine --train-tokenizer --vocab-size 1024

Inputs: .jsonl / .jsonl.xz / .jsonl.gz files with a "text" field per line, .txt files (one document each), or
folders of those. Every document becomes BOS + its tokens; the first --val-docs documents form the val split
(as the challenge's val split is the first 50,000 docs), the rest train. A document never straddles shards.
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
BOS_ID = 1


def write_shard(path: str | Path, tokens) -> None:
    """Write a challenge shard: 256 little-endian int32 header (magic, version, count), then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError("token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def _open_text(path: Path):
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8")


def iter_documents(inputs: list[str]):
    """Yield document texts from files and folders, in sorted order within each folder."""
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"input {item} not found")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if ".jsonl" in f.suffixes:
                with _open_text(f) as fh:
                    for n, line in enumerate(fh, 1):
                        if line.strip():
                            try:
                                yield json.loads(line)["text"]
                            except (json.JSONDecodeError, KeyError, TypeError):
                                raise ValueError(f"{f}:{n}: not a JSON object with a 'text' field") from None
            elif f.suffix == ".txt":
                yield f.read_text(encoding="utf-8")


def train_tokenizer(docs: list[str], prefix: str, vocab_size: int) -> str:
    """SentencePiece BPE in the challenge's layout: pad 0, BOS 1, EOS 2, UNK 3, then 256 byte-fallback pieces."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=0.999, normalization_rule_name="nmt_nfkc",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, max_sentence_length=1 << 20, input_sentence_size=2_000_000,
        shuffle_input_sentence=True, minloglevel=2)
    return prefix + ".model"


_SP = None


def _encode_batch(args):
    global _SP
    model, texts = args
    if _SP is None or _SP[0] != model:
        import sentencepiece as spm
        _SP = (model, spm.SentencePieceProcessor(model_file=model))
    return [np.array([BOS_ID] + ids, dtype=np.uint16) for ids in _SP[1].encode(texts)]


def encode_documents(docs: list[str], model: str, workers: int, batch: int = 512) -> list[np.ndarray]:
    jobs = [(model, docs[i:i + batch]) for i in range(0, len(docs), batch)]
    if workers <= 1:
        results = map(_encode_batch, jobs)
    else:
        results = mp.get_context("spawn").Pool(workers).imap(_encode_batch, jobs)
    return [arr for chunk in results for arr in chunk]


def write_split(encoded: list[np.ndarray], out: Path, split: str, shard_tokens: int) -> list[Path]:
    paths, buf, n = [], [], 0

    def flush():
        nonlocal buf, n
        path = out / f"fineweb_{split}_{len(paths):06d}.bin"
        write_shard(path, np.concatenate(buf))
        paths.append(path)
        buf, n = [], 0

    for arr in encoded:
        if n and n + len(arr) > shard_tokens:
            flush()
        buf.append(arr)
        n += len(arr)
    if buf:
        flush()
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", help="an existing SentencePiece model")
    ap.add_argument("--train-tokenizer", action="store_true", help="train a BPE tokenizer on the train docs")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--val-docs", type=int, default=50_000)
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    a = ap.parse_args(argv)
    if bool(a.tokenizer) == a.train_tokenizer:
        ap.error("give exactly one of --tokenizer MODEL and --train-tokenizer")
    docs = list(iter_documents(a.input))
    if len(docs) <= a.val_docs:
        ap.error(f"{len(docs)} documents: need more than --val-docs={a.val_docs} to leave a train split")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = a.tokenizer or train_tokenizer(docs[a.val_docs:], str(out / f"tokenizer_{a.vocab_size}_bpe"), a.vocab_size)
    encoded = encode_documents(docs, model, a.workers)
    for split, part, texts in (("val", encoded[:a.val_docs], docs[:a.val_docs]), ("train", encoded[a.val_docs:], docs[a.val_docs:])):
        paths = write_split(part, out, split, a.shard_tokens)
        ntok = sum(len(x) for x in part)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        print(f"{split}: {len(part)} docs, {ntok} tokens (BOS included), {nbytes} bytes, "
              f"{nbytes / max(ntok - len(part), 1):.3f} bytes/token, {len(paths)} shards")
    print(f"tokenizer: {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
