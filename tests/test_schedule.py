"""The schedule alone: every time-dependent setting as a function of the run's progress, and the run clock."""
import math
import time

import pytest
import torch

import train_gpt as tg
from test_model import tiny_hp


def schedule(**kw) -> tg.Schedule:
    defaults = dict(iterations=20000, max_wallclock_seconds=600, recur_layers="1", recur_loops=2, recur_start_frac="0.3,0.55")
    return tg.Schedule.from_hp(tiny_hp(**{**defaults, **kw}))


def test_progress_is_the_larger_of_steps_and_time():
    s = schedule(iterations=1000, max_wallclock_seconds=100)
    assert s.progress(100, 5_000) == 0.1  # steps ahead of the clock
    assert s.progress(100, 50_000) == 0.5  # the clock ahead of the steps
    assert s.progress(1000, 1) >= 1.0 and s.progress(3, 100_000) >= 1.0  # either one ends the run
    assert schedule(iterations=1000, max_wallclock_seconds=0).progress(500, 1e12) == 0.5  # no cap: steps only


def test_lr_holds_then_falls_linearly_to_zero_over_the_warmdown():
    s = schedule(warmdown_frac=0.49)
    assert [s.lr_scale(p) for p in (0.0, 0.3, 0.51)] == [1.0, 1.0, 1.0]
    assert s.lr_scale(0.51 + 0.49 / 2) == pytest.approx(0.5) and s.lr_scale(0.51 + 0.49 * 0.75) == pytest.approx(0.25)
    assert s.lr_scale(1.0) == 0.0
    grid = [s.lr_scale(i / 1000) for i in range(1001)]
    assert all(a >= b for a, b in zip(grid, grid[1:]))
    assert schedule(warmdown_frac=0).lr_scale(0.99) == 1.0


def test_momentum_warms_up_linearly_then_holds():
    s = schedule(muon_momentum_warmup_start=0.92, muon_momentum=0.99, muon_momentum_warmup_frac=0.21)
    assert s.momentum(0.0) == 0.92 and s.momentum(0.105) == pytest.approx(0.955)
    assert s.momentum(0.21) == pytest.approx(0.99) and s.momentum(0.7) == 0.99
    assert schedule(muon_momentum=0.99, muon_momentum_warmup_frac=0).momentum(0.0) == 0.99


def test_ema_time_constant_is_a_fraction_of_the_run():
    s = schedule(ema_frac=0.047)
    assert s.ema_decay(1 / 7100) == pytest.approx(0.997, abs=1e-4)  # the record's per-step decay at ~7,100 steps
    # what a whole run forgets is the same whatever its step count: exp(-1 / EMA_FRAC)
    for steps in (1000, 7100):
        assert s.ema_decay(1 / steps) ** steps == pytest.approx(math.exp(-1 / 0.047))
    assert schedule(ema_frac=0).ema_decay(0.01) == 0.0


def test_qat_switches_on_where_the_lr_scale_crosses_its_threshold():
    s = schedule(warmdown_frac=0.5, late_qat_threshold=0.15)
    crossing = 1 - 0.15 * 0.5  # lr_scale(p) = (1 - p) / 0.5
    assert not s.qat(crossing - 1e-6) and s.qat(crossing + 1e-6) and s.qat(1.0)
    assert not any(schedule(late_qat_threshold=0).qat(i / 100) for i in range(101))


@pytest.mark.parametrize("budget", [dict(iterations=100_000, max_wallclock_seconds=150),
                                    dict(iterations=100_000, max_wallclock_seconds=600),
                                    dict(iterations=1000, max_wallclock_seconds=0),
                                    dict(iterations=7100, max_wallclock_seconds=0)])
def test_a_run_of_any_length_has_the_same_shape(budget):
    """The same fraction of a 150 s and a 600 s run (or of 1,000 and 7,100 steps) gives the same settings."""
    s, ref = schedule(**budget), schedule(iterations=20000, max_wallclock_seconds=0)
    for frac in (0.0, 0.1, 0.3, 0.51, 0.6, 0.9, 0.95, 1.0):
        if budget["max_wallclock_seconds"]:
            p = s.progress(0, frac * budget["max_wallclock_seconds"] * 1000)
        else:
            p = s.progress(round(frac * budget["iterations"]), 0.0)
        q = ref.progress(round(frac * 20000), 0.0)
        assert p == pytest.approx(q)
        assert (s.lr_scale(p), s.momentum(p), s.qat(p), s.recur_loops(p)) == pytest.approx(
            (ref.lr_scale(q), ref.momentum(q), ref.qat(q), ref.recur_loops(q)))


def test_clock_counts_from_its_start():
    """Time before start() (the compile warm-up) is not training time."""
    clock = tg.RunClock(torch.device("cpu"), world=1, sync_every=10, capped=True)
    time.sleep(0.3)
    clock.start()
    time.sleep(0.1)
    assert 90 <= clock.elapsed_ms(5) < 250
