"""`evaluation.time_random_variants`: MHA/GQA/MQA timing at a chosen shape with
random weights, in rounds of seeded random order, with the KV-cache bytes.

The structure test decodes for real with a tiny model; the order tests put a
recording function in place of each variant's decoder.
"""

from __future__ import annotations

import pytest

from gqa_t5x.experiments import timing
from gqa_t5x.experiments.study import evaluation

pytestmark = pytest.mark.study

TINY = dict(emb_dim=16, head_dim=4, mlp_dim=24, num_layers=1, vocab_size=29)


def _recording_decoders(monkeypatch) -> list[tuple]:
    """Replaces `timing.greedy_decoder`; returns the log of (kv heads, input, output, seed) calls."""
    calls: list[tuple] = []

    def fake(config, params, *, batch, input_length, output_length, seed=0):
        return lambda: calls.append((config.num_kv_heads, input_length, output_length, seed))

    monkeypatch.setattr(timing, "greedy_decoder", fake)
    return calls


class _Clock:
    """`time` stand-in whose perf_counter() makes the n-th timed call (from 1) last n/10 seconds."""

    def __init__(self):
        self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        call = (self.reads + 1) // 2  # reads 2n-1 (start) and 2n (end) time call n
        return 100.0 * call + (0.1 * call if self.reads % 2 == 0 else 0.0)


def _check_structure(result, shapes, rounds, batch):
    names = ["MHA", "GQA-2", "MQA"]
    assert result["batch"] == batch and result["rounds"] == rounds and result["wall_s"] > 0
    assert result["variants"] == {"MHA": 4, "GQA-2": 2, "MQA": 1}
    config = result["config"]
    assert (config["emb_dim"], config["num_heads"], config["head_dim"], config["mlp_dim"]) == (16, 4, 4, 24)
    assert (config["num_encoder_layers"], config["num_decoder_layers"], config["vocab_size"]) == (1, 1, 29)
    assert config["dtype"] == "float32" and config["dropout_rate"] == 0.0
    assert list(result["decode_step_weight_bytes"]) == names
    assert [(s["input_length"], s["output_length"]) for s in result["shapes"]] == list(shapes)
    for shape in result["shapes"]:
        assert list(shape["time_per_sample"]) == names
        assert all(len(t) == rounds and min(t) > 0 for t in shape["time_per_sample"].values())
        assert len(shape["order"]) == rounds and all(sorted(o) == sorted(names) for o in shape["order"])
        n_in, n_out = shape["input_length"], shape["output_length"]
        for name, kv in result["variants"].items():
            width = 4 * kv * 4  # kv heads x head_dim x float32 bytes
            cache = shape["cache_bytes_per_sample"][name]
            # K and V of the one decoder layer: `output_length` self positions, `input_length` cross.
            assert cache == {"self": 2 * n_out * width, "cross": 2 * n_in * width,
                             "total": 2 * (n_in + n_out) * width}
            assert shape["cache_to_weight_ratio"][name] == pytest.approx(
                batch * cache["total"] / result["decode_step_weight_bytes"][name])


def test_result_holds_per_round_times_orders_and_cache_bytes_of_every_variant_and_shape(monkeypatch):
    _recording_decoders(monkeypatch)
    monkeypatch.setattr(timing, "time", _Clock())
    shapes, rounds, batch = ((6, 3), (4, 2)), 2, 2
    result = evaluation.time_random_variants(4, (4, 2, 1), shapes=shapes, batch=batch, rounds=rounds, seed=3,
                                             **TINY)
    assert result["seed"] == 3
    _check_structure(result, shapes, rounds, batch)
    # Timed call n lasts n/10 s (the warm-up calls are not timed), counted through the rounds in their orders.
    n = 0
    for shape in result["shapes"]:
        expected = {}
        for order in shape["order"]:
            for name in order:
                n += 1
                expected.setdefault(name, []).append(0.1 * n / batch)
        assert shape["time_per_sample"] == {k: pytest.approx(expected[k]) for k in shape["time_per_sample"]}


@pytest.mark.slow
def test_decodes_for_real_with_random_weights():
    shapes = ((6, 3),)
    result = evaluation.time_random_variants(4, (4, 2, 1), shapes=shapes, batch=2, rounds=2, seed=3, **TINY)
    _check_structure(result, shapes, rounds=2, batch=2)


def test_cache_bytes_fall_with_kv_heads(monkeypatch):
    _recording_decoders(monkeypatch)
    result = evaluation.time_random_variants(4, (4, 2, 1), shapes=((8, 4),), batch=2, rounds=1, **TINY)
    cache = result["shapes"][0]["cache_bytes_per_sample"]
    assert cache["MHA"]["total"] == 2 * cache["GQA-2"]["total"] == 4 * cache["MQA"]["total"]
    ratio = result["shapes"][0]["cache_to_weight_ratio"]
    assert ratio["MHA"] > ratio["GQA-2"] > ratio["MQA"]
    weights = result["decode_step_weight_bytes"]
    assert weights["MHA"] > weights["GQA-2"] > weights["MQA"]  # the self-attention k/v kernels shrink too


def test_every_variant_is_timed_once_per_round_in_that_rounds_random_order(monkeypatch):
    calls = _recording_decoders(monkeypatch)
    rounds = 6
    result = evaluation.time_random_variants(4, (4, 2, 1), shapes=((5, 2),), batch=2, rounds=rounds, seed=1,
                                             **TINY)
    name = {4: "MHA", 2: "GQA-2", 1: "MQA"}
    assert [name[c[0]] for c in calls[:3]] == ["MHA", "GQA-2", "MQA"]  # warm-up (compile), each once
    timed = [name[c[0]] for c in calls[3:]]
    order = result["shapes"][0]["order"]
    assert timed == [n for round_order in order for n in round_order]  # each variant once per round, as recorded
    assert all(sorted(o) == ["GQA-2", "MHA", "MQA"] for o in order)
    assert all(a != b for a, b in zip(order, order[1:]))  # the order changes every round
    assert {c[1:] for c in calls} == {(5, 2, 1)}  # every variant decodes the same seeded inputs
    assert all(len(t) == rounds for t in result["shapes"][0]["time_per_sample"].values())


def test_round_orders_are_reproducible_for_a_seed_and_differ_between_seeds_and_shapes(monkeypatch):
    _recording_decoders(monkeypatch)

    def orders(seed):
        result = evaluation.time_random_variants(4, (4, 2, 1), shapes=((5, 2), (5, 2)), batch=1, rounds=5,
                                                 seed=seed, **TINY)
        return [shape["order"] for shape in result["shapes"]]

    first = orders(0)
    assert orders(0) == first
    assert orders(1) != first
    assert first[0] != first[1]  # each shape draws its own orders


@pytest.mark.parametrize("kv_heads,message", [((4, 4), "each once"), ((), "at least one"),
                                              ((3,), "num_kv_heads")])
def test_refuses_repeated_missing_or_non_dividing_kv_heads(kv_heads, message, monkeypatch):
    _recording_decoders(monkeypatch)
    with pytest.raises(ValueError, match=message):
        evaluation.time_random_variants(4, kv_heads, shapes=((4, 2),), batch=1, rounds=1, **TINY)
