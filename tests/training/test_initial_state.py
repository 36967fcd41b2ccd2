"""`training.initial_state`: where a run starts (MODEL_DIR, the initial
checkpoint or scratch), the TRAIN_STEPS check, the shape comparison with an
initial checkpoint, and the state each start restores or builds."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x import checkpoints
from gqa_t5x.model import layer_stack
from gqa_t5x.model import models
from gqa_t5x.model import initialization
from gqa_t5x.model import network
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config
from gqa_t5x.training import continuation
from gqa_t5x.training import initial_state as ist
from gqa_t5x.training import optimizers
from gqa_t5x.training import partitioning
from gqa_t5x.training import train_state as ts


def _config(**changes) -> T5Config:
    base = dict(vocab_size=40, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=32, num_encoder_layers=1,
                num_decoder_layers=2, dropout_rate=0.0, dtype="float32")
    base.update(changes)
    return T5Config(**base)


def _numbered_params(config: T5Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Flat float32 params with known, distinct values."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in param_tree.param_shapes(config).items()}


def _save(path, config: T5Config, step: int, seed: int = 0) -> dict[str, np.ndarray]:
    flat = _numbered_params(config, seed)
    checkpoints.save(path, config, param_tree.unflatten(flat), step=step)
    return flat


class _ShapesOnly:
    """A checkpoint reader's shape index (what `check_param_shapes` reads)."""

    def __init__(self, config: T5Config, extra: dict | None = None, drop: tuple = ()):
        self.config = config
        self._shapes = {k: v for k, v in param_tree.param_shapes(config).items() if k not in drop}
        self._shapes.update(extra or {})

    def keys(self):
        return list(self._shapes)

    def shape(self, key):
        return self._shapes[key]


# ---------------------------------------------------------------- find_start
def test_checkpoint_step_is_the_recorded_step(tmp_path):
    config = _config()
    _save(tmp_path / "a", config, step=1234)
    _save(tmp_path / "b", config, step=0)
    assert ist.checkpoint_step(str(tmp_path / "a")) == 1234
    assert ist.checkpoint_step(str(tmp_path / "b")) == 0


def test_model_dir_wins_over_the_initial_checkpoint_which_wins_over_scratch(tmp_path):
    _save(tmp_path / "init", _config(), step=1000)
    init = str(tmp_path / "init")
    assert ist.find_start(7, init) == ist.StartInfo(7, "model_dir")
    assert ist.find_start(0, None) == ist.StartInfo(0, "model_dir")  # a step-0 checkpoint still counts
    assert ist.find_start(None, init) == ist.StartInfo(1000, "initial_checkpoint")
    assert ist.find_start(None, None) == ist.StartInfo(0, "scratch")
    assert ist.find_start(None, "") == ist.StartInfo(0, "scratch")
    assert ist.find_start(None, None).data_row is None


def test_a_missing_initial_checkpoint_is_an_error_naming_it(tmp_path):
    with pytest.raises(checkpoints.CheckpointNotFoundError, match="nothing_here"):
        ist.find_start(None, str(tmp_path / "nothing_here"))


# --------------------------------------------------------- check_train_steps
@pytest.mark.parametrize("total,start,finished", [
    (10, ist.StartInfo(0, "scratch"), False),
    (1, ist.StartInfo(0, "scratch"), False),
    (1001, ist.StartInfo(1000, "initial_checkpoint"), False),
    (8, ist.StartInfo(7, "model_dir"), False),
    (7, ist.StartInfo(7, "model_dir"), True),  # a finished run: rerunning it is a no-op
])
def test_train_steps_beyond_the_start_are_accepted(total, start, finished):
    assert ist.check_train_steps(total, start, "/m", None) is finished


@pytest.mark.parametrize("total", [0, -5, 2.5, "10", None])
def test_train_steps_must_be_a_positive_integer(total):
    with pytest.raises(ValueError, match="must be a positive integer"):
        ist.check_train_steps(total, ist.StartInfo(0, "scratch"), "/m", None)


def test_train_steps_below_model_dirs_checkpoint_names_the_checkpoint():
    with pytest.raises(ValueError) as raised:
        ist.check_train_steps(5, ist.StartInfo(7, "model_dir"), "/runs/m", None)
    message = str(raised.value)
    assert "TRAIN_STEPS=5 is below the step of MODEL_DIR's newest checkpoint /runs/m/checkpoint_7" in message
    assert "beyond 7" in message


def test_train_steps_at_the_initial_checkpoints_step_suggests_step_plus_n():
    with pytest.raises(ValueError) as raised:
        ist.check_train_steps(1000, ist.StartInfo(1000, "initial_checkpoint"), "/m", "/ckpt/checkpoint_1000")
    message = str(raised.value)
    assert "TRAIN_STEPS=1000 is not beyond step 1000" in message and "'/ckpt/checkpoint_1000'" in message
    assert "e.g. 2000" in message  # 1000 + 1000 more
    with pytest.raises(ValueError, match=r"e\.g\. 1300"):
        ist.check_train_steps(300, ist.StartInfo(1000, "initial_checkpoint"), "/m", "/c")
    # From scratch every positive count is beyond step 0; an initial checkpoint at step 0 alike.
    assert ist.check_train_steps(1, ist.StartInfo(0, "initial_checkpoint"), "/m", "/c") is False


# -------------------------------------------------------- check_param_shapes
def test_equal_shapes_pass_whatever_the_fields_that_do_not_change_shapes():
    model = _config(num_kv_heads=4, dtype="bfloat16", dropout_rate=0.1)
    ist.check_param_shapes(model, _ShapesOnly(_config(num_kv_heads=None)), "ckpt")  # no error


def test_differing_kv_heads_are_named_with_the_gin_macro_and_counted():
    model, found = _config(num_kv_heads=1), _config()
    with pytest.raises(ValueError) as raised:
        ist.check_param_shapes(model, _ShapesOnly(found), "/c/checkpoint_5")
    message = str(raised.value)
    assert message.startswith("INITIAL_CHECKPOINT_PATH='/c/checkpoint_5' does not match the model gin")
    assert "(gin macro NUM_KV_HEADS)" in message
    # 2 decoder layers x (self, cross) x (key, value): 8 kernels of width 16 -> 4.
    assert "8 parameter(s) differ" in message
    assert "decoder/layers_0/self_attention/key/kernel: model (16, 4) vs checkpoint (16, 16)" in message


def test_parameters_present_on_one_side_only_are_reported_absent():
    config = _config()
    reader = _ShapesOnly(config, extra={"decoder/extra/kernel": (3, 3)}, drop=("decoder/decoder_norm/scale",))
    with pytest.raises(ValueError) as raised:
        ist.check_param_shapes(config, reader, "ckpt")
    message = str(raised.value)
    assert "2 parameter(s) differ" in message and "parameter shapes differ" in message
    assert "decoder/decoder_norm/scale: model (16,) vs checkpoint absent" in message
    assert "decoder/extra/kernel: model absent vs checkpoint (3, 3)" in message


def test_every_field_that_changes_shapes_is_named_and_no_other():
    model = _config(mlp_dim=48, num_kv_heads=2, dtype="bfloat16", dropout_rate=0.3, vocab_size=44)
    with pytest.raises(ValueError) as raised:
        ist.check_param_shapes(model, _ShapesOnly(_config()), "ckpt")
    message = str(raised.value)
    for field in ("mlp_dim: model gin 48 vs checkpoint 32", "num_kv_heads: model gin 2 vs checkpoint",
                  "vocab_size: model gin 44 vs checkpoint 40"):
        assert field in message
    assert "dtype" not in message.split(". ")[0] and "dropout_rate" not in message


# ------------------------------------------------------ restore_or_initialize
def _small(**changes) -> T5Config:
    """1+1 layers: restore_or_initialize compiles the initialisation (seconds on 2 cores)."""
    return _config(num_decoder_layers=1, **changes)


def _restore_or_initialize(tmp_path, start, initial=None, batch_size=8, config=None, optimizer=None, **kw):
    config = config or _small()
    model = models.EncoderDecoderModel(network.Transformer(config))
    optimizer = optimizer or optimizers.adafactor()
    manager = ts.checkpoint_manager(tmp_path / "model", async_save=False)
    try:
        return ist.restore_or_initialize(
            start=start, model=model, optimizer=optimizer, partitioner=partitioning.Partitioner(num_partitions=1),
            manager=manager, initial_checkpoint_path=initial, batch_size=batch_size, rng=jax.random.PRNGKey(3),
            **kw)
    finally:
        manager.close()


def _flat_np(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in param_tree.flatten(tree).items()}


def test_scratch_start_is_a_fresh_init_at_step_zero_with_fresh_optimizer_state(tmp_path):
    config = _small()
    state, shardings, start = _restore_or_initialize(tmp_path, ist.StartInfo(0, "scratch"))
    assert int(state.step) == 0 and start == ist.StartInfo(0, "scratch", data_row=0)
    got = _flat_np(state.params)
    assert {k: v.shape for k, v in got.items()} == param_tree.param_shapes(config)
    assert all(v.dtype == np.float32 for v in got.values())
    # T5X initialises every norm scale to one; kernels and embeddings are random (not all equal).
    scales = [k for k in got if k.endswith("/scale")]
    assert len(scales) == 2 * 1 + 1 + 3 * 1 + 1  # encoder: 2 per layer + final; decoder: 3 per layer + final
    assert all(np.all(got[k] == 1.0) for k in scales)
    assert all(np.unique(got[k]).size > 1 for k in got if k.endswith("/kernel") or k.endswith("embedding"))
    fresh = optimizers.adafactor().init(state.params)
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(fresh)
    for a, b in zip(jax.tree_util.tree_leaves(state.opt_state), jax.tree_util.tree_leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(shardings.params) == jax.tree_util.tree_structure(state.params)


@pytest.mark.slow  # compiles the initialisation twice (about 10 s on 2 busy cores)
def test_scratch_start_is_the_models_random_init_for_the_runs_rng(tmp_path):
    config = _small()
    state, _, _ = _restore_or_initialize(tmp_path, ist.StartInfo(0, "scratch"))
    got = _flat_np(state.params)
    init = jax.jit(lambda rng: initialization.init_variables(config, rng)["params"])
    expected = _flat_np(init(jax.random.PRNGKey(3)))  # the rng `_restore_or_initialize` passes
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_initial_checkpoint_start_loads_its_values_at_its_step(tmp_path):
    config = _small()
    saved = _save(tmp_path / "init", config, step=1000, seed=5)
    start = ist.find_start(None, str(tmp_path / "init"))
    state, _, start = _restore_or_initialize(tmp_path, start, initial=str(tmp_path / "init"))
    assert int(state.step) == 1000 and start.resumed_from == "initial_checkpoint" and start.data_row == 0
    got = _flat_np(state.params)
    assert got.keys() == saved.keys()
    for key in saved:
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], saved[key], err_msg=key)
    # The optimizer state is fresh (adafactor's factored second moments start at zero).
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(state.opt_state)
               if np.ndim(x) > 0)


def test_an_initial_checkpoint_of_another_shape_is_refused_before_loading(tmp_path):
    _save(tmp_path / "init", _small(), step=10)
    with pytest.raises(ValueError, match=r"num_kv_heads: model gin 2 vs checkpoint .*NUM_KV_HEADS"):
        _restore_or_initialize(tmp_path, ist.StartInfo(10, "initial_checkpoint"), initial=str(tmp_path / "init"),
                               config=_small(num_kv_heads=2))


def _write_model_dir(tmp_path, config, step, meta_batch=8):
    flat = _numbered_params(config, seed=9)
    params = param_tree.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    opt_state = jax.tree_util.tree_map(  # moved away from a fresh state (counters left alone)
        lambda x: x + 0.25 if jnp.issubdtype(x.dtype, jnp.floating) else x, optimizers.adafactor().init(params))
    state = ts.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)
    meta = ts.metadata_for(config, data_start_step=4, data_start_row=100, batch_size=meta_batch, task="t", seed=1)
    manager = ts.checkpoint_manager(tmp_path / "model", async_save=False)
    ts.save(manager, state, meta)
    manager.close()
    return flat, opt_state, meta


def test_model_dir_start_restores_state_optimizer_and_the_data_row(tmp_path):
    config = _small()
    flat, opt_state, meta = _write_model_dir(tmp_path, config, step=7)
    state, _, start = _restore_or_initialize(tmp_path, ist.StartInfo(7, "model_dir"))
    assert int(state.step) == 7
    # Data began at step 4, row 100, 8 rows a step: step 7 reads row 100 + 3 * 8.
    assert start.data_row == 124 and start.restored_metadata == meta
    got = _flat_np(state.params)
    for key in flat:
        np.testing.assert_array_equal(got[key], flat[key], err_msg=key)
    for a, b in zip(jax.tree_util.tree_leaves(state.opt_state), jax.tree_util.tree_leaves(opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # restored, not fresh (+0.25)


def test_a_changed_batch_size_warns_and_resumes_by_example(tmp_path, caplog):
    _write_model_dir(tmp_path, _small(), step=7, meta_batch=8)
    with caplog.at_level(logging.WARNING):
        _, _, start = _restore_or_initialize(tmp_path, ist.StartInfo(7, "model_dir"), batch_size=16)
    assert start.data_row == 124  # rows already read, whatever the new batch
    assert "BATCH_SIZE changed from 8 to 16" in caplog.text and "global row 124" in caplog.text


# ------------------------------------- INITIAL_DATA_ROW, INITIAL_OPTIMIZER_STATE
def test_a_start_from_the_initial_checkpoint_reads_from_initial_data_row(tmp_path):
    _save(tmp_path / "init", _small(), step=1000)
    start = ist.find_start(None, str(tmp_path / "init"))
    _, _, start = _restore_or_initialize(tmp_path, start, initial=str(tmp_path / "init"), initial_data_row=8000)
    assert start.data_row == 8000 and start.notes == ()


def test_a_resume_from_model_dir_ignores_initial_data_row_and_optimizer_state_and_says_so(tmp_path):
    _write_model_dir(tmp_path, _small(), step=7)
    _, _, start = _restore_or_initialize(tmp_path, ist.StartInfo(7, "model_dir"), initial="/unused",
                                         initial_data_row=5, initial_optimizer_state="/nowhere")
    assert start.data_row == 124  # the checkpoint's row, as without the options
    assert start.notes == ("[train] INITIAL_DATA_ROW and INITIAL_OPTIMIZER_STATE ignored: resumed from "
                           "MODEL_DIR, whose checkpoint holds the data row (124) and the optimizer state.",)


@pytest.mark.parametrize("row", [-1, 2.5, True, "8"])
def test_initial_data_row_must_be_a_non_negative_integer(row):
    with pytest.raises(ValueError, match=r"INITIAL_DATA_ROW \(gqa_t5x\.training\.trainer\.train\."
                                         r"initial_data_row\)=.* must be a non-negative integer"):
        continuation.check_initial_options(row, None, "/ckpt")
    continuation.check_initial_options(0, None, None)  # row 0 from scratch is fine


def test_an_optimizer_state_without_an_initial_checkpoint_is_refused():
    with pytest.raises(ValueError, match=r"INITIAL_OPTIMIZER_STATE .*='/runs/a/checkpoint_5' needs "
                                         r"INITIAL_CHECKPOINT_PATH.*starts from scratch"):
        continuation.check_initial_options(None, "/runs/a/checkpoint_5", None)


def _write_trainer_checkpoint(directory, config: T5Config, step: int, optimizer, count: int, seed: int = 0):
    """A trainer checkpoint whose optimizer state is not fresh: floats + 0.25, counters = `count`
    (its parameters are `_save`'s of the same seed)."""
    params = param_tree.unflatten({k: jnp.asarray(v) for k, v in _numbered_params(config, seed=seed).items()})
    opt_state = jax.tree_util.tree_map(
        lambda x: x + 0.25 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.full_like(x, count),
        optimizer.init(params))
    state = ts.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)
    manager = ts.checkpoint_manager(directory, async_save=False)
    ts.save(manager, state, ts.metadata_for(config, data_start_step=0, batch_size=8, task="t", seed=1))
    manager.close()
    return str(directory / f"checkpoint_{step}"), opt_state


def _flat_opt(opt_state, params) -> dict[str, np.ndarray]:
    """{'0/v_row/decoder/...': array} of an optimizer state, unstacked when scanned."""
    counts = layer_stack.layer_counts(params)
    tree = layer_stack.unstack_tree(opt_state, counts) if counts else opt_state
    return {param_tree.keypath_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_without_initial_optimizer_state_the_state_is_fresh_and_with_it_restored_with_its_count(tmp_path):
    config, optimizer = _small(), optimizers.adafactor()
    _save(tmp_path / "init", config, step=7)
    opt_path, saved = _write_trainer_checkpoint(tmp_path / "pretrain", config, 7, optimizer, count=7)
    start = ist.find_start(None, str(tmp_path / "init"))
    fresh, _, _ = _restore_or_initialize(tmp_path, start, initial=str(tmp_path / "init"))
    restored, _, start = _restore_or_initialize(tmp_path, start, initial=str(tmp_path / "init"),
                                                initial_optimizer_state=opt_path)
    assert int(fresh.opt_state[0].count) == 0 and int(restored.opt_state[0].count) == 7
    want = _flat_opt(saved, saved)
    got = _flat_opt(restored.opt_state, restored.params)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert start.notes == (f"[train] optimizer state from {opt_path} (step 7): restored for "
                           f"{len(param_tree.param_shapes(config))} of {len(param_tree.param_shapes(config))} "
                           "parameters and the optimizer's step counters; none reinitialised.",)


@pytest.mark.parametrize("scan", [False, True])
def test_after_a_conversion_only_the_reshaped_and_rewritten_kernels_get_a_fresh_optimizer_state(tmp_path, scan):
    # Factor the tiny kernels' statistics, so the converted key kernel's v_row keeps
    # the original's shape (16,): matching by shape would wrongly restore it.
    optimizer = optimizers.adafactor(min_dim_size_to_factor=4)
    mha, gqa = _small(), _small(num_kv_heads=2)
    opt_path, saved = _write_trainer_checkpoint(tmp_path / "pretrain", mha, 5, optimizer, count=5)
    old, new = param_tree.param_shapes(mha), param_tree.param_shapes(gqa)
    reshaped = sorted(k for k in new if new[k] != old[k])
    assert reshaped == [f"decoder/layers_0/{a}/{p}/kernel" for a in ("encoder_decoder_attention", "self_attention")
                        for p in ("key", "value")]
    # The converted model: the checkpoint's parameters, new key/value kernels, and
    # one query kernel rewritten in place (as `align` rotates queries and outputs).
    rewritten = "decoder/layers_0/self_attention/query/kernel"
    flat = {k: v for k, v in _numbered_params(mha).items() if k not in reshaped}
    flat.update({k: v for k, v in _numbered_params(gqa, seed=4).items() if k in reshaped})
    flat[rewritten] = -flat[rewritten]
    checkpoints.save(tmp_path / "converted", gqa, param_tree.unflatten(flat), step=5)
    start = ist.find_start(None, str(tmp_path / "converted"))
    state, _, start = _restore_or_initialize(
        tmp_path, start, initial=str(tmp_path / "converted"), config=gqa.replace(scan_layers=scan),
        optimizer=optimizer, initial_optimizer_state=opt_path)
    assert bool(layer_stack.layer_counts(state.params)) is scan  # a scanned run's state is stacked
    got, want = _flat_opt(state.opt_state, state.params), _flat_opt(saved, saved)
    assert got["0/count"] == 5
    trap = "0/v_col/decoder/layers_0/self_attention/key/kernel"  # (16, 4 heads x 4) -> (16, 2 x 4)
    assert got[trap].shape == want[trap].shape == (16,)
    for key, value in got.items():
        param = next((p for p in new if key.endswith("/" + p)), None)
        if param in reshaped or param == rewritten:
            assert not np.any(value), f"{key}: not fresh"
        else:
            np.testing.assert_array_equal(value, want[key], err_msg=key)
    assert len(start.notes) == 1 and f"restored for {len(new) - 5} of {len(new)} parameters" in start.notes[0]
    assert "reinitialised for 4 whose shape differs from that checkpoint's model: " in start.notes[0]
    assert f"and 1 whose values differ from that checkpoint's: {rewritten}." in start.notes[0]
    assert all(name in start.notes[0] for name in reshaped)


def test_an_optimizer_state_of_another_optimizer_is_refused_naming_the_leaves(tmp_path):
    opt_path, _ = _write_trainer_checkpoint(tmp_path / "pretrain", _small(), 5, optimizers.adafactor(), count=5)
    with pytest.raises(ValueError) as raised:
        continuation.open_optimizer_state(opt_path, optimizers.adafactor(momentum=0.9))
    message = str(raised.value)
    assert message.startswith(f"INITIAL_OPTIMIZER_STATE (gqa_t5x.training.trainer.train.initial_optimizer_state)="
                              f"{opt_path!r} holds the state of another optimizer")
    assert "3/ema/decoder/decoder_norm/scale: checkpoint absent vs this optimizer (16,)" in message


def test_a_missing_or_converted_optimizer_state_is_refused_naming_the_option_and_path(tmp_path):
    with pytest.raises(checkpoints.CheckpointNotFoundError,
                       match=r"INITIAL_OPTIMIZER_STATE .*nowhere' does not exist"):
        continuation.open_optimizer_state(str(tmp_path / "nowhere"), optimizers.adafactor())
    _save(tmp_path / "converted", _small(), step=5)
    with pytest.raises(checkpoints.CheckpointError, match=r"converted'.* is not a training checkpoint written by "
                                                          r"this trainer.*carry no optimizer state"):
        continuation.open_optimizer_state(str(tmp_path / "converted"), optimizers.adafactor())


def test_an_initial_checkpoint_is_read_in_batches_bounded_by_bytes_in_key_order():
    from gqa_t5x.training import initial_state

    class Shapes:  # a reader's keys() and shape() only
        table = {"a": (2, 3), "b": (4,), "c": (10,), "d": (1,)}  # 24, 16, 40, 4 bytes

        def keys(self):
            return list(self.table)

        def shape(self, key):
            return self.table[key]

    assert initial_state._read_batches(Shapes(), 40) == [["a", "b"], ["c"], ["d"]]
    assert initial_state._read_batches(Shapes(), 1) == [["a"], ["b"], ["c"], ["d"]]  # larger ones alone
    assert initial_state._read_batches(Shapes(), 10**6) == [["a", "b", "c", "d"]]
