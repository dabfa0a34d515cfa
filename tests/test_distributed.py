"""Several processes (torchrun, gloo on CPU) agree with one: the same global batch trains the same model, and
one artifact scores the same bpb whatever the process count."""
import re

import pytest

from conftest import failure_tail, run_train
from logs import parse_log


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset, tokenizer):
    out = {}
    for n in (1, 2):
        d = tmp_path_factory.mktemp(f"world{n}")
        r = run_train(d, dataset, tokenizer, nproc=n, ITERATIONS=8, COMPRESSOR="zstd", GRAD_ACCUM_STEPS=4 // n,
                      LATE_QAT_THRESHOLD=0.5, QAT_SIZE_FIT=1, SIZE_TARGET=80_000, SIZE_LIMIT=90_000)
        assert r.returncode == 0, failure_tail(r)
        out[n] = d
    return out


def test_two_processes_train_like_one(runs):
    one, two = (parse_log(str(runs[n] / "logs" / "t.txt"))["train_curve"] for n in (1, 2))
    assert [s for s, _, _ in one] == [s for s, _, _ in two]
    assert one[0][2] == two[0][2]  # the first step's global loss: same data, same weights
    for (_, _, a), (_, _, b) in zip(one, two):
        assert abs(a - b) < 2e-3  # later steps differ only by reduction order
    floors = [re.search(r"qat_size_fit: clip_floor ([\d.]+)", (runs[n] / "logs" / "t.txt").read_text())[1] for n in (1, 2)]
    assert floors[0] == floors[1] and float(floors[0]) > 0.5  # QAT_SIZE_FIT's floor, the same with two processes


@pytest.mark.parametrize("nproc", [2, 3])
def test_an_artifact_scores_the_same_on_any_number_of_processes(runs, tmp_path, dataset, tokenizer, nproc):
    artifact = runs[1] / "logs" / "t.int6.ptz"
    r = run_train(tmp_path, dataset, tokenizer, args=[str(artifact)], NPROC=nproc, RUN_ID="multi")
    assert r.returncode == 0, failure_tail(r)
    ref, got = parse_log(str(runs[1] / "logs" / "t.txt")), parse_log(str(tmp_path / "logs" / "multi.txt"))
    for key in ("roundtrip_bpb", "sliding_bpb", "sliding_loss"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6)


def test_ranks_follow_one_clock_under_a_wallclock_cap(tmp_path, dataset, tokenizer):
    """With MAX_WALLCLOCK_SECONDS the schedule runs on rank 0's clock: the ranks end with identical weights,
    so rank 0's artifact is what every rank scored before export."""
    r = run_train(tmp_path, dataset, tokenizer, nproc=2, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=4,
                  COMPRESSOR="zstd", GRAD_ACCUM_STEPS=1)
    assert r.returncode == 0, failure_tail(r)
    log = parse_log(str(tmp_path / "logs" / "t.txt"))
    assert log["train_s"] >= 4.0 and log["steps"] > 2
    assert "ranks_in_sync:1" in r.stdout
    step_avgs = [float(ms) for ms in re.findall(r"step_avg:([\d.]+)ms", r.stdout)]
    assert len(step_avgs) > 2 and min(step_avgs) > 0  # the clock runs from step 1, before its first mean


def test_ranks_share_the_default_run_id(tmp_path, dataset, tokenizer):
    """Without RUN_ID each rank would make its own run_<time>_<pid> name; all must use rank 0's."""
    r = run_train(tmp_path, dataset, tokenizer, nproc=2, ITERATIONS=2, COMPRESSOR="zstd", GRAD_ACCUM_STEPS=1, RUN_ID="")
    assert r.returncode == 0, failure_tail(r)
    assert len(list((tmp_path / "logs").glob("run_*.int6.ptz"))) == 1
