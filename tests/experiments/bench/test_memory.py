"""The bench's memory planning: the estimate against XLA's own buffer assignment,
the batch that fits, and the paper preset on an 80 GB chip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from gqa_t5x.experiments.bench import memory
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config


def test_batch_is_halved_until_the_memory_estimate_fits():
    config = T5Config(vocab_size=100, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                      num_encoder_layers=1, num_decoder_layers=1)
    need = {b: memory.estimate_peak_bytes(config, b, 256, 32) for b in (1, 2, 4, 8)}
    assert need[1] < need[2] < need[4] < need[8]
    assert memory.pick_batch(config, 8, 256, 32, budget=None) == (8, "batch 8 as asked (no memory budget known)")
    assert memory.pick_batch(config, 8, 256, 32, budget=need[8])[0] == 8
    batch, why = memory.pick_batch(config, 8, 256, 32, budget=need[4])
    assert batch == 4 and why.startswith("batch 4, not the 8 asked: batch 8 needs an estimated")
    assert memory.pick_batch(config, 8, 256, 32, budget=need[2] - 1)[0] == 1


def _xxl(**changes):
    from gqa_t5x import gin_config

    return gin_config.model_config_from_gin("gin/models/t5_1_1/xxl.gin").replace(
        dtype="bfloat16", param_dtype="bfloat16", num_kv_heads=None, **changes)


@pytest.mark.slow  # traces the XXL network of each variant (about 10 s)
def test_the_paper_preset_batch_32_fits_an_80_gb_chip_with_query_blocks_and_is_told_why_not_without():
    """XXL 24+24, in 2048, out 512, batch 32, bfloat16 weights, MHA / GQA-8 / MQA.

    The multi-head weights (22 GB) stay beside the MHA cache (32 GB), the
    peak phase once the encoder attends in blocks of 256 queries; with one
    block the encoder's float32 logits ([32, 64, 2048, 2048], 34 GB each)
    rule batch 32 out, and the reason names the flags that change it.
    """
    from gqa_t5x.experiments.bench import presets

    paper = presets.PRESETS["paper"]
    xxl = _xxl(attention_query_chunk=paper["attention_query_chunk"])
    kv = paper["num_kv_heads"]
    weights = memory.weight_bytes(xxl)
    assert 21e9 < weights < 23e9  # ~22 GB of bfloat16 weights (44.5 GB in float32)
    cache = memory.cache_bytes(xxl, 32, 2048, 512)
    assert 25e9 < cache["cross"] < 28e9  # the MHA cross-attention cache at batch 32
    need = memory.estimate_peak_bytes(xxl, 32, 2048, 512, kv)
    assert need == weights + 32 * 2048 * 4096 * 2 + sum(cache.values()) + int(1.5 * 32 * 32128 * 4)
    chip_80gb = int(paper["memory_fraction"] * 0.75 * 80 * 2**30)  # JAX takes 75% of the device by default
    assert memory.pick_batch(xxl, 32, 2048, 512, chip_80gb, kv)[0] == 32
    assert not memory.variants_fit_together(xxl, kv, 32, 2048, 512, chip_80gb)
    assert memory.variants_fit_together(xxl, kv, 32, 2048, 512, None)

    whole = xxl.replace(attention_query_chunk=None)
    batch, why = memory.pick_batch(whole, 32, 2048, 512, chip_80gb, kv)
    assert batch < 32 and "not the 32 asked" in why and "a smaller --attention_query_chunk" in why
    assert memory.estimate_peak_bytes(whole, 32, 2048, 512, kv) > 2 * need


def _encoder_memory(config, batch: int, length: int):
    """XLA's buffer assignment of the encoder, compiled from shapes alone (nothing allocated)."""
    from gqa_t5x.model import layer_stack, network

    model = network.Transformer(config)
    params = jax.eval_shape(lambda p: layer_stack.model_params(p, config), param_tree.abstract_params(config))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, enable_dropout=False,
                                              method=network.Transformer.encode))
    return encode.lower(params, tokens).compile().memory_analysis()


_SMALL = T5Config(vocab_size=256, emb_dim=128, num_heads=8, head_dim=16, mlp_dim=256, num_encoder_layers=2,
                  num_decoder_layers=1, dropout_rate=0.0)


@pytest.mark.parametrize("config,batch,length", [
    pytest.param(_SMALL.replace(dtype="float32"), 4, 1024, id="small-f32"),
    pytest.param(_SMALL.replace(dtype="float32", scan_layers=True), 4, 1024, id="small-f32-scan"),
    pytest.param(_SMALL.replace(dtype="bfloat16", param_dtype="bfloat16"), 4, 1024, id="small-bf16"),
    pytest.param("xxl-layer", 32, 2048, id="xxl-one-layer-bf16"),
])
@pytest.mark.parametrize("chunk", [None, 256, 128])
def test_the_encoder_memory_estimate_covers_xlas_buffer_assignment(config, batch, length, chunk):
    """The estimate's encoder phase against XLA:CPU's own temporaries + output (not vacuous: within 2.5x).

    One XXL layer stands for the stack: XLA:CPU widens bfloat16 weights to
    float32 for its products, so a whole bfloat16 XXL stack holds a float32
    copy of the weights that accelerators, which multiply bfloat16, do not.
    """
    config = (_xxl(num_encoder_layers=1, scan_layers=True) if config == "xxl-layer" else config).replace(
        attention_query_chunk=chunk)
    assigned = _encoder_memory(config, batch, length)
    held = assigned.temp_size_in_bytes + assigned.output_size_in_bytes
    encoded = batch * length * config.emb_dim * config.activation_dtype.itemsize
    estimate = memory.encoder_activation_bytes(config, batch, length) + encoded
    print(f"held {held / 1e6:.0f} MB, estimate {estimate / 1e6:.0f} MB ({estimate / held:.2f}x)")
    assert held <= estimate <= 2.5 * held, (held / 1e6, estimate / 1e6)
