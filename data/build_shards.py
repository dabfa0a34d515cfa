"""Build challenge-format shards from local documents.

    python3 data/build_shards.py --input docs.jsonl.xz --out data/datasets/mine_sp1024 \\
        --tokenizer data/tokenizers/fineweb_1024_bpe.model [--val-docs 50000] [--shard-tokens 100000000]
    python3 data/build_shards.py --input texts/ --out data/datasets/mine --train-tokenizer --vocab-size 1024
    python3 data/build_shards.py --input README.md --paragraphs --out /tmp/tiny --train-tokenizer --vocab-size 320 --val-docs 10
    python3 data/build_shards.py --input docs.jsonl.xz --val-shard fineweb_val_000000.bin \
        --val-tokenizer fineweb_1024_bpe.model --out proxy_sp8192 --train-tokenizer --vocab-size 8192

Inputs: .jsonl / .jsonl.xz / .jsonl.gz files with a "text" field per line, text files (one document each, or
one per blank-line-separated paragraph with --paragraphs), or folders of .jsonl* and .txt files. Every document
becomes BOS + its tokens; the first --val-docs documents form the val split (as the challenge's val split is the
first 50,000 docs), the rest train; or, with --val-shard, the val split is that shard's documents decoded with
--val-tokenizer (the same val text at another vocab: check it with data/check_bytes.py) and every input document
is a train document. A trained tokenizer sees the train documents only. A document never
straddles shards. The shards are written to OUT.partial and renamed to OUT when complete; OUT must not hold
files already. Bad input: one `error:` line, exit code 2.
"""
from __future__ import annotations

import gzip
import json
import lzma
import multiprocessing as mp
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from cli import ArgParser, UsageError, run  # noqa: E402

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


def iter_documents(inputs: list[str], paragraphs: bool = False):
    """Yield document texts from files and folders, in sorted order within each folder."""
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise UsageError(f"input {item} not found")
        files = sorted(f for f in p.rglob("*") if f.is_file() and (".jsonl" in f.suffixes or f.suffix == ".txt")) \
            if p.is_dir() else [p]
        for f in files:
            try:
                yield from (read_jsonl(f) if ".jsonl" in f.suffixes else read_text(f, paragraphs))
            except (UnicodeDecodeError, lzma.LZMAError, gzip.BadGzipFile, EOFError) as e:
                raise UsageError(f"{f}: cannot read it as UTF-8 text ({type(e).__name__}: {e})") from None


def read_jsonl(f: Path):
    with _open_text(f) as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UsageError(f"{f}:{n}: not a JSON object with a 'text' field") from None
                if not isinstance(text, str):
                    raise UsageError(f"{f}:{n}: its 'text' field is not a string")
                yield text


def read_text(f: Path, paragraphs: bool):
    with _open_text(f) as fh:
        text = fh.read()
    if not paragraphs:
        yield text
        return
    for part in re.split(r"\n\s*\n", text):
        if part.strip():
            yield part.strip()


def read_documents(shard: str, tokenizer: str) -> list[str]:
    """The texts of a shard's documents (each starts at BOS), decoded with its tokenizer."""
    import sentencepiece as spm
    check_tokenizer(tokenizer)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    raw = Path(shard).read_bytes() if os.path.isfile(shard) else b""
    header = np.frombuffer(raw[:min(len(raw), 4 * HEADER_INTS) // 4 * 4], dtype="<i4")
    tokens = np.frombuffer(raw[4 * HEADER_INTS:len(raw) - len(raw) % 2], dtype="<u2")
    if len(header) < 3 or header[0] != SHARD_MAGIC or header[2] != len(tokens) or not len(tokens) or tokens[0] != BOS_ID:
        raise UsageError(f"--val-shard {shard}: not a challenge shard of BOS-separated documents")
    starts = np.flatnonzero(tokens == BOS_ID)
    return [sp.decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, np.append(starts[1:], len(tokens)))]


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


def check_tokenizer(path: str) -> int:
    """The vocab size of a SentencePiece model that loads and fits uint16 shards."""
    import sentencepiece as spm
    if not os.path.isfile(path):
        raise UsageError(f"tokenizer {path} not found")
    try:
        vocab = spm.SentencePieceProcessor(model_file=path).vocab_size()
    except (RuntimeError, OSError) as e:
        raise UsageError(f"tokenizer {path} is not a SentencePiece model ({str(e).strip()[:120]})") from None
    if vocab > 1 << 16:
        raise UsageError(f"tokenizer {path} has {vocab} tokens: shards hold uint16 ids (at most 65536)")
    return vocab


def build(docs: list[str], a, out: Path) -> str:
    """Tokenizer (given or trained on the train documents) and shards in `out`; returns the tokenizer path."""
    model = a.tokenizer
    if model is None:
        try:
            model = train_tokenizer(docs[a.val_docs:], str(out / f"tokenizer_{a.vocab_size}_bpe"), a.vocab_size)
        except RuntimeError as e:  # e.g. a vocab larger than the text supports
            raise UsageError(f"tokenizer training failed: {str(e).strip()[:200]}") from None
    encoded = encode_documents(docs, model, a.workers)
    n = a.val_docs
    for split, part, texts in (("val", encoded[:n], docs[:n]), ("train", encoded[n:], docs[n:])):
        paths = write_split(part, out, split, a.shard_tokens)
        ntok = sum(len(x) for x in part)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        print(f"{split}: {len(part)} docs, {ntok} tokens (BOS included), {nbytes} bytes, "
              f"{nbytes / max(ntok - len(part), 1):.3f} bytes/token, {len(paths)} shards")
    return model


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__)
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", help="an existing SentencePiece model")
    ap.add_argument("--train-tokenizer", action="store_true", help="train a BPE tokenizer on the train docs")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--paragraphs", action="store_true", help="text files: one document per paragraph")
    ap.add_argument("--val-docs", type=int, help="the first N input documents are val (default 50,000)")
    ap.add_argument("--val-shard", help="val = this shard's documents, decoded with --val-tokenizer")
    ap.add_argument("--val-tokenizer", help="the tokenizer of --val-shard")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    a = ap.parse_args(argv)
    if bool(a.tokenizer) == a.train_tokenizer:
        ap.error("give exactly one of --tokenizer MODEL and --train-tokenizer")
    if a.train_tokenizer and not 262 <= a.vocab_size <= 1 << 16:
        ap.error(f"--vocab-size {a.vocab_size}: the tokenizer needs 4 special and 256 byte pieces plus merges "
                 "(at least 262), and shards hold uint16 ids (at most 65536)")
    if bool(a.val_shard) != bool(a.val_tokenizer) or (a.val_shard and a.val_docs is not None):
        ap.error("--val-shard needs --val-tokenizer, and takes the place of --val-docs")
    if a.val_docs is None:
        a.val_docs = 0 if a.val_shard else 50_000
    if a.val_docs < 0 or a.shard_tokens < 1 or a.workers < 1:
        ap.error("--val-docs must be >= 0, --shard-tokens and --workers >= 1")
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder: remove it or choose another")
    if a.tokenizer:
        check_tokenizer(a.tokenizer)
    docs = list(iter_documents(a.input, a.paragraphs))
    if a.val_shard:
        val = read_documents(a.val_shard, a.val_tokenizer)
        docs, a.val_docs = val + docs, len(val)
    if len(docs) <= a.val_docs:
        raise UsageError(f"{len(docs)} documents: need more than --val-docs={a.val_docs} to leave a train split")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        model = build(docs, a, partial)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if a.train_tokenizer:
        model = str(out / Path(model).name)
    print(f"tokenizer: {model}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
