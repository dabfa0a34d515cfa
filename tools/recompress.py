"""Size of an artifact's model under other codecs: python3 tools/recompress.py ARTIFACT [CODEC ...]"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

blob = Path(sys.argv[1]).read_bytes()
raw = tg.decompress(blob[5:], {v: k for k, v in tg.CODECS.items()}[blob[4]])
print(f"raw payload: {len(raw)} bytes")
for codec in sys.argv[2:] or tg.CODECS:
    t0 = time.perf_counter()
    n = len(tg.compress(raw, codec)) + 5
    print(f"{codec}: {n} bytes ({time.perf_counter() - t0:.1f}s)")
