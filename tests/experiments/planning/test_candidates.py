"""Candidate kv-head configurations: cache bytes by hand and as allocated, the budget, divisibility, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from gqa_t5x.experiments.bench import memory
from gqa_t5x.experiments.planning import candidates as lib
from gqa_t5x.experiments.planning import planner
from gqa_t5x.model import initialization, param_tree
from gqa_t5x.model.config import T5Config

BATCH, INPUT, OUTPUT = 3, 5, 7
SOURCE = T5Config(vocab_size=32, emb_dim=8, num_heads=4, head_dim=2, mlp_dim=8, num_encoder_layers=1,
                  num_decoder_layers=2, dropout_rate=0.0)
F32 = planner.Device("test", 1.0, 1.0, "float32", "hand-made")


@pytest.fixture(scope="module")
def params():
    return initialization.init_params(SOURCE, 0)


def _hand_numbers(self_kv, cross_kv):
    """2 (key and value) x batch x kv heads x head_dim x cached positions, summed over the layers."""
    hd = SOURCE.head_dim
    return {"self": sum(2 * BATCH * g * hd * OUTPUT for g in self_kv),
            "cross": sum(2 * BATCH * g * hd * INPUT for g in cross_kv)}


@pytest.mark.parametrize("family,self_kv,cross_kv", [
    ("uniform", (2, 2), (2, 2)),
    ("self-cross", (1, 1), (4, 4)),
    ("per-layer", (1, 4), (2, 1)),
])
def test_kv_bytes_equal_hand_counts_and_the_cache_the_model_allocates(family, self_kv, cross_kv):
    candidate = lib.Candidate(family, self_kv, cross_kv)
    config = candidate.config(SOURCE)
    hand = _hand_numbers(self_kv, cross_kv)
    per_head = lib.numbers_per_head(SOURCE, BATCH, INPUT, OUTPUT)
    assert lib.kv_numbers(candidate, per_head) == hand["self"] + hand["cross"]
    predicted = planner.predict(config, F32, batch=BATCH, input_length=INPUT, output_length=OUTPUT)["kv_bytes"]
    assert predicted == {"self": 4 * hand["self"], "cross": 4 * hand["cross"],
                         "total": 4 * (hand["self"] + hand["cross"])}
    allocated = memory.cache_bytes(config, BATCH, INPUT, OUTPUT)
    assert allocated == {"self": predicted["self"], "cross": predicted["cross"]}


def test_uniform_and_self_cross_families_list_every_divisor_and_pair(params):
    proxy = lib.pooling_errors(SOURCE, params)
    assert [c.self_kv for c in lib.uniform_candidates(SOURCE)] == [(4, 4), (2, 2), (1, 1)]
    pairs = {(c.self_kv, c.cross_kv) for c in lib.self_cross_candidates(SOURCE, proxy)}
    expected = {((s, s), (c, c)) for s in (1, 2, 4) for c in (1, 2, 4) if s != c}
    assert pairs == expected


def test_pooling_error_is_zero_at_the_source_count_and_for_identical_heads(params):
    proxy = lib.pooling_errors(SOURCE, params)
    assert all(errors[4] == 0.0 for errors in proxy.values())
    assert all(errors[1] >= errors[2] > 0 for errors in proxy.values())
    flat = {k: np.asarray(v) for k, v in param_tree.flatten(params).items()}
    for p in ("key", "value"):  # every head of layer 0's self-attention the same: pooling loses nothing
        kernel = flat[f"decoder/layers_0/self_attention/{p}/kernel"]
        flat[f"decoder/layers_0/self_attention/{p}/kernel"] = np.tile(kernel[:, :SOURCE.head_dim], (1, 4))
    same = lib.pooling_errors(SOURCE, param_tree.unflatten(flat))
    assert same[("self", 0)] == {1: 0.0, 2: 0.0, 4: 0.0}


def test_per_layer_candidates_fit_the_budget_divide_the_source_and_are_maximal(params):
    proxy = lib.pooling_errors(SOURCE, params)
    per_head = lib.numbers_per_head(SOURCE, BATCH, INPUT, OUTPUT)
    source_numbers = lib.kv_numbers(lib.uniform_candidates(SOURCE)[0], per_head)
    budget = 0.4 * source_numbers
    found = lib.per_layer_candidates(SOURCE, proxy, per_head, budget, limit=100)
    assert found
    for candidate in found:
        numbers = lib.kv_numbers(candidate, per_head)
        assert numbers <= budget
        assert all(4 % g == 0 for g in (*candidate.self_kv, *candidate.cross_kv))
        assert len(set(candidate.self_kv)) > 1 or len(set(candidate.cross_kv)) > 1  # not uniform / self-cross
        for kind, counts in (("self", candidate.self_kv), ("cross", candidate.cross_kv)):
            for g in counts:  # raising any slot to its next count would exceed the budget
                if g < 4:
                    assert numbers + per_head[kind] * g > budget
    errors = [sum(proxy[("self", i)][g] for i, g in enumerate(c.self_kv))
              + sum(proxy[("cross", i)][g] for i, g in enumerate(c.cross_kv)) for c in found]
    assert errors == sorted(errors)
    assert lib.per_layer_candidates(SOURCE, proxy, per_head, budget, limit=2) == found[:2]


def test_greedy_search_of_a_large_space_fits_the_budget_and_is_maximal(params, monkeypatch):
    monkeypatch.setattr(lib, "ENUMERATE_LIMIT", 1)
    proxy = lib.pooling_errors(SOURCE, params)
    per_head = lib.numbers_per_head(SOURCE, BATCH, INPUT, OUTPUT)
    budget = 0.3 * lib.kv_numbers(lib.uniform_candidates(SOURCE)[0], per_head)
    found = lib.per_layer_candidates(SOURCE, proxy, per_head, budget, limit=8)
    assert len(found) <= 1
    for candidate in found:
        numbers = lib.kv_numbers(candidate, per_head)
        assert numbers <= budget
        for kind, counts in (("self", candidate.self_kv), ("cross", candidate.cross_kv)):
            assert all(g == 4 or numbers + per_head[kind] * g > budget for g in counts)
    assert lib.per_layer_candidates(SOURCE, proxy, per_head, 0.0, limit=8) == []  # nothing fits


def test_generate_is_deterministic_ordered_and_cut_by_max_candidates(params):
    shape = dict(batch=BATCH, input_length=INPUT, output_length=OUTPUT)
    budget = 0.4 * lib.kv_numbers(lib.uniform_candidates(SOURCE)[0], lib.numbers_per_head(SOURCE, **shape))
    first, info = lib.generate(SOURCE, params, **shape, budget_numbers=budget, groupings=("contiguous", "similarity"))
    again, _ = lib.generate(SOURCE, params, **shape, budget_numbers=budget, groupings=("contiguous", "similarity"))
    assert first == again
    families = [c.family for c in first]
    assert families == sorted(families, key=lib.FAMILIES.index)
    assert [c.grouping for c in first if c.is_source(SOURCE)] == ["contiguous"]  # the source appears once
    assert info["generated"] == len(first) and info["dropped"] == 0
    cut, cut_info = lib.generate(SOURCE, params, **shape, budget_numbers=budget, max_candidates=4)
    assert cut == [c for c in first if c.grouping == "contiguous"][:4] and cut_info["dropped"] > 0
    with pytest.raises(ValueError, match="groupings"):
        lib.generate(SOURCE, params, **shape, budget_numbers=budget, groupings=("nearest",))


def test_candidate_names_and_configs():
    assert lib.Candidate("uniform", (2, 2), (2, 2)).name == "G=2"
    assert lib.Candidate("self-cross", (1, 1), (4, 4), "similarity").name == "self=1,cross=4 sim"
    per_layer = lib.Candidate("per-layer", (1, 4), (2, 1))
    assert per_layer.name == "self=(1,4),cross=(2,1)"
    config = per_layer.config(SOURCE)
    assert [config.kv_heads("self", i) for i in (0, 1)] == [1, 4]
    assert [config.kv_heads("cross", i) for i in (0, 1)] == [2, 1]
    assert lib.Candidate("uniform", (2, 2), (2, 2)).config(SOURCE) == SOURCE.replace(num_kv_heads=2)
