"""Run a script on N local processes, as `torchrun --standalone --nproc_per_node=N` does, and exit with the
first failing process's exit code. A bad input then ends with train_gpt.py's one `error:` line and exit code 2
(torchrun adds its own ChildFailedError traceback and exits 1).

    python3 eval/launch.py N SCRIPT [ARGS...]

Each process gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (and
OMP_NUM_THREADS=1 unless set); with N=1 the script runs alone, without them.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 10  # once a process fails, the others get this long to end by themselves before they are stopped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(procs: list[subprocess.Popen]):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def exit_code(rank: int, code: int) -> int:
    """A process killed by a signal has a negative code: say which, and exit as a shell would (128 + signal)."""
    if code >= 0:
        return code
    print(f"error: rank {rank} was killed by {signal.Signals(-code).name}", file=sys.stderr, flush=True)
    return 128 - code


def launch(nproc: int, cmd: list[str]) -> int:
    if nproc == 1:
        return exit_code(0, subprocess.call(cmd))
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.setdefault("OMP_NUM_THREADS", "1")
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.05)
        if failed is None:
            return 0
        deadline = time.time() + GRACE_S
        while time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.05)
        stop(procs)
        return exit_code(*failed)
    except KeyboardInterrupt:
        stop(procs)
        return 130


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        print("error: usage: python3 eval/launch.py N SCRIPT [ARGS...] (N a whole number >= 1)", file=sys.stderr)
        return 2
    if not os.path.isfile(argv[1]):
        print(f"error: script {argv[1]} not found", file=sys.stderr)
        return 2
    return launch(int(argv[0]), [sys.executable, *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
