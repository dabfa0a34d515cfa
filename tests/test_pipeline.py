"""End to end on CPU: train, export, reload the artifact alone and score it; the failure exits."""
import hashlib
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_one_error, failure_tail, run_train, train_env
import pack
from logs import parse_log


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset, tokenizer):
    d = tmp_path_factory.mktemp("run")
    r = run_train(d, dataset, tokenizer, ITERATIONS=20, COMPRESSOR="zstd")
    assert r.returncode == 0, failure_tail(r)
    return d, r


def test_loss_falls_and_every_final_line_is_there(trained):
    d, r = trained
    log = parse_log(str(d / "logs" / "t.txt"))
    curve = log["train_curve"]
    assert curve[0][0] == 1 and curve[-1][0] == 20
    assert curve[-1][2] < curve[0][2] - 0.5  # loss falls over 20 CPU steps
    for key in ("pre_quant_bpb", "roundtrip_bpb", "sliding_bpb", "total_bytes"):
        assert key in log, key
    assert "late_qat:on" in r.stdout and "qat_check: compiled loss" in r.stdout
    code = pack.counted((ROOT / "train_gpt.py").read_bytes())  # the packed form counts (tools/pack.py)
    assert log["total_bytes"] == (d / "logs" / "t.int6.ptz").stat().st_size + len(code)
    assert (log["code_bytes"], log["code_sha256"]) == (len(code), hashlib.sha256(code).hexdigest())


def test_a_missing_codec_fails_before_training(tmp_path, dataset, tokenizer):
    sitecustom = tmp_path / "nobrotli"
    sitecustom.mkdir()
    (sitecustom / "brotli.py").write_text("raise ImportError('no brotli here', name='brotli')\n")
    r = run_train(tmp_path, dataset, tokenizer, ITERATIONS=5, COMPRESSOR="brotli", PYTHONPATH=str(sitecustom))
    assert_one_error(r, "COMPRESSOR=brotli needs the brotli package")
    assert "step:" not in r.stdout


@pytest.mark.parametrize("ttt, unit", [(dict(TTT_MODE="chunk", TTT_CHUNK_TOKENS=2048), "chunks"),
                                       (dict(TTT_MODE="lora", TTT_LORA_DOCS=4), "steps")])
def test_eval_sh_scores_an_artifact_alone(trained, tmp_path, dataset, tokenizer, ttt, unit):
    d, _ = trained
    # a data dir with the val shard only: scoring must not need training data
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "fineweb_val_000000.bin").write_bytes((dataset / "fineweb_val_000000.bin").read_bytes())
    r = run_train(tmp_path, tmp_path / "val", tokenizer, args=[str(d / "logs" / "t.int6.ptz")],
                  NUM_LAYERS=5, PARALLEL_RESID_START=3, RUN_ID="score", **ttt)  # the shape: the artifact's
    assert r.returncode == 0, failure_tail(r)
    first = parse_log(str(d / "logs" / "t.txt"))
    again = parse_log(str(tmp_path / "logs" / "score.txt"))
    assert again["sliding_bpb"] == first["sliding_bpb"] and again["roundtrip_bpb"] == first["roundtrip_bpb"]
    assert again["ttt_bpb"] != again["sliding_bpb"]  # score-first TTT: its own line, after the plain sliding score
    assert re.search(rf"ttt: (\d+) of \1 {unit} adapted in [0-9.]+s of [0-9.]+s; the full val \(62,021,632 tokens\) "
                     r"on 8 GPUs: ~\d+s", r.stdout), failure_tail(r)


def test_oversize_artifact_is_an_error_that_says_by_how_much(tmp_path, dataset, tokenizer):
    r = run_train(tmp_path, dataset, tokenizer, ITERATIONS=2, SIZE_LIMIT=60_000, SIZE_FIT=0)
    assert_one_error(r, "over the 60000-byte limit")
    m = re.search(r"error: submission is (\d+) bytes, (\d+) over the 60000-byte limit", r.stderr)
    assert m and int(m[1]) - 60_000 == int(m[2])
    assert list((tmp_path / "logs").glob("*.ptz"))  # the artifact is kept


def test_an_error_ends_the_log_with_its_reason(tmp_path, dataset, tokenizer):
    r = run_train(tmp_path, tmp_path / "nowhere", tokenizer, ITERATIONS=2)
    assert_one_error(r, "no val shards match")
    assert (tmp_path / "logs" / "t.txt").read_text().splitlines()[-1].startswith("error: no val shards match")


def test_a_native_crash_prints_where_python_was(tmp_path, dataset, tokenizer):
    """SIGABRT (what a C++ library's abort raises) mid-training dumps every thread's Python stack."""
    p = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, text=True,
                         env=train_env(dataset, tokenizer, ITERATIONS=100000), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    for line in p.stdout:
        if line.startswith("step:2/"):
            break
    p.send_signal(signal.SIGABRT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err and re.search(r"train_gpt\.py\", line \d+ in train\n", err), err[-3000:]


def test_nan_loss_stops_the_run(tmp_path, dataset, tokenizer):
    r = run_train(tmp_path, dataset, tokenizer, ITERATIONS=8, MATRIX_LR="1e30", TIED_EMBED_LR="1e30", SCALAR_LR="1e30",
                  GRAD_CLIP_NORM="0")
    assert_one_error(r, "non-finite train loss")


def test_quickstart_runs_the_whole_job_on_the_cpu(tmp_path):
    """README's CPU quick start: shards and a tokenizer from a small text, then train, export and score."""
    t0 = time.time()
    r = subprocess.run(["bash", str(ROOT / "eval" / "quickstart.sh")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, failure_tail(r)
    log = parse_log(str(tmp_path / "logs" / "quickstart.txt"))
    curve = log["train_curve"]
    assert log["steps"] == 60 and curve[-1][2] < curve[0][2] - 1.0 and math.isfinite(log["sliding_bpb"])
    assert time.time() - t0 < 60


def test_packed_script_runs_like_the_readable_one(tmp_path, dataset, tokenizer):
    """The counted form (tools/pack.py: comments and docstrings stripped, lzma, base85, a two-line loader)
    trains the same tiny model to the same losses and the same artifact bytes, and both runs count the packed
    size as their code bytes."""
    import ast
    import subprocess
    import sys
    from conftest import ROOT, failure_tail, train_env
    from logs import parse_log
    source = (ROOT / "train_gpt.py").read_text()
    packed = pack.pack_source(source)
    assert packed.startswith(pack.PACKED_PREFIX) and packed.count(b"\n") == 2 and len(packed) < len(source) // 3

    def without_docstrings(src):  # the AST with every docstring and `pass` dropped
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(getattr(node, "body", None), list):
                node.body = [n for n in node.body if not isinstance(n, ast.Pass) and not (
                    isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str))]
        return ast.dump(tree)
    assert without_docstrings(pack.strip_source(source)) == without_docstrings(source)

    logs = {}
    for name, script in (("readable", ROOT / "train_gpt.py"), ("packed", tmp_path / "p" / "train_gpt.py")):
        (tmp_path / name).mkdir()
        if name == "packed":
            script.parent.mkdir()
            script.write_bytes(packed)
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path / name, capture_output=True, text=True,
                           env=train_env(dataset, tokenizer, ITERATIONS=12, COMPRESSOR="zstd"), timeout=600)
        assert r.returncode == 0, failure_tail(r)
        logs[name] = parse_log(str(tmp_path / name / "logs" / "t.txt"))
    curves = [[(step, loss) for step, _, loss in logs[k]["train_curve"]] for k in ("packed", "readable")]
    assert curves[0] == curves[1] and len(curves[0]) > 2
    assert logs["packed"]["code_bytes"] == logs["readable"]["code_bytes"] == len(packed)
    assert (tmp_path / "packed" / "logs" / "t.int6.ptz").read_bytes() == (tmp_path / "readable" / "logs" / "t.int6.ptz").read_bytes()


def test_strip_source_keeps_string_literals_whole():
    """Blank lines and trailing spaces inside a multi-line string survive, also after a multi-line docstring
    (which shifts every later row when it becomes `pass`)."""
    src = 'def f():\n    """doc\n\n    more"""\n    x = """a\n\n  b  \n"""  # c\n\n    return x\n\n\nprint(f())\n'
    out = pack.strip_source(src)
    assert "#" not in out and "doc" not in out and "\n\n\n" not in out.replace('"""a\n\n  b  \n"""', "")
    scope = {}
    exec(out, scope)
    assert scope["f"]() == "a\n\n  b  \n"
