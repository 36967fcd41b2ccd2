"""Helpers shared by the conversion, export and CLI tests."""

from __future__ import annotations

import functools

import numpy as np

from gqa_t5x import conversion
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config

from paths import SHARED  # noqa: E402
T5X_TINY = SHARED / "fixtures" / "t5x" / "t5_1_1_tiny" / "checkpoint_0"

# HuggingFace sizes of the small random T5 v1.1 used for round trips.
HF_SIZES = dict(vocab_size=53, d_model=24, num_heads=4, d_kv=6, d_ff=40, num_layers=2, num_decoder_layers=2)


def tiny_config(**changes) -> T5Config:
    """A small float32 T5.1.1 config (4 heads of 8, 2+2 layers)."""
    base = dict(
        vocab_size=41, dtype="float32", emb_dim=32, num_heads=4, num_encoder_layers=2,
        num_decoder_layers=2, head_dim=8, mlp_dim=48, dropout_rate=0.0,
    )
    base.update(changes)
    return T5Config(**base)


def random_params(config: T5Config, seed: int = 0) -> dict:
    """T5X-initialised params as nested float32 numpy arrays; norms perturbed."""
    return param_tree.unflatten(dict(_random_flat_params(config, seed)))


@functools.lru_cache(maxsize=16)
def _random_flat_params(config: T5Config, seed: int) -> dict[str, np.ndarray]:
    from gqa_t5x.model import initialization

    params = param_tree.flatten(initialization.init_params(config, seed=seed))
    rng = np.random.default_rng(seed + 100)
    out = {}
    for path, value in params.items():
        value = np.asarray(value, np.float32)
        if path.endswith("/scale"):
            value = (1.0 + 0.2 * rng.standard_normal(value.shape)).astype(np.float32)
        if path.endswith("rel_embedding"):
            value = rng.standard_normal(value.shape).astype(np.float32)
        value.setflags(write=False)  # shared by the cache: never mutate
        out[path] = value
    return out


def tokens(seed: int, vocab: int, batch: int = 2, enc_len: int = 9, dec_len: int = 7):
    """(encoder tokens, decoder inputs, decoder targets); row 1 padded."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab, size=(batch, enc_len)).astype(np.int32)
    tgt = rng.integers(2, vocab, size=(batch, dec_len)).astype(np.int32)
    enc[1, enc_len - 3 :] = 0
    tgt[1, dec_len - 2 :] = 0
    dec_in = np.zeros_like(tgt)
    dec_in[:, 1:] = tgt[:, :-1]
    return enc, dec_in, tgt


def our_logits(config: T5Config, params, batch) -> np.ndarray:
    """Teacher-forced logits of our network, dropout off."""
    from gqa_t5x.model import network

    enc, dec_in, tgt = batch
    model = network.Transformer(config)
    return np.asarray(
        model.apply({"params": params}, enc, dec_in, tgt, enable_dropout=False), np.float64
    )


def make_hf_t5_v1_1(seed: int = 0, **sizes):
    """A random HuggingFace T5 v1.1 (gated-gelu, UNTIED lm_head), eval mode.

    transformers 5.x ties `lm_head` to `shared` on construction even with
    tie_word_embeddings=False; a separate lm_head parameter is installed here
    so the model has T5.1.1's layout. Norm scales are perturbed from 1.
    """
    import torch
    import transformers

    sizes = {**HF_SIZES, **sizes}
    torch.manual_seed(seed)
    hf_config = transformers.T5Config(
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **sizes,
    )
    model = transformers.T5ForConditionalGeneration(hf_config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(
            torch.randn(model.lm_head.weight.shape, generator=gen) * sizes["d_model"] ** -0.5
        )
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
    return model.eval()


def hf_logits(model, batch) -> np.ndarray:
    """HuggingFace logits with T5X-style padding masks (0 = padding)."""
    import torch

    enc, dec_in, tgt = batch
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(enc.astype(np.int64)),
            attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
            decoder_input_ids=torch.from_numpy(dec_in.astype(np.int64)),
            decoder_attention_mask=torch.from_numpy((tgt > 0).astype(np.int64)),
        )
    return out.logits.numpy().astype(np.float64)


def config_for_hf(model) -> T5Config:
    """Our config of a model made by `make_hf_t5_v1_1` (untied logits)."""
    c = model.config
    return T5Config(
        vocab_size=c.vocab_size, dtype="float32", emb_dim=c.d_model, num_heads=c.num_heads,
        num_encoder_layers=c.num_layers, num_decoder_layers=c.num_decoder_layers,
        head_dim=c.d_kv, mlp_dim=c.d_ff, dropout_rate=0.0, logits_via_embedding=False,
    )


def flat(params) -> dict[str, np.ndarray]:
    """Nested params -> {path: float32 numpy array}."""
    return {k: np.asarray(v, np.float32) for k, v in param_tree.flatten(params).items()}


def masked_max_diff(a: np.ndarray, b: np.ndarray, tgt: np.ndarray) -> float:
    """Max |a - b| over non-padding decoder positions."""
    keep = tgt > 0
    return float(np.abs(a - b)[keep].max())


def rotated_heads_params(config, seed=0, noise=0.05):
    """Params whose heads, in every converted layer, are rotations of head 0.

    Head h: Q_h = Q_0 R_h, K_h = K_0 R_h + noise, V_h = V_0 S_h + noise,
    O_h = S_h^T O_0 (R_h, S_h random orthogonal), so all heads compute (nearly)
    the same thing in different bases: the case align is designed for.
    """
    rng = np.random.default_rng(seed)
    p = flat(random_params(config, seed))
    d, heads = config.head_dim, config.num_heads

    def orth():
        q, r = np.linalg.qr(rng.standard_normal((d, d)))
        return q * np.sign(np.diag(r))

    for path in list(p):
        split = conversion.split_attention_path(path)
        if not split or split[1] != "key" or "/attention" in split[0]:
            continue
        pre = split[0]
        q, k, v, o = (p[f"{pre}/{x}/kernel"] for x in ("query", "key", "value", "out"))
        rs, ss = [orth() for _ in range(heads)], [orth() for _ in range(heads)]
        q0, k0, v0, o0 = q[:, :d], k[:, :d], v[:, :d], o[:d]
        scale_k, scale_v = noise * k0.std(), noise * v0.std()
        p[f"{pre}/query/kernel"] = np.concatenate([q0 @ r for r in rs], 1).astype(np.float32)
        p[f"{pre}/key/kernel"] = np.concatenate([k0 @ r + scale_k * rng.standard_normal(k0.shape) for r in rs], 1).astype(np.float32)
        p[f"{pre}/value/kernel"] = np.concatenate([v0 @ s + scale_v * rng.standard_normal(v0.shape) for s in ss], 1).astype(np.float32)
        p[f"{pre}/out/kernel"] = np.concatenate([s.T @ o0 for s in ss], 0).astype(np.float32)
    return param_tree.unflatten(p)


def relative_logit_error(config, params, groups, method, batch) -> float:
    """||logits after conversion - before|| / ||before|| over non-padding positions."""
    reference = our_logits(config, params, batch)
    new_config, new_params = conversion.convert(config, params, groups, method=method)
    got = our_logits(new_config, new_params, batch)
    keep = batch[2] > 0
    return float(np.linalg.norm((got - reference)[keep]) / np.linalg.norm(reference[keep]))
