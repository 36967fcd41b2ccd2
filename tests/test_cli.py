"""`gqa-t5x convert` / `gqa-t5x export` and the convert run mode, end to end."""

from __future__ import annotations

import os
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
    random_params,
    tiny_config,
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


@pytest.mark.slow  # the fast tier keeps convert-then-export
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
    code, out, err = _run(["export", "--checkpoint", gqa, "--format", "huggingface", "--output", tmp_path / "hf",
                           "--no_progress", "--weights_only"], capsys)
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
    export = ["export", "--checkpoint", source, "--format", "huggingface", "--no_progress", "--weights_only",
              "--output"]
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


# ------------------------------------------------------------------------ help
def _subparsers(parser):
    """{name: parser} of `gqa-t5x`'s commands."""
    return parser.get_default("_parsers")


def _help(argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _shown_default(default) -> str:
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def _entry(out: str, flag: str) -> str:
    """The help text of `flag`: its line in the flag list and the indented lines after it."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("  ") and line.split() and line.split()[0].rstrip(",") == flag)
    entry = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("        "):
            break
        entry.append(line)
    return " ".join(" ".join(entry).split())


@pytest.mark.parametrize("command", [c.name for c in cli.COMMANDS])
def test_every_commands_help_has_examples_of_itself_and_shows_defaults(command, capsys, monkeypatch):
    out = _help([command], capsys, monkeypatch)
    examples = out.split("\nexamples:\n", 1)[1].splitlines()
    starts = [line.strip() for line in examples if not line.startswith("      ")]
    assert starts and all(line.startswith(f"gqa-t5x {command}") for line in starts), examples
    for action in _subparsers(cli.build_parser())[command]._actions:
        default = action.default
        if not action.option_strings or default in (None, False, "", [], ()) or action.dest == "help":
            continue
        described = _entry(out, action.option_strings[0])
        assert "default" in described and _shown_default(default) in described.replace(" ", ""), described


def test_convert_help_marks_required_flags_and_shows_method_and_seed_defaults(capsys, monkeypatch):
    out = _help(["convert"], capsys, monkeypatch)
    usage = out.split("\n\n", 1)[0]
    assert usage.startswith("usage: gqa-t5x convert --source SOURCE --output OUTPUT --num_kv_heads NUM_KV_HEADS ")
    assert "[--source" not in usage and "--gin_file=gin/runs/convert.gin" in usage
    required = out.split("required (or --gin_file", 1)[1].split("\n\n", 1)[0]
    assert all(flag in required for flag in ("--source", "--output", "--num_kv_heads"))
    assert out.index("required (or --gin_file") < out.index("\noptions:")  # required flags first
    assert _entry(out, "--method").endswith("(default: mean)")
    assert _entry(out, "--seed").endswith("(default: 0)")
    assert "--gin.MODEL_DIR=\\\"/runs/x\\\"" in out  # how to quote a string binding


def test_top_level_and_launcher_help_point_at_examples(capsys, monkeypatch):
    out = _help([], capsys, monkeypatch)
    assert "list " in out and "gqa-t5x COMMAND --help" in out
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        cli.launcher_main(["--help"])
    out = capsys.readouterr().out
    assert "examples:\n  python -m gqa_t5x.main --gin_file=" in out and "--run_mode=convert" in out


@pytest.mark.parametrize("argv,prefix,flag", [
    (["convert", "--source", "s", "--output", "o", "--num_kv_head", "2"], "--num_kv_head", "--num_kv_heads"),
    (["export", "--check", "c", "--format", "huggingface", "--output", "o"], "--check", "--checkpoint"),
    (["reproduce", "--output", "o", "--seed=1"], "--seed=1", "--seeds"),
])
def test_a_flag_prefix_is_refused_naming_the_flag(argv, prefix, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"gqa-t5x {argv[0]}: error: unrecognized arguments: {prefix} (did you mean {flag}?" in err
    assert list(tmp_path.iterdir()) == []


def test_launcher_refuses_a_flag_prefix_too(capsys):
    with pytest.raises(SystemExit) as info:
        cli.launcher_main(["--gin_file=gin/runs/convert.gin", "--run_mod=convert"])
    assert info.value.code == 2
    assert "did you mean --run_mode?" in capsys.readouterr().err


def test_every_parser_refuses_abbreviations():
    parsers = [cli.build_parser(), cli.build_launcher_parser(), *_subparsers(cli.build_parser()).values()]
    assert all(parser.allow_abbrev is False for parser in parsers)


@pytest.mark.parametrize("command,gin", [("eval", "gin/runs/eval.gin"), ("infer", "gin/runs/infer.gin"),
                                         ("train", "gin/runs/uptrain.gin")])
def test_a_run_command_without_gin_files_suggests_its_own_run_gin(command, gin, capsys):
    assert cli.main([command]) == 2
    err = capsys.readouterr().err
    _assert_user_error(2, err, f"gqa-t5x {command}: error: --gin_file is required", f"--gin_file={gin}")
    if command != "train":
        assert "uptrain.gin" not in err


def test_an_unquoted_string_binding_names_the_flag_and_the_quoting_rule(tmp_path, capsys):
    code = cli.main(["infer", "--gin_file=gin/runs/infer.gin", f"--gin.CHECKPOINT_PATH={tmp_path}/ckpt",
                     f'--gin.INPUT_FILE="{tmp_path}/in.txt"'])
    err = capsys.readouterr().err
    _assert_user_error(code, err, f"--gin.CHECKPOINT_PATH={tmp_path}/ckpt: a gin value that is a string must be "
                       f'quoted: --gin.CHECKPOINT_PATH=\\"{tmp_path}/ckpt\\"')
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ list
@pytest.mark.parametrize("what,names", [
    ("methods", ("mean", "first", "random", "align", "lsq")),
    ("groupings", ("contiguous", "similarity", "PATH")),
    ("formats", ("huggingface", "gqa_t5x", "t5x_orbax", "t5x_legacy", "mesh_tf")),
    ("presets", ("paper",)),
    ("tasks", ("gqa_cnn_dailymail", "gqa_c4_span_corruption", "gqa_wmt14_ende", "gqa_eval_mixture")),
])
def test_list_names_what_each_registry_holds_one_line_each(what, names, capsys):
    assert cli.main(["list", what]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].endswith(":") and all(len(line) <= 120 for line in lines)
    listed = {line.split()[0] for line in lines[1:] if line.startswith("  ") and not line.startswith("   ")}
    assert set(names) <= listed, listed


def test_list_describes_each_entry(capsys):
    assert cli.main(["list", "methods"]) == 0
    methods = capsys.readouterr().out
    assert "mean of the group's key (value) heads (the paper)" in methods
    assert cli.main(["list"]) == 0
    everything = capsys.readouterr().out
    for title in ("seqio tasks", "conversion methods", "conversion groupings", "checkpoint formats", "bench presets"):
        assert f"\n{title}" in f"\n{everything}"
    assert "export --format huggingface" in everything and "Table 1 CNN" in everything


# ---------------------------------------------------------------- grouping
@pytest.mark.slow
def test_convert_grouping_flag_and_gin_macro_choose_and_reproduce_groups_and_refuse_unknown_names(tmp_path, capsys):
    from gqa_t5x import checkpoints
    from gqa_t5x.conversion import calibration

    config = tiny_config()
    params = random_params(config, seed=4)
    checkpoints.save(tmp_path / "mha", config, params)
    enc, dec_in, tgt = tokens(0, config.vocab_size, batch=4)
    stats = calibration.save_statistics(tmp_path / "stats.npz", calibration.collect_statistics(
        config, params, [{"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt}]))
    base = ["convert", "--source", tmp_path / "mha", "--num_kv_heads", 2, "--no_progress"]
    code, out, err = _run(base + ["--output", tmp_path / "sim", "--grouping", "similarity", "--calibration", stats],
                          capsys)
    assert code == 0 and "grouping=similarity" in out, err
    conversion.convert_checkpoint(tmp_path / "mha", tmp_path / "api", 2, grouping="similarity",
                                  calibration=str(stats), progress=False)
    code, _, err = _run(["convert", "--gin_file=gin/runs/convert.gin", f'--gin.SOURCE="{tmp_path / "mha"}"',
                         f'--gin.OUTPUT="{tmp_path / "gin"}"', "--gin.NUM_KV_HEADS=2",
                         f"--gin.GROUPING='{tmp_path / 'sim'}'"], capsys)  # reproduced from the record
    assert code == 0, err
    _, by_flags = checkpoints.load(tmp_path / "sim")
    for other in ("api", "gin"):
        _, by_other = checkpoints.load(tmp_path / other)
        for path, value in flat(by_flags).items():
            np.testing.assert_array_equal(flat(by_other)[path], value, err_msg=f"{other} {path}")
    code, _, err = _run(base + ["--output", tmp_path / "bad", "--grouping", "simlarity"], capsys)
    assert code == 2 and "Unknown grouping 'simlarity': choose one of ['contiguous', 'similarity']" in err
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------- a quiet console
@pytest.mark.slow
def test_importing_the_command_line_loads_no_jax_and_its_commands_print_no_tensorflow_notices(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    probe = "import sys, gqa_t5x.cli; print(sorted({'jax', 'tensorflow'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.strip() == "[]", result.stderr
    # `list tasks` imports TensorFlow (seqio): its C++ start-up notices must not reach the console.
    result = subprocess.run([sys.executable, "-m", "gqa_t5x.cli", "list", "tasks"], capture_output=True,
                            text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "gqa_cnn_dailymail" in result.stdout
    assert result.stderr == "", result.stderr


def test_reproduce_refuses_reduced_together_with_another_preset_before_writing(tmp_path, capsys):
    code, _, err = _run(["reproduce", "--output", tmp_path / "study", "--reduced", "--preset", "gpu"], capsys)
    assert code != 0 and "--reduced and --preset gpu contradict each other" in err
    assert not (tmp_path / "study").exists()


def test_per_kind_flags_and_gin_macros_convert_alike_and_each_layer_gets_its_count(tmp_path, capsys):
    if not T5X_TINY.exists():
        pytest.skip(f"T5X fixture not found at {T5X_TINY}")
    from gqa_t5x import checkpoints

    code, out, err = _run(["convert", "--source", T5X_TINY, "--output", tmp_path / "flags", "--method", "first",
                           "--decoder_self_kv_heads", "1,2", "--decoder_cross_kv_heads", "4", "--no_progress"], capsys)
    assert code == 0, err
    assert "decoder_self_kv_heads=(1, 2), decoder_cross_kv_heads=(4, 4)" in out
    code, _, err = _run([
        "convert", "--gin_file=gin/runs/convert.gin", f'--gin.SOURCE="{T5X_TINY}"', f'--gin.OUTPUT="{tmp_path / "gin"}"',
        "--gin.NUM_KV_HEADS=None", "--gin.DECODER_SELF_KV_HEADS=(1, 2)", "--gin.DECODER_CROSS_KV_HEADS=4",
        "--gin.METHOD='first'"], capsys)
    assert code == 0, err
    config_a, a = checkpoints.load(tmp_path / "flags")
    config_b, b = checkpoints.load(tmp_path / "gin")
    assert config_a == config_b
    assert [config_a.kv_heads("self", i) for i in (0, 1)] == [1, 2] and config_a.layer_kv_heads("cross") == (4, 4)
    assert flat(a)["decoder/layers_0/self_attention/key/kernel"].shape == (8, 3)
    assert flat(a)["decoder/layers_1/self_attention/key/kernel"].shape == (8, 6)
    for path, value in flat(b).items():
        np.testing.assert_array_equal(flat(a)[path], value, err_msg=path)


def test_per_kind_flags_and_macros_refuse_text_that_is_not_counts(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        _run(["convert", "--source", tmp_path, "--output", tmp_path / "o", "--decoder_self_kv_heads", "1,x"], capsys)
    assert exit_info.value.code == 2
    assert "'1,x' is not a key/value head count or a comma-separated list" in capsys.readouterr().err
    if not T5X_TINY.exists():
        pytest.skip(f"T5X fixture not found at {T5X_TINY}")
    code, _, err = _run(["convert", "--gin_file=gin/runs/convert.gin", f'--gin.SOURCE="{T5X_TINY}"',
                         f'--gin.OUTPUT="{tmp_path / "o"}"', "--gin.NUM_KV_HEADS=None",
                         '--gin.DECODER_SELF_KV_HEADS="(1, 2)"'], capsys)
    assert code != 0 and "decoder_self_kv_heads='(1, 2)' is not a key/value head count or a sequence" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,seeds", [([], (0, 1, 2, 3, 4)), (["--reduced"], (0, 1)),
                                         (["--preset", "gpu"], (0, 1, 2, 3, 4)), (["--reduced", "--seeds", "3"], (3,))])
def test_reproduce_seeds_default_to_the_presets_and_given_seeds_win(tmp_path, capsys, monkeypatch, flags, seeds):
    from gqa_t5x.experiments.study import reproduction

    calls = []
    monkeypatch.setattr(reproduction, "run_study", lambda output, **kw: calls.append(kw))
    code, _, err = _run(["reproduce", "--output", tmp_path / "study", *flags], capsys)
    assert code == 0, err
    assert tuple(calls[0]["seeds"]) == seeds
    assert f"--seeds {','.join(map(str, seeds))}" in calls[0]["command"]
