"""The log parser, the plotting tool and the records tool on tiny hand-written logs; the step timing tool and
the launcher on the tiny config."""
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

import logs
import make_record
import pack
import plot_logs
from cli import UsageError
from conftest import ROOT, assert_one_error, failure_tail, train_env
from logs import parse_log, summary

SCRIPT = b"print('the script that ran')\n"


def fake_log(path, seed, sliding_loss, total=15_000_000, val_every=False, script=SCRIPT, ttt_loss=None):
    lines = [f'hyperparameters: {{"seed": {seed}, "num_layers": 11, "run_id": "r{seed}"}}',
             f"code: train_gpt.py {len(script)} bytes sha256:{hashlib.sha256(script).hexdigest()}"]
    for s in (1, 100, 200):
        lines.append(f"step:{s}/20000 train_loss:{6 - s / 100:.4f} train_time:{s * 0.09:.1f}s step_avg:90.00ms "
                     f"tok/s:1,092,267 lr_scale:1.000 eta:10s")
        if val_every and s > 1:
            lines.append(f"step:{s} val val_loss:{3 - s / 1000:.8f} val_bpb:{1.8 - s / 1000:.8f} eval_time:1.0s")
    lines += ["training done: 200 steps in 18.0s (90.00 ms/step)",
              "pre_quant_ema val_loss:2.44000000 val_bpb:1.46200000 eval_time:20.0s",
              "artifact:logs/x.ptz 14950000 bytes (brotli) clip_floor:1.0000 export_time:80.0s",
              "final_int6_roundtrip_exact val_loss:2.44100000 val_bpb:1.46300000 eval_time:0.2s",
              f"final_int6_sliding_window_exact val_loss:{sliding_loss:.8f} val_bpb:{sliding_loss / 1.67:.8f} eval_time:8.0s",
              *([f"final_int6_ttt_exact val_loss:{ttt_loss:.8f} val_bpb:{ttt_loss / 1.67:.8f} eval_time:20.0s"] if ttt_loss else []),
              f"Total submission size int6+brotli: {total} bytes (model 14950000 + code 50000)"]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_parse_log_and_summary(tmp_path):
    r = parse_log(fake_log(tmp_path / "a.txt", 1337, 2.4, val_every=True))
    assert r["steps"] == 200 and r["ms_per_step"] == 90.0 and r["code_bytes"] == len(SCRIPT)
    assert r["sliding_loss"] == 2.4 and r["total_bytes"] == 15_000_000 and r["artifact_bytes"] == 14_950_000
    assert r["train_curve"][0] == (1, 0.1, 5.99) and r["val_curve"] == [(100, 1.7), (200, 1.6)]
    assert r["tokens_per_s"] == 1_092_267 and r["hparams"]["seed"] == 1337
    line = summary(r)
    assert "steps:200 ms/step:90.0" in line and "sliding_bpb:1.43713" in line and "bytes:15000000" in line
    assert "calib_s" not in line
    with open(r["path"], "a") as f:
        f.write("gptq_calibration: 16 training batches, 67 Hessians in 1.3s; training 590.0s + calibration 1.3s\n")
    assert summary(parse_log(r["path"])).endswith("calib_s:1.3")


def test_table_rows_give_each_run_against_the_base_of_its_seed(tmp_path, capsys):
    runs = [fake_log(tmp_path / f"run_s{seed}.txt", seed, loss) for seed, loss in ((1337, 2.40), (42, 2.41))]
    bases = [fake_log(tmp_path / f"base_s{seed}.txt", seed, loss) for seed, loss in ((42, 2.42), (1337, 2.38))]
    assert logs.main(["table", *runs, "--base", ",".join(bases)]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["| run_s1337", "| run_s42"] and [r[1] for r in rows] == ["1337", "42"]
    assert rows[0][2:8] == ["200", "90.0", "1.46200", "1.46300", "0.00100", f"{2.40 / 1.67:.5f}"]
    assert rows[0][8] == f"+{(2.40 - 2.38) / 1.67:.5f}" and rows[1][8] == f"−{(2.42 - 2.41) / 1.67:.5f}"
    assert rows[0][9:] == ["15,000,000", "1 |"]
    assert logs.main(["table", runs[0]]) == 0 and capsys.readouterr().out.splitlines()[2].split(" | ")[8] == "—"
    with pytest.raises(UsageError, match="at least one LOG"):
        logs.main(["table", "--base", bases[0]])
    with pytest.raises(UsageError, match="two logs of seed 1337"):
        logs.main(["table", runs[0], "--base", f"{runs[0]},{bases[1]}"])


def test_plot_writes_a_png(tmp_path):
    a = fake_log(tmp_path / "a.txt", 1, 2.40, val_every=True)
    b = fake_log(tmp_path / "b.txt", 2, 2.41)
    out = tmp_path / "p.png"
    assert plot_logs.main([a, b, "--out", str(out), "--labels", "base,other"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert plot_logs.val_points(parse_log(a)) == [(100, 9.0, 1.7), (200, 18.0, 1.6), (200, 18.0, pytest.approx(2.4 / 1.67))]


def record(tmp_path, logs, name="Test", script=SCRIPT, tokenizer=None):
    (tmp_path / "train_gpt.py").write_bytes(script)
    return make_record.build_record(make_record.load_runs(logs), name, "A. Person", "aperson", "tiny",
                                    tmp_path / "records", "2026-11-22", record_loss=2.40, script=tmp_path / "train_gpt.py",
                                    tokenizer=tokenizer)


def test_record_folder_and_statistics(tmp_path):
    losses = [2.390, 2.392, 2.391]
    logs = [fake_log(tmp_path / f"s{i}.txt", seed, l, total=15_000_000 + i) for i, (seed, l) in enumerate(zip((1337, 42, 7), losses))]
    folder, res = record(tmp_path, logs)
    assert folder.name == "2026-11-22_Test"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_loss"] == pytest.approx(statistics.mean(losses)) and sub["bytes_total"] == 15_000_002
    assert sub["seeds"] == [1337, 42, 7] and sub["github_id"] == "aperson"
    assert sub["val_loss_std"] == pytest.approx(0.001)
    # t = (2.40 - 0.005 - 2.391) / (0.001 / sqrt(3)) = 6.93 with 2 dof: one-sided p = 0.0101
    assert sub["t_stat"] == pytest.approx(0.004 / (0.001 / math.sqrt(3)))
    assert sub["p_value"] == pytest.approx(0.0101, abs=2e-4)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "submission.json", "train_gpt.py", "train_seed1337.log",
                                                        "train_seed42.log", "train_seed7.log"]
    assert (folder / "train_gpt.py").read_bytes() == SCRIPT
    readme = (folder / "README.md").read_text()
    assert "| 42 | 200 | 90.00 |" in readme and "NUM_LAYERS=11" in readme
    assert [p.name for p in (tmp_path / "records").iterdir()] == [folder.name]  # no temporary folder left
    with pytest.raises(UsageError, match="exists already"):
        record(tmp_path, logs)


def test_a_record_scores_by_test_time_training_where_the_runs_had_it(tmp_path):
    logs = [fake_log(tmp_path / f"s{seed}.txt", seed, 2.395, ttt_loss=l) for seed, l in ((1337, 2.390), (42, 2.392))]
    folder, _ = record(tmp_path, logs)
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_loss"] == pytest.approx(2.391) and sub["val_bpb"] == pytest.approx(2.391 / 1.67)
    assert "| 1337 | 200 | 90.00 | 1.46200 | 1.46300 | 2.39500 | 1.43413 | 2.39000 | 1.43114 |" in (folder / "README.md").read_text()


def test_record_ships_the_packed_script_the_runs_counted(tmp_path):
    """Runs log the packed form of a readable script; the folder gets that packed form, which runs."""
    readable = b'"""doc"""\nimport sys  # a comment\n\n\ndef f():\n    """doc"""\n    print("packed ran", sys.argv[1:])\n\n\nf()\n'
    packed = pack.pack_source(readable.decode())
    logs = [fake_log(tmp_path / f"{s}.txt", s, 2.39, script=packed) for s in (1, 2)]
    folder, _ = record(tmp_path, logs, script=readable)
    assert (folder / "train_gpt.py").read_bytes() == packed
    r = subprocess.run([sys.executable, str(folder / "train_gpt.py"), "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "packed ran ['x']\n", r.stderr


def test_a_shipped_tokenizer_is_copied_and_counted(tmp_path):
    """--tokenizer: the model file goes into the folder and its bytes into bytes_total; over 16,000,000 is refused."""
    tok = tmp_path / "proxy_8192_bpe.model"
    tok.write_bytes(b"t" * 370_000)
    logs = [fake_log(tmp_path / f"{s}.txt", s, 2.39, total=15_500_000) for s in (1, 2)]
    folder, res = record(tmp_path, logs, tokenizer=tok)
    assert (folder / tok.name).read_bytes() == tok.read_bytes()
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["bytes_total"] == 15_870_000 and sub["bytes_tokenizer"] == 370_000
    big = [fake_log(tmp_path / f"b{s}.txt", s, 2.39, total=15_700_000) for s in (1, 2)]
    with pytest.raises(UsageError, match="16,070,000 bytes .code \\+ model \\+ tokenizer., over the 16,000,000-byte limit"):
        record(tmp_path, big, name="Big", tokenizer=tok)


def test_record_refuses_a_script_that_did_not_run(tmp_path):
    logs = [fake_log(tmp_path / "a.txt", 1, 2.39), fake_log(tmp_path / "b.txt", 2, 2.39, script=b"other code\n")]
    with pytest.raises(UsageError, match="is not the code .*b.txt ran"):
        record(tmp_path, logs)
    with pytest.raises(UsageError, match="is not the code .*a.txt ran"):
        record(tmp_path, logs[:1], script=SCRIPT + b"# edited\n")
    assert not (tmp_path / "records").exists() or not list((tmp_path / "records").iterdir())


def test_record_refuses_two_logs_of_one_seed(tmp_path):
    logs = [fake_log(tmp_path / "a.txt", 42, 2.39), fake_log(tmp_path / "b.txt", 42, 2.38)]
    with pytest.raises(UsageError, match="b.txt and .*a.txt both ran seed 42"):
        make_record.load_runs(logs)


def test_record_tool_rejects_unfinished_logs(tmp_path):
    (tmp_path / "x.txt").write_text("step:1/10 train_loss:5.0 train_time:0.1s step_avg:1.00ms tok/s:1 lr_scale:1 eta:1s\n")
    with pytest.raises(UsageError, match="not a finished run"):
        make_record.load_runs([str(tmp_path / "x.txt")])


def test_step_timing_phases_add_up_to_the_step(tmp_path, dataset, tokenizer):
    """tools/step_timing.py: each phase takes time, and together they are the step's wall-clock time."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "step_timing.py"), "--warmup", "2", "--steps", "6"],
                       cwd=tmp_path, env=train_env(dataset, tokenizer), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, failure_tail(r)
    line = r.stdout.strip().splitlines()[-1]
    phases = {k: float(v) for k, v in (kv.split(":") for kv in line.split()[1:] if ":" in kv)}
    assert {"data", "forward", "backward", "optimizer", "total", "wall"} <= set(phases), line
    assert all(phases[k] > 0 for k in ("forward", "backward", "optimizer"))
    assert phases["total"] == pytest.approx(phases["wall"], rel=0.05)


def test_launcher_runs_ranks_and_passes_the_first_failure_on(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text("import os, sys\nr = int(os.environ['RANK'])\n"  # one write per line: the ranks share stdout
                      "os.write(1, f\"rank {r} of {os.environ['WORLD_SIZE']}\\n\".encode())\n"
                      "sys.exit(2 if r == int(os.environ.get('FAIL_RANK', -1)) else 0)\n")
    launch = [sys.executable, str(ROOT / "eval" / "launch.py")]
    r = subprocess.run([*launch, "3", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and sorted(r.stdout.splitlines()) == [f"rank {i} of 3" for i in range(3)]
    r = subprocess.run([*launch, "3", str(script)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "FAIL_RANK": "1"})
    assert r.returncode == 2
    assert_one_error(subprocess.run([*launch, "0", str(script)], capture_output=True, text=True), "usage")


def test_quant_error_ranks_export_settings_on_an_artifact(tmp_path, dataset, tokenizer):
    """tools/quant_error.py on a tiny artifact: its own setting quantises it again as stored (no error, the same
    loss), a higher floor costs fewer bytes and adds error, and GPTQ on the same scales has less output error than
    rounding (it minimises exactly that error on the calibration Hessians)."""
    import re
    import train_gpt as tg
    from test_export import trained_like_state
    from test_model import tiny_hp
    hp = tiny_hp(vocab_size=320)
    tg.write_artifact(str(tmp_path / "a.ptz"), trained_like_state(hp)[1], hp, tg.Quantizer.from_hp(hp))
    tool = [sys.executable, str(ROOT / "tools" / "quant_error.py"), str(tmp_path / "a.ptz"), str(dataset), tokenizer,
            "--calib-seqs", "4", "--val-seqs", "4", "--seq-len", "64"]
    r = subprocess.run([*tool, "QUANT_CLIP_FLOOR=0.5", "QUANT_CLIP_FLOOR=2", "QUANTIZER=gptq,QUANT_CLIP_FLOOR=2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    stored = float(re.search(r"artifact as stored: val_loss ([\d.]+)", r.stdout)[1])
    rows = re.findall(r"estimated ([\d,]+) bytes, output error ([\d.e+-]+) .*val_loss ([\d.]+)", r.stdout)
    (b05, e05, l05), (b2, e2, l2), (bg, eg, lg) = [(int(b.replace(",", "")), float(e), float(l)) for b, e, l in rows]
    assert e05 == 0 and l05 == stored  # the artifact's own grid
    assert b2 < b05 and e2 > 0 and l2 != stored and bg == b2 and 0 < eg < e2
    bad = subprocess.run([*tool, "QUANT_CLIP_FLOOR"], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not NAME=VALUE" in bad.stderr
