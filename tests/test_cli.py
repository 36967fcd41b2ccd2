"""`gqa-t5x convert` / `gqa-t5x export` and the convert run mode, end to end."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conversion_utils import (
    T5X_TINY,
    config_for_hf,
    flat,
    hf_logits,
    make_hf_t5_v1_1,
    masked_max_diff,
    our_logits,
    tokens,
)
from gqa_t5x import cli
from gqa_t5x import conversion
from paths import REPO

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random HuggingFace T5 v1.1 saved with save_pretrained, and the model."""
    model = make_hf_t5_v1_1(seed=9)
    directory = tmp_path_factory.mktemp("hf_src") / "t5_v1_1"
    model.save_pretrained(directory)
    return directory, model


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_convert_hf_to_ours_at_g_equal_h_gives_hf_logits(hf_dir, tmp_path, capsys):
    from gqa_t5x import checkpoints

    source, model = hf_dir
    code, out, err = _run(["convert", "--source", source, "--output", tmp_path / "mha", "--num_kv_heads", 4, "--no_progress"], capsys)
    assert code == 0, err
    assert "num_kv_heads=4" in out
    config, params = checkpoints.load(tmp_path / "mha")
    assert config == config_for_hf(model).replace(num_kv_heads=4)
    batch = tokens(5, config.vocab_size)
    assert masked_max_diff(our_logits(config, params, batch), hf_logits(model, batch), batch[2]) <= 1e-4


@pytest.mark.parametrize("groups,method", [(2, "mean"), (1, "align")])
def test_cli_convert_then_export_gives_our_gqa_logits_in_huggingface(hf_dir, tmp_path, capsys, groups, method):
    from gqa_t5x import checkpoints

    source, _ = hf_dir
    gqa = tmp_path / "gqa"
    code, _, err = _run(["convert", "--source", source, "--output", gqa, "--num_kv_heads", groups, "--method", method], capsys)
    assert code == 0, err
    assert "param" in err  # the tqdm progress bar
    code, out, err = _run(["export", "--checkpoint", gqa, "--format", "huggingface", "--output", tmp_path / "hf", "--no_progress"], capsys)
    assert code == 0, err
    config, params = checkpoints.load(gqa)
    assert config.num_kv_heads == groups and config.encoder_num_kv_heads == 4
    assert params["decoder"]["layers_0"]["self_attention"]["key"]["kernel"].shape == (24, 6 * groups)
    batch = tokens(6, config.vocab_size)
    exported = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert masked_max_diff(our_logits(config, params, batch), hf_logits(exported, batch), batch[2]) <= 1e-4


def test_gin_entry_point_converts_like_the_flags(tmp_path, capsys):
    if not T5X_TINY.exists():
        pytest.skip(f"T5X fixture not found at {T5X_TINY}")
    from gqa_t5x import checkpoints

    code, _, err = _run([
        "convert", "--gin_file=gin/runs/convert.gin", f'--gin.SOURCE="{T5X_TINY}"',
        f'--gin.OUTPUT="{tmp_path / "gin"}"', "--gin.NUM_KV_HEADS=2", "--gin.METHOD='first'",
    ], capsys)
    assert code == 0, err
    code, _, err = _run(["convert", "--source", T5X_TINY, "--output", tmp_path / "flags", "--num_kv_heads", 2, "--method", "first"], capsys)
    assert code == 0, err
    config_a, a = checkpoints.load(tmp_path / "gin")
    config_b, b = checkpoints.load(tmp_path / "flags")
    assert config_a == config_b and config_a.num_kv_heads == 2
    for path, value in flat(b).items():
        np.testing.assert_array_equal(flat(a)[path], value)


@pytest.mark.slow
def test_python_dash_m_main_run_mode_convert_runs_in_a_fresh_process(tmp_path):
    if not T5X_TINY.exists():
        pytest.skip(f"T5X fixture not found at {T5X_TINY}")
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "gqa_t5x.main", "--gin_file=gin/runs/convert.gin", "--run_mode=convert",
         f'--gin.SOURCE="{T5X_TINY}"', f'--gin.OUTPUT="{tmp_path / "out"}"', "--gin.NUM_KV_HEADS=1"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out").is_dir()
    missing = subprocess.run(
        [sys.executable, "-m", "gqa_t5x.main", "--gin_file=gin/runs/convert.gin", "--run_mode=convert",
         "--gin.NUM_KV_HEADS=1"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert missing.returncode == 2
    assert "SOURCE" in missing.stderr and "Traceback" not in missing.stderr


# ------------------------------------------------------------------ bad input
def _assert_user_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("gqa-t5x"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_source_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    code, _, err = _run(["convert", "--source", tmp_path / "nope", "--output", tmp_path / "out", "--num_kv_heads", 2], capsys)
    _assert_user_error(code, err, "gqa-t5x convert: error:", str(tmp_path / "nope"))
    assert sorted(tmp_path.iterdir()) == []


def test_directory_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["convert", "--source", tmp_path / "empty", "--output", tmp_path / "out", "--num_kv_heads", 2], capsys)
    _assert_user_error(code, err, str(tmp_path / "empty"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_num_kv_heads_not_dividing_num_heads_names_both_and_the_divisors(hf_dir, tmp_path, capsys):
    source, _ = hf_dir
    code, _, err = _run(["convert", "--source", source, "--output", tmp_path / "out", "--num_kv_heads", 3], capsys)
    _assert_user_error(code, err, "num_kv_heads=3", "num_heads=4", "[1, 2, 4]")
    assert list(tmp_path.iterdir()) == []
    code, _, err = _run(["convert", "--source", source, "--output", tmp_path / "out", "--num_kv_heads", 8], capsys)
    _assert_user_error(code, err, "num_kv_heads=8")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(hf_dir, tmp_path, capsys):
    from gqa_t5x import checkpoints

    source, _ = hf_dir
    out = tmp_path / "out"
    assert _run(["convert", "--source", source, "--output", out, "--num_kv_heads", 2, "--no_progress"], capsys)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, _, err = _run(["convert", "--source", source, "--output", out, "--num_kv_heads", 1, "--no_progress"], capsys)
    _assert_user_error(code, err, str(out), "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert checkpoints.open_checkpoint(out).config.num_kv_heads == 2
    code, _, err = _run(["convert", "--source", source, "--output", out, "--num_kv_heads", 1, "--overwrite", "--no_progress"], capsys)
    assert code == 0, err
    assert checkpoints.open_checkpoint(out).config.num_kv_heads == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_unknown_method_is_rejected_before_anything_is_written(hf_dir, tmp_path, capsys):
    source, _ = hf_dir
    code, _, err = _run(["convert", "--source", source, "--output", tmp_path / "o", "--num_kv_heads", 2, "--method", "median"], capsys)
    _assert_user_error(code, err, "'median'", "align")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="median"):
        conversion.convert_checkpoint(source, tmp_path / "o", 2, method="median")
    assert list(tmp_path.iterdir()) == []


def test_missing_required_flag_and_export_refusing_to_replace(hf_dir, tmp_path, capsys):
    source, _ = hf_dir
    code, _, err = _run(["convert", "--source", source, "--output", tmp_path / "o"], capsys)
    _assert_user_error(code, err, "--num_kv_heads is required")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x").write_text("x")
    export = ["export", "--checkpoint", source, "--format", "huggingface", "--no_progress", "--output"]
    code, _, err = _run([*export, tmp_path / "notes", "--overwrite"], capsys)
    _assert_user_error(code, err, "gqa-t5x export: error:", "holds no checkpoint")
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["x"]
    assert _run([*export, tmp_path / "hf"], capsys)[0] == 0
    code, _, err = _run([*export, tmp_path / "hf"], capsys)
    _assert_user_error(code, err, "already holds a huggingface checkpoint", "--overwrite")


def test_a_refused_pickle_is_a_one_line_error_without_torchs_advice(hf_dir, tmp_path, capsys):
    import os

    import torch

    _, model = hf_dir
    source = tmp_path / "bin"
    source.mkdir()
    model.config.save_pretrained(source)
    torch.save({"shared.weight": _RunsCode(tmp_path / "pwned")}, source / "pytorch_model.bin")
    code, _, err = _run(["convert", "--source", source, "--output", tmp_path / "out", "--num_kv_heads", 2], capsys)
    _assert_user_error(code, err, "refused", str(source / "pytorch_model.bin"))
    assert "weights_only" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]
    assert not os.path.exists(tmp_path / "pwned")


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious .bin does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_help_lists_convert_and_export(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "convert" in out and "export" in out
