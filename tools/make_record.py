"""Turn run logs (one per seed) into a submission folder records/<YYYY-MM-DD>_<name>/.

    python3 tools/make_record.py --name 11L_Int6_QAT --author "A. Person" --github-id aperson \\
        --blurb "11 layers, int6 + brotli, late QAT" --record-loss 1.8967 logs/seed1337.txt logs/seed42.txt ...

The score of a run is its final_int6_ttt_exact line (score-first test-time training), or without one its
final_int6_sliding_window_exact line; both are in the folder's table. With several seeds it prints the mean, the
std and a one-sided t-test of "mean val_loss < record_loss - 0.005 nats" (the challenge asks for p < 0.01).
The folder gets the script that ran (--script, default this repo's train_gpt.py) in its counted, packed form
(tools/pack.py; a script that is packed already, or older logs that counted the raw file, as it is): its
size and sha256 must be those every log recorded in its `code:` line. A tokenizer that is not the challenge's
(--tokenizer MODEL, e.g. one data/build_shards.py trained) ships in the folder too, and its bytes count: the
folder is refused if code + model + tokenizer exceed 16,000,000 bytes. Each seed appears once; an existing folder is never overwritten.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import ArgParser, UsageError, run  # noqa: E402
from pack import counted  # noqa: E402
from logs import parse_log  # noqa: E402

REQUIRED = ("sliding_loss", "sliding_bpb", "total_bytes", "hparams", "code_sha256")
DEFAULT_SCRIPT = Path(__file__).resolve().parent.parent / "train_gpt.py"


def score(r: dict) -> tuple[float, float]:
    """A run's (val_loss, val_bpb): its test-time-training score where it has one, else its sliding-window score."""
    key = "ttt" if "ttt_loss" in r else "sliding"
    return r[f"{key}_loss"], r[f"{key}_bpb"]


def gain_test(losses: list[float], record_loss: float, margin: float = 0.005) -> tuple[float, float]:
    """One-sided one-sample t-test of mean(losses) < record_loss - margin: returns (t, p)."""
    from scipy import stats
    n = len(losses)
    sd = statistics.stdev(losses)
    if sd == 0:
        return (math.inf, 0.0) if statistics.mean(losses) < record_loss - margin else (-math.inf, 1.0)
    t = (record_loss - margin - statistics.mean(losses)) / (sd / math.sqrt(n))
    return t, float(stats.t.sf(t, df=n - 1))


def load_runs(paths: list[str]) -> list[dict]:
    """The finished runs of the logs, one per seed."""
    runs, seen = [], {}
    for p in paths:
        r = parse_log(p)
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise UsageError(f"{p} lacks {', '.join(missing)}: not a finished run of this train_gpt.py")
        seed = r["hparams"].get("seed")
        if seed in seen:
            raise UsageError(f"{p} and {seen[seed]} both ran seed {seed}: give one log per seed")
        seen[seed] = p
        runs.append(r)
    return runs


def check_script(script: Path, runs: list[dict]) -> bytes:
    """The bytes the runs counted, packed from the script (or the script itself), if they are the code every run
    logged (size and sha256)."""
    raw = script.read_bytes()
    logged = {(r["code_bytes"], r["code_sha256"]) for r in runs}
    for code in (counted(raw), raw):
        digest = hashlib.sha256(code).hexdigest()
        if logged == {(len(code), digest)}:
            return code
    r = next(r for r in runs if (r["code_bytes"], r["code_sha256"]) != (len(code), digest))
    raise UsageError(f"{script} (packed {len(counted(raw))} bytes) is not the code {r['path']} ran "
                     f"({r['code_bytes']} bytes, sha256 {r['code_sha256'][:12]}): pass that script with --script")


SIZE_LIMIT = 16_000_000


def build_record(runs, name, author, github_id, blurb, out_root: Path, date: str, record_loss=None,
                 script: Path = DEFAULT_SCRIPT, tokenizer: Path | None = None) -> tuple[Path, dict]:
    losses, bpbs = (list(x) for x in zip(*map(score, runs)))
    summary = {
        "author": author, "github_id": github_id, "name": name, "blurb": blurb, "date": date,
        "val_loss": statistics.mean(losses), "val_bpb": statistics.mean(bpbs),
        "bytes_total": max(r["total_bytes"] for r in runs) + (tokenizer.stat().st_size if tokenizer else 0),
        "seeds": [r["hparams"]["seed"] for r in runs],
    }
    stats_lines = [f"val_bpb mean {summary['val_bpb']:.5f}", f"val_loss mean {summary['val_loss']:.5f}"]
    if len(runs) > 1:
        summary["val_bpb_std"], summary["val_loss_std"] = statistics.stdev(bpbs), statistics.stdev(losses)
        stats_lines += [f"val_bpb std {summary['val_bpb_std']:.5f}", f"val_loss std {summary['val_loss_std']:.5f}"]
        if record_loss is not None:
            t, p = gain_test(losses, record_loss)
            summary.update(record_val_loss=record_loss, t_stat=t, p_value=p)
            stats_lines.append(f"gain test vs record val_loss {record_loss:.5f} - 0.005 nats: t={t:.3f}, one-sided "
                               f"p={p:.4g} ({'passes' if p < 0.01 else 'does not pass'} p < 0.01)")
    if tokenizer:
        summary["bytes_tokenizer"] = tokenizer.stat().st_size
        stats_lines.append(f"bytes with the shipped tokenizer {tokenizer.name}: {summary['bytes_total']:,}")
    if summary["bytes_total"] > SIZE_LIMIT:
        raise UsageError(f"the submission is {summary['bytes_total']:,} bytes (code + model"
                         f"{' + tokenizer' if tokenizer else ''}), over the {SIZE_LIMIT:,}-byte limit")
    folder = out_root / f"{date}_{name}"
    if folder.exists():
        raise UsageError(f"{folder} exists already: remove it or choose another --name")
    code = check_script(script, runs)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=out_root))  # renamed into place when complete
    try:
        write_folder(tmp, runs, summary, stats_lines, code)
        if tokenizer:
            shutil.copy(tokenizer, tmp / tokenizer.name)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, {"lines": stats_lines, **summary}


def write_folder(folder: Path, runs: list[dict], summary: dict, stats_lines: list[str], code: bytes):
    name, blurb, author, github_id, date = (summary[k] for k in ("name", "blurb", "author", "github_id", "date"))
    (folder / "train_gpt.py").write_bytes(code)
    for r in runs:
        shutil.copy(r["path"], folder / f"train_seed{r['hparams']['seed']}.log")
    (folder / "submission.json").write_text(json.dumps(summary, indent=2) + "\n")
    hp = runs[0]["hparams"]
    rows = "\n".join(
        f"| {r['hparams']['seed']} | {r.get('steps', 'n/a')} | {r.get('ms_per_step', float('nan')):.2f} | "
        f"{r.get('pre_quant_bpb', float('nan')):.5f} | {r.get('roundtrip_bpb', float('nan')):.5f} | "
        f"{r['sliding_loss']:.5f} | {r['sliding_bpb']:.5f} | {r.get('ttt_loss', float('nan')):.5f} | "
        f"{r.get('ttt_bpb', float('nan')):.5f} | {r['total_bytes']:,} |" for r in runs)
    config = "\n".join(f"- {k.upper()}={v}" for k, v in sorted(hp.items()) if k not in ("seed", "run_id"))
    (folder / "README.md").write_text(
        f"# {name}\n\n{blurb}\n\nAuthor: {author} (@{github_id}), {date}.\n\n## Results\n\n"
        "| seed | steps | ms/step | pre-quant bpb | int6 roundtrip bpb | sliding val_loss | sliding val_bpb | TTT val_loss "
        "| TTT val_bpb | bytes |\n|---|---|---|---|---|---|---|---|---|---|\n" + rows + "\n\n" + "\n".join(f"- {s}" for s in stats_lines) +
        f"\n\n## Configuration (from the first log)\n\n{config}\n\nCode: `train_gpt.py`, {len(code):,} bytes, "
        f"sha256 {runs[0]['code_sha256']} (as every log records).\n")


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--name", required=True)
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", required=True)
    ap.add_argument("--blurb", default="")
    ap.add_argument("--record-loss", type=float, help="the standing record's val_loss (nats) for the gain test")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "records"))
    ap.add_argument("--script", default=str(DEFAULT_SCRIPT), help="the train_gpt.py the runs ran")
    ap.add_argument("--tokenizer", help="a tokenizer the record ships (not the challenge's): its bytes count")
    a = ap.parse_args(argv)
    if not re.fullmatch(r"[\w.-]+", a.name):
        ap.error(f"--name {a.name!r} becomes a folder name: use letters, digits, '_', '.', '-'")
    if a.tokenizer and not Path(a.tokenizer).is_file():
        raise UsageError(f"--tokenizer {a.tokenizer} not found")
    folder, result = build_record(load_runs(a.logs), a.name, a.author, a.github_id, a.blurb, Path(a.out), a.date,
                                  a.record_loss, Path(a.script), Path(a.tokenizer) if a.tokenizer else None)
    print("\n".join(result["lines"]))
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
