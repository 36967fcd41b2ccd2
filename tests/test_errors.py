"""Which exit status each kind of error gets, and the one-line message."""

from __future__ import annotations

from gqa_t5x import errors


def test_configuration_errors_exit_2_and_failed_runs_exit_1():
    assert errors.exit_status(errors.UsageError("x")) == errors.EXIT_USAGE == 2
    assert errors.exit_status(ValueError("x")) == 2
    assert errors.exit_status(FileNotFoundError("x")) == 2
    assert errors.exit_status(errors.RunError(ValueError("bad line"))) == errors.EXIT_FAILURE == 1
    assert errors.exit_status(RuntimeError("x")) == 1
    assert errors.exit_status(FloatingPointError("nan")) == 1
    assert errors.exit_status(KeyboardInterrupt()) == 130


def test_message_is_the_first_non_empty_line_without_key_error_quotes():
    assert errors.describe(ValueError("\n  first line\nsecond")) == "first line"
    assert errors.describe(KeyError("EVAL_METRIC='x' is unknown")) == "EVAL_METRIC='x' is unknown"
    assert errors.describe(RuntimeError()) == "RuntimeError"
    wrapped = errors.RunError(OSError("disk full\ndetails"))
    assert str(wrapped) == "disk full" and isinstance(wrapped.cause, OSError)


def test_a_tensorflow_staging_error_is_described_by_the_error_it_wraps():
    staged = RuntimeError(
        "in user code:\n\n    File \"x.py\", line 3, in f  *\n        load()\n\n"
        "    FileNotFoundError: SentencePiece model file '/x' does not exist.\n"
    )
    assert errors.describe(staged) == "FileNotFoundError: SentencePiece model file '/x' does not exist."
