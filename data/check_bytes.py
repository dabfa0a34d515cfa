"""Do two tokenisations of the same documents count the same bytes? bpb compares across tokenizers only if so.

    python3 data/check_bytes.py TOKENIZER_A SHARD_A TOKENIZER_B SHARD_B

Each shard's bytes are counted as train_gpt.py scores them (its byte tables and count_bytes: a token's UTF-8
bytes, a leading space unless the previous token is a boundary), per document (a document starts at BOS).
Exit 0 when the totals are equal; else the difference, the first documents that differ with their text as
each tokenizer decodes it, and exit 1. Bad input: one `error:` line, exit 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
import train_gpt as tg  # noqa: E402
from cli import UsageError, run  # noqa: E402


def document_bytes(tokenizer: str, shard: str) -> tuple[np.ndarray, list[np.ndarray], object]:
    """(bytes of each document, each document's tokens after its BOS, the tokenizer)."""
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=tokenizer)
    except (RuntimeError, OSError) as e:
        raise UsageError(f"{tokenizer} is not a SentencePiece model ({str(e).strip()[:120]})") from None
    tokens = tg.read_shard(shard, sp.vocab_size())
    bos = sp.bos_id()
    if not len(tokens) or tokens[0] != bos:
        raise UsageError(f"{shard} does not start with BOS (id {bos}): not documents of this tokenizer")
    t = torch.from_numpy(tokens.astype(np.int64))
    per_target = tg.count_bytes(t[:-1], t[1:], tg.build_byte_tables(sp)).long()  # entry i: the bytes of t[i + 1]
    cum = torch.cat([torch.zeros(1, dtype=torch.long), per_target.cumsum(0)]).numpy()  # cum[j]: targets 1..j
    starts = np.flatnonzero(tokens == bos)
    ends = np.append(starts[1:], len(tokens))
    return cum[ends - 1] - cum[starts], [tokens[s + 1:e] for s, e in zip(starts, ends)], sp


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4:
        raise UsageError("usage: python3 data/check_bytes.py TOKENIZER_A SHARD_A TOKENIZER_B SHARD_B")
    (a, docs_a, sp_a), (b, docs_b, sp_b) = document_bytes(*argv[:2]), document_bytes(*argv[2:])
    for name, counts, docs in (("A", a, docs_a), ("B", b, docs_b)):
        print(f"{name}: {len(docs)} documents, {sum(map(len, docs)) + len(docs)} tokens, {int(counts.sum())} bytes")
    if len(a) != len(b):
        print(f"different documents: {len(a)} in A, {len(b)} in B")
        return 1
    diff = np.flatnonzero(a != b)
    if not len(diff):
        print(f"equal: {int(a.sum())} bytes in both")
        return 0
    print(f"differ: B counts {int(b.sum() - a.sum()):+d} bytes over {len(diff)} of {len(a)} documents")
    for i in diff[:5]:
        print(f"  document {i}: A {a[i]} bytes {sp_a.decode(docs_a[i].tolist())[:80]!r}\n"
              f"  {' ' * len(f'document {i}: ')}B {b[i]} bytes {sp_b.decode(docs_b[i].tolist())[:80]!r}")
    return 1


if __name__ == "__main__":
    sys.exit(run(main, errors=(tg.DataError,)))
