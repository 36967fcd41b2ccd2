"""HuggingFace `transformers` T5 (PyTorch, CPU) as the independent reference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import transformers

from gqa_t5x.checkpoints import huggingface
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config


def make_hf_t5(
    *,
    vocab_size: int,
    d_model: int,
    num_heads: int,
    d_kv: int,
    d_ff: int,
    num_layers: int,
    num_decoder_layers: int,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> transformers.T5ForConditionalGeneration:
    """A randomly initialised T5 v1.1 model in eval mode, float32.

    Norm scales are perturbed away from 1 so that a wrong norm shows up.
    """
    torch.manual_seed(seed)
    hf_config = transformers.T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_decoder_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=tie_word_embeddings,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    # transformers 5 forces `tie_word_embeddings=True` in T5Config.__init__ (and
    # keeps the v1.1 "no rescaling" choice in `scale_decoder_outputs`); set the
    # attribute after construction so lm_head is a separate matrix, and share
    # the input embedding explicitly as T5 does in every version.
    hf_config.tie_word_embeddings = tie_word_embeddings
    model = transformers.T5ForConditionalGeneration(hf_config).eval()
    model.encoder.embed_tokens = model.shared
    model.decoder.embed_tokens = model.shared
    if not tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
    return model


def our_config_for(model: transformers.T5ForConditionalGeneration) -> T5Config:
    c = model.config
    return T5Config(
        vocab_size=c.vocab_size,
        dtype="float32",
        emb_dim=c.d_model,
        num_heads=c.num_heads,
        num_encoder_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers,
        head_dim=c.d_kv,
        mlp_dim=c.d_ff,
        mlp_activations=("gelu", "linear"),
        dropout_rate=0.0,
        logits_via_embedding=model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr(),
    )


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: T5Config) -> dict[str, Any]:
    """Our nested parameter tree from a HuggingFace T5 state dict.

    Goes through `huggingface.hf_name` (the export's direction), so tests of
    the reader (`hf_to_t5x`) compare the two directions of the name map.

    Args:
      state_dict: name -> array-like (numpy arrays or torch tensors).
      config: the config whose `param_shapes` the result must have.

    Returns:
      Nested dict of float32 numpy arrays with T5X names.
    """
    flat = {}
    for path, shape in param_tree.param_shapes(config).items():
        name, transpose = huggingface.hf_name(path)
        if name not in state_dict:
            raise KeyError(f"HuggingFace state dict lacks {name!r} (needed for {path!r}).")
        value = state_dict[name]
        if hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu().float().numpy()
        value = np.asarray(value)
        if transpose:
            value = value.T
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"HuggingFace tensor {name!r} has shape {tuple(value.shape)} but "
                f"{path!r} needs {tuple(shape)} for this config."
            )
        flat[path] = np.ascontiguousarray(value)
    return param_tree.unflatten(flat)


def our_params_for(model: transformers.T5ForConditionalGeneration, config: T5Config):
    return params_from_hf_state_dict(model.state_dict(), config)


def hf_logits(
    model: transformers.T5ForConditionalGeneration,
    encoder_input_tokens: np.ndarray,
    decoder_input_tokens: np.ndarray,
    decoder_target_tokens: np.ndarray,
) -> np.ndarray:
    """HF logits with padding masks derived like T5X's (0 = padding)."""
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(np.asarray(encoder_input_tokens, np.int64)),
            attention_mask=torch.from_numpy(np.asarray(encoder_input_tokens > 0, np.int64)),
            decoder_input_ids=torch.from_numpy(np.asarray(decoder_input_tokens, np.int64)),
            decoder_attention_mask=torch.from_numpy(
                np.asarray(decoder_target_tokens > 0, np.int64)
            ),
        )
    return out.logits.numpy()
