"""Checkpoint reading (T5X legacy / Orbax / ours) and our streaming, atomic writer."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
from flax import serialization

from gqa_t5x import checkpoints
from gqa_t5x.model import param_tree
from gqa_t5x.checkpoints import zarr_io
from gqa_t5x.model.config import T5Config

from paths import REPO, SHARED
T5X = SHARED / "fixtures" / "t5x"
TINY = T5X / "t5_1_1_tiny" / "checkpoint_0"
TOY_TS = T5X / "toy_tensorstore" / "checkpoint_1"
TOY_ORBAX = T5X / "toy_orbax" / "1"

needs_shared = pytest.mark.skipif(not T5X.is_dir(), reason=f"shared fixtures not found at {SHARED}")

SMALL = T5Config(
    vocab_size=64, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16,
    num_encoder_layers=2, num_decoder_layers=2,
)


def random_params(config: T5Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(s).astype(np.float32)
        for k, s in param_tree.param_shapes(config).items()
    }


def write_t5x_legacy(
    directory: Path,
    flat: dict[str, np.ndarray],
    *,
    step: int = 0,
    version: int = 3,
    tensorstore_keys: tuple[str, ...] = (),
) -> Path:
    """Writes a T5X legacy checkpoint the way T5X does (msgpack + zarr specs)."""
    directory.mkdir(parents=True)
    target = {}
    for key, value in flat.items():
        if key in tensorstore_keys:
            rel = "target." + key.replace("/", ".")
            spec = {
                "driver": "zarr",
                "dtype": value.dtype.name,
                "kvstore": {"driver": "file", "path": str(directory / rel)},
                "metadata": {"chunks": list(value.shape), "compressor": {"id": "gzip", "level": 1}, "shape": list(value.shape)},
            }
            ts.open(spec, create=True).result().write(value).result()
            spec["kvstore"] = {"driver": "gfile", "path": rel}
            target[key] = spec
        else:
            target[key] = value
    tree = {
        "version": version,
        "optimizer": {"target": param_tree.unflatten(target), "state": {"step": np.int32(step), "param_states": {}}},
    }
    (directory / "checkpoint").write_bytes(serialization.msgpack_serialize(tree))
    return directory


# --------------------------------------------------------------- T5X legacy
@needs_shared
def test_t5x_tiny_fixture_infers_config_and_matches_independent_msgpack_decode():
    expected = serialization.msgpack_restore((TINY / "checkpoint").read_bytes())
    flat = param_tree.flatten(expected["optimizer"]["target"])
    with checkpoints.open_checkpoint(TINY) as reader:
        assert reader.format == "t5x_legacy"
        assert reader.step == 0
        c = reader.config
        assert (c.num_encoder_layers, c.num_decoder_layers, c.num_heads, c.head_dim) == (2, 2, 4, 3)
        assert (c.emb_dim, c.mlp_dim, c.vocab_size) == (8, 16, 32128)
        assert c.mlp_activations == ("gelu", "linear") and not c.logits_via_embedding
        assert c.num_kv_heads == c.encoder_num_kv_heads == 4  # multi-head, as ints
        assert reader.keys() == list(param_tree.param_shapes(c))
        assert set(flat) == set(reader.keys())
        for key in reader.keys():
            value = reader.read(key)
            assert value.dtype == np.float32 and value.shape == reader.shape(key)
            np.testing.assert_array_equal(value, flat[key], err_msg=key)


@needs_shared
def test_t5x_legacy_accepts_directory_or_checkpoint_file():
    config_dir, params_dir = checkpoints.load(TINY)
    config_file, params_file = checkpoints.load(TINY / "checkpoint")
    assert config_dir == config_file
    np.testing.assert_array_equal(
        params_dir["decoder"]["logits_dense"]["kernel"], params_file["decoder"]["logits_dense"]["kernel"]
    )
    assert checkpoints.detect_format(TINY / "checkpoint") == ("t5x_legacy", str(TINY))


@needs_shared
def test_read_t5x_legacy_tree_returns_adafactor_state_of_tiny_fixture():
    expected = param_tree.flatten(serialization.msgpack_restore((TINY / "checkpoint").read_bytes()))
    got = param_tree.flatten(checkpoints.read_t5x_legacy_tree(TINY))
    assert set(got) == set(expected)
    assert any(k.endswith("/v_row") for k in got) and any(k.endswith("/v_col") for k in got)
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            assert got[key] == value, key


def _gunzip_chunk(path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Independent zarr chunk decode (gzip + little-endian C order)."""
    return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=dtype).reshape(shape)


@needs_shared
def test_toy_tensorstore_leaves_have_stored_values_and_dtypes():
    tree = checkpoints.read_t5x_legacy_tree(TOY_TS)
    states = tree["optimizer"]["state"]["param_states"]
    kernel, bias = states["kernel"], states["bias"]
    assert kernel.dtype == np.float64 and kernel.shape == (10, 5)
    assert bias.dtype == np.float32 and bias.shape == (5,)
    np.testing.assert_array_equal(kernel, _gunzip_chunk(TOY_TS / "state.param_states.kernel" / "0.0", "<f8", (10, 5)))
    np.testing.assert_array_equal(bias, np.ones(5, np.float32))
    assert states["step"].dtype == np.int32 and int(states["step"]) == 1
    assert int(tree["optimizer"]["state"]["step"]) == 1
    assert tree["version"] == 3 and tree["optimizer"]["target"] == {}


@needs_shared
def test_toy_orbax_needs_template_for_missing_zarray_then_matches_toy_tensorstore():
    # T5X's Orbax test data ships without .zarray files: shapes/dtypes must be given.
    with pytest.raises(checkpoints.CorruptCheckpointError, match=r"\.zarray.*template="):
        checkpoints.read_orbax_tree(TOY_ORBAX)
    reference = checkpoints.read_t5x_legacy_tree(TOY_TS)["optimizer"]
    got = checkpoints.read_orbax_tree(TOY_ORBAX, template={"_optimizer": reference})
    flat_ref, flat_got = param_tree.flatten(reference), param_tree.flatten(got["_optimizer"])
    assert set(flat_got) == {"state/param_states/bias", "state/param_states/kernel", "state/param_states/step", "state/step"}
    for key, value in flat_got.items():
        assert value.dtype == flat_ref[key].dtype, key
        np.testing.assert_array_equal(value, flat_ref[key], err_msg=key)
    assert got["flax_mutables"] is None
    assert checkpoints.detect_format(TOY_ORBAX) == ("t5x_orbax", str(TOY_ORBAX))


@needs_shared
def test_toy_checkpoints_are_not_t5_models_and_say_so():
    with pytest.raises(checkpoints.CheckpointError, match="token_embedder/embedding"):
        checkpoints.open_checkpoint(TOY_TS)


def test_legacy_tensorstore_leaves_read_like_inline_leaves(tmp_path):
    flat = random_params(SMALL, 1)
    big = ("token_embedder/embedding", "decoder/logits_dense/kernel", "encoder/layers_1/mlp/wo/kernel")
    ckpt = write_t5x_legacy(tmp_path / "checkpoint_7", flat, step=7, tensorstore_keys=big)
    assert (ckpt / "target.token_embedder.embedding" / ".zarray").is_file()
    with checkpoints.open_checkpoint(ckpt) as reader:
        assert reader.step == 7 and reader.config == SMALL
        for key in reader.keys():
            np.testing.assert_array_equal(reader.read(key), flat[key], err_msg=key)


def test_legacy_version2_uint16_leaves_are_bfloat16(tmp_path):
    import ml_dtypes

    flat = random_params(SMALL, 2)
    bf16 = flat["encoder/encoder_norm/scale"].astype(ml_dtypes.bfloat16)
    flat["encoder/encoder_norm/scale"] = bf16.view(np.uint16)
    ckpt = write_t5x_legacy(tmp_path / "checkpoint_0", flat, version=2)
    with checkpoints.open_checkpoint(ckpt) as reader:
        np.testing.assert_array_equal(reader.read("encoder/encoder_norm/scale"), bf16.astype(np.float32))


def test_gqa_key_value_widths_infer_num_kv_heads(tmp_path):
    config = SMALL.replace(num_kv_heads=2)
    flat = random_params(config, 3)
    ckpt = write_t5x_legacy(tmp_path / "checkpoint_0", flat)
    with checkpoints.open_checkpoint(ckpt) as reader:
        assert reader.config.num_kv_heads == 2 and reader.config.encoder_num_kv_heads == SMALL.num_heads
        assert reader.shape("decoder/layers_1/encoder_decoder_attention/value/kernel") == (8, 6)


def test_tensorstore_spec_paths_resolve_locally_and_to_gcs_buckets():
    spec = {"driver": "zarr", "kvstore": {"driver": "gfile", "path": "target.encoder.x.kernel"}, "metadata": {"shape": [2]}}
    local = zarr_io.resolve_tensorstore_spec(spec, "/ckpts/run/checkpoint_5")
    assert local["kvstore"] == {"driver": "file", "path": "/ckpts/run/checkpoint_5/target.encoder.x.kernel/"}
    gcs = zarr_io.resolve_tensorstore_spec(spec, "gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000")
    assert gcs["kvstore"] == {
        "driver": "gcs",
        "bucket": "t5-data",
        "path": "pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000/target.encoder.x.kernel/",
    }
    old_style = zarr_io.resolve_tensorstore_spec({"driver": "zarr", "path": "target.a", "kvstore": {"driver": "file"}}, "/c")
    assert old_style["kvstore"]["path"] == "/c/target.a/" and "path" not in old_style
    assert spec["kvstore"]["path"] == "target.encoder.x.kernel"  # input untouched
    with pytest.raises(checkpoints.CheckpointError, match="Unsupported tensorstore kvstore driver 's3'"):
        zarr_io.resolve_tensorstore_spec({"driver": "zarr", "kvstore": {"driver": "s3", "path": "x"}}, "/c")


# --------------------------------------------------------- config inference
def test_missing_relpos_needs_explicit_num_heads_or_head_dim():
    shapes = {k: v for k, v in param_tree.param_shapes(SMALL).items() if "relpos" not in k}
    with pytest.raises(checkpoints.CheckpointError, match="num_heads= or head_dim="):
        checkpoints.infer_config(shapes, source="x")
    assert checkpoints.infer_config(shapes, source="x", num_heads=4).head_dim == 3
    assert checkpoints.infer_config(shapes, source="x", head_dim=3).num_heads == 4
    with pytest.raises(checkpoints.CheckpointError, match="not a multiple of head_dim=5"):
        checkpoints.infer_config(shapes, source="x", head_dim=5)


def test_explicit_config_shape_mismatch_names_parameter_and_both_shapes(tmp_path):
    ckpt = write_t5x_legacy(tmp_path / "checkpoint_0", random_params(SMALL))
    with pytest.raises(checkpoints.CheckpointError, match=r"'encoder/layers_0/mlp/wi_0/kernel' has shape \(8, 16\).*needs \(8, 32\)"):
        checkpoints.open_checkpoint(ckpt, config=SMALL.replace(mlp_dim=32))
    with pytest.raises(checkpoints.CheckpointError, match="num_heads=2 was passed"):
        checkpoints.open_checkpoint(ckpt, num_heads=2)


def test_missing_parameter_is_named(tmp_path):
    flat = random_params(SMALL)
    del flat["decoder/layers_1/pre_mlp_layer_norm/scale"]
    ckpt = write_t5x_legacy(tmp_path / "checkpoint_0", flat)
    with pytest.raises(checkpoints.CheckpointError, match="missing parameter.*decoder/layers_1/pre_mlp_layer_norm/scale"):
        checkpoints.open_checkpoint(ckpt)


# ------------------------------------------------------------ corruption
def test_truncated_msgpack_names_the_file(tmp_path):
    ckpt = write_t5x_legacy(tmp_path / "checkpoint_0", random_params(SMALL))
    data = (ckpt / "checkpoint").read_bytes()
    (ckpt / "checkpoint").write_bytes(data[: len(data) - 100])
    with pytest.raises(checkpoints.CorruptCheckpointError, match=f"{ckpt / 'checkpoint'}.*truncated"):
        checkpoints.open_checkpoint(ckpt)


def test_truncated_zarr_chunk_names_the_array_and_other_params_still_read(tmp_path):
    flat = random_params(SMALL)
    ckpt = write_t5x_legacy(tmp_path / "checkpoint_0", flat, tensorstore_keys=("decoder/logits_dense/kernel",))
    chunk = ckpt / "target.decoder.logits_dense.kernel" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    with checkpoints.open_checkpoint(ckpt) as reader:  # lazy: opening reads no tensor
        np.testing.assert_array_equal(reader.read("token_embedder/embedding"), flat["token_embedder/embedding"])
        with pytest.raises(checkpoints.CorruptCheckpointError, match="target.decoder.logits_dense.kernel"):
            reader.read("decoder/logits_dense/kernel")


def test_empty_zarr_directory_is_an_error_not_zeros(tmp_path):
    ckpt = write_t5x_legacy(tmp_path / "checkpoint_0", random_params(SMALL), tensorstore_keys=("decoder/logits_dense/kernel",))
    (ckpt / "target.decoder.logits_dense.kernel" / "0.0").unlink()
    with checkpoints.open_checkpoint(ckpt) as reader:
        with pytest.raises(checkpoints.CorruptCheckpointError, match="no chunk data"):
            reader.read("decoder/logits_dense/kernel")


# ------------------------------------------------------------ detection
def test_no_checkpoint_error_names_path_and_what_was_looked_for(tmp_path):
    with pytest.raises(checkpoints.CheckpointNotFoundError, match=f"{tmp_path}.*looked for") as info:
        checkpoints.open_checkpoint(tmp_path)
    for fmt in checkpoints.formats():  # every registered format says what it needs
        assert f"{fmt.name}: {fmt.doc}" in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.open_checkpoint(tmp_path / "nope")
    write_t5x_legacy(tmp_path / "checkpoint_10", random_params(SMALL))
    write_t5x_legacy(tmp_path / "checkpoint_20", random_params(SMALL))
    with pytest.raises(checkpoints.CheckpointNotFoundError, match="checkpoint_20"):
        checkpoints.open_checkpoint(tmp_path)
    assert not checkpoints.is_checkpoint(tmp_path)
    assert checkpoints.is_checkpoint(tmp_path / "checkpoint_10")


# ---------------------------------------------------------------- our format
def test_save_then_open_is_bit_exact_and_records_config_and_step(tmp_path):
    config = SMALL.replace(num_kv_heads=2)
    flat = random_params(config, 5)
    out = tmp_path / "run" / "checkpoint_1050000"
    checkpoints.save(out, config, {"params": param_tree.unflatten(flat)}, step=1_050_000)
    assert T5Config.from_json((out / "config.json").read_text()) == config
    assert "network.T5Config.num_kv_heads = 2" in (out / "config.gin").read_text()
    assert checkpoints.is_checkpoint(out)
    with checkpoints.open_checkpoint(out) as reader:
        assert reader.format == "gqa_t5x" and reader.step == 1_050_000 and reader.config == config
        assert reader.keys() == list(param_tree.param_shapes(config))
        for key in reader.keys():
            got = reader.read(key)
            assert got.dtype == np.float32
            assert got.tobytes() == flat[key].tobytes(), key
    assert sorted(os.listdir(out.parent)) == ["checkpoint_1050000"]  # no temp dirs left


def test_an_old_checkpoint_that_recorded_null_kv_heads_opens_as_multi_head(tmp_path):
    from gqa_t5x.checkpoints import native

    flat = random_params(SMALL, 8)
    out = tmp_path / "checkpoint_1"
    checkpoints.save(out, SMALL, param_tree.unflatten(flat), step=1)
    assert json.loads((out / native.CONFIG_JSON).read_text())["num_kv_heads"] == 4  # written as an int
    # What checkpoints written while None was stored look like on disk.
    manifest = json.loads((out / native.MANIFEST).read_text())
    manifest["config"].update(num_kv_heads=None, encoder_num_kv_heads=None)
    (out / native.MANIFEST).write_text(json.dumps(manifest))
    record = json.loads((out / native.CONFIG_JSON).read_text())
    record.update(num_kv_heads=None, encoder_num_kv_heads=None)
    (out / native.CONFIG_JSON).write_text(json.dumps(record))
    with checkpoints.open_checkpoint(out) as reader:
        assert reader.config == SMALL and hash(reader.config) == hash(SMALL)
        assert (reader.config.num_kv_heads, reader.config.encoder_num_kv_heads) == (4, 4)
        np.testing.assert_array_equal(reader.read("token_embedder/embedding"), flat["token_embedder/embedding"])


@needs_shared
@pytest.mark.parametrize("kv_heads", ["None", "4"])
def test_a_multi_head_checkpoint_equals_the_gin_config_with_none_or_num_heads(kv_heads):
    import gin

    from gqa_t5x import gin_config

    try:
        from_gin = gin_config.model_config_from_gin(
            str(REPO / "gin/models/t5_1_1/tiny.gin"),
            [f"NUM_KV_HEADS={kv_heads}", f"ENCODER_NUM_KV_HEADS={kv_heads}"],
        )
    finally:
        gin.clear_config()
    with checkpoints.open_checkpoint(TINY) as reader:
        inferred = reader.config
    # dtype and dropout are run settings the tensors cannot tell.
    assert inferred == from_gin.replace(dtype=inferred.dtype, dropout_rate=inferred.dropout_rate)


_NO_ALLOCATOR_TUNING_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np
    from gqa_t5x import checkpoints, runtime
    from gqa_t5x.model import param_tree
    from gqa_t5x.model.config import T5Config

    config = T5Config(vocab_size=64, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16,
                      num_encoder_layers=1, num_decoder_layers=1)
    params = {k: np.ones(s, np.float32) for k, s in param_tree.param_shapes(config).items()}
    loaded = []
    real = ctypes.CDLL

    def spy(name, *args, **kwargs):  # the C library is opened for nothing but mallopt
        if name and str(name).rsplit("/", 1)[-1].startswith("libc.so"):
            loaded.append(name)
        return real(name, *args, **kwargs)

    ctypes.CDLL = spy
    checkpoints.save(sys.argv[1], config, param_tree.unflatten(params), step=1)
    with checkpoints.open_checkpoint(sys.argv[1]) as reader:
        reader.read("token_embedder/embedding")
    checkpoints.load(sys.argv[1])
    print(loaded, runtime._allocator_tuned)
    """
)


def test_writing_and_opening_a_checkpoint_leave_the_process_allocator_alone(tmp_path):
    """glibc tuning is `runtime.return_freed_buffers_to_os()`, for entry points to call."""
    script = tmp_path / "no_tuning.py"
    script.write_text(_NO_ALLOCATOR_TUNING_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "[] False", proc.stdout


def test_our_format_is_restorable_by_orbax_for_training(tmp_path):
    import jax
    import orbax.checkpoint as ocp

    flat = random_params(SMALL, 6)
    out = tmp_path / "checkpoint_3"
    checkpoints.save(out, SMALL, param_tree.unflatten(flat), step=3)
    restored = ocp.PyTreeCheckpointer().restore(out / "state")
    assert int(restored["state"]["step"]) == 3
    for key, value in param_tree.flatten(restored["target"]).items():
        np.testing.assert_array_equal(value, flat[key])
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), restored)
    as_jax = ocp.PyTreeCheckpointer().restore(out / "state", args=ocp.args.PyTreeRestore(restore_args=args))
    assert isinstance(as_jax["target"]["token_embedder"]["embedding"], jax.Array)


def test_t5x_orbax_ocdbt_checkpoint_reads_per_parameter_with_bfloat16_as_float32(tmp_path):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    flat = random_params(SMALL, 7)
    stored = dict(flat)
    stored["token_embedder/embedding"] = jnp.asarray(flat["token_embedder/embedding"], jnp.bfloat16)
    state = {"target": param_tree.unflatten(stored), "state": {"step": np.int32(11)}}
    ocp.PyTreeCheckpointer().save(tmp_path / "checkpoint_11" / "state", state)  # OCDBT by default
    assert (tmp_path / "checkpoint_11" / "state" / "manifest.ocdbt").is_file()
    with checkpoints.open_checkpoint(tmp_path / "checkpoint_11") as reader:
        assert reader.format == "t5x_orbax" and reader.step == 11 and reader.config == SMALL
        for key in reader.keys():
            np.testing.assert_array_equal(reader.read(key), np.asarray(stored[key], np.float32), err_msg=key)


def test_read_many_of_an_orbax_checkpoint_is_one_restore_and_equals_reading_each_parameter(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from gqa_t5x.checkpoints import t5x_orbax

    flat = random_params(SMALL, 8)
    state = {"target": param_tree.unflatten(flat), "state": {"step": np.int32(5)}}
    ocp.PyTreeCheckpointer().save(tmp_path / "checkpoint_5" / "state", state)
    with checkpoints.open_checkpoint(tmp_path / "checkpoint_5") as reader:
        one_by_one = {key: reader.read(key) for key in reader.keys()}
        calls = []
        original = t5x_orbax._OrbaxTree.restore
        monkeypatch.setattr(t5x_orbax._OrbaxTree, "restore", lambda self, keys: calls.append(len(keys)) or original(self, keys))
        together = reader.read_many()
        assert calls == [len(reader.keys())]  # one request for every parameter
        assert list(together) == reader.keys()
        for key, value in one_by_one.items():
            assert together[key].dtype == np.float32 and together[key].tobytes() == value.tobytes(), key
        assert list(reader.read_many(["decoder/decoder_norm/scale"])) == ["decoder/decoder_norm/scale"]
        with pytest.raises(KeyError, match="no parameter 'decoder/nope'"):
            reader.read_many(["decoder/nope"])


def test_an_orbax_checkpoints_metadata_is_read_once_per_process_and_again_when_the_checkpoint_is_rewritten(
        tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from gqa_t5x.checkpoints import t5x_orbax

    def write(seed):
        state = {"target": param_tree.unflatten(random_params(SMALL, seed)), "state": {"step": np.int32(5)}}
        ocp.PyTreeCheckpointer().save(tmp_path / "checkpoint_5" / "state", state, force=True)

    write(1)
    reads = []
    original = ocp.PyTreeCheckpointer.metadata
    monkeypatch.setattr(ocp.PyTreeCheckpointer, "metadata", lambda self, d: reads.append(d) or original(self, d))
    for _ in range(3):
        with checkpoints.open_checkpoint(tmp_path / "checkpoint_5") as reader:
            assert reader.config == SMALL
    assert len(reads) == 1
    shutil.rmtree(tmp_path / "checkpoint_5")
    write(2)
    with checkpoints.open_checkpoint(tmp_path / "checkpoint_5") as reader:
        np.testing.assert_array_equal(reader.read("decoder/decoder_norm/scale"),
                                      random_params(SMALL, 2)["decoder/decoder_norm/scale"])
    assert len(reads) == 2


def test_read_many_of_every_other_format_equals_reading_each_parameter(tmp_path):
    flat = random_params(SMALL, 9)
    checkpoints.save(tmp_path / "ours", SMALL, {"params": param_tree.unflatten(flat)}, step=1)
    legacy = write_t5x_legacy(tmp_path / "legacy" / "checkpoint_0", flat)
    for path in (tmp_path / "ours", legacy):
        with checkpoints.open_checkpoint(path) as reader:
            together = reader.read_many()
            for key in reader.keys():
                assert together[key].tobytes() == reader.read(key).tobytes() == flat[key].tobytes(), (path, key)


def test_exception_mid_write_leaves_no_destination_and_no_temp(tmp_path):
    flat = random_params(SMALL)
    out = tmp_path / "checkpoint_0"
    with pytest.raises(RuntimeError, match="boom"):
        with checkpoints.CheckpointWriter(out, SMALL) as writer:
            writer.write("token_embedder/embedding", flat["token_embedder/embedding"])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_commit_with_missing_parameter_fails_and_publishes_nothing(tmp_path):
    out = tmp_path / "checkpoint_0"
    with pytest.raises(checkpoints.CheckpointError, match="not written.*token_embedder/embedding"):
        with checkpoints.CheckpointWriter(out, SMALL):
            pass
    assert os.listdir(tmp_path) == []


def test_writer_rejects_unknown_key_wrong_shape_duplicate_and_integer_dtype(tmp_path):
    with checkpoints.CheckpointWriter(tmp_path / "c", SMALL) as writer:
        with pytest.raises(checkpoints.CheckpointError, match="'encoder/layers_9/mlp/wo/kernel' is not a parameter"):
            writer.write("encoder/layers_9/mlp/wo/kernel", np.zeros((16, 8), np.float32))
        with pytest.raises(checkpoints.CheckpointError, match=r"shape \(8, 3\) but the config needs \(8, 12\)"):
            writer.write("encoder/layers_0/attention/key/kernel", np.zeros((8, 3), np.float32))
        with pytest.raises(checkpoints.CheckpointError, match="dtype int32"):
            writer.write("encoder/encoder_norm/scale", np.zeros(8, np.int32))
        writer.write("encoder/encoder_norm/scale", np.ones(8))
        with pytest.raises(checkpoints.CheckpointError, match="already written"):
            writer.write("encoder/encoder_norm/scale", np.ones(8))
        writer.abort()
    assert os.listdir(tmp_path) == []


def test_existing_checkpoint_needs_overwrite_and_survives_a_failed_replacement(tmp_path):
    out = tmp_path / "checkpoint_0"
    first, second = random_params(SMALL, 1), random_params(SMALL, 2)
    checkpoints.save(out, SMALL, param_tree.unflatten(first), step=1)
    with pytest.raises(FileExistsError, match="already holds a gqa_t5x checkpoint.*overwrite=True"):
        checkpoints.save(out, SMALL, param_tree.unflatten(second))
    with pytest.raises(RuntimeError):
        with checkpoints.CheckpointWriter(out, SMALL, overwrite=True) as writer:
            writer.write("token_embedder/embedding", second["token_embedder/embedding"])
            raise RuntimeError("interrupted")
    with checkpoints.open_checkpoint(out) as reader:  # old one intact
        assert reader.step == 1
        np.testing.assert_array_equal(reader.read("token_embedder/embedding"), first["token_embedder/embedding"])
    checkpoints.save(out, SMALL, param_tree.unflatten(second), step=2, overwrite=True)
    with checkpoints.open_checkpoint(out) as reader:
        assert reader.step == 2
        np.testing.assert_array_equal(reader.read("token_embedder/embedding"), second["token_embedder/embedding"])
    assert os.listdir(tmp_path) == ["checkpoint_0"]


def test_empty_destination_directory_is_filled_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    checkpoints.save(tmp_path / "out", SMALL, param_tree.unflatten(random_params(SMALL)))
    assert checkpoints.detect_format(tmp_path / "out") == ("gqa_t5x", str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["out"]


def test_non_checkpoint_directory_is_never_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no checkpoint"):
        checkpoints.CheckpointWriter(tmp_path / "out", SMALL, overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_our_format_detects_corrupted_and_truncated_chunks_by_parameter(tmp_path):
    flat = random_params(SMALL, 8)
    out = tmp_path / "checkpoint_0"
    checkpoints.save(out, SMALL, param_tree.unflatten(flat))
    # A valid zarr array with other values: only the manifest checksum can tell.
    ts.open(
        {"driver": "zarr", "kvstore": zarr_io.kvstore_for(str(out / "state" / "target.encoder.encoder_norm.scale"))},
        open=True,
    ).result().write(np.zeros(8, np.float32)).result()
    chunk = out / "state" / "target.decoder.decoder_norm.scale" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])
    with checkpoints.open_checkpoint(out) as reader:
        np.testing.assert_array_equal(reader.read("decoder/layers_0/mlp/wo/kernel"), flat["decoder/layers_0/mlp/wo/kernel"])
        with pytest.raises(checkpoints.CorruptCheckpointError, match="target.encoder.encoder_norm.scale.*checksum"):
            reader.read("encoder/encoder_norm/scale")
        with pytest.raises(checkpoints.CorruptCheckpointError, match="decoder/decoder_norm/scale"):
            reader.read("decoder/decoder_norm/scale")


_STREAMING_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from gqa_t5x import checkpoints, runtime
    from gqa_t5x.model import param_tree
    from gqa_t5x.model.config import T5Config

    config = T5Config(vocab_size=8192, emb_dim=512, num_heads=8, head_dim=64, mlp_dim=1024,
                      num_encoder_layers=12, num_decoder_layers=12)
    shapes = param_tree.param_shapes(config)
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    largest = max(int(np.prod(s)) * 4 for s in shapes.values())
    warm, src, dst = sys.argv[1:4]
    runtime.return_freed_buffers_to_os()  # as the command line does; the library does not

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def fill(i, shape):  # cheap to make and to compress: the test is about memory
        return np.full(shape, float(i), np.float32)

    # Warm up imports, thread pools and Orbax/JAX with a 2-layer checkpoint.
    small = config.replace(num_encoder_layers=1, num_decoder_layers=1)
    checkpoints.save(warm, small, param_tree.unflatten(
        {k: fill(i, s) for i, (k, s) in enumerate(param_tree.param_shapes(small).items())}))
    checkpoints.load(warm)
    base = peak()
    with checkpoints.CheckpointWriter(src, config, step=1) as w:
        for i, (k, s) in enumerate(shapes.items()):
            w.write(k, fill(i, s))
    write_peak = peak() - base
    with checkpoints.open_checkpoint(src) as r, checkpoints.CheckpointWriter(dst, r.config) as w:
        for k in r.keys():
            w.write(k, r.read(k))
    copy_peak = peak() - base
    print(total, largest, write_peak, copy_peak)
    """
)


@pytest.mark.slow
def test_writer_and_reader_stream_one_parameter_at_a_time(tmp_path):
    """Writing and copying a 320 MB checkpoint raise peak memory by far less than its size."""
    script = tmp_path / "stream.py"
    script.write_text(_STREAMING_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, str(script), *(str(tmp_path / d) for d in ("warm", "a", "b"))],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    total, largest, write_peak, copy_peak = map(int, proc.stdout.split()[-4:])
    assert total > 300e6 and largest < total / 15
    # Holding every parameter would add >= total bytes; streaming adds a few.
    # Holding every parameter would add >= total bytes; streaming adds a few
    # parameters' worth over the warm-up (which already read the largest one).
    assert write_peak < total / 8, (write_peak, total)
    assert copy_peak < total / 8, (copy_peak, total)
    with checkpoints.open_checkpoint(tmp_path / "b") as copy:
        assert copy.step == 0 and copy.config.num_decoder_layers == 12
        key = "decoder/layers_11/mlp/wo/kernel"
        np.testing.assert_array_equal(copy.read(key), np.full((1024, 512), list(copy.keys()).index(key), np.float32))


# ------------------------------------------------------- registry and detection
def test_every_format_is_registered_once_with_detection_reader_and_doc():
    names = checkpoints.format_names()
    assert sorted(names) == ["gqa_t5x", "huggingface", "mesh_tf", "t5x_legacy", "t5x_orbax"]
    for fmt in checkpoints.formats():
        assert callable(fmt.detect) and callable(fmt.reader) and fmt.doc
        assert checkpoints.get_format(fmt.name) is fmt
    assert checkpoints.get_format("huggingface").exporter is checkpoints.export_huggingface_checkpoint
    with pytest.raises(ValueError, match="already registered"):
        checkpoints.register_format(dataclasses.replace(checkpoints.get_format("mesh_tf")))
    with pytest.raises(checkpoints.CheckpointError, match="Unknown checkpoint format 'tf1'.*mesh_tf"):
        checkpoints.open_checkpoint(TINY, format="tf1")


def test_ours_without_manifest_is_an_incomplete_checkpoint_not_plain_orbax(tmp_path):
    out = tmp_path / "checkpoint_0"
    checkpoints.save(out, SMALL, param_tree.unflatten(random_params(SMALL)))
    (out / "gqa_t5x_checkpoint.json").unlink()  # e.g. a copy that stopped early
    with pytest.raises(checkpoints.IncompleteCheckpointError, match=f"{out} has the gqa_t5x layout.*no gqa_t5x_checkpoint.json"):
        checkpoints.open_checkpoint(out)
    assert not checkpoints.is_checkpoint(out)


def test_missing_parameter_directory_is_named_not_reported_as_a_missing_tree(tmp_path):
    out = tmp_path / "checkpoint_0"
    checkpoints.save(out, SMALL, param_tree.unflatten(random_params(SMALL)))
    missing = out / "state" / "target.decoder.layers_0.mlp.wo.kernel"
    shutil.rmtree(missing)
    with pytest.raises(checkpoints.CorruptCheckpointError, match=f"{missing}: array directory missing") as info:
        checkpoints.open_checkpoint(out)
    assert "token_embedder/embedding" not in str(info.value)


def _export_hf(directory: Path, seed: int = 0) -> dict[str, np.ndarray]:
    from gqa_t5x.checkpoints import huggingface

    flat = random_params(SMALL, seed)
    huggingface.export_huggingface(directory, SMALL, param_tree.unflatten(flat))
    return flat


@needs_shared
def test_huggingface_beside_a_t5x_checkpoint_file_is_ambiguous_until_a_format_is_chosen(tmp_path):
    both = tmp_path / "both"
    hf = _export_hf(both)
    shutil.copy(TINY / "checkpoint", both / "checkpoint")
    with pytest.raises(checkpoints.AmbiguousCheckpointError) as info:
        checkpoints.open_checkpoint(both)
    message = str(info.value)
    assert "huggingface" in message and "t5x_legacy" in message and "format=" in message and "--source_format" in message
    with checkpoints.open_checkpoint(both, format="huggingface") as reader:
        np.testing.assert_array_equal(reader.read("token_embedder/embedding"), hf["token_embedder/embedding"])
    with checkpoints.open_checkpoint(both, format="t5x_legacy") as reader:
        assert reader.config.vocab_size == 32128
    assert checkpoints.detect_format(both / "config.json") == ("huggingface", str(both))  # a file chooses too


def test_ours_beside_a_huggingface_export_is_ambiguous_and_each_reads_by_format(tmp_path):
    ours = tmp_path / "checkpoint_0"
    flat = random_params(SMALL, 1)
    checkpoints.save(ours, SMALL, param_tree.unflatten(flat), step=5)
    hf = _export_hf(tmp_path / "hf", seed=2)
    for name in ("config.json", "model.safetensors"):  # HF's config.json replaces ours
        shutil.copy(tmp_path / "hf" / name, ours / name)
    with pytest.raises(checkpoints.AmbiguousCheckpointError, match="2 formats") as info:
        checkpoints.open_checkpoint(ours)
    assert f"gqa_t5x ({ours})" in str(info.value) and f"huggingface ({ours})" in str(info.value)
    with checkpoints.open_checkpoint(ours, format="gqa_t5x") as reader:  # config from the manifest
        assert reader.config == SMALL and reader.step == 5
        np.testing.assert_array_equal(reader.read("token_embedder/embedding"), flat["token_embedder/embedding"])
    with checkpoints.open_checkpoint(ours, format="huggingface") as reader:
        np.testing.assert_array_equal(reader.read("token_embedder/embedding"), hf["token_embedder/embedding"])


PER_LAYER = SMALL.replace(decoder_self_kv_heads=(1, 4), decoder_cross_kv_heads=(2, 2), encoder_layer_kv_heads=(4, 2))


def test_per_layer_kv_heads_round_trip_through_our_format_bit_exact(tmp_path):
    flat = random_params(PER_LAYER, 6)
    out = tmp_path / "checkpoint_3"
    checkpoints.save(out, PER_LAYER, {"params": param_tree.unflatten(flat)}, step=3)
    record = json.loads((out / "config.json").read_text())
    assert record["decoder_self_kv_heads"] == [1, 4] and record["encoder_layer_kv_heads"] == [4, 2]
    assert record["decoder_cross_kv_heads"] is None and record["num_kv_heads"] == 2  # canonical: cross uniform
    with checkpoints.open_checkpoint(out) as reader:
        assert reader.config == PER_LAYER
        assert reader.shape("decoder/layers_0/self_attention/key/kernel") == (8, 3)
        assert reader.shape("encoder/layers_1/attention/value/kernel") == (8, 6)
        for key in reader.keys():
            assert reader.read(key).tobytes() == flat[key].tobytes(), key


def test_a_t5x_checkpoint_with_per_layer_widths_infers_the_per_layer_config(tmp_path):
    ckpt = write_t5x_legacy(tmp_path / "checkpoint_0", random_params(PER_LAYER, 7))
    with checkpoints.open_checkpoint(ckpt) as reader:
        assert reader.config.replace(vocab_size=SMALL.vocab_size) == PER_LAYER
        assert reader.config.layer_kv_heads("self") == (1, 4)
        assert reader.config.layer_kv_heads("cross") == (2, 2)
        assert reader.config.layer_kv_heads("encoder") == (4, 2)
