"""Read train_gpt.py run logs: the figures every report needs, and a one-line summary.

    python3 tools/logs.py summary logs/RUN.txt [...]
"""
from __future__ import annotations

import json
import re
import sys

_NUM = r"([-+0-9.eE,]+)"
_PATTERNS = {
    "steps": rf"training done: {_NUM} steps in {_NUM}s \({_NUM} ms/step\)",
    "phases": r"step_phases_ms ((?:\w+:[-0-9.]+ ?)+)",
    "pre_quant": rf"pre_quant_ema val_loss:{_NUM} val_bpb:{_NUM} eval_time:{_NUM}s",
    "roundtrip": rf"final_int6_roundtrip_exact val_loss:{_NUM} val_bpb:{_NUM} eval_time:{_NUM}s",
    "sliding": rf"final_int6_sliding_window_exact val_loss:{_NUM} val_bpb:{_NUM} eval_time:{_NUM}s",
    "total": rf"Total submission size \S+: {_NUM} bytes",
    "export": rf"artifact:\S+ {_NUM} bytes \((\w+)\) clip_floor:{_NUM} export_time:{_NUM}s",
    "hparams": r"hyperparameters: (\{.*\})",
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
        elif key == "phases":  # mean ms per warm-up step of each phase
            ph = {k: _f(v) for k, v in (kv.split(":") for kv in g[0].split())}
            out.update(phases_ms=ph, data_ms=ph.get("data", 0.0), fwd_bwd_ms=ph.get("forward", 0.0) + ph.get("backward", 0.0),
                       optimizer_ms=ph.get("optimizer", 0.0) + ph.get("comm", 0.0))
        elif key == "total":
            out["total_bytes"] = int(_f(g[0]))
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
    eval_s = sum(r.get(k, 0.0) for k in ("roundtrip_eval_s", "sliding_eval_s"))
    return (f"steps:{g('steps')} ms/step:{g('ms_per_step', '{:.1f}')} tok/s:{g('tokens_per_s', '{:,.0f}')} "
            f"opt_ms:{g('optimizer_ms', '{:.1f}')} pre_quant_bpb:{g('pre_quant_bpb', '{:.4f}')} "
            f"roundtrip_bpb:{g('roundtrip_bpb', '{:.4f}')} sliding_bpb:{g('sliding_bpb', '{:.4f}')} "
            f"bytes:{g('total_bytes')} train_s:{g('train_s', '{:.0f}')} export_s:{g('export_s', '{:.1f}')} "
            f"eval_s:{eval_s:.1f}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "summary":
        sys.exit("usage: python3 tools/logs.py summary LOG [LOG ...]")
    for p in sys.argv[2:]:
        print(f"{p}: {summary(parse_log(p))}")
