"""Gin flags, file lookup, and the checks T5X does not make (unknown macros)."""

from __future__ import annotations

import pytest

from gqa_t5x import gin_config
from gqa_t5x.errors import UsageError

TINY = "gin/models/t5_1_1/tiny.gin"
UPTRAIN = "gin/runs/uptrain.gin"


def test_gin_bindings_split_like_t5x():
    rest, bindings = gin_config.split_gin_flags(
        ["--gin_file=a.gin", "--gin.MODEL_DIR=\"/x\"", "--gin.TRAIN_STEPS", "5", "--run_mode=eval"])
    assert rest == ["--gin_file=a.gin", "--run_mode=eval"]
    assert bindings == ['MODEL_DIR="/x"', "TRAIN_STEPS=5"]


def test_a_gin_flag_without_value_is_a_usage_error():
    with pytest.raises(UsageError, match="--gin.TRAIN_STEPS needs a value"):
        gin_config.split_gin_flags(["--gin.TRAIN_STEPS"])


def test_misspelled_macro_is_an_error_naming_the_closest_known_macro():
    with pytest.raises(UsageError, match=r"--gin\.CHECKPOINT_PERIODD .*did you mean --gin\.CHECKPOINT_PERIOD\?"):
        gin_config.parse_gin([TINY, UPTRAIN], ["CHECKPOINT_PERIODD=1"], check_required=False)


def test_unknown_macro_without_a_close_match_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"--gin\.FOO is not a macro.*known macros: .*MODEL_DIR"):
        gin_config.parse_gin([TINY, UPTRAIN], ["FOO=1"], check_required=False)


def test_known_macros_and_configurable_parameters_are_accepted():
    config = gin_config.parse_gin(
        [TINY, UPTRAIN],
        ["CHECKPOINT_PERIOD=7", "NUM_KV_HEADS=2", "network.T5Config.mlp_dim=16"],
        check_required=False,
    )
    assert "CHECKPOINT_PERIOD = 7" in config
    assert gin_config.model_config().mlp_dim == 16 and gin_config.model_config().num_kv_heads == 2


def test_unknown_configurable_parameter_is_rejected_by_gin():
    with pytest.raises(ValueError, match="nonexistent"):
        gin_config.parse_gin([TINY], ["network.T5Config.nonexistent=1"], check_required=False)


def test_required_macros_are_all_named():
    with pytest.raises(UsageError) as info:
        gin_config.parse_gin([TINY, UPTRAIN])
    assert "INITIAL_CHECKPOINT_PATH" in str(info.value) and "MODEL_DIR" in str(info.value)


def test_missing_gin_file_names_it_and_the_search_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.gin.*search paths"):
        gin_config.resolve_gin_file("nowhere.gin", [str(tmp_path)])
    (tmp_path / "found.gin").write_text("X = 1\n")
    assert gin_config.resolve_gin_file("found.gin", [str(tmp_path)]) == str((tmp_path / "found.gin").resolve())


def test_a_later_parse_may_import_new_configurables():
    # The configuration is not locked after a parse (T5X finalizes it): later
    # imports of modules declaring configurables must keep working.
    gin_config.parse_gin([TINY], check_required=False)
    import gin

    @gin.configurable(module="test_gin_config_probe")
    def probe(x: int = 1) -> int:
        return x

    assert probe() == 1


@pytest.mark.parametrize("value", ["runs/x", "/tmp/runs/x", "gs://bucket/runs/x", "runs"])
def test_an_unquoted_string_names_the_binding_and_the_quoting_rule(value):
    with pytest.raises(UsageError) as info:
        gin_config.parse_gin([TINY, UPTRAIN], ["TRAIN_STEPS=3", f"MODEL_DIR={value}"], check_required=False)
    assert str(info.value) == (
        f"--gin.MODEL_DIR={value}: a gin value that is a string must be quoted: "
        f"--gin.MODEL_DIR=\\\"{value}\\\" (or --gin.MODEL_DIR=\"'{value}'\"), as the shell removes one "
        "level of quotes.")


def test_the_failing_binding_is_found_among_several():
    with pytest.raises(UsageError, match=r"^--gin\.INITIAL_CHECKPOINT_PATH=/ckpt/x: a gin value that is a string"):
        gin_config.parse_gin([TINY, UPTRAIN], ["TRAIN_STEPS=3", "MODEL_DIR='/runs/m'",
                                              "INITIAL_CHECKPOINT_PATH=/ckpt/x", "NUM_KV_HEADS=2"],
                             check_required=False)


def test_a_malformed_value_that_is_not_a_string_names_the_binding_and_what_gin_accepts():
    with pytest.raises(UsageError) as info:
        gin_config.parse_gin([TINY, UPTRAIN], ["TASK_FEATURE_LENGTHS={'inputs': 16,"], check_required=False)
    message = str(info.value)
    assert message.startswith("--gin.TASK_FEATURE_LENGTHS={'inputs': 16, is not a gin value (")
    assert "quoted strings" in message and "must be quoted" not in message and "EOF" in message


def test_quoted_strings_still_parse():
    config = gin_config.parse_gin([TINY, UPTRAIN], ["MODEL_DIR='runs/x'", 'INITIAL_CHECKPOINT_PATH="/c"'],
                                  check_required=False)
    assert "MODEL_DIR = 'runs/x'" in config and gin_config.macro_value("INITIAL_CHECKPOINT_PATH") == "/c"
