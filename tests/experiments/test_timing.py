"""`experiments.timing`: the one timing loop, with a scripted clock.

`timing.time` is replaced by a clock whose `perf_counter` returns scripted
values, so every timed interval is known in advance; the decoders run for
real on a tiny model.
"""

from __future__ import annotations

import numpy as np
import pytest

from gqa_t5x import checkpoints
from gqa_t5x.experiments import timing
from gqa_t5x.model import decoding
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config


class _Clock:
    """perf_counter() returning the given values in order (fails when they run out)."""

    def __init__(self, *values: float):
        self.values = list(values)

    def perf_counter(self) -> float:
        return self.values.pop(0)


def _intervals(*seconds: float) -> _Clock:
    """A clock whose consecutive (start, end) pairs are `seconds` apart, with gaps between pairs."""
    values, t = [], 100.0
    for s in seconds:
        values += [t, t + s]
        t += s + 50.0  # time between timed calls is never counted
    return _Clock(*values)


def _counter():
    calls = []

    def fn():
        calls.append(len(calls))
        return len(calls)  # 1 for the warm-up call, 2 for the first timed call, ...

    return fn, calls


def test_fastest_is_the_minimum_of_the_timed_calls_after_an_untimed_warm_up(monkeypatch):
    monkeypatch.setattr(timing, "time", _intervals(0.5, 0.2, 0.7))
    fn, calls = _counter()
    seconds, out = timing.fastest(fn, 3)
    assert seconds == pytest.approx(0.2)
    assert len(calls) == 4  # warm-up + 3 timed
    assert out == 4  # the last call's output


def test_fastest_of_one_repeat_is_that_calls_time(monkeypatch):
    monkeypatch.setattr(timing, "time", _intervals(1.25))
    fn, calls = _counter()
    assert timing.fastest(fn, 1) == (pytest.approx(1.25), 2)
    assert len(calls) == 2


@pytest.mark.parametrize("repeats", [0, -1])
def test_fastest_needs_at_least_one_timed_repeat(repeats, monkeypatch):
    monkeypatch.setattr(timing, "time", _Clock())  # never read
    fn, calls = _counter()
    with pytest.raises(ValueError, match=f"repeats={repeats}"):
        timing.fastest(fn, repeats)
    assert calls == []  # refused before the warm-up


def test_interleaved_warms_every_function_up_then_times_one_call_of_each_per_round(monkeypatch):
    monkeypatch.setattr(timing, "time", _intervals(1.0, 2.0, 3.0, 4.0))
    log = []

    def make(name):
        def fn():
            log.append(name)
            return f"{name}{len(log)}"
        return fn

    runs = timing.interleaved([make("a"), make("b")], 2)
    assert log == ["a", "b", "a", "b", "a", "b"]
    assert runs == [[(1.0, "a3"), (3.0, "a5")], [(2.0, "b4"), (4.0, "b6")]]


def _tiny() -> T5Config:
    return T5Config(vocab_size=29, dtype="float32", emb_dim=16, num_heads=4, head_dim=4, mlp_dim=24,
                    num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0)


@pytest.fixture(scope="module")
def tiny_params():
    """Random parameters from the real tree's shapes (no initialiser to compile)."""
    config = _tiny()
    rng = np.random.default_rng(0)
    flat = {k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in param_tree.param_shapes(config).items()}
    return config, param_tree.unflatten(flat)


def test_greedy_decoder_decodes_exactly_output_length_tokens_of_its_seeded_inputs(tiny_params):
    config, params = tiny_params
    run = timing.greedy_decoder(config, params, batch=3, input_length=4, output_length=2, seed=4)
    tokens = np.asarray(run())
    assert tokens.shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(run()), tokens)  # deterministic
    # The same greedy decode of the same seeded inputs, called directly.
    inputs = np.random.default_rng(4).integers(2, 29, size=(3, 4)).astype(np.int32)
    spec = decoding.DecodingSpec(method="greedy", max_decode_length=2, eos_id=None)
    direct = decoding.decode(config, params, inputs, spec, kernels=decoding.step_kernels(params))
    np.testing.assert_array_equal(np.asarray(direct.tokens), tokens)


@pytest.mark.parametrize("sizes", [dict(batch=0, input_length=3, output_length=2),
                                   dict(batch=1, input_length=0, output_length=2),
                                   dict(batch=1, input_length=3, output_length=0)])
def test_greedy_decoder_refuses_empty_shapes(tiny_params, sizes):
    config, params = tiny_params
    with pytest.raises(ValueError, match=">= 1"):
        timing.greedy_decoder(config, params, **sizes)


def test_time_params_reports_the_fastest_run_divided_by_the_batch(tiny_params, monkeypatch):
    config, params = tiny_params
    monkeypatch.setattr(timing, "time", _intervals(0.9, 0.6, 0.75))
    result = timing.time_params(config, params, batch=3, input_length=4, output_length=2, repeats=3)
    assert result == {"time_per_sample": pytest.approx(0.2), "seconds": pytest.approx(0.6), "batch": 3,
                      "input_length": 4, "output_length": 2}


def test_time_params_refuses_zero_repeats_before_decoding(tiny_params, monkeypatch):
    config, params = tiny_params
    monkeypatch.setattr(timing, "greedy_decoder", lambda *a, **k: pytest.fail("decoder was built"))
    with pytest.raises(ValueError, match="repeats=0 must be >= 1"):
        timing.time_params(config, params, batch=1, input_length=2, output_length=1, repeats=0)


def test_time_checkpoint_times_a_saved_model_in_the_requested_dtype(tiny_params, tmp_path, monkeypatch):
    config, params = tiny_params
    checkpoints.save(tmp_path / "ckpt", config.replace(dropout_rate=0.1), params, step=5)
    seen = {}
    real = timing.greedy_decoder

    def recording(cfg, p, **kw):
        seen["config"] = cfg
        return real(cfg, p, **kw)

    monkeypatch.setattr(timing, "greedy_decoder", recording)
    monkeypatch.setattr(timing, "time", _intervals(0.5, 0.25))
    result = timing.time_checkpoint(str(tmp_path / "ckpt"), dtype="float32", batch=3, input_length=4,
                                    output_length=2, repeats=2)
    assert result["seconds"] == pytest.approx(0.25) and result["time_per_sample"] == pytest.approx(0.25 / 3)
    assert result["checkpoint"] == str(tmp_path / "ckpt")
    assert seen["config"].dtype == "float32" and seen["config"].dropout_rate == 0.0


def test_round_orders_are_seeded_permutations_that_change_every_round():
    orders = timing.round_orders(3, 20, seed=7)
    assert len(orders) == 20 and all(sorted(order) == [0, 1, 2] for order in orders)
    assert all(a != b for a, b in zip(orders, orders[1:]))  # never the same order twice in a row
    assert timing.round_orders(3, 20, seed=7) == orders  # reproducible
    assert timing.round_orders(3, 20, seed=8) != orders
    assert timing.round_orders(1, 3, seed=0) == [[0], [0], [0]]
    with pytest.raises(ValueError, match="must be >= 1"):
        timing.round_orders(0, 3, seed=0)


def test_interleaved_calls_each_round_in_its_order_and_returns_runs_in_the_given_order(monkeypatch):
    monkeypatch.setattr(timing, "time", _intervals(1.0, 2.0, 3.0, 4.0, 5.0, 6.0))
    log = []

    def make(name):
        def fn():
            log.append(name)
            return len(log)
        return fn

    runs = timing.interleaved([make("a"), make("b"), make("c")], 2, orders=[[2, 0, 1], [1, 2, 0]])
    assert log == ["a", "b", "c", "c", "a", "b", "b", "c", "a"]  # warm-up in the given order
    assert runs == [[(2.0, 5), (6.0, 9)], [(3.0, 6), (4.0, 7)], [(1.0, 4), (5.0, 8)]]


@pytest.mark.parametrize("orders", [[[0, 1]], [[0, 1], [0, 0]], [[0, 1], [1, 2]]])
def test_interleaved_refuses_orders_that_are_not_one_permutation_per_round(orders, monkeypatch):
    monkeypatch.setattr(timing, "time", _Clock())  # never read
    fn, calls = _counter()
    with pytest.raises(ValueError, match="permutations"):
        timing.interleaved([fn, fn], 2, orders=orders)
    assert calls == []  # refused before the warm-up
