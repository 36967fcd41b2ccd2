"""What every `gqa-t5x` subcommand is made of: the `Command` record, shared flags, help format."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

PROG = "gqa-t5x"
LAUNCHER_PROG = "python -m gqa_t5x.main"


@dataclasses.dataclass(frozen=True)
class Command:
    """One `gqa-t5x <name>` subcommand.

    Attributes:
      name: The subcommand's name on the command line.
      help: One-line description shown by `gqa-t5x --help`.
      add_arguments: Adds the subcommand's flags to its parser.
      run: Runs it; returns the exit status (None = 0). `--gin.X=v` flags are
        in `args.gin_bindings` when `accepts_gin` is set.
      accepts_gin: Pass `--gin.MACRO=value` flags through as gin bindings.
      examples: Command lines shown under "examples:" in the command's help.
      usage: The usage line(s) of its help, when argparse's would hide which
        flags are required (e.g. required unless --gin_file is given).
      uses_tensorflow: It runs TensorFlow (seqio, tf.data); its accelerators
        are hidden from TensorFlow before it starts
        (`runtime.keep_tensorflow_off_accelerators`).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    accepts_gin: bool = False
    examples: tuple[str, ...] = ()
    usage: str | None = None
    uses_tensorflow: bool = False

    def epilog(self) -> str | None:
        """The "examples:" section of the command's help."""
        if not self.examples:
            return None
        return "examples:\n" + "\n".join(shell_lines(example) for example in self.examples)


def shell_lines(command: str, width: int = 96, indent: str = "  ") -> str:
    """`command` as shell lines of at most ~`width` characters, broken before flags with ` \\`."""
    lines = [indent]
    for word in command.split(" "):
        if lines[-1].strip() and word.startswith("--") and len(lines[-1]) + 1 + len(word) > width:
            lines[-1] += " \\"
            lines.append(indent + "    ")
        lines[-1] += ("" if not lines[-1].strip() else " ") + word
    return "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """T5X-style help: examples kept as written, defaults shown.

    A flag's default is appended as "(default: X)" unless its help already
    names it or there is nothing to show (None, False, an empty list).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is argparse.SUPPRESS or default is None
                or default is False or default in ("", [], ()) or "default" in text):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else "%(default)s"
        return f"{text} (default: {shown})"


GIN_FLAGS_HELP = """\
--gin.MACRO=VALUE binds a macro of the gin files (repeatable; the last one wins),
e.g. --gin.TRAIN_STEPS=1050000. A string is quoted for gin inside the shell's
quoting: --gin.MODEL_DIR=\\"/runs/x\\" or --gin.MODEL_DIR="'/runs/x'"."""


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds T5X's gin flags (`--gin_file`, `--gin_bindings`, `--gin_search_paths`)."""
    group = parser.add_argument_group("gin configuration", GIN_FLAGS_HELP)
    group.add_argument("--gin_file", action="append", default=[],
                       help="Gin file (repeatable): model gin, run gin, experiment gins, in that order.")
    group.add_argument("--gin_bindings", action="append", default=[],
                       help="Gin binding, e.g. 'TRAIN_STEPS=1050000' (repeatable; the same as --gin.X=v).")
    group.add_argument("--gin_search_paths", action="append", default=[],
                       help="Extra gin search paths (comma-separated or repeated).")


def int_list(minimum: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers, each >= `minimum`."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < minimum:
            kind = "positive" if minimum == 1 else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {kind} integers, got {text!r}")
        return values
    return parse


ints = int_list(1)
