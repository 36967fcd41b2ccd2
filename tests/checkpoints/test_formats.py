"""HuggingFace (safetensors, sharded, .bin) and Mesh TensorFlow checkpoints."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from gqa_t5x import checkpoints
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_reference = pytest.importorskip("hf_reference")

HF_KW = dict(
    vocab_size=64, d_model=8, d_kv=3, d_ff=16, num_layers=2, num_decoder_layers=3,
    num_heads=4, decoder_start_token_id=0,
)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **HF_KW)
    return transformers.T5ForConditionalGeneration(config).eval()


def expected_params(model, config: T5Config) -> dict[str, np.ndarray]:
    """HF state dict -> T5X names through `hf_name`, the export's direction."""
    return param_tree.flatten(hf_reference.params_from_hf_state_dict(model.state_dict(), config))


def check_t5_1_1_config(config: T5Config) -> None:
    assert (config.vocab_size, config.emb_dim, config.num_heads, config.head_dim) == (64, 8, 4, 3)
    assert (config.mlp_dim, config.num_encoder_layers, config.num_decoder_layers) == (16, 2, 3)
    assert config.mlp_activations == ("gelu", "linear")
    assert config.num_kv_heads == config.encoder_num_kv_heads == 4  # multi-head, as ints


@pytest.mark.parametrize("variant", ["safetensors", "sharded_safetensors", "pytorch_bin"])
def test_huggingface_checkpoint_loads_to_transposed_t5x_params(hf_model, tmp_path, variant):
    out = tmp_path / variant
    if variant == "safetensors":
        hf_model.save_pretrained(out)
        assert (out / "model.safetensors").is_file()
    elif variant == "sharded_safetensors":
        hf_model.save_pretrained(out, max_shard_size="2KB")
        assert (out / "model.safetensors.index.json").is_file()
        assert len(list(out.glob("model-*.safetensors"))) > 2
    else:  # transformers 5 only writes safetensors; .bin is what older ones wrote
        out.mkdir()
        hf_model.config.save_pretrained(out)
        torch.save(hf_model.state_dict(), out / "pytorch_model.bin")
    config, params = checkpoints.load(out)
    check_t5_1_1_config(config)
    # transformers 5 ties lm_head to shared and does not scale: an untied T5X head.
    assert not config.logits_via_embedding
    flat = param_tree.flatten(params)
    expected = expected_params(hf_model, config)
    assert list(flat) == list(param_tree.param_shapes(config)) and set(flat) == set(expected)
    for key, value in expected.items():
        assert flat[key].dtype == np.float32
        np.testing.assert_array_equal(flat[key], value, err_msg=key)
    np.testing.assert_array_equal(
        flat["encoder/layers_0/attention/query/kernel"],
        hf_model.encoder.block[0].layer[0].SelfAttention.q.weight.detach().numpy().T,
    )
    assert checkpoints.detect_format(out / "config.json") == ("huggingface", str(out))


def test_legacy_pre_zip_pytorch_bin_is_read(hf_model, tmp_path):
    out = tmp_path / "legacy"
    out.mkdir()
    hf_model.config.save_pretrained(out)
    torch.save(hf_model.state_dict(), out / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    config, params = checkpoints.load(out)
    for key, value in expected_params(hf_model, config).items():
        np.testing.assert_array_equal(param_tree.flatten(params)[key], value, err_msg=key)


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious .bin does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("content", ["code", "non_tensor"])
def test_refused_pickle_gets_our_message_and_runs_no_code(hf_model, tmp_path, zipped, content):
    out = tmp_path / "bin"
    out.mkdir()
    hf_model.config.save_pretrained(out)
    marker = tmp_path / "pwned"
    state = dict(hf_model.state_dict())
    state["shared.weight"] = _RunsCode(marker) if content == "code" else [1.0, 2.0]
    torch.save(state, out / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    with pytest.raises(checkpoints.CheckpointError, match=f"{out / 'pytorch_model.bin'}: refused") as info:
        checkpoints.open_checkpoint(out)
    assert not marker.exists()
    shown, error = [], info.value  # what a traceback would print, chained errors included
    while error is not None:
        shown.append(str(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    assert "weights_only" not in " ".join(shown)  # torch's advice to disable the check


def _write_safetensors(directory, state: dict[str, np.ndarray], hf_config: dict) -> None:
    from safetensors.numpy import save_file

    directory.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config))


def _state(model) -> dict[str, np.ndarray]:
    return {
        k: v.detach().numpy()
        for k, v in model.state_dict().items()
        if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
    }


def test_huggingface_gqa_weights_infer_num_kv_heads(hf_model, tmp_path):
    state = _state(hf_model)
    for name in list(state):  # mean-pool pairs of kv heads: 4 -> 2 in decoder attention
        if name.startswith("decoder") and name.endswith((".k.weight", ".v.weight")):
            w = state[name].reshape(2, 2, 3, 8)
            state[name] = w.mean(axis=1).reshape(6, 8)
    hf_config = dict(hf_model.config.to_dict(), scale_decoder_outputs=False)
    _write_safetensors(tmp_path / "gqa", state, hf_config)
    with checkpoints.open_checkpoint(tmp_path / "gqa") as reader:
        assert reader.config.num_kv_heads == 2 and reader.config.encoder_num_kv_heads == 4
        np.testing.assert_array_equal(
            reader.read("decoder/layers_2/self_attention/key/kernel"),
            state["decoder.block.2.layer.0.SelfAttention.k.weight"].T,
        )


def test_huggingface_t5_0_relu_with_scaled_tied_head_is_logits_via_embedding(tmp_path):
    torch.manual_seed(1)
    hf_config = transformers.T5Config(feed_forward_proj="relu", **HF_KW)
    model = transformers.T5ForConditionalGeneration(hf_config)
    legacy = {k: v for k, v in hf_config.to_dict().items() if k != "scale_decoder_outputs"}
    legacy["tie_word_embeddings"] = True  # a transformers-4 T5.0 config.json
    _write_safetensors(tmp_path / "t5", _state(model), legacy)
    with checkpoints.open_checkpoint(tmp_path / "t5") as reader:
        assert reader.config.mlp_activations == ("relu",) and reader.config.logits_via_embedding
        assert "decoder/logits_dense/kernel" not in reader.keys()
        np.testing.assert_array_equal(
            reader.read("decoder/layers_1/mlp/wi/kernel"),
            model.decoder.block[1].layer[2].DenseReluDense.wi.weight.detach().numpy().T,
        )


def test_huggingface_bfloat16_safetensors_read_as_float32(hf_model, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "bf16"
    out.mkdir()
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in hf_model.state_dict().items() if "embed_tokens" not in k}
    save_file(state, str(out / "model.safetensors"))
    hf_model.config.save_pretrained(out)
    with checkpoints.open_checkpoint(out) as reader:
        got = reader.read("encoder/relpos_bias/rel_embedding")
        ref = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].float().numpy().T
        assert got.dtype == np.float32 and got.shape == (4, 32)
        np.testing.assert_array_equal(got, ref)


def test_truncated_safetensors_is_named_and_unsupported_activation_is_rejected(hf_model, tmp_path):
    out = tmp_path / "cut"
    hf_model.save_pretrained(out)
    file = out / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-64])
    with pytest.raises(checkpoints.CorruptCheckpointError, match=f"{file}: truncated safetensors"):
        checkpoints.open_checkpoint(out)
    other = tmp_path / "gelu"
    hf_model.save_pretrained(other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["feed_forward_proj"] = "gelu"  # HuggingFace's exact-erf gelu: T5X has only the tanh form
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoints.CheckpointError, match="feed_forward_proj='gelu' is not supported.*exact-erf"):
        checkpoints.open_checkpoint(other)


def test_huggingface_missing_tensor_is_named(hf_model, tmp_path):
    state = _state(hf_model)
    del state["decoder.block.1.layer.1.EncDecAttention.v.weight"]
    _write_safetensors(tmp_path / "m", state, dict(hf_model.config.to_dict(), scale_decoder_outputs=False))
    with pytest.raises(checkpoints.CheckpointError, match="decoder/layers_1/encoder_decoder_attention/value/kernel"):
        checkpoints.open_checkpoint(tmp_path / "m")


# ------------------------------------------------------------------ Mesh TF
def mesh_tf_name(path: str) -> str:
    """T5X path -> Mesh TensorFlow variable name, written independently of the
    reader's inverse map (`mesh_tf.mesh_tf_to_t5x`) that the tests check."""
    fixed = {
        "token_embedder/embedding": "shared/embedding",
        "decoder/logits_dense/kernel": "decoder/logits/kernel",
        "encoder/encoder_norm/scale": "encoder/rms_norm/scale",
        "decoder/decoder_norm/scale": "decoder/rms_norm/scale",
    }
    if path in fixed:
        return fixed[path]
    side, rest = path.split("/", 1)
    if rest == "relpos_bias/rel_embedding":
        return f"{side}/block_000/layer_000/SelfAttention/relative_attention_bias"
    block, rest = re.fullmatch(r"layers_(\d+)/(.+)", rest).groups()
    prefix = f"{side}/block_{int(block):03d}"
    layer = {
        "pre_attention_layer_norm": 0, "attention": 0, "pre_self_attention_layer_norm": 0,
        "self_attention": 0, "pre_cross_attention_layer_norm": 1, "encoder_decoder_attention": 1,
        "pre_mlp_layer_norm": 1 if side == "encoder" else 2, "mlp": 1 if side == "encoder" else 2,
    }[rest.split("/")[0]]
    if rest.endswith("layer_norm/scale"):
        return f"{prefix}/layer_{layer:03d}/rms_norm/scale"
    if rest.startswith("mlp/"):
        return f"{prefix}/layer_{layer:03d}/DenseReluDense/{rest.split('/')[1]}/kernel"
    module = "EncDecAttention" if rest.startswith("encoder_decoder") else "SelfAttention"
    proj = {"query": "q", "key": "k", "value": "v", "out": "o"}[rest.split("/")[1]]
    return f"{prefix}/layer_{layer:03d}/{module}/{proj}"


def _save_mesh_tf(prefix: str, variables: dict[str, np.ndarray]) -> None:
    """Writes a TF bundle with exactly these variable names (as Mesh TF does)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=list(variables),
        shape_and_slices=[""] * len(variables),
        tensors=[tf.constant(v) for v in variables.values()],
    )


@pytest.fixture(scope="module")
def mesh_tf_checkpoint(tmp_path_factory):
    config = T5Config(vocab_size=64, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16,
                      num_encoder_layers=2, num_decoder_layers=2)
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_tree.param_shapes(config).items()}
    variables = {mesh_tf_name(k): v for k, v in params.items()}
    variables["global_step"] = np.asarray(1_000_000, np.int64)
    variables["encoder/block_000/layer_000/SelfAttention/q_slot_vc"] = np.zeros(12, np.float32)
    variables["decoder/logits/kernel_slot_vr"] = np.zeros(8, np.float32)
    directory = tmp_path_factory.mktemp("mtf")
    _save_mesh_tf(str(directory / "model.ckpt-1000000"), variables)
    (directory / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1000000"\n')
    return directory, config, params


def test_mesh_tf_checkpoint_loads_to_the_same_params(mesh_tf_checkpoint):
    directory, config, params = mesh_tf_checkpoint
    for path in (directory, directory / "model.ckpt-1000000", directory / "model.ckpt-1000000.index"):
        with checkpoints.open_checkpoint(path) as reader:
            assert reader.format == "mesh_tf" and reader.step == 1_000_000
            assert reader.config == config
            for key in reader.keys():
                np.testing.assert_array_equal(reader.read(key), params[key], err_msg=key)


def test_mesh_tf_corrupted_data_file_is_named(mesh_tf_checkpoint, tmp_path):
    import shutil

    directory, _, _ = mesh_tf_checkpoint
    copy = tmp_path / "mtf"
    shutil.copytree(directory, copy)
    data = next(copy.glob("*.data-*"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(checkpoints.CorruptCheckpointError, match="model.ckpt-1000000"):
        with checkpoints.open_checkpoint(copy) as reader:
            for key in reader.keys():
                reader.read(key)


def test_mesh_tf_unknown_variables_are_reported(tmp_path):
    _save_mesh_tf(str(tmp_path / "model.ckpt-0"), {"encoder/block_000/layer_000/Foo/w": np.zeros(3, np.float32)})
    with pytest.raises(checkpoints.CheckpointError, match="Foo/w.*no T5X equivalent"):
        checkpoints.open_checkpoint(tmp_path)
