"""Shared fixtures: a tiny SentencePiece tokenizer trained on generated text, and tiny challenge shards."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "data"), str(ROOT / "tools")]

import build_shards  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven bright birds sing near old stone walls in the "
         "morning rain; café naïve 42 fjord über 2026 résumé zoë!").split()



def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


# The tiny model of eval/tiny.env (2 layers, dim 64, every feature on), at the tests' 320-token vocab.
TINY_ENV = {**read_env_file(ROOT / "eval" / "tiny.env"), "VOCAB_SIZE": "320"}


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 80))) for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tok")
    return build_shards.train_tokenizer(make_docs(300, seed=1), str(d / "tiny"), 320)


@pytest.fixture(scope="session")
def sp(tokenizer):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=tokenizer)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, tokenizer) -> Path:
    """Train and val shards of generated documents, BOS before each."""
    d = tmp_path_factory.mktemp("data")
    enc = build_shards.encode_documents(make_docs(400, seed=2), tokenizer, workers=1)
    build_shards.write_split(enc[:60], d, "val", 1 << 30)
    build_shards.write_split(enc[60:], d, "train", 8000)
    return d


def train_env(dataset: Path, tokenizer: str, **env) -> dict:
    """The environment of a tiny-config run on `dataset`, with `env` on top."""
    return {**os.environ, **TINY_ENV, "DATA_PATH": str(dataset), "TOKENIZER_PATH": tokenizer, "OMP_NUM_THREADS": "1",
            "RUN_ID": "t", "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in env.items()}}


def run_train(tmp_path: Path, dataset: Path, tokenizer: str, args=(), nproc=0, **env) -> subprocess.CompletedProcess:
    """Run train_gpt.py in tmp_path with the tiny config: plain python, torchrun with `nproc` CPU processes
    (gloo), or eval/eval.sh when `args` are given."""
    full = train_env(dataset, tokenizer, **env)
    if args:
        cmd = ["bash", str(ROOT / "eval" / "eval.sh"), *args]
    elif nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train_gpt.py")]
    else:
        cmd = [sys.executable, str(ROOT / "train_gpt.py")]
    return subprocess.run(cmd, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=600)


def failure_tail(r: subprocess.CompletedProcess) -> str:
    """What a failed run printed last, on both streams (a crash at exit shows only on stderr)."""
    return f"--- stdout ---\n{r.stdout[-2000:]}\n--- stderr ---\n{r.stderr[-3000:]}"


def assert_one_error(r: subprocess.CompletedProcess, text: str):
    """Bad input: exit code 2 and one `error:` line on stderr that says `text`, with no traceback."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and text in errors[0], failure_tail(r)
    assert "Traceback" not in r.stderr, failure_tail(r)


def _on_rank(rank, world, store, out_path, fn):
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result = fn(world=world, rank=rank)
    if rank == 0:
        torch.save(result, out_path)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # no interpreter shutdown: a gloo thread that wants the GIL during it aborts the process


def on_ranks(fn, world: int, tmp_path: Path):
    """Rank 0's result of fn(world=, rank=) run in `world` gloo processes (fn: a module-level function, or a
    functools.partial of one)."""
    import torch
    torch.multiprocessing.spawn(_on_rank, args=(world, str(tmp_path / "store"), str(tmp_path / "r.pt"), fn),
                                nprocs=world)
    return torch.load(tmp_path / "r.pt")
