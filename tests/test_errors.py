"""Every entry point turns bad input into one `error:` line and exit code 2, with no traceback and nothing
half-written: train_gpt.py (python, the launcher, torchrun), eval/*.sh, the data tools and the tools."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import build_shards
from conftest import ROOT, assert_one_error, run_train, train_env


def run(args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env or os.environ, capture_output=True, text=True, timeout=timeout)


def copy_data(dataset, dest, val_tokens=None):
    shutil.copytree(dataset, dest)
    if val_tokens is not None:
        build_shards.write_shard(dest / "fineweb_val_000000.bin", val_tokens)
    return dest


@pytest.mark.parametrize("case, message", [
    (dict(ITERATIONS=0), "ITERATIONS=0 must be at least 1"),
    (dict(TRAIN_BATCH_TOKENS=1000), "TRAIN_BATCH_TOKENS=1000 must divide into"),
    (dict(VOCAB_SIZE=400), "has vocab 320, but VOCAB_SIZE=400"),
    (dict(DATA_PATH="nowhere"), "no val shards match nowhere/fineweb_val_*.bin"),
    (dict(TOKENIZER_PATH="not_a_model.txt"), "is not a SentencePiece model"),
    (dict(DATA_PATH="big_ids"), "token id 400 is outside VOCAB_SIZE=320"),
    (dict(DATA_PATH="bad_train"), "bad magic"),
    (dict(ARTIFACT_PATH="a_file/model.ptz"), "File exists"),
    (dict(EVAL_ARTIFACT="missing.ptz"), "artifact missing.ptz not found"),
])
def test_train_gpt_bad_input(tmp_path, dataset, tokenizer, case, message):
    (tmp_path / "not_a_model.txt").write_text("hello")
    (tmp_path / "a_file").write_text("not a folder")
    copy_data(dataset, tmp_path / "big_ids", val_tokens=np.array([1, 5, 400, 7] * 50))
    bad = copy_data(dataset, tmp_path / "bad_train")
    (bad / "fineweb_train_000000.bin").write_bytes(b"\0" * 2048)
    case = {k: str(tmp_path / v) if k.endswith("_PATH") and v != "nowhere" else v for k, v in case.items()}
    r = run_train(tmp_path, dataset, tokenizer, **{"ITERATIONS": 2, **case})
    assert_one_error(r, message)
    assert not list((tmp_path / "logs").glob("*.ptz*"))  # no artifact, whole or half


def test_under_torchrun_rank_0_alone_reports(tmp_path, dataset, tokenizer):
    """torchrun adds its own ChildFailedError report and exit code; the error line still comes once."""
    r = run_train(tmp_path, dataset, tokenizer, nproc=2, ITERATIONS=0)
    assert r.returncode != 0 and r.stderr.count("error: ITERATIONS=0 must be at least 1") == 1, r.stderr[-3000:]


def test_eval_sh_bad_input(tmp_path, dataset, tokenizer):
    env = train_env(dataset, tokenizer)
    eval_sh = ["bash", str(ROOT / "eval" / "eval.sh")]
    assert_one_error(run([*eval_sh, "missing.ptz"], tmp_path, env), "artifact missing.ptz not found")
    assert_one_error(run([*eval_sh, "a", "b"], tmp_path, env), "too many arguments")
    assert_one_error(run(eval_sh, tmp_path, {**env, "NPROC": "two"}), "NPROC=two is not a whole number")
    (tmp_path / "bad.ptz").write_bytes(b"PGA2\x01" + b"\x00" * 100)
    assert_one_error(run([*eval_sh, "bad.ptz"], tmp_path, {**env, "NPROC": "2"}), "truncated or corrupt artifact")


def test_proxy_and_quickstart_bad_input(tmp_path):
    proxy = ["bash", str(ROOT / "eval" / "proxy.sh")]
    assert_one_error(run([*proxy, str(tmp_path / "none")], tmp_path), "fineweb_val_000000.bin not found")
    assert_one_error(run(["bash", str(ROOT / "eval" / "proxy_vocab.sh"), "8192", str(tmp_path), "out"], tmp_path),
                     "docs.jsonl.xz not found")
    assert_one_error(run(proxy, tmp_path, {**os.environ, "NPROC": "0"}), "NPROC=0 is not a whole number")
    assert_one_error(run(["bash", str(ROOT / "eval" / "quickstart.sh"), "missing.txt"], tmp_path), "input missing.txt not found")
    ablate = ["bash", str(ROOT / "eval" / "ablate.sh")]
    (tmp_path / "plan.txt").write_text("a SEED=1\nb lowercase=1\n")
    assert_one_error(run([*ablate, "plan.txt", str(tmp_path)], tmp_path), "'lowercase=1' in run b is not ENV=VALUE")
    (tmp_path / "twice.txt").write_text("a SEED=1\na SEED=2\n")
    assert_one_error(run([*ablate, "twice.txt", str(tmp_path)], tmp_path), "run name a appears twice")
    assert_one_error(run([*ablate, "none.txt"], tmp_path), "plan none.txt not found")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\n")
    (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
    (tmp_path / "shared.txt").write_text("a SEED=1\nb SEED=1 PROXY_SECONDS=150\n")
    fake_gpu = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "JOBS": "2", "PROXY_SECONDS": "0"}
    assert_one_error(run([*ablate, "shared.txt", str(tmp_path)], tmp_path, fake_gpu), "but b has a wallclock budget")
    (tmp_path / "good.txt").write_text("a SEED=1\n")
    assert_one_error(run([*ablate, "good.txt", str(tmp_path)], tmp_path, {**os.environ, "RUNS": "a b"}),
                     "RUNS names b, which is not a run of")


def test_build_shards_bad_input_leaves_nothing(tmp_path, tokenizer):
    tool = [sys.executable, str(ROOT / "data" / "build_shards.py")]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "docs.txt").write_text("one\n\ntwo\n\nthree")
    for args, message in [(["--input", "missing.jsonl", "--tokenizer", tokenizer], "input missing.jsonl not found"),
                          (["--input", "bad.jsonl", "--tokenizer", tokenizer, "--val-docs", "0"], "bad.jsonl:2: its 'text'"),
                          (["--input", "docs.txt", "--tokenizer", "none.model"], "tokenizer none.model not found"),
                          (["--input", "docs.txt", "--train-tokenizer", "--vocab-size", "100"], "--vocab-size 100"),
                          (["--input", "docs.txt", "--tokenizer", tokenizer, "--paragraphs", "--val-docs", "3"],
                           "3 documents: need more than --val-docs=3"),
                          (["--input", "docs.txt", "--tokenizer", tokenizer, "--out", "full"], "--out full exists"),
                          (["--input", "docs.txt"], "exactly one of --tokenizer MODEL and --train-tokenizer"),
                          (["--input", "docs.txt", "--tokenizer", tokenizer, "--val-shard", "docs.txt"],
                           "--val-shard needs --val-tokenizer"),
                          (["--input", "docs.txt", "--tokenizer", tokenizer, "--val-shard", "docs.txt",
                            "--val-tokenizer", tokenizer], "--val-shard docs.txt: not a challenge shard")]:
        args = args if "--out" in args else [*args, "--out", "out"]
        assert_one_error(run([*tool, *args], tmp_path), message)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert_one_error(run([sys.executable, str(ROOT / "data" / "cached_challenge_fineweb.py"), "--train-shards", "-1"],
                         tmp_path), "--train-shards -1")


def test_tools_bad_input(tmp_path, dataset, tokenizer):
    tools = ROOT / "tools"
    (tmp_path / "bad.ptz").write_bytes(b"nonsense")
    (tmp_path / "bad.py").write_text("def (:\n")
    (tmp_path / "run.txt").write_text("step:1/10 train_loss:5.0 train_time:0.1s step_avg:1.00ms tok/s:1 lr_scale:1 eta:1s\n")
    py = sys.executable
    for args, message in [([py, tools / "logs.py", "summary", "missing.txt"], "No such file"),
                          ([py, tools / "logs.py"], "usage"),
                          ([py, tools / "recompress.py", "bad.ptz"], "not a train_gpt.py artifact"),
                          ([py, tools / "recompress.py", "bad.ptz", "--shuffle", "0,x"], "--shuffle takes"),
                          ([py, tools / "recompress.py", "bad.ptz", "--tensors", "0"], "--tensors takes"),
                          ([py, tools / "pack.py", "missing.py", "out.py"], "No such file"),
                          ([py, ROOT / "data" / "check_bytes.py", "a"], "usage"),
                          ([py, ROOT / "data" / "check_bytes.py", "none.model", "x.bin", "none.model", "x.bin"],
                           "none.model is not a SentencePiece model"),
                          ([py, tools / "pack.py", "bad.py", "out.py"], "not Python source"),
                          ([py, tools / "plot_logs.py", "missing.txt"], "No such file"),
                          ([py, tools / "make_record.py", "run.txt", "--name", "x", "--author", "a", "--github-id", "g"],
                           "not a finished run"),
                          ([py, tools / "make_record.py", "run.txt", "--name", "a/b", "--author", "a", "--github-id", "g"],
                           "--name 'a/b' becomes a folder name"),
                          ([py, tools / "step_timing.py", "--steps", "0"], "--steps >= 1")]:
        assert_one_error(run([str(a) for a in args], tmp_path), message)
    env = train_env(tmp_path / "nowhere", tokenizer)
    assert_one_error(run([py, str(tools / "step_timing.py")], tmp_path, env), "no train shards match")
    if not torch.cuda.is_available():
        assert_one_error(run([py, str(tools / "gpu_bench.py")], tmp_path), "gpu_bench needs a CUDA GPU")
