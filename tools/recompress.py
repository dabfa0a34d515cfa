"""Size of an artifact's model under other codecs: python3 tools/recompress.py ARTIFACT [CODEC ...]"""
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import train_gpt as tg  # noqa: E402
from cli import UsageError, run  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise UsageError("usage: python3 tools/recompress.py ARTIFACT [CODEC ...]")
    codecs = argv[1:] or list(tg.CODECS)
    unknown = [c for c in codecs if c not in tg.CODECS]
    if unknown:
        raise UsageError(f"unknown codec {', '.join(unknown)} (use {', '.join(tg.CODECS)})")
    tg.read_artifact(argv[0])  # a readable artifact, or one clear error
    blob = Path(argv[0]).read_bytes()
    raw = tg.decompress(blob[5:], {v: k for k, v in tg.CODECS.items()}[blob[4]])
    print(f"raw payload: {len(raw)} bytes")
    for codec in codecs:
        t0 = time.perf_counter()
        n = len(tg.compress(raw, codec)) + 5
        print(f"{codec}: {n} bytes ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, errors=(tg.ArtifactError, tg.ConfigError)))
