"""data/cached_challenge_fineweb.py with a fake hub, data/build_shards.py on generated text, eval/proxy.sh on CPU."""
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import build_shards
import cached_challenge_fineweb as ccf
from cli import UsageError
import train_gpt as tg
from conftest import ROOT, TINY_ENV, failure_tail, make_docs
from logs import parse_log

MANIFEST = {"version": 1, "datasets": [
    {"name": "fineweb10B_sp1024", "files": [
        {"path": "datasets/fineweb10B_sp1024/fineweb_val_000000.bin", "bytes": 30},
        *({"path": f"datasets/fineweb10B_sp1024/fineweb_train_{i:06d}.bin", "bytes": 10 + i} for i in range(4))]},
    {"name": "fineweb10B_sp4096", "files": [{"path": "datasets/fineweb10B_sp4096/fineweb_val_000000.bin", "bytes": 5}]}],
    "tokenizers": [{"path": "tokenizers/fineweb_1024_bpe.model", "bytes": 7},
                   {"path": "tokenizers/fineweb_4096_bpe.model", "bytes": 9}]}


class FakeHub:
    def __init__(self, manifest=MANIFEST, lie=None):
        self.files = {"datasets/manifest.json": json.dumps(manifest).encode()}
        for path, size in ccf.manifest_entries(manifest):
            self.files[f"datasets/{path}"] = b"x" * (size if path != lie else size + 1)
        self.calls = []

    def __call__(self, remote, dest):
        self.calls.append(remote)
        if remote not in self.files:
            raise ccf.DownloadError(f"404 {remote}")
        dest.write_bytes(self.files[remote])


def test_manifest_plan_maps_paths_and_limits_train_shards(tmp_path):
    plan = ccf.plan_downloads(ccf.manifest_entries(MANIFEST), "sp1024", 2, tmp_path)
    assert [(r, str(p.relative_to(tmp_path)), s) for r, p, s in plan] == [
        ("datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin", "datasets/fineweb10B_sp1024/fineweb_train_000000.bin", 10),
        ("datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin", "datasets/fineweb10B_sp1024/fineweb_train_000001.bin", 11),
        ("datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin", "datasets/fineweb10B_sp1024/fineweb_val_000000.bin", 30),
        ("datasets/tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.model", 7)]


def test_other_variants_get_their_own_shards_and_tokenizer(tmp_path):
    """--variant sp4096: that variant's shards and the 4096 tokenizer only; a variant the manifest lacks is an error."""
    hub = FakeHub()
    files = ccf.fetch_all("sp4096", 80, tmp_path, download=hub, log=lambda m: None)
    assert [str(f.relative_to(tmp_path)) for f in files] == ["datasets/fineweb10B_sp4096/fineweb_val_000000.bin",
                                                             "tokenizers/fineweb_4096_bpe.model"]
    with pytest.raises(ccf.DownloadError, match="no val shards for variant 'sp8192'"):
        ccf.fetch_all("sp8192", 1, tmp_path, download=hub, log=lambda m: None)


def test_fetch_skips_present_files_and_verifies_sizes(tmp_path):
    hub = FakeHub()
    files = ccf.fetch_all("sp1024", 3, tmp_path, download=hub, log=lambda m: None)
    assert len(files) == 5 and all(f.exists() for f in files)
    hub.calls.clear()
    ccf.fetch_all("sp1024", 3, tmp_path, download=hub, log=lambda m: None)
    assert hub.calls == ["datasets/manifest.json"]  # everything present with the right size: skipped
    (tmp_path / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin").write_bytes(b"short")
    ccf.fetch_all("sp1024", 3, tmp_path, download=hub, log=lambda m: None)
    assert hub.calls[-1].endswith("fineweb_train_000001.bin")  # a wrong size is fetched again


def test_size_mismatch_after_download_is_an_error(tmp_path):
    hub = FakeHub(lie="datasets/fineweb10B_sp1024/fineweb_val_000000.bin")
    with pytest.raises(ccf.DownloadError, match="got 31 bytes, the manifest says 30"):
        ccf.fetch_all("sp1024", 1, tmp_path, download=hub, log=lambda m: None)
    assert not (tmp_path / "datasets/fineweb10B_sp1024/fineweb_val_000000.bin").exists()


def test_unreachable_hub_is_a_one_line_error(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    r = subprocess.run(["python3", str(ROOT / "data" / "cached_challenge_fineweb.py"), "--root", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: cannot fetch") and "Traceback" not in r.stderr


def test_build_shards_from_jsonl_xz_with_a_trained_tokenizer(tmp_path):
    docs = make_docs(120, seed=5)
    with lzma.open(tmp_path / "docs.jsonl.xz", "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "src": "gen"}) + "\n")
    out = tmp_path / "out"
    rc = build_shards.main(["--input", str(tmp_path / "docs.jsonl.xz"), "--out", str(out), "--train-tokenizer",
                            "--vocab-size", "300", "--val-docs", "20", "--shard-tokens", "1500", "--workers", "2"])
    assert rc == 0
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer_300_bpe.model"))
    assert sp.vocab_size() == 300 and sp.bos_id() == 1 and sp.is_byte(4)
    val = np.concatenate([tg.read_shard(str(p)) for p in sorted(out.glob("fineweb_val_*.bin"))])
    train_files = sorted(out.glob("fineweb_train_*.bin"))
    assert len(train_files) > 1 and all(len(tg.read_shard(str(p))) <= 1500 for p in train_files)
    train = np.concatenate([tg.read_shard(str(p)) for p in train_files])
    assert (val == 1).sum() == 20 and (train == 1).sum() == 100  # BOS before every document
    expect = [t for d in docs[:20] for t in [1] + sp.encode(d)]
    np.testing.assert_array_equal(val, expect)
    for p in train_files:  # no document straddles two shards
        assert tg.read_shard(str(p))[0] == 1


def test_build_shards_reads_txt_folders_and_rejects_bad_jsonl(tmp_path):
    (tmp_path / "t").mkdir()
    for i, d in enumerate(make_docs(5)):
        (tmp_path / "t" / f"{i}.txt").write_text(d)
    assert list(build_shards.iter_documents([str(tmp_path / "t")])) == make_docs(5)
    (tmp_path / "p.md").write_text("one\ntwo\n\n\n  three  \n\nfour")
    assert list(build_shards.iter_documents([str(tmp_path / "p.md")], paragraphs=True)) == ["one\ntwo", "three", "four"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UsageError, match="bad.jsonl:2"):
        list(build_shards.iter_documents([str(tmp_path / "bad.jsonl")]))


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory, dataset, tokenizer) -> Path:
    """A ../shared/data look-alike: xz proxy shards, the val shard and the tokenizer under the official names."""
    shared = tmp_path_factory.mktemp("shared")
    (shared / "proxy_train").mkdir()
    for i, src in enumerate(sorted(dataset.glob("fineweb_train_*.bin"))):
        (shared / "proxy_train" / f"proxy_train_{i:06d}.bin.xz").write_bytes(lzma.compress(src.read_bytes()))
    (shared / "fineweb_val_000000.bin").write_bytes((dataset / "fineweb_val_000000.bin").read_bytes())
    (shared / "fineweb_1024_bpe.model").write_bytes(open(tokenizer, "rb").read())
    (shared / "proxy_docs").mkdir()
    with lzma.open(shared / "proxy_docs" / "docs.jsonl.xz", "wt", encoding="utf-8") as f:
        for d in make_docs(300, seed=9):
            f.write(json.dumps({"text": d, "src": "gen"}) + "\n")
    return shared


def proxy_env(tmp_path, **env) -> dict:
    """The tiny model on the proxy's batch (98,304 tokens at seq 2048: ~7 s a step on one CPU thread), so no
    warm-up steps (nothing to compile with TORCH_COMPILE=0; test_depth.py checks the warm-up's graphs)."""
    return {**os.environ, **TINY_ENV, "PROXY_SECONDS": "3", "PROXY_DATA_DIR": str(tmp_path / "pd"), "OMP_NUM_THREADS": "1",
            "WARMUP_STEPS": "0", **env}


@pytest.mark.parametrize("nproc", [1, 2])
def test_proxy_script_runs_and_summarises(tmp_path, shared_data, nproc):
    env = proxy_env(tmp_path, NPROC=str(nproc), RUN_ID=f"proxy_test_{nproc}")
    r = subprocess.run(["bash", str(ROOT / "eval" / "proxy.sh"), str(shared_data)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, failure_tail(r)
    summary = r.stdout.strip().splitlines()[-1]
    assert "sliding_bpb:" in summary and "n/a" not in summary
    log = parse_log(str(ROOT / "logs" / f"proxy_test_{nproc}.txt"))
    assert log["hparams"]["train_batch_tokens"] == 98304 * nproc and log["hparams"]["max_wallclock_seconds"] == 3
    for f in (ROOT / "logs").glob(f"proxy_test_{nproc}*"):
        f.unlink()


def test_proxy_at_another_vocab(tmp_path, shared_data):
    """eval/proxy_vocab.sh builds a proxy folder at vocab 400 (the val's bytes checked against the sp1024 val);
    eval/proxy.sh trains and scores on it with VOCAB_SIZE taken from its tokenizer."""
    out = tmp_path / "p400"
    r = subprocess.run(["bash", str(ROOT / "eval" / "proxy_vocab.sh"), "400", str(shared_data), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "equal:" in r.stdout, failure_tail(r)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["fineweb_val_000000.bin", "proxy_400_bpe.model",
                                                                    "proxy_train_000000.bin.xz"]
    env = {k: v for k, v in proxy_env(tmp_path, RUN_ID="proxy_test_v400").items() if k not in ("VOCAB_SIZE", "PROXY_DATA_DIR")}
    try:
        r = subprocess.run(["bash", str(ROOT / "eval" / "proxy.sh"), str(out)], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, failure_tail(r)
        log = parse_log(str(ROOT / "logs" / "proxy_test_v400.txt"))
        assert log["hparams"]["vocab_size"] == 400 and log["hparams"]["data_path"] == "/tmp/proxy_data_proxy_400_bpe"
        assert "sliding_bpb" in log
    finally:
        for f in (ROOT / "logs").glob("proxy_test_v400*"):
            f.unlink()


def test_device_ablation_call_returns_its_logs_at_the_deadline(tmp_path, shared_data):
    """eval/device_ablate.sh stops the plan at DEADLINE and still leaves $OUT/logs.tgz (the logs so far) and the
    artifacts KEEP_ARTIFACTS names; a run whose complete log a warm machine kept from the call before runs again."""
    import tarfile
    plan = tmp_path / "plan.txt"
    plan.write_text("device_test_a SEED=3\n")
    (ROOT / "logs").mkdir(exist_ok=True)
    (ROOT / "logs" / "device_test_a.txt").write_text("final_int6_sliding_window_exact val_loss:1 val_bpb:1\n")
    (ROOT / "logs" / "device_test_old.int6.ptz").write_bytes(b"PGA2 an earlier run's artifact")
    out = tmp_path / "out"
    out.mkdir()
    env = proxy_env(tmp_path, OUT=str(out), DEADLINE="3", PROXY_SECONDS="30", WHEELS=str(tmp_path / "no_wheels"),
                    KEEP_ARTIFACTS="device_test_old device_test_a")
    try:
        r = subprocess.run(["bash", str(ROOT / "eval" / "device_ablate.sh"), str(plan), str(shared_data)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 124 and "the deadline stopped the plan" in r.stdout, failure_tail(r)
        assert "start device_test_a" in r.stdout and "done already" not in r.stdout
        with tarfile.open(out / "logs.tgz") as tar:
            assert all(n.startswith("logs/") for n in tar.getnames())
        assert (out / "device_test_old.int6.ptz").read_bytes() == b"PGA2 an earlier run's artifact"
        assert "device_test_a left no artifact" in r.stdout
        assert sorted(p.name for p in out.iterdir()) == ["device_test_old.int6.ptz", "logs.tgz"]
    finally:
        for f in (ROOT / "logs").glob("device_test_*"):
            f.unlink()
    r = subprocess.run(["bash", str(ROOT / "eval" / "device_ablate.sh"), str(plan)], env={**env, "OUT": ""},
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: OUT is not a folder")


def test_ablation_plans_name_only_settings_train_gpt_reads(tmp_path, shared_data):
    """A plan line that sets what train_gpt.py does not read (a typo, a removed switch) is refused before anything
    runs; every committed plan passes that check (RUNS names no run, so the plan is read and nothing starts)."""
    plan = tmp_path / "plan.txt"
    for bad in ("MLP_MUL=4", "EMBED_BF16=1"):
        plan.write_text(f"ok_s1 SEED=1 PROXY_SECONDS=0 MLP_MULT=3.0\nbad_s1 SEED=1 {bad}\n")
        r = subprocess.run(["bash", str(ROOT / "eval" / "ablate.sh"), str(plan), str(shared_data)],
                           env=proxy_env(tmp_path), capture_output=True, text=True, timeout=60)
        key = bad.split("=")[0]
        assert r.returncode == 2 and r.stderr.startswith(f"error: {plan}: run bad_s1 sets {key}, which train_gpt.py"), r.stderr
    for committed in sorted((ROOT / "eval" / "plans").glob("*.txt")):
        r = subprocess.run(["bash", str(ROOT / "eval" / "ablate.sh"), str(committed), str(shared_data)],
                           env=proxy_env(tmp_path, RUNS="no_such_run"), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "RUNS names no_such_run" in r.stderr, (committed.name, r.stderr)


def test_ablation_plan_runs_each_line_once(tmp_path, shared_data):
    """eval/ablate.sh: every plan line RUNS names is a proxy run with its env on top, two at a time; a finished
    run is not run again (with FRESH=1 it is, and its summary says how it went); the summary comes in plan order; a
    line with EVAL_ARTIFACT scores an artifact without training."""
    plan = tmp_path / "plan.txt"
    plan.write_text("# a comment\nablate_test_a SEED=3\nablate_test_c SEED=5\n\nablate_test_b SEED=4 LEAKY_RELU_SLOPE=0.5\n"
                    "ablate_test_e EVAL_ARTIFACT=logs/ablate_test_a.int6.ptz TTT_MODE=lora TTT_LORA_DOCS=4\n")
    cmd = ["bash", str(ROOT / "eval" / "ablate.sh"), str(plan), str(shared_data)]
    only = {"RUNS": "ablate_test_b ablate_test_a"}
    try:
        r = subprocess.run(cmd, env=proxy_env(tmp_path, JOBS="2", PROXY_SECONDS="2", **only), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, failure_tail(r)
        lines = r.stdout.strip().splitlines()
        assert [line.split(":")[0] for line in lines[-2:]] == ["logs/ablate_test_a.txt", "logs/ablate_test_b.txt"]
        logs = [parse_log(str(ROOT / "logs" / f"ablate_test_{x}.txt"))["hparams"] for x in "ab"]
        assert (logs[0]["seed"], logs[1]["seed"], logs[1]["leaky_relu_slope"]) == (3, 4, 0.5)
        assert not (ROOT / "logs" / "ablate_test_c.txt").exists()
        again = subprocess.run(cmd, env=proxy_env(tmp_path, **only), capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and again.stdout.count("done already") == 2, failure_tail(again)
        fresh = subprocess.run(cmd, env=proxy_env(tmp_path, FRESH="1", PROXY_SECONDS="2", RUNS="ablate_test_a"),
                               capture_output=True, text=True, timeout=600)
        assert fresh.returncode == 0 and "done already" not in fresh.stdout, failure_tail(fresh)
        assert fresh.stdout.strip().splitlines()[-1].startswith("logs/ablate_test_a.txt: steps:")
        scored = subprocess.run(cmd, env=proxy_env(tmp_path, RUNS="ablate_test_e"), capture_output=True, text=True,
                                timeout=600)  # a line with EVAL_ARTIFACT only scores a run's artifact
        assert scored.returncode == 0, failure_tail(scored)
        e, a = (parse_log(str(ROOT / "logs" / f"ablate_test_{x}.txt")) for x in "ea")
        assert "steps" not in e and e["sliding_bpb"] == a["sliding_bpb"] and "ttt_bpb" in e
    finally:
        for f in (ROOT / "logs").glob("ablate_test_*"):
            f.unlink()


def test_val_shard_at_another_vocab_counts_the_same_bytes(tmp_path, tokenizer):
    """build_shards --val-shard re-encodes a shard's documents (decoded with its tokenizer) at another vocab, and
    the tokenizer it trains never sees them; data/check_bytes.py finds the two byte counts equal, and names the
    document and the difference when one document lost a token."""
    val_docs = make_docs(12, seed=7) + ["Café  naïve — 3.14 × 2 = 6.28 😀 end", "  leading and trailing  "]
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    build_shards.write_split(build_shards.encode_documents(val_docs, tokenizer, workers=1), val_dir, "val", 1 << 30)
    val_shard = str(val_dir / "fineweb_val_000000.bin")
    (tmp_path / "train.txt").write_text("\n\n".join(make_docs(200, seed=8)))
    out = tmp_path / "sp400"
    rc = build_shards.main(["--input", str(tmp_path / "train.txt"), "--paragraphs", "--val-shard", val_shard,
                            "--val-tokenizer", tokenizer, "--out", str(out), "--train-tokenizer", "--vocab-size", "400",
                            "--workers", "1"])
    assert rc == 0
    new_tok, new_val = str(out / "tokenizer_400_bpe.model"), str(out / "fineweb_val_000000.bin")
    assert (tg.read_shard(new_val) == 1).sum() == len(val_docs)
    check = [sys.executable, str(ROOT / "data" / "check_bytes.py")]
    r = subprocess.run([*check, tokenizer, val_shard, new_tok, new_val], capture_output=True, text=True)
    assert r.returncode == 0 and "equal:" in r.stdout, r.stdout + r.stderr
    tokens = tg.read_shard(new_val)
    bos = np.flatnonzero(tokens == 1)
    build_shards.write_shard(tmp_path / "cut.bin", np.delete(tokens, bos[3] + 2))  # document 3 loses a token
    r = subprocess.run([*check, tokenizer, val_shard, new_tok, str(tmp_path / "cut.bin")], capture_output=True, text=True)
    assert r.returncode == 1 and "over 1 of 14 documents" in r.stdout and "document 3:" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("plan", sorted((ROOT / "eval" / "plans").glob("*.txt")), ids=lambda p: p.name)
def test_every_plan_names_real_settings(plan):
    """Each run of a shipped plan has a unique name and sets only train_gpt.py settings (or PROXY_SECONDS), each
    with a value train_gpt.py accepts, so a typo fails here rather than after a device call."""
    names = []
    for line in plan.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, *settings = line.split()
        names.append(name)
        env = dict(kv.split("=", 1) for kv in settings)
        env.pop("PROXY_SECONDS", None)
        full_depth = {**TINY_ENV, "NUM_LAYERS": "11", "PARALLEL_RESID_START": "7"}
        tg.Hyperparameters.from_env({**full_depth, **env})  # a ConfigError names the bad one
        unknown = set(env) - {f.name.upper() for f in tg.dataclasses.fields(tg.Hyperparameters)}
        assert not unknown, f"{plan.name}: {name} sets {unknown}"
    assert names and len(names) == len(set(names))
