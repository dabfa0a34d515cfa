"""The log parser, the plotting tool and the records tool, on tiny hand-written logs."""
import json
import math
import statistics

import pytest

import make_record
import plot_logs
from logs import parse_log, summary


def fake_log(path, seed, sliding_loss, total=15_000_000, val_every=False):
    lines = [f'hyperparameters: {{"seed": {seed}, "num_layers": 11, "run_id": "r{seed}"}}',
             "step_phases_ms data:0.50 forward:30.00 backward:50.00 comm:0.00 optimizer:12.00 total:92.50 (last 5 warm-up steps)"]
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
              f"Total submission size int6+brotli: {total} bytes (model 14950000 + code 50000)"]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_parse_log_and_summary(tmp_path):
    r = parse_log(fake_log(tmp_path / "a.txt", 1337, 2.4, val_every=True))
    assert r["steps"] == 200 and r["ms_per_step"] == 90.0 and r["optimizer_ms"] == 12.0 and r["fwd_bwd_ms"] == 80.0
    assert r["sliding_loss"] == 2.4 and r["total_bytes"] == 15_000_000 and r["artifact_bytes"] == 14_950_000
    assert r["train_curve"][0] == (1, 0.1, 5.99) and r["val_curve"] == [(100, 1.7), (200, 1.6)]
    assert r["tokens_per_s"] == 1_092_267 and r["hparams"]["seed"] == 1337
    line = summary(r)
    assert "steps:200 ms/step:90.0" in line and "sliding_bpb:1.4371" in line and "bytes:15000000" in line


def test_plot_writes_a_png(tmp_path):
    a = fake_log(tmp_path / "a.txt", 1, 2.40, val_every=True)
    b = fake_log(tmp_path / "b.txt", 2, 2.41)
    out = tmp_path / "p.png"
    assert plot_logs.main([a, b, "--out", str(out), "--labels", "base,other"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert plot_logs.val_points(parse_log(a)) == [(100, 9.0, 1.7), (200, 18.0, 1.6), (200, 18.0, pytest.approx(2.4 / 1.67))]


def test_record_folder_and_statistics(tmp_path):
    losses = [2.390, 2.392, 2.391]
    logs = [fake_log(tmp_path / f"s{i}.txt", seed, l, total=15_000_000 + i) for i, (seed, l) in enumerate(zip((1337, 42, 7), losses))]
    folder, res = make_record.build_record(make_record.load_runs(logs), "Test", "A. Person", "aperson", "tiny",
                                           tmp_path / "records", "2026-11-22", record_loss=2.40)
    assert folder.name == "2026-11-22_Test"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_loss"] == pytest.approx(statistics.mean(losses)) and sub["bytes_total"] == 15_000_002
    assert sub["seeds"] == [1337, 42, 7] and sub["github_id"] == "aperson"
    assert sub["val_loss_std"] == pytest.approx(0.001)
    # t = (2.40 - 0.005 - 2.391) / (0.001 / sqrt(3)) = 6.93 with 2 dof: one-sided p = 0.0101
    assert sub["t_stat"] == pytest.approx(0.004 / (0.001 / math.sqrt(3)))
    assert sub["p_value"] == pytest.approx(0.0101, abs=2e-4)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "submission.json", "train_seed1337.log",
                                                        "train_seed42.log", "train_seed7.log"]
    readme = (folder / "README.md").read_text()
    assert "| 42 | 200 | 90.00 |" in readme and "NUM_LAYERS=11" in readme


def test_record_tool_rejects_unfinished_logs(tmp_path):
    (tmp_path / "x.txt").write_text("step:1/10 train_loss:5.0 train_time:0.1s step_avg:1.00ms tok/s:1 lr_scale:1 eta:1s\n")
    with pytest.raises(SystemExit, match="not a finished train_gpt.py run"):
        make_record.load_runs([str(tmp_path / "x.txt")])
