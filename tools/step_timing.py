"""Where a training step's time goes: the mean time per step of each phase (data, forward, backward, optimizer)
over real training steps, and with --profile the GPU kernel time per step by kind and the largest kernels
(torch.profiler). The loader, model, optimizer and step are train_gpt.py's own, configured by the same env vars.

    DATA_PATH=... TOKENIZER_PATH=... python3 tools/step_timing.py [--warmup 20] [--steps 20] [--profile]

One process: a GPU (phases timed with CUDA events, read once at the end) or the CPU (host clock). The warm-up
steps compile and are not timed. Last line: `phases_ms data:… forward:… backward:… optimizer:… total:… wall:…`,
where wall is the host clock around the timed steps (after a final sync): the phases add up to it.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import train_gpt as tg  # noqa: E402
from cli import ArgParser, run  # noqa: E402

KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")), ("comm", ("nccl",)),
                ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "wgmma")), ("fused_pointwise", ("triton",)),
                ("optimizer", ("foreach", "multi_tensor", "adam")), ("copy/fill", ("memcpy", "memset", "copy", "fill")))


class PhaseTimer:
    """mark(phase) records when a phase's work ends (a CUDA event, or the host clock on CPU); the time since the
    previous mark is charged to that phase."""

    def __init__(self, device: torch.device):
        self.cuda, self.marks = device.type == "cuda", []
        self.mark("start")

    def mark(self, phase: str):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((phase, event))
        else:
            self.marks.append((phase, time.perf_counter()))

    def totals_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:]):
            totals[phase] = totals.get(phase, 0.0) + (a.elapsed_time(b) if self.cuda else 1000 * (b - a))
        return totals


def profile_table(prof, steps: int, cuda: bool) -> str:
    """Kernel time per step by kind (GPU kernels, or CPU ops on the CPU), and the 40 largest."""
    totals, top = {}, []
    for ev in prof.key_averages():
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if not us:
            continue
        kind = next((k for k, words in KERNEL_KINDS if any(w in ev.key.lower() for w in words)), "other")
        totals[kind] = totals.get(kind, 0.0) + us / 1000 / steps
        top.append((us / 1000 / steps, kind, ev.key[:90]))
    lines = ["profile_ms_per_step " + " ".join(f"{k}:{v:.2f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))
             + f" total:{sum(totals.values()):.2f}"]
    lines += [f"profile_kernel {ms:8.3f}ms {kind:15s} {name}" for ms, kind, name in sorted(top, reverse=True)[:40]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__)
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--profile", action="store_true", help="torch.profiler kernel table over the timed steps")
    a = ap.parse_args(argv)
    if a.warmup < 0 or a.steps < 1:
        ap.error("--warmup must be >= 0 and --steps >= 1")
    hp = tg.Hyperparameters.from_env()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(hp.seed)
    hp, attn_impl = tg.select_kernels(hp, device, 1, print)
    parts = tg.setup_training(hp, 0, 1, device, attn_impl, print)
    momentum = tg.Schedule.from_hp(hp).momentum(0.0)
    for _ in range(a.warmup):
        tg.train_step(parts, 1.0, momentum)
    prof = None
    if a.profile:
        activities = [torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU]
        prof = torch.profiler.profile(activities=activities)
        prof.start()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    timer = PhaseTimer(device)
    for _ in range(a.steps):
        tg.train_step(parts, 1.0, momentum, timer.mark)
    totals = timer.totals_ms()
    wall = 1000 * (time.perf_counter() - t0) / a.steps
    if prof is not None:
        prof.stop()
        print(profile_table(prof, a.steps, device.type == "cuda"))
    print("phases_ms " + " ".join(f"{k}:{v / a.steps:.2f}" for k, v in totals.items())
          + f" total:{sum(totals.values()) / a.steps:.2f} wall:{wall:.2f} (mean of {a.steps} steps after {a.warmup})")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, errors=tg.USER_ERRORS))
