"""Size of an artifact's model under other codecs and byte shuffles (BYTE_SHUFFLE):
python3 tools/recompress.py ARTIFACT [CODEC ...] [--shuffle 0,2,4]"""
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import train_gpt as tg  # noqa: E402
from cli import UsageError, run  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    strides = [0]
    if "--shuffle" in argv:
        i = argv.index("--shuffle")
        try:
            strides = [int(s) for s in argv[i + 1].split(",")]
        except (IndexError, ValueError):
            raise UsageError("--shuffle takes comma-separated strides, e.g. --shuffle 0,2,4") from None
        if not all(0 <= s <= 15 for s in strides):
            raise UsageError("--shuffle strides must be between 0 and 15")
        del argv[i:i + 2]
    if not argv:
        raise UsageError("usage: python3 tools/recompress.py ARTIFACT [CODEC ...] [--shuffle 0,2,4]")
    codecs = argv[1:] or list(tg.CODECS)
    unknown = [c for c in codecs if c not in tg.CODECS]
    if unknown:
        raise UsageError(f"unknown codec {', '.join(unknown)} (use {', '.join(tg.CODECS)})")
    raw = tg.read_payload(argv[0])  # a readable artifact, or one clear error
    tg.unpack_state(raw)
    print(f"raw payload: {len(raw)} bytes")
    for codec in codecs:
        for stride in strides:
            t0 = time.perf_counter()
            n = len(tg.compress(tg.shuffle_bytes(raw, stride), codec)) + 5
            print(f"{codec} byte_shuffle {stride}: {n} bytes ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, errors=(tg.ArtifactError, tg.ConfigError)))
