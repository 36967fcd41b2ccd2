"""`training.train_state`: the T5X-shaped state tree, its Orbax checkpoints
(save/restore round trip, missing and unfinished checkpoints, retention, the
best checkpoint) and the data position stored beside it."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.model.config import T5Config
from gqa_t5x.training import optimizers
from gqa_t5x.training import train_state as ts

_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _state(step: int, scale: float = 1.0) -> ts.TrainState:
    params = {"dense": {"kernel": scale * jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)},
              "norm": {"scale": jnp.full((4,), 2.0 * scale, jnp.float32)}}
    return ts.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                         opt_state=optimizers.adafactor().init(params))


def _shardings(state: ts.TrainState) -> ts.TrainState:
    return jax.tree_util.tree_map(lambda _: _DEVICE, state)


def _manager(directory, **kw):
    kw.setdefault("async_save", False)
    return ts.checkpoint_manager(directory, **kw)


def _leaves_equal(a, b) -> None:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_saved_tree_has_t5xs_layout_and_reads_back_into_a_state():
    state = _state(3)
    tree = state.to_tree()
    assert set(tree) == {"target", "state"} and set(tree["state"]) == {"step", "param_states"}
    assert tree["target"] is state.params and tree["state"]["param_states"] is state.opt_state
    back = ts.TrainState.from_tree(tree)
    assert int(back.step) == 3 and back.params is state.params and back.opt_state is state.opt_state


def test_abstract_tree_has_the_leaves_shapes_dtypes_and_shardings():
    state = _state(0)
    abstract = ts.abstract_tree(state, _shardings(state))
    kernel = abstract["target"]["dense"]["kernel"]
    assert (kernel.shape, kernel.dtype, kernel.sharding) == ((3, 4), jnp.float32, _DEVICE)
    step = abstract["state"]["step"]
    assert (step.shape, step.dtype) == ((), jnp.int32)


@pytest.mark.parametrize("async_save", [False, True])
def test_save_then_restore_gives_back_the_same_state_and_metadata(tmp_path, async_save):
    state = _state(7, scale=0.5)
    meta = {"batch_size": 8, "note": "hello", "nested": {"x": [1, 2]}}
    manager = _manager(tmp_path, async_save=async_save)
    assert ts.save(manager, state, meta) is True
    manager.wait_until_finished()
    manager.close()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_7"]
    assert {"state", "metadata"} <= set(os.listdir(tmp_path / "checkpoint_7"))
    reopened = _manager(tmp_path)
    assert reopened.latest_step() == 7
    restored, got_meta = ts.restore(reopened, 7, _state(0), _shardings(state))
    assert int(restored.step) == 7 and got_meta == meta
    _leaves_equal(restored.params, state.params)
    _leaves_equal(restored.opt_state, state.opt_state)
    # The optimizer state keeps its (named tuple) structure.
    assert jax.tree_util.tree_structure(restored.opt_state) == jax.tree_util.tree_structure(state.opt_state)
    assert restored.params["dense"]["kernel"].sharding == _DEVICE


def test_restore_accepts_an_abstract_template(tmp_path):
    state = _state(4)
    manager = _manager(tmp_path)
    ts.save(manager, state, {})
    template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, _ = ts.restore(manager, 4, template, _shardings(state))
    np.testing.assert_array_equal(np.asarray(restored.params["dense"]["kernel"]), np.arange(12.0).reshape(3, 4))
    manager.close()


def test_saving_an_already_saved_step_is_a_no_op_that_keeps_the_first(tmp_path):
    manager = _manager(tmp_path)
    assert ts.save(manager, _state(5, scale=1.0), {"which": "first"}) is True
    assert ts.save(manager, _state(5, scale=9.0), {"which": "second"}) is False
    restored, meta = ts.restore(manager, 5, _state(0), _shardings(_state(0)))
    assert meta == {"which": "first"}
    np.testing.assert_array_equal(np.asarray(restored.params["norm"]["scale"]), np.full(4, 2.0))
    manager.close()


def test_an_empty_model_dir_has_no_step_and_a_missing_step_cannot_be_restored(tmp_path):
    manager = _manager(tmp_path / "model")
    assert manager.latest_step() is None and list(manager.all_steps()) == []
    assert ts.best_so_far(_manager(tmp_path / "best", best_metric="score")) is None
    ts.save(manager, _state(2), {})
    with pytest.raises(FileNotFoundError, match="checkpoint_3"):
        ts.restore(manager, 3, _state(0), _shardings(_state(0)))
    manager.close()


def test_an_unfinished_save_is_ignored_and_removed_by_the_next_start(tmp_path):
    manager = _manager(tmp_path)
    ts.save(manager, _state(2), {"good": True})
    manager.close()
    # What a run killed while saving step 4 leaves on local disk: Orbax's temporary directory.
    unfinished = tmp_path / "checkpoint_4.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "checkpoint_2", unfinished)
    reopened = _manager(tmp_path)
    assert list(reopened.all_steps()) == [2] and reopened.latest_step() == 2
    _, meta = ts.restore(reopened, 2, _state(0), _shardings(_state(0)))
    assert meta == {"good": True}
    # The clean-up runs in the background from the start; the first save waits for it.
    ts.save(reopened, _state(3), {})
    assert not unfinished.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_2", "checkpoint_3"]
    reopened.close()


def test_a_checkpoint_missing_its_state_item_fails_naming_it(tmp_path):
    manager = _manager(tmp_path)
    ts.save(manager, _state(6), {})
    manager.close()
    shutil.rmtree(tmp_path / "checkpoint_6" / ts.STATE_ITEM)
    reopened = _manager(tmp_path)
    with pytest.raises(Exception, match="state"):
        ts.restore(reopened, 6, _state(0), _shardings(_state(0)))
    reopened.close()


def test_max_to_keep_keeps_the_newest_steps(tmp_path):
    manager = _manager(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        ts.save(manager, _state(step), {"step": step})
    manager.close()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_2", "checkpoint_3"]


@pytest.mark.parametrize("mode,best", [("max", 20), ("min", 30)])
def test_best_so_far_is_the_metadata_of_the_best_scored_step(tmp_path, mode, best):
    manager = _manager(tmp_path, best_metric="score", best_mode=mode, max_to_keep=3)
    for step, score in ((10, 2.0), (20, 5.0), (30, 1.0)):
        ts.save(manager, _state(step), {"eval_score": score, "eval_metric": "bleu"}, metrics={"score": score})
    got = ts.best_so_far(manager)
    assert got["step"] == best and got["eval_score"] == {10: 2.0, 20: 5.0, 30: 1.0}[best]
    assert got["eval_metric"] == "bleu"
    manager.close()


def test_best_so_far_is_none_when_the_best_checkpoint_has_no_evaluation(tmp_path):
    manager = _manager(tmp_path, best_metric="score")
    ts.save(manager, _state(10), {"batch_size": 8}, metrics={"score": 1.0})
    assert manager.best_step() == 10 and ts.best_so_far(manager) is None
    manager.close()


def test_metadata_records_the_config_and_data_position():
    config = T5Config(vocab_size=40, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=32, num_encoder_layers=1,
                      num_decoder_layers=1, num_kv_heads=2, dtype="float32")
    meta = ts.metadata_for(config, data_start_step=100, batch_size=np.int64(8), task="c4", seed=None,
                           data_start_row=640, data_pipeline="cache", data_cache="abc123")
    assert {k: v for k, v in meta.items() if k != "config"} == {
        "data_start_step": 100, "data_start_row": 640, "batch_size": 8, "data_pipeline": "cache",
        "data_cache": "abc123", "mixture_or_task_name": "c4", "seed": None}
    assert type(meta["batch_size"]) is int
    assert T5Config.from_dict(meta["config"]) == config
    defaults = ts.metadata_for(config, data_start_step=0, batch_size=4, task="t", seed=3)
    assert (defaults["data_start_row"], defaults["data_pipeline"], defaults["data_cache"]) == (0, "stream", None)


@pytest.mark.parametrize("meta,step,row", [
    ({"data_start_step": 100, "data_start_row": 640, "batch_size": 8}, 100, 640),
    ({"data_start_step": 100, "data_start_row": 640, "batch_size": 8}, 103, 640 + 3 * 8),
    ({"data_start_step": 1000, "batch_size": 16}, 1010, 160),  # written before rows were recorded
    ({"data_start_step": 0, "data_start_row": 0, "batch_size": 32}, 7, 224),
])
def test_data_row_is_the_start_row_plus_the_rows_read_since(meta, step, row):
    assert ts.data_row(meta, step) == row
