"""Step directories of a run, and the gin call that names the newest one."""

from __future__ import annotations

import gin
import pytest

from gqa_t5x.checkpoints import steps


def test_complete_steps_ignore_unfinished_writes_and_other_entries(tmp_path):
    for name in ("checkpoint_5", "checkpoint_12", "checkpoint_40.orbax-checkpoint-tmp-1", "best", "train"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint_99").write_text("a file, not a checkpoint")
    assert steps.complete_steps(tmp_path) == [5, 12]
    assert steps.complete_steps(tmp_path / "absent") == []


def test_a_printed_command_resolves_the_newest_checkpoint_when_it_runs(tmp_path):
    gin.clear_config()
    try:
        gin.parse_config([
            "X = @gqa_t5x.checkpoints.steps.latest_checkpoint()",
            f"gqa_t5x.checkpoints.steps.latest_checkpoint.model_dir = '{tmp_path}'",
        ])
        with pytest.raises(FileNotFoundError, match="has not finished"):
            gin.query_parameter("%X").scoped_configurable_fn()
        (tmp_path / "checkpoint_1000").mkdir()
        (tmp_path / "checkpoint_1050").mkdir()
        assert gin.query_parameter("%X").scoped_configurable_fn() == str(tmp_path / "checkpoint_1050")
    finally:
        gin.clear_config()
