"""The train step and the decoding step run where TensorFlow and seqio cannot be imported.

A GPU/TPU image may have neither (T5X hides the accelerators from TensorFlow
when it has it). A subprocess blocks both imports, imports the model, the
train step and decoding, runs one train step and a greedy decode of a tiny
model, and must print the same loss and tokens as this process does.
"""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r'''
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "seqio", "tensorflow_datasets"):
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
from test_train_step import run_step_and_decode
result = run_step_and_decode()
result["loaded"] = sorted(m for m in ("tensorflow", "seqio") if m in sys.modules)
print(json.dumps(result))
'''


def run_step_and_decode() -> dict:
    """One train step and a greedy decode of a tiny GQA model (no data pipeline)."""
    from gqa_t5x.model import decoding
    from gqa_t5x.model import models
    from gqa_t5x.model import network
    from gqa_t5x.model.config import T5Config
    from gqa_t5x.training import optimizers
    from gqa_t5x.training import train_state as ts
    from gqa_t5x.training.train_step import make_train_step

    config = T5Config(vocab_size=32, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=32, num_encoder_layers=1,
                      num_decoder_layers=1, dtype="float32", num_kv_heads=2, dropout_rate=0.0)
    model = models.EncoderDecoderModel(network.Transformer(config))
    params = model.get_initial_params(jax.random.PRNGKey(0))
    optimizer = optimizers.adafactor()
    state = ts.TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=optimizer.init(params))
    rng = np.random.default_rng(0)
    batch = {
        "encoder_input_tokens": rng.integers(2, 32, (2, 6)).astype(np.int32),
        "decoder_target_tokens": rng.integers(2, 32, (2, 4)).astype(np.int32),
    }
    batch["decoder_input_tokens"] = np.pad(batch["decoder_target_tokens"][:, :-1], ((0, 0), (1, 0)))
    batch["decoder_loss_weights"] = np.ones((2, 4), np.float32)
    step = jax.jit(make_train_step(model, optimizer, optimizers.constant_schedule(0.01), jax.random.PRNGKey(1)))
    state, metrics = step(state, batch)
    decoded = decoding.decode(config, state.params, batch["encoder_input_tokens"],
                              decoding.DecodingSpec(max_decode_length=3))
    return {"loss": float(metrics["loss"]), "tokens": np.asarray(decoded.tokens).tolist()}


@pytest.mark.slow
def test_the_train_step_and_decoding_need_neither_tensorflow_nor_seqio():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", SCRIPT, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    isolated = json.loads(done.stdout.strip().splitlines()[-1])
    assert isolated["loaded"] == []
    here = run_step_and_decode()
    assert isolated["tokens"] == here["tokens"]
    assert isolated["loss"] == here["loss"]
