"""The counted form of train_gpt.py, what a record ships: comments, docstrings and blank lines stripped with the
tokenizer, lzma, base85, and a two-line loader that runs it. Standard library only; deterministic.

    python3 tools/pack.py train_gpt.py OUT        (train_gpt.py counts this form as its code bytes)
"""
from __future__ import annotations

import base64
import io
import lzma
import sys
import tokenize
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import UsageError, run  # noqa: E402

PACKED_PREFIX = b"import lzma,base64,linecache as L\n"


def string_rows(src: str) -> set[int]:
    """The rows that continue a string (or f-string) literal from the row above."""
    return {r for tok in tokenize.generate_tokens(io.StringIO(src).readline)
            if tok.type == tokenize.STRING or tokenize.tok_name[tok.type].startswith("FSTRING")
            for r in range(tok.start[0] + 1, tok.end[0] + 1)}


def strip_source(src: str) -> str:
    """Python source without its comments, docstrings (an indented one becomes `pass`, so no block is left empty),
    trailing spaces and blank lines, found with the tokenizer; string literals are left as they are."""
    toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    starts = [0]
    for line in src.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    cuts, prev = [], tokenize.NEWLINE
    for i, tok in enumerate(toks):
        if tok.type == tokenize.COMMENT:
            cuts.append((tok.start, tok.end, ""))
        elif tok.type == tokenize.STRING and prev in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) \
                and toks[i + 1].type == tokenize.NEWLINE:
            cuts.append((tok.start, tok.end, "pass" if tok.start[1] else ""))
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            prev = tok.type
    for (r0, c0), (r1, c1), new in reversed(cuts):  # from the end: earlier offsets stay valid
        src = src[:starts[r0 - 1] + c0] + new + src[starts[r1 - 1] + c1:]
    keep = string_rows(src)
    lines = [line if row in keep else line.rstrip() for row, line in enumerate(src.splitlines(), start=1)]
    return "\n".join(line for row, line in enumerate(lines, start=1) if line or row in keep) + "\n"


def pack_source(src: str) -> bytes:
    """The counted form of this script (what a record ships): the stripped source, lzma-compressed and base85-
    encoded, in a two-line loader that runs it. The loader registers the source with linecache, where Triton
    and inspect read function sources."""
    blob = base64.b85encode(lzma.compress(strip_source(src).encode(), preset=9 | lzma.PRESET_EXTREME)).decode()
    return PACKED_PREFIX + (f's=lzma.decompress(base64.b85decode("{blob}")).decode();f=__file__+".src";'
                            f'L.cache[f]=(len(s),None,s.splitlines(True),f);exec(compile(s,f,"exec"))\n').encode()


def counted(code: bytes) -> bytes:
    """What a record counts: the packed form of a readable script; a packed script as it is."""
    return code if code.startswith(PACKED_PREFIX) else pack_source(code.decode())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise UsageError("usage: python3 tools/pack.py SCRIPT OUT")
    src = Path(argv[0]).read_bytes()
    try:
        packed = counted(src)
        compile(packed, argv[1], "exec")
    except (SyntaxError, UnicodeDecodeError, tokenize.TokenError) as e:
        raise UsageError(f"{argv[0]} is not Python source this packer can read ({e})") from None
    Path(argv[1]).write_bytes(packed)
    print(f"{argv[1]}: {len(packed)} bytes (from {len(src)})")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
