"""Read train_gpt.py run logs: the figures every report needs, and a one-line summary.

    python3 tools/logs.py summary logs/RUN.txt [...]
    python3 tools/logs.py table logs/RUN.txt [...] [--base logs/BASE_A.txt,logs/BASE_B.txt]

`table` prints one README table row per log (run, seed, steps, ms/step, pre-quant, roundtrip, quant gap, sliding, Δ
sliding, total bytes, the clip floor of the last export); Δ is against the --base log of the same seed ("—" without).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import ArgParser, UsageError, run  # noqa: E402

_NUM = r"([-+0-9.eE,]+)"
_PATTERNS = {
    "steps": rf"training done: {_NUM} steps in {_NUM}s \({_NUM} ms/step\)",
    "pre_quant": rf"pre_quant_ema val_loss:{_NUM} val_bpb:{_NUM} eval_time:{_NUM}s",
    "roundtrip": rf"final_int6_roundtrip_exact val_loss:{_NUM} val_bpb:{_NUM} eval_time:{_NUM}s",
    "sliding": rf"final_int6_sliding_window_exact val_loss:{_NUM} val_bpb:{_NUM} eval_time:{_NUM}s",
    "ttt": rf"final_int6_ttt_exact val_loss:{_NUM} val_bpb:{_NUM} eval_time:{_NUM}s",
    "total": rf"Total submission size \S+: {_NUM} bytes",
    "export": rf"artifact:\S+ {_NUM} bytes \((\w+)\) clip_floor:{_NUM} export_time:{_NUM}s",
    "hparams": r"hyperparameters: (\{.*\})",
    "code": r"code: (\S+) (\d+) bytes sha256:([0-9a-f]{64})",
    "calib": rf"gptq_calibration: {_NUM} training batches, {_NUM} Hessians in {_NUM}s",
}
_STEP = re.compile(rf"step:(\d+)/\d+ train_loss:{_NUM} train_time:{_NUM}s step_avg:{_NUM}ms tok/s:{_NUM}")
_VAL = re.compile(rf"step:(\d+) val val_loss:{_NUM} val_bpb:{_NUM}")


def _f(x: str) -> float:
    return float(x.replace(",", ""))


def parse_log(path: str) -> dict:
    """Final figures of a run (missing ones absent), plus its step and val curves."""
    text = open(path, encoding="utf-8").read()
    out: dict = {"path": path, "train_curve": [], "val_curve": []}
    for key, pat in _PATTERNS.items():
        matches = list(re.finditer(pat, text))
        if not matches:
            continue
        g = matches[-1].groups()  # the last one: a size fit may export several times
        if key == "hparams":
            out["hparams"] = json.loads(g[0])
        elif key == "steps":
            out.update(steps=int(_f(g[0])), train_s=_f(g[1]), ms_per_step=_f(g[2]))
        elif key == "total":
            out["total_bytes"] = int(_f(g[0]))
        elif key == "code":
            out.update(code_name=g[0], code_bytes=int(g[1]), code_sha256=g[2])
        elif key == "calib":
            out["calib_s"] = _f(g[2])
        elif key == "export":
            out.update(artifact_bytes=int(_f(g[0])), compressor=g[1], clip_floor=_f(g[2]), export_s=_f(g[3]))
        else:
            out.update({f"{key}_loss": _f(g[0]), f"{key}_bpb": _f(g[1]), f"{key}_eval_s": _f(g[2])})
    for m in _STEP.finditer(text):
        out["train_curve"].append((int(m[1]), _f(m[3]), _f(m[2])))  # step, seconds, loss
    for m in _VAL.finditer(text):
        out["val_curve"].append((int(m[1]), _f(m[3])))
    if out["train_curve"]:
        out["tokens_per_s"] = _f(_STEP.findall(text)[-1][4])
    return out


def summary(r: dict) -> str:
    def g(key, fmt="{}"):
        return fmt.format(r[key]) if key in r else "n/a"
    eval_s = sum(r.get(k, 0.0) for k in ("roundtrip_eval_s", "sliding_eval_s", "ttt_eval_s"))
    return (f"steps:{g('steps')} ms/step:{g('ms_per_step', '{:.1f}')} tok/s:{g('tokens_per_s', '{:,.0f}')} "
            f"pre_quant_bpb:{g('pre_quant_bpb', '{:.5f}')} "
            f"roundtrip_bpb:{g('roundtrip_bpb', '{:.5f}')} sliding_bpb:{g('sliding_bpb', '{:.5f}')} "
            f"bytes:{g('total_bytes')} train_s:{g('train_s', '{:.0f}')} export_s:{g('export_s', '{:.1f}')} "
            f"eval_s:{eval_s:.1f}" + (f" ttt_bpb:{r['ttt_bpb']:.5f} ttt_s:{r['ttt_eval_s']:.1f}" if "ttt_bpb" in r else "")
            + (f" calib_s:{r['calib_s']:.1f}" if "calib_s" in r else ""))


TABLE_HEAD = ("| run | seed | steps | ms/step | pre-quant bpb | roundtrip bpb | gap | sliding bpb | Δ sliding | "
              "total bytes | clip floor |\n|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: dict, bases: dict) -> str:
    """One markdown row of `r`'s figures; `bases`: parsed base logs by seed."""
    def g(key, fmt):
        return fmt.format(r[key]) if key in r else "n/a"
    seed = r.get("hparams", {}).get("seed", "n/a")
    gap = r["roundtrip_bpb"] - r["pre_quant_bpb"] if "roundtrip_bpb" in r and "pre_quant_bpb" in r else None
    base = bases.get(seed, {})
    delta = r["sliding_bpb"] - base["sliding_bpb"] if "sliding_bpb" in r and "sliding_bpb" in base else None
    cells = [Path(r["path"]).stem, str(seed), g("steps", "{:,}"), g("ms_per_step", "{:.1f}"), g("pre_quant_bpb", "{:.5f}"),
             g("roundtrip_bpb", "{:.5f}"), "n/a" if gap is None else f"{gap:.5f}", g("sliding_bpb", "{:.5f}"),
             "—" if delta is None else f"{delta:+.5f}".replace("-", "−"), g("total_bytes", "{:,}"), g("clip_floor", "{:.4g}")]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__)
    ap.add_argument("command", nargs="?", choices=("summary", "table"))
    ap.add_argument("logs", nargs="*")
    ap.add_argument("--base", default="", help="table: comma-separated base logs, one per seed")
    args = ap.parse_args(argv)
    if args.command is None or not args.logs:
        raise UsageError("usage: python3 tools/logs.py summary LOG [LOG ...] | table LOG [LOG ...] [--base LOG,LOG] "
                         "(at least one LOG besides the --base ones)")
    if args.command == "summary":
        for p in args.logs:
            print(f"{p}: {summary(parse_log(p))}")
        return 0
    bases = {}
    for p in filter(None, args.base.split(",")):
        b = parse_log(p)
        seed = b.get("hparams", {}).get("seed")
        if seed in bases:
            raise UsageError(f"--base holds two logs of seed {seed}")
        bases[seed] = b
    rows = [table_row(parse_log(p), bases) for p in args.logs]  # every log read before anything prints
    print("\n".join([TABLE_HEAD, *rows]))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
