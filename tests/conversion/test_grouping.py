"""Groupings: contiguous (default) and chosen by similarity; head permutations; records."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from conversion_utils import flat, our_logits, random_params, tiny_config, tokens
from gqa_t5x import conversion
from gqa_t5x.conversion import calibration, grouping
from gqa_t5x.model import param_tree

D = 8  # head_dim of tiny_config
SELF, CROSS, ENC = "self_attention", "encoder_decoder_attention", "attention"


def _batches(config, count: int = 3) -> list[dict]:
    out = []
    for seed in range(count):
        enc, dec_in, tgt = tokens(seed, config.vocab_size, batch=4, enc_len=9, dec_len=7)
        out.append({"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt})
    return out


def _prefixes(config, stack: str, module: str) -> list[str]:
    count = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
    return [f"{stack}/layers_{i}/{module}" for i in range(count)]


def _permuted(config, params, orders: dict[str, tuple[int, ...]], relpos: dict[str, tuple[int, ...]]) -> dict:
    """`params` with the heads of the given layers and the rows of the given relpos biases permuted."""
    out = dict(flat(params))
    for prefix, order in orders.items():
        kernels = {p: out[f"{prefix}/{p}/kernel"] for p in param_tree.ATTENTION_PROJECTIONS}
        for p, kernel in grouping.permute_heads(kernels, order, num_heads=config.num_heads,
                                                head_dim=config.head_dim).items():
            out[f"{prefix}/{p}/kernel"] = kernel
    for stack, order in relpos.items():
        path = f"{stack}/relpos_bias/rel_embedding"
        out[path] = grouping.permute_relpos(out[path], order)
    return param_tree.unflatten(out)


def _duplicated(config, params, pairs=((0, 2), (1, 3))) -> dict:
    """Every layer's key/value head b set to head a, for each (a, b): duplicates sit non-contiguously."""
    out = {k: np.array(v) for k, v in flat(params).items()}
    for path, value in out.items():
        split = conversion.split_attention_path(path)
        if split and split[1] in ("key", "value"):
            for a, b in pairs:
                value[:, b * D:(b + 1) * D] = value[:, a * D:(a + 1) * D]
    return param_tree.unflatten(out)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------ permutations
@pytest.mark.slow  # 10 s; the fast tier keeps the lossless similarity merge
@pytest.mark.parametrize("source_kv", [4, pytest.param(2, marks=pytest.mark.slow)])
def test_permuting_heads_of_encoder_self_with_relpos_and_cross_attention_leaves_logits_unchanged(source_kv):
    config = tiny_config(num_kv_heads=source_kv, encoder_num_kv_heads=source_kv)
    params = random_params(config, seed=1)
    batch = tokens(3, config.vocab_size)
    heads = list(range(source_kv))
    enc_order, self_order = tuple(heads[::-1]), tuple(heads[1:] + heads[:1])
    orders = {p: enc_order for p in _prefixes(config, "encoder", ENC)}
    orders.update({p: self_order for p in _prefixes(config, "decoder", SELF)})
    orders.update({p: tuple(heads[i + 1:] + heads[:i + 1]) if i + 1 < source_kv else tuple(heads[::-1])
                   for i, p in enumerate(_prefixes(config, "decoder", CROSS))})
    relpos = {"encoder": tuple(grouping.query_order(enc_order, 4)),
              "decoder": tuple(grouping.query_order(self_order, 4))}
    assert enc_order != tuple(range(source_kv)) and self_order != tuple(range(source_kv))
    permuted = _permuted(config, params, orders, relpos)
    np.testing.assert_allclose(our_logits(config, permuted, batch), our_logits(config, params, batch),
                               rtol=1e-5, atol=1e-5)
    # Without the relpos rows the self-attention permutation changes the function.
    unmatched = _permuted(config, params, orders, {})
    assert _relative(our_logits(config, unmatched, batch), our_logits(config, params, batch)) > 1e-3


def test_query_order_moves_each_kv_heads_query_heads_with_it():
    np.testing.assert_array_equal(grouping.query_order((1, 0), 4), [2, 3, 0, 1])
    np.testing.assert_array_equal(grouping.query_order((2, 0, 1), 3), [2, 0, 1])


# ---------------------------------------------------------------- criterion
def test_pair_costs_are_the_calibration_weighted_kernel_differences():
    rng = np.random.default_rng(0)
    emb, s = 6, 3
    kernels = {p: rng.standard_normal((emb, s * 2)) for p in ("key", "value")}
    a = rng.standard_normal((emb, emb))
    moment = a @ a.T
    got = grouping.pair_costs(kernels, moment, 2)
    for i, j in itertools.product(range(s), repeat=2):
        expected = sum(np.trace((w[:, 2 * i:2 * i + 2] - w[:, 2 * j:2 * j + 2]).T @ moment
                                @ (w[:, 2 * i:2 * i + 2] - w[:, 2 * j:2 * j + 2])) for w in kernels.values())
        np.testing.assert_allclose(got[i, j], expected, rtol=1e-9, atol=1e-9)


def test_rotation_invariant_costs_are_zero_for_rotated_copies_and_the_aligned_residual_otherwise():
    rng = np.random.default_rng(1)
    emb, d = 7, 3
    base = {p: rng.standard_normal((emb, d)) for p in ("key", "value")}
    rot = {p: np.linalg.qr(rng.standard_normal((d, d)))[0] for p in ("key", "value")}
    other = {p: rng.standard_normal((emb, d)) for p in ("key", "value")}
    kernels = {p: np.concatenate([base[p], base[p] @ rot[p], other[p]], axis=1) for p in ("key", "value")}
    moment = np.eye(emb)
    plain = grouping.pair_costs(kernels, moment, d)
    invariant = grouping.pair_costs(kernels, moment, d, rotation_invariant=True)
    assert plain[0, 1] > 1.0 and invariant[0, 1] < 1e-9
    # Against the orthogonal Procrustes residual min_R ||X R - Y||^2 computed directly.
    expected = 0.0
    for p in ("key", "value"):
        u, _, vt = np.linalg.svd(base[p].T @ other[p])
        expected += np.sum((base[p] @ u @ vt - other[p]) ** 2)
    np.testing.assert_allclose(invariant[0, 2], expected, rtol=1e-9)


# ------------------------------------------------------------ partition
def _brute_force(costs, s: int) -> float:
    return min(grouping.grouping_cost(order, costs) for order in itertools.permutations(range(s)))


def _random_costs(rng, s: int, sizes) -> list:
    costs = []
    for n in sizes:
        x = rng.standard_normal((s, 3))
        costs.append((((x[:, None] - x[None]) ** 2).sum(-1), n))
    return costs


@pytest.mark.parametrize("s,sizes", [(4, (2,)), (6, (2,)), (6, (3,)),
                                     *(pytest.param(s, g, marks=pytest.mark.slow)  # seconds each: exhaustive search
                                       for s, g in ((8, (2,)), (8, (4,)), (8, (4, 2)), (8, (2, 2, 4))))])
def test_partition_finds_the_exhaustive_optimum_on_small_cases_with_nested_group_sizes(s, sizes):
    rng = np.random.default_rng(s * 10 + len(sizes))
    for _ in range(4):
        costs = _random_costs(rng, s, sizes)
        order = grouping.partition(costs)
        assert sorted(order) == list(range(s))
        np.testing.assert_allclose(grouping.grouping_cost(order, costs), _brute_force(costs, s), rtol=1e-9)


def test_partition_with_group_sizes_that_do_not_nest_ends_where_no_swap_of_two_heads_helps():
    rng = np.random.default_rng(5)
    costs = _random_costs(rng, 6, (3, 2))
    order = list(grouping.partition(costs))
    value = grouping.grouping_cost(order, costs)
    for a, b in itertools.combinations(range(6), 2):
        swapped = list(order)
        swapped[a], swapped[b] = swapped[b], swapped[a]
        assert grouping.grouping_cost(swapped, costs) >= value - 1e-12


def test_partition_is_contiguous_when_contiguous_is_optimal_and_canonical_otherwise():
    dist = np.ones((6, 6)) - np.kron(np.eye(3), np.ones((2, 2)))  # pairs (0,1), (2,3), (4,5) are free
    assert grouping.partition([(dist, 2)]) == (0, 1, 2, 3, 4, 5)
    swapped = dist[np.ix_([0, 2, 1, 3, 4, 5], [0, 2, 1, 3, 4, 5])]  # free pairs (0,2), (1,3), (4,5)
    assert grouping.partition([(swapped, 2)]) == (0, 2, 1, 3, 4, 5)
    assert grouping.partition([(swapped, 6)]) == tuple(range(6))  # one group: nothing to choose


# ------------------------------------------------------------ conversions
@pytest.fixture(scope="module")
def duplicated():
    """A source whose kv heads 0 == 2 and 1 == 3 in every layer, with its calibration statistics."""
    config = tiny_config()
    params = _duplicated(config, random_params(config, seed=7))
    return config, params, calibration.collect_statistics(config, params, _batches(config))


@pytest.mark.parametrize("targets", [dict(num_kv_heads=2, convert_encoder=True),
                                     dict(decoder_self_kv_heads=(2, 4), decoder_cross_kv_heads=(4, 2))])
def test_similarity_mean_merges_non_contiguous_duplicate_heads_losslessly_where_contiguous_does_not(
        duplicated, targets):
    config, params, stats = duplicated
    batch = tokens(11, config.vocab_size)
    source = our_logits(config, params, batch)
    target, similar = conversion.convert(config, params, method="mean", grouping="similarity",
                                         calibration=stats, **targets)
    _, contiguous = conversion.convert(config, params, method="mean", **targets)
    np.testing.assert_allclose(our_logits(target, similar, batch), source, rtol=1e-5, atol=1e-5)
    assert _relative(our_logits(target, contiguous, batch), source) > 1e-2
    if "decoder_self_kv_heads" in targets:  # layer 1 keeps 4 heads but follows the stack's order
        order = (0, 2, 1, 3)
        q = flat(params)["decoder/layers_1/self_attention/query/kernel"]
        np.testing.assert_array_equal(flat(similar)["decoder/layers_1/self_attention/query/kernel"],
                                      q.reshape(-1, 4, D)[:, list(order)].reshape(q.shape))


def test_contiguous_grouping_and_its_record_give_the_default_conversion_bit_for_bit():
    config = tiny_config()
    params = random_params(config, seed=2)
    for method in ("mean", "align"):
        _, default = conversion.convert(config, params, 2, method=method)
        _, named = conversion.convert(config, params, 2, method=method, grouping="contiguous")
        plan = conversion.plan_conversion(config, 2, method=method)
        record = grouping.resolve(plan, "contiguous", None, lambda path: None).record()
        assert record["layers"]["decoder/layers_0/self_attention"] == [[0, 1], [2, 3]]
        assert record["relpos_permutations"] == {"decoder": [0, 1, 2, 3]}
        _, reproduced = conversion.convert(config, params, 2, method=method, grouping=record)
        for path, value in flat(default).items():
            assert flat(named)[path] is value or np.array_equal(flat(named)[path], value), path
            assert np.asarray(flat(reproduced)[path]).tobytes() == np.asarray(value).tobytes(), path


@pytest.mark.parametrize("method", ["mean", pytest.param("align", marks=pytest.mark.slow)])
def test_streaming_similarity_equals_in_memory_and_its_record_reproduces_it_without_calibration(
        duplicated, tmp_path, method):
    from gqa_t5x import checkpoints

    config, params, stats = duplicated
    checkpoints.save(tmp_path / "mha", config, params)
    stats_path = calibration.save_statistics(tmp_path / "stats.npz", stats)
    conversion.convert_checkpoint(tmp_path / "mha", tmp_path / "sim", 2, method=method, grouping="similarity",
                                  calibration=str(stats_path), convert_encoder=True, progress=False)
    _, in_memory = conversion.convert(config, params, 2, method=method, grouping="similarity", calibration=stats,
                                      convert_encoder=True)
    with checkpoints.open_checkpoint(tmp_path / "sim") as reader:
        record = reader.metadata["conversion"]["grouping"]
        streamed = {key: reader.read(key) for key in reader.keys()}
    assert record["name"] == "similarity"
    assert record["layers"]["decoder/layers_1/encoder_decoder_attention"] == [[0, 2], [1, 3]]
    assert record["relpos_permutations"] == {"encoder": [0, 2, 1, 3], "decoder": [0, 2, 1, 3]}
    for path, value in flat(in_memory).items():
        assert streamed[path].tobytes() == np.asarray(value, streamed[path].dtype).tobytes(), path
    (tmp_path / "record.json").write_text(json.dumps({"conversion": {"grouping": record}}))
    for i, spec in enumerate((str(tmp_path / "sim"), str(tmp_path / "record.json"))):
        conversion.convert_checkpoint(tmp_path / "mha", tmp_path / f"again{i}", 2, method=method, grouping=spec,
                                      convert_encoder=True, progress=False)
        with checkpoints.open_checkpoint(tmp_path / f"again{i}") as reader:
            assert reader.metadata["conversion"]["grouping"]["layers"] == record["layers"]
            assert reader.metadata["conversion"]["grouping"]["reproduced_from"] == spec
            for key in reader.keys():
                assert reader.read(key).tobytes() == streamed[key].tobytes(), key


# ------------------------------------------------------------ statistics
@pytest.mark.slow
def test_key_second_moment_is_the_encoder_outputs_second_moment_and_old_files_still_load(tmp_path):
    from gqa_t5x.model import network

    config = tiny_config()
    params = random_params(config, seed=3)
    batches = _batches(config, 2)
    stats = calibration.collect_statistics(config, params, batches)
    assert calibration.KEY_SECOND_MOMENT not in stats["decoder/layers_0/self_attention"]
    assert calibration.KEY_SECOND_MOMENT not in stats["encoder/layers_0/attention"]
    model = network.Transformer(config)
    sums, count = 0.0, 0
    for b in batches:
        encoded = np.asarray(model.apply({"params": params}, b["encoder_input_tokens"], enable_dropout=False,
                                         method=model.encode), np.float64)
        rows = encoded[b["encoder_input_tokens"] > 0]
        sums, count = sums + rows.T @ rows, count + len(rows)
    for i in range(config.num_decoder_layers):
        got = stats[f"decoder/layers_{i}/{CROSS}"]
        assert int(got[calibration.KEY_TOKENS]) == count
        np.testing.assert_allclose(got[calibration.KEY_SECOND_MOMENT], sums / count, rtol=1e-5, atol=1e-6)
    old = {prefix: {k: v for k, v in layer.items() if not k.startswith("key_")} for prefix, layer in stats.items()}
    back = calibration.load_statistics(calibration.save_statistics(tmp_path / "old.npz", old))
    assert set(back) == set(stats) and calibration.KEY_SECOND_MOMENT not in back[f"decoder/layers_0/{CROSS}"]


# ------------------------------------------------------------ errors
def test_similarity_without_the_cross_key_statistic_is_refused_naming_layer_and_statistic(duplicated, tmp_path):
    from gqa_t5x import checkpoints

    config, params, stats = duplicated
    old = {prefix: {k: v for k, v in layer.items() if not k.startswith("key_")} for prefix, layer in stats.items()}
    checkpoints.save(tmp_path / "mha", config, params)
    with pytest.raises(ValueError, match=r"decoder/layers_0/encoder_decoder_attention: grouping='similarity' needs "
                                         r"the calibration statistic 'key_second_moment'.*collect_statistics"):
        conversion.convert_checkpoint(tmp_path / "mha", tmp_path / "out", 2, grouping="similarity",
                                      calibration=old, progress=False)
    with pytest.raises(ValueError, match="grouping='similarity' needs calibration statistics.*--calibration"):
        conversion.convert(config, params, 2, grouping="similarity")
    # Self-attention alone needs only the query statistics every file has.
    conversion.convert(config, params, decoder_self_kv_heads=2, grouping="similarity", calibration=old)
    assert not (tmp_path / "out").exists()


def test_unknown_grouping_names_and_mismatched_records_are_refused_naming_the_problem(duplicated):
    config, params, stats = duplicated
    with pytest.raises(ValueError, match=r"Unknown grouping 'simlarity': choose one of \['contiguous', 'similarity'\]"):
        conversion.convert(config, params, 2, grouping="simlarity")
    plan = conversion.plan_conversion(config, 2)
    record = grouping.resolve(plan, "similarity", stats, lambda path: flat(params)[path]).record()
    with pytest.raises(ValueError, match=r"decoder/layers_0/self_attention: the grouping record has groups of sizes "
                                         r"\[2, 2\] but the request merges 4 key/value heads into 1"):
        conversion.convert(config, params, 1, grouping=record)
    with pytest.raises(ValueError, match="encoder/layers_0/attention: this conversion changes the layer but the "
                                         "grouping record has no groups for it"):
        conversion.convert(config, params, 2, convert_encoder=True, grouping=record)
    with pytest.raises(ValueError, match="decoder/layers_0/encoder_decoder_attention: the grouping record has "
                                         "groups for this layer but this conversion does not change it"):
        conversion.convert(config, params, decoder_self_kv_heads=2, grouping=record)
    bad = json.loads(json.dumps(record))
    bad["layers"]["decoder/layers_1/self_attention"] = [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="decoder/layers_1/self_attention: the recorded groups do not match the "
                                         "recorded relpos permutation"):
        conversion.convert(config, params, 2, grouping=bad)
    with pytest.raises(ValueError, match="holds no grouping record"):
        conversion.convert(config, params, 2, grouping={"method": "mean"})
