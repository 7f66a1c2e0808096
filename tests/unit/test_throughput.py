"""Throughput meter: warm-up steps and paused time (evaluation, saving) stay out of the rates."""

import trainer.metrics as metrics


def test_paused_time_is_left_out(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    meter = metrics.Throughput(warmup_steps=1)
    meter.update(tokens=999, examples=9)  # warm-up: starts the clock, not counted
    for _ in range(4):
        now[0] += 1.0
        meter.update(tokens=1000, examples=10)
    with meter.paused():
        now[0] += 30.0  # an evaluation
    rates = meter.rates()
    assert rates["throughput/tokens_per_s"] == 1000.0
    assert rates["throughput/examples_per_s"] == 10.0


def test_a_rank_without_tokens_still_reports_rates(monkeypatch):
    """The trainer sums rates across ranks with an all-reduce that every rank must join: whether rates exist may
    depend on steps only, never on this rank's tokens (a rank can get no documents in a logging interval)."""
    now = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    meter = metrics.Throughput(warmup_steps=1)
    assert meter.rates() == {}  # nothing measured yet: the same on every rank
    meter.update(tokens=5, examples=1)
    assert meter.rates() == {}  # the warm-up step only started the clock
    now[0] += 2.0
    meter.update(tokens=0, examples=0)  # this rank's share of the step was empty
    assert meter.rates() == {"throughput/tokens_per_s": 0.0, "throughput/examples_per_s": 0.0}
    assert meter.rates() == {}  # and nothing since


def test_step_timer_times_only_active_steps_and_syncs_at_each_mark():
    """On CUDA the trainer times logging steps only, waiting for the GPU at each mark (`sync`); other steps leave
    the shares untouched."""
    from trainer.metrics import StepTimer

    syncs = []
    timer = StepTimer(sync=lambda: syncs.append(1))
    timer.start(active=False)
    timer.mark("forward")
    timer.move(1.0, "forward", "communication")
    assert timer.totals == {} and syncs == []
    timer.start(active=True)
    timer.mark("forward")
    timer.mark("backward")
    assert set(timer.totals) == {"forward", "backward"} and len(syncs) == 3  # start and both marks
    assert abs(sum(timer.shares().values()) - 1.0) < 1e-9
