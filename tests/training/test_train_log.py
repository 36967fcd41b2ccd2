"""`training.train_log`: per-step losses, TensorBoard scalars, the progress
line (rate, percentage, ETA) and the NaN guard, with a scripted clock and
hand-computed numbers.

The clock is read when the log opens, at the first `add` (the first step is
compiled by then) and at each flush (then again to open the next window)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gqa_t5x.training import train_log as tl


class _Writer:
    def __init__(self):
        self.scalars: list[tuple[int, dict]] = []
        self.flushed = 0

    def write_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))

    def flush(self):
        self.flushed += 1


class _Manager:
    def __init__(self, latest):
        self.latest = latest
        self.waited = 0

    def wait_until_finished(self):
        self.waited += 1

    def latest_step(self):
        return self.latest


class _Clock:
    """time.time() returning scripted values, in order."""

    def __init__(self, *values):
        self.values = list(values)

    def time(self):
        return self.values.pop(0)


def _metrics(loss_sum, tokens, *, cross_ent_sum=None, z_loss_sum=0.0, correct=0.0, lr=1e-3, grad_norm=1.0,
             param_norm=10.0, loss=None):
    return {"loss_sum": np.float32(loss_sum), "num_tokens": np.float32(tokens),
            "cross_ent_sum": np.float32(loss_sum if cross_ent_sum is None else cross_ent_sum),
            "z_loss_sum": np.float32(z_loss_sum), "correct": np.float32(correct),
            "learning_rate": np.float32(lr), "grad_norm": np.float32(grad_norm),
            "param_norm": np.float32(param_norm),
            "loss": np.float32(loss_sum / max(tokens, 1) if loss is None else loss)}


def _summary(start=10, resumed_from="scratch") -> tl.TrainSummary:
    return tl.TrainSummary(start_step=start, end_step=start, losses=[], final_metrics={}, eval_metrics={},
                           best=None, elapsed_s=0.0, tokens_per_second=0.0, resumed_from=resumed_from)


def _log(monkeypatch, clock, *, start=10, total=20, progress=True, latest=None, resumed_from="scratch",
         run_start_step=None):
    monkeypatch.setattr(tl, "time", clock)
    summary, writer, manager = _summary(start, resumed_from), _Writer(), _Manager(latest)
    log = tl.TrainLog(summary=summary, writer=writer, manager=manager, model_dir="/runs/m",
                      total_steps=total, progress=progress, run_start_step=run_start_step)
    return log, summary, writer, manager


@pytest.mark.parametrize("rate,text", [(0.0, "0.0"), (12.34, "12.3"), (999.9, "999.9"), (1000.0, "1.0k"),
                                       (12345.0, "12.3k"), (2.5e6, "2500.0k")])
def test_format_rate(rate, text):
    assert tl.format_rate(rate) == text


def test_flush_records_every_steps_loss_and_the_last_steps_scalars_and_rates(monkeypatch, capsys):
    # The log opens at t=96, the first step is compiled at t=100 (start step 10), and the
    # window is flushed at t=110 after steps 11..15.
    log, summary, writer, _ = _log(monkeypatch, _Clock(96.0, 100.0, 110.0, 110.0))
    losses = [(40.0, 20), (30.0, 20), (27.0, 18), (12.0, 8), (33.0, 30)]
    for i, (loss_sum, tokens) in enumerate(losses):
        log.add(11 + i, _metrics(loss_sum, tokens, correct=tokens / 4, z_loss_sum=0.3, cross_ent_sum=loss_sum - 0.3,
                                 lr=0.01, grad_norm=0.5), tokens=100)
    assert writer.scalars == [] and summary.losses == []  # nothing fetched before the flush
    log.flush(15)
    assert summary.losses == pytest.approx([2.0, 1.5, 1.5, 1.5, 1.1])
    step, scalars = writer.scalars[0]
    assert step == 15 and len(writer.scalars) == 1
    assert scalars == pytest.approx({
        "loss": 33.0 / 30, "cross_ent_loss": 32.7 / 30, "z_loss": 0.01, "accuracy": 0.25,
        "learning_rate": 0.01, "grad_norm": 0.5, "param_norm": 10.0,
        "timing/steps_per_second": 5 / 10.0,  # steps 10 -> 15 in 10 s
        "timing/tokens_per_second": 500 / 10.0,  # 5 x 100 tokens in 10 s
    })
    assert summary.final_metrics == scalars
    line = capsys.readouterr().out.strip()
    # 5 of the 10 steps from 10 to 20; at 0.5 steps/s the 5 left take 10 s.
    assert line == ("[train] step 15/20 ( 50.0%) loss 1.1000 acc 0.250 z 1.00e-02 lr 1.00e-02 "
                    "0.50 steps/s 50.0 tok/s eta 10s (first step compiled in 4.0s, not in the rate)")


def test_the_next_window_starts_where_the_last_flush_ended(monkeypatch, capsys):
    log, summary, writer, _ = _log(monkeypatch, _Clock(-3.0, 0.0, 4.0, 4.0, 6.0, 6.0), start=0, total=1000)
    log.add(1, _metrics(10.0, 10), tokens=1500)
    log.add(2, _metrics(10.0, 10), tokens=1500)
    log.flush(2)  # 2 steps, 3000 tokens in 4 s
    log.add(3, _metrics(10.0, 10), tokens=4000)
    log.flush(3)  # 1 step, 4000 tokens in 2 s
    (_, first), (_, second) = writer.scalars
    assert (first["timing/steps_per_second"], first["timing/tokens_per_second"]) == (0.5, 750.0)
    assert (second["timing/steps_per_second"], second["timing/tokens_per_second"]) == (0.5, 2000.0)
    lines = capsys.readouterr().out.splitlines()
    assert "step 2/1000 (  0.2%)" in lines[0] and "750.0 tok/s eta 1996s" in lines[0]
    assert "step 3/1000 (  0.3%)" in lines[1] and "2.0k tok/s eta 1994s" in lines[1]
    assert len(summary.losses) == 3


def test_flush_without_pending_steps_writes_nothing(monkeypatch, capsys):
    log, summary, writer, _ = _log(monkeypatch, _Clock(0.0))
    log.flush(10)
    assert writer.scalars == [] and summary.losses == [] and capsys.readouterr().out == ""


def test_a_step_without_target_tokens_counts_one_token(monkeypatch):
    log, summary, writer, _ = _log(monkeypatch, _Clock(0.0, 0.5, 1.0, 1.0))
    log.add(11, _metrics(0.0, 0, loss=0.0), tokens=0)
    log.flush(11)
    assert summary.losses == [0.0] and writer.scalars[0][1]["loss"] == 0.0


def test_no_progress_line_when_progress_is_off_but_scalars_are_still_written(monkeypatch, capsys):
    log, _, writer, _ = _log(monkeypatch, _Clock(0.0, 1.0, 2.0, 2.0), progress=False)
    log.add(11, _metrics(5.0, 5), tokens=5)
    log.flush(11)
    assert capsys.readouterr().out == "" and len(writer.scalars) == 1


def test_write_scalars_and_close_go_to_the_writer(monkeypatch):
    log, _, writer, _ = _log(monkeypatch, _Clock(0.0))
    log.write_scalars(12, {"eval/bleu": 3.0})
    log.close()
    assert writer.scalars == [(12, {"eval/bleu": 3.0})] and writer.flushed == 1


def test_a_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(monkeypatch):
    log, summary, writer, manager = _log(monkeypatch, _Clock(0.0, 1.0), latest=12)
    log.add(13, _metrics(3.0, 3), tokens=3)
    log.add(14, _metrics(float("nan"), 3, loss=float("nan"), lr=0.005), tokens=3)
    with pytest.raises(tl.NonFiniteLossError) as raised:
        log.flush(14)
    message = str(raised.value)
    assert message.startswith("Training loss is nan at step 14 (learning rate 0.005)")
    assert "Nothing after step 12 was saved: the last good checkpoint is /runs/m/checkpoint_12" in message
    assert manager.waited == 1  # a pending save finishes before the message names it
    assert summary.losses == [1.0] and writer.scalars == []  # step 13 was counted, nothing written


def test_non_finite_parameters_stop_the_run_even_with_a_finite_loss(monkeypatch):
    log, *_ = _log(monkeypatch, _Clock(0.0, 1.0), latest=None)
    log.add(11, _metrics(3.0, 3, param_norm=math.inf), tokens=3)
    with pytest.raises(tl.NonFiniteLossError) as raised:
        log.flush(11)
    message = str(raised.value)
    assert "Parameters became non-finite (norm inf, loss 1) at step 11" in message
    assert "no checkpoint was written" in message
    assert isinstance(raised.value, FloatingPointError)


def test_an_infinite_loss_is_stopped_too(monkeypatch):
    log, *_ = _log(monkeypatch, _Clock(0.0, 1.0))
    log.add(11, _metrics(3.0, 3, loss=-math.inf), tokens=3)
    with pytest.raises(tl.NonFiniteLossError, match="Training loss is -inf at step 11"):
        log.flush(11)


def test_summary_lists_steps_time_loss_accuracy_best_and_paths(capsys):
    summary = tl.TrainSummary(
        start_step=100, end_step=150, losses=[4.56789, 3.2, 2.34561], final_metrics={"accuracy": 0.61234},
        eval_metrics={}, best=(140, 0.51239), elapsed_s=12.345, tokens_per_second=2345.0,
        resumed_from="initial_checkpoint", best_metric="gqa_wmt14_ende/bleu")
    tl.print_summary(summary, "/runs/m")
    assert capsys.readouterr().out.splitlines() == [
        "[train] done.",
        "  steps        100 -> 150 (50 run, started from initial_checkpoint)",
        "  time         12.3s, 2.3k tokens/s",
        "  loss         first 4.5679 -> last 2.3456",
        "  accuracy     0.6123",
        "  best         gqa_wmt14_ende/bleu = 0.5124 (BLEU, 0-100) at step 140 (/runs/m/best/checkpoint_140)",
        "  checkpoints  /runs/m/checkpoint_150",
        "  summaries    /runs/m/train (tensorboard --logdir /runs/m)",
    ]


def test_summary_of_a_run_that_did_nothing_leaves_out_loss_accuracy_and_best(capsys):
    tl.print_summary(_summary(start=3), "m")
    out = capsys.readouterr().out
    assert "3 -> 3 (0 run, started from scratch)" in out
    assert "loss" not in out and "accuracy" not in out and "best" not in out



def test_the_eta_counts_the_measured_step_time_not_the_compilation(monkeypatch, capsys):
    # 100 s to compile the first step, then 10 steps in 10 s: 1 step/s, 90 steps left.
    log, _, writer, _ = _log(monkeypatch, _Clock(0.0, 100.0, 110.0, 110.0, 130.0, 130.0), start=0, total=100)
    for step in range(10):
        log.add(step, _metrics(10.0, 10), tokens=100)
    log.flush(10)
    for step in range(10, 20):
        log.add(step, _metrics(10.0, 10), tokens=100)
    log.flush(20)  # 10 steps in 20 s
    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith("1.00 steps/s 100.0 tok/s eta 90s (first step compiled in 100.0s, not in the rate)")
    assert second.endswith("0.50 steps/s 50.0 tok/s eta 160s")  # said once
    assert writer.scalars[0][1]["timing/steps_per_second"] == 1.0


@pytest.mark.parametrize("start,total,step,resumed_from,run_start_step,shown", [
    (0, 2000, 120, "scratch", None, "step 120/2000 (  6.0%)"),
    (100, 2000, 120, "model_dir", 0, "step 120/2000 (  6.0%)"),  # as the run it continues said at step 120
    (100, 2000, 120, "model_dir", None, "step 120/2000 (  1.1% since resume)"),  # run start unknown: says so
    (1_000_000, 1_050_000, 1_000_500, "initial_checkpoint", None, "step 1000500/1050000 (  1.0%)"),
    (1_000_100, 1_050_000, 1_000_600, "model_dir", 1_000_000, "step 1000600/1050000 (  1.2%)"),
])
def test_the_percentage_runs_from_the_runs_own_start_to_train_steps(start, total, step, resumed_from,
                                                                    run_start_step, shown, monkeypatch, capsys):
    log, *_ = _log(monkeypatch, _Clock(0.0, 1.0, 2.0, 2.0), start=start, total=total,
                   resumed_from=resumed_from, run_start_step=run_start_step)
    log.add(start + 1, _metrics(10.0, 10), tokens=100)
    log.flush(step)
    assert capsys.readouterr().out.startswith(f"[train] {shown} loss")
