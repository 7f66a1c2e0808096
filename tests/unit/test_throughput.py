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
