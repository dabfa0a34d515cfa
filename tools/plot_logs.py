"""Plot train loss and val bpb against time and steps for one or more train_gpt.py logs.

    python3 tools/plot_logs.py logs/a.txt logs/b.txt --out ablation.png [--labels base,no_qat]

Val points are the periodic `step:N val` lines (VAL_LOSS_EVERY) plus the final sliding-window score, drawn at
the last step.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import ArgParser, run  # noqa: E402
from logs import parse_log  # noqa: E402


def val_points(r: dict) -> list[tuple[int, float, float]]:
    """(step, seconds, bpb) for every val figure of a run."""
    seconds = {s: t for s, t, _ in r["train_curve"]}
    pts = [(s, seconds.get(s, float("nan")), b) for s, b in r["val_curve"]]
    if "sliding_bpb" in r and r["train_curve"]:
        last_step, last_t, _ = r["train_curve"][-1]
        pts.append((last_step, last_t, r["sliding_bpb"]))
    return pts


def plot(paths: list[str], out: str, labels: list[str] | None = None) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for i, path in enumerate(paths):
        r = parse_log(path)
        label = labels[i] if labels else Path(path).stem
        if r["train_curve"]:
            steps, secs, losses = zip(*r["train_curve"])
            axes[0][0].plot(secs, losses, label=label)
            axes[0][1].plot(steps, losses, label=label)
        pts = val_points(r)
        if pts:
            steps, secs, bpbs = zip(*pts)
            axes[1][0].plot(secs, bpbs, "o-", label=label)
            axes[1][1].plot(steps, bpbs, "o-", label=label)
    for ax, (x, y) in zip(axes.flat, [("train seconds", "train loss"), ("step", "train loss"),
                                      ("train seconds", "val bpb"), ("step", "val bpb")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--out", default="plot.png")
    ap.add_argument("--labels", help="comma-separated, one per log")
    a = ap.parse_args(argv)
    labels = a.labels.split(",") if a.labels else None
    if labels and len(labels) != len(a.logs):
        ap.error(f"{len(labels)} labels for {len(a.logs)} logs")
    plot(a.logs, a.out, labels)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
