"""Download the challenge's tokenised FineWeb shards and tokenizer, driven by the dataset repo's manifest.

    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80

Files come from the Hugging Face dataset repo willdepueoai/parameter-golf (folder datasets/: manifest.json,
datasets/fineweb10B_<variant>/fineweb_{train,val}_*.bin, tokenizers/*.model) and land in
./data/datasets/fineweb10B_<variant>/ and ./data/tokenizers/. Files already present with the manifest's size
are skipped; every download is checked against that size. HF_ENDPOINT overrides the hub's address.
"""
from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from cli import ArgParser, run  # noqa: E402

REPO_ID = "willdepueoai/parameter-golf"
MANIFEST = "datasets/manifest.json"


class DownloadError(RuntimeError):
    pass


def hub_download(remote: str, dest: Path) -> None:
    """Fetch one file of the dataset repo to dest (through dest.part, so nothing half-written stays)."""
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}/datasets/{REPO_ID}/resolve/main/{remote}"
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 22):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"cannot fetch {url}: {getattr(e, 'reason', e)}") from None
    os.replace(part, dest)


def manifest_entries(manifest) -> list[tuple[str, int | None]]:
    """Every (path, size) the manifest names for a .bin or .model file, whatever its nesting."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            path = next((node[k] for k in ("path", "file", "filename", "name") if isinstance(node.get(k), str)), None)
            if path and path.endswith((".bin", ".model")):
                size = next((node[k] for k in ("bytes", "size", "num_bytes") if isinstance(node.get(k), int)), None)
                found.append((path, size))
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and node.endswith((".bin", ".model")):
            found.append((node, None))

    walk(manifest)
    return found


def plan_downloads(entries, variant: str, train_shards: int, root: Path) -> list[tuple[str, Path, int | None]]:
    """(remote path, local path, expected bytes) for the variant's val shards, its first train shards and
    its tokenizer. Manifest paths are relative to the manifest's folder."""
    vocab = variant.removeprefix("sp")
    plan = []
    for path, size in entries:
        name = path.rsplit("/", 1)[-1]
        remote = f"datasets/{path}"
        m = re.fullmatch(r"fineweb_(train|val)_(\d+)\.bin", name)
        if m and f"fineweb10B_{variant}/" in path:
            if m[1] == "val" or int(m[2]) < train_shards:
                plan.append((remote, root / "datasets" / f"fineweb10B_{variant}" / name, size))
        elif name.endswith(".model") and "tokenizers/" in path and re.search(rf"(^|_){vocab}(_|\.)", name):
            plan.append((remote, root / "tokenizers" / name, size))
    return sorted(plan, key=lambda p: str(p[1]))


def fetch_all(variant: str, train_shards: int, root: Path, download=hub_download, log=print) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    download(MANIFEST, manifest_path)
    try:
        entries = manifest_entries(json.loads(manifest_path.read_text()))
    except json.JSONDecodeError as e:
        raise DownloadError(f"{MANIFEST} is not valid JSON: {e}") from None
    plan = plan_downloads(entries, variant, train_shards, root)
    if not any("fineweb_val_" in str(p[1]) for p in plan):
        raise DownloadError(f"the manifest lists no val shards for variant {variant!r}")
    got = sum("fineweb_train_" in str(p[1]) for p in plan)
    if got < train_shards:
        log(f"note: the manifest lists {got} train shards for {variant}, fewer than the {train_shards} asked for")
    for remote, local, size in plan:
        if local.exists() and (size is None or local.stat().st_size == size):
            log(f"skip {local} (present)")
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        log(f"get  {remote} -> {local}")
        download(remote, local)
        if size is not None and local.stat().st_size != size:
            bad = local.stat().st_size
            local.unlink()
            raise DownloadError(f"{local}: got {bad} bytes, the manifest says {size}")
    return [p[1] for p in plan]


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__)
    ap.add_argument("--variant", default="sp1024", help="tokenizer variant, e.g. sp1024")
    ap.add_argument("--train-shards", type=int, default=80, help="how many train shards (100M tokens each)")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent), help="where datasets/ and tokenizers/ go")
    a = ap.parse_args(argv)
    if a.train_shards < 0:
        ap.error(f"--train-shards {a.train_shards}: must be >= 0")
    if not re.fullmatch(r"sp\d+", a.variant):
        ap.error(f"--variant {a.variant!r}: expected sp<vocab size>, e.g. sp1024")
    try:
        files = fetch_all(a.variant, a.train_shards, Path(a.root))
    except DownloadError as e:
        raise DownloadError(f"{e} (is the Hugging Face hub reachable from this machine?)") from None
    print(f"done: {len(files)} files under {a.root}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, errors=(DownloadError,)))
