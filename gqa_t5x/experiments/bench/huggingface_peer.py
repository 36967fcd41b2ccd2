"""HuggingFace `transformers` T5 as the bench's peer: built, placed and timed.

`gqa-t5x bench` times it in its own process with our multi-head weights
(`hf_model`), which is what a CPU run does. On an accelerator that process
already holds our weights and JAX's share of the device (75% by default),
so there HuggingFace is timed alone, in a process with JAX kept off the
device (`random_hf_model`: the same architecture, HuggingFace's own random
initialisation, made on the device in the timed dtype):

    gqa-t5x bench --huggingface_alone --gin_file gin/models/t5_1_1/xxl.gin \
        --input_length 2048 --output_length 512 --batch_size 32 --dtype bfloat16 --output hf/xxl

(`time_alone`; `scripts/accelerator_check.py` runs it at the paper's shape). Both time
the same thing (`time_huggingface`): the encoder forward, then
`generate(do_sample=False)` for exactly `output_length` tokens with
HuggingFace's own KV cache, on the bench's inputs (`bench_tokens`);
HuggingFace has no GQA, so it always pays MHA costs.
"""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from gqa_t5x.experiments import timing
from gqa_t5x.experiments.bench import memory
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config


def bench_tokens(seed: int, vocab_size: int, batch: int, input_length: int) -> np.ndarray:
    """The bench's encoder inputs: `[batch, input_length]` int32 ids in [2, vocab_size)."""
    return np.random.default_rng(seed).integers(2, vocab_size, size=(batch, input_length)).astype(np.int32)


def _hf_config(config: T5Config):
    import transformers

    from gqa_t5x.checkpoints import huggingface

    hf_config = transformers.T5Config(**{
        k: v for k, v in huggingface.hf_config_dict(config).items()
        if k not in ("architectures", "gqa_t5x", "torch_dtype")
    })
    hf_config.tie_word_embeddings = bool(config.logits_via_embedding)  # transformers 5 forces True
    return hf_config


def hf_model(config: T5Config, mha_params: Any):
    """HuggingFace T5ForConditionalGeneration holding `mha_params` (float32, on the CPU)."""
    import torch
    import transformers

    from gqa_t5x.checkpoints import huggingface

    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(_hf_config(config))
    state = {}
    for path, value in param_tree.flatten(mha_params).items():
        name, transpose = huggingface.hf_name(path)
        value = np.asarray(value, np.float32)
        state[name] = torch.tensor(value.T if transpose else value)  # a copy torch owns
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state[alias] = state["shared.weight"]
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["shared.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared
    model.decoder.embed_tokens = model.shared
    return model.eval()


def random_hf_model(config: T5Config, device: str, dtype: str):
    """HuggingFace T5ForConditionalGeneration of `config`'s shape, randomly initialised by
    HuggingFace, made directly on `device` in `dtype` ('bfloat16' or 'float32').

    No float32 copy is made first: at T5.1.1-XXL that copy alone would be 44.5 GB.
    """
    import torch
    import transformers

    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = transformers.T5ForConditionalGeneration(_hf_config(config))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def time_huggingface(model, tokens: np.ndarray, output_length: int, repeats: int, device: str,
                     log=print) -> dict[str, Any]:
    """Times a HuggingFace T5 on `device`: encoder forward, then `generate` from its output.

    The whole batch runs through the encoder when it fits; where it does not
    (HuggingFace's T5 attention materialises `[batch, heads, length, length]`
    scores and a float32 softmax of them), the encoder runs in micro-batches,
    halved until they fit, and the decoder still decodes the whole batch.

    Returns:
      {'encoder_s', 'decoder_s', 'tokens' [batch, output_length], 'device',
      'dtype', 'encoder_micro_batch'} (times of the whole batch).
    """
    import torch
    import transformers
    from transformers.modeling_outputs import BaseModelOutput

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    input_ids = torch.from_numpy(tokens.astype(np.int64)).to(device)
    mask = torch.from_numpy((tokens > 0).astype(np.int64)).to(device)
    batch = tokens.shape[0]

    def encode(micro: int):
        def run():
            parts = [model.encoder(input_ids=input_ids[i:i + micro], attention_mask=mask[i:i + micro]
                                   ).last_hidden_state for i in range(0, batch, micro)]
            out = BaseModelOutput(last_hidden_state=parts[0] if len(parts) == 1 else torch.cat(parts))
            sync()
            return out
        return run

    def generate():
        cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
        out = model.generate(
            encoder_outputs=enc_out, attention_mask=mask, past_key_values=cache,
            do_sample=False, num_beams=1, max_new_tokens=output_length, min_new_tokens=output_length,
            decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
        )
        sync()
        return out

    def halved(failed: int, micro: int, first_line: str) -> None:
        if device == "cuda":
            torch.cuda.empty_cache()
        log(f"[huggingface] the encoder ran out of memory; micro-batches of {micro}")

    with torch.inference_mode():
        (encoder_s, enc_out), micro = memory.halve_until_it_fits(
            lambda micro: timing.fastest(encode(micro), repeats), batch, halved)
        decoder_s, out = timing.fastest(generate, repeats)
    return {"encoder_s": encoder_s, "decoder_s": decoder_s, "tokens": out[:, 1:].cpu().numpy(),
            "device": device, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "encoder_micro_batch": micro}


def time_huggingface_with(config: T5Config, mha_params: Any, tokens: np.ndarray, output_length: int,
                          repeats: int) -> dict[str, Any]:
    """`time_huggingface` of `hf_model(config, mha_params)`, on the GPU when torch sees one
    (in bfloat16 when our activations are: its usual setting there), else on the CPU in float32."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda" and jnp.dtype(config.activation_dtype) == jnp.bfloat16
    model = hf_model(config, mha_params).to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    return time_huggingface(model, tokens, output_length, repeats, device)


def huggingface_row(hf: dict[str, Any], input_length: int, output_length: int) -> dict[str, Any]:
    """The report's row of a `time_huggingface` result (per-sample and per-step times)."""
    batch = int(hf["tokens"].shape[0])
    return {
        "input_length": input_length, "output_length": output_length, "batch": batch,
        "encoder_s": hf["encoder_s"], "decoder_s": hf["decoder_s"],
        "time_per_sample_s": (hf["encoder_s"] + hf["decoder_s"]) / batch,
        "encoder_per_sample_s": hf["encoder_s"] / batch, "decoder_per_sample_s": hf["decoder_s"] / batch,
        "decoder_per_token_s": hf["decoder_s"] / (batch * output_length),
        "decode_step_s": hf["decoder_s"] / output_length, "device": hf["device"], "dtype": hf["dtype"],
        "encoder_micro_batch": hf["encoder_micro_batch"],
    }


def time_alone(config: T5Config, input_length: int, output_length: int, batch: int, dtype: str,
               seed: int = 0, repeats: int = 1, log=print) -> dict[str, Any]:
    """HuggingFace T5 of `config`'s shape timed alone on this machine's GPU (else its CPU, in
    float32), on the bench's inputs for `seed`.

    Returns:
      {'huggingface': [its row], 'device', 'weights', 'torch', 'transformers'}.
    """
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype if device == "cuda" else "float32"
    clock = time.monotonic()
    model = random_hf_model(config, device, dtype)
    log(f"[huggingface] made on {device} in {dtype} in {time.monotonic() - clock:.1f} s")
    tokens = bench_tokens(seed, config.vocab_size, batch, input_length)
    clock = time.monotonic()
    row = huggingface_row(time_huggingface(model, tokens, output_length, repeats, device, log=log),
                          input_length, output_length)
    log(f"[huggingface] in={input_length} out={output_length} batch={batch}: {row['time_per_sample_s']:.4f} s/sample "
        f"(encoder {row['encoder_s']:.3f} s in micro-batches of {row['encoder_micro_batch']}, decode step "
        f"{1e3 * row['decode_step_s']:.2f} ms); warm-up and {repeats} timed run(s) in {time.monotonic() - clock:.1f} s")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"huggingface": [row], "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "weights": "HuggingFace's random initialisation", "torch": torch.__version__,
            "transformers": transformers.__version__}
