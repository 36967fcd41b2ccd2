"""The `gqa-t5x` command line: one argparse subcommand per task.

    gqa-t5x convert --source SRC --output DST --num_kv_heads 8 [--method mean]
    gqa-t5x convert --gin_file=gin/runs/convert.gin --gin.SOURCE=\\"SRC\\" ...
    gqa-t5x export --checkpoint DST --format huggingface --output OUT

Adding a subcommand: in your module, call `register(Subcommand(...))` at import
time and add the module's name to `SUBCOMMAND_MODULES`; it is imported lazily,
only when `main` builds the parser. User errors (bad paths, flags, head counts)
end with one line `gqa-t5x <cmd>: error: ...` on stderr and exit code 2; set
GQA_T5X_TRACEBACK=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Sequence

PROG = "gqa-t5x"

# Modules that register further subcommands (train, bench, sweep, ...).
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "gqa_t5x.experiments.report",
    "gqa_t5x.experiments.sweep",
    "gqa_t5x.experiments.quickstart",
    "gqa_t5x.experiments.benchmark",
    "gqa_t5x.launcher",
)

# Exceptions that mean "the user asked for something impossible".
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class UsageError(Exception):
    """A user error that `main` reports in one line (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """One `gqa-t5x <name>` subcommand.

    Attributes:
      name: The subcommand's name on the command line.
      help: One-line description shown by `gqa-t5x --help`.
      add_arguments: Adds the subcommand's flags to its parser.
      run: Runs it; returns the exit code (None = 0). Unparsed `--gin.X=v`
        bindings are in `args.gin_bindings` when `accepts_gin` is set.
      accepts_gin: Pass `--gin.MACRO=value` flags through as gin bindings.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    accepts_gin: bool = False


_REGISTRY: dict[str, Subcommand] = {}


def register(command: Subcommand) -> Subcommand:
    """Adds a subcommand (a name may be registered once)."""
    if command.name in _REGISTRY and _REGISTRY[command.name] is not command:
        raise ValueError(f"Subcommand {command.name!r} is already registered.")
    _REGISTRY[command.name] = command
    return command


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates T5X-style `--gin.MACRO=value` flags from the other arguments.

    Args:
      argv: Command-line arguments.

    Returns:
      (other arguments, gin bindings such as 'NUM_KV_HEADS=8').
    """
    rest, bindings = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--gin."):
            binding = arg[len("--gin.") :]
            if "=" not in binding:
                if i + 1 >= len(args):
                    raise UsageError(f"{arg} needs a value: {arg}=VALUE.")
                binding = f"{binding}={args[i + 1]}"
                i += 1
            bindings.append(binding)
        else:
            rest.append(arg)
        i += 1
    return rest, bindings


# ------------------------------------------------------------------ convert
def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_t5x import conversion

    parser.add_argument("--source", help="Source checkpoint: T5X (legacy/Orbax), Mesh TF, HuggingFace or ours.")
    parser.add_argument("--output", help="Directory of the converted checkpoint (our format).")
    parser.add_argument("--num_kv_heads", type=int, help="Key/value heads of decoder self- and cross-attention.")
    parser.add_argument(
        "--method", default="mean", choices=conversion.METHODS,
        help="mean (paper), first, random (paper ablations), align (rotate heads, then mean).",
    )
    parser.add_argument("--convert_encoder", action="store_true", help="Also convert encoder self-attention.")
    parser.add_argument("--encoder_num_kv_heads", type=int, help="Encoder target with --convert_encoder (default: --num_kv_heads).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of --method random.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing checkpoint at --output.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    parser.add_argument("--gin_file", action="append", default=[], help="Gin file(s), e.g. gin/runs/convert.gin; with --gin.MACRO=value.")
    parser.add_argument("--gin_search_paths", action="append", default=[], help="Extra gin search paths.")


def _run_convert(args: argparse.Namespace) -> int:
    if args.gin_file or args.gin_bindings:
        from gqa_t5x.conversion import gin_entry

        flags = {
            "source": args.source, "output": args.output, "num_kv_heads": args.num_kv_heads,
        }
        given = [f"--{k}" for k, v in flags.items() if v is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)} cannot be combined with --gin_file; bind "
                f"--gin.SOURCE / --gin.OUTPUT / --gin.NUM_KV_HEADS instead."
            )
        if not args.gin_file:
            raise UsageError("--gin.* bindings need --gin_file (e.g. gin/runs/convert.gin).")
        gin_entry.run_gin(args.gin_file, args.gin_bindings, args.gin_search_paths)
        return 0
    from gqa_t5x import conversion

    for flag in ("source", "output", "num_kv_heads"):
        if getattr(args, flag) is None:
            raise UsageError(f"--{flag} is required (or use --gin_file).")
    config = conversion.convert_checkpoint(
        args.source,
        args.output,
        args.num_kv_heads,
        method=args.method,
        convert_encoder=args.convert_encoder,
        encoder_num_kv_heads=args.encoder_num_kv_heads,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        seed=args.seed,
    )
    print(
        f"Wrote {args.output}: num_heads={config.num_heads}, "
        f"num_kv_heads={config.decoder_kv_heads}, "
        f"encoder_num_kv_heads={config.encoder_kv_heads}, method={args.method}."
    )
    return 0


# ------------------------------------------------------------------- export
def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Checkpoint to export (any readable format).")
    parser.add_argument("--format", required=True, choices=("huggingface",), help="Output format.")
    parser.add_argument("--output", required=True, help="Output directory.")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="Tensor dtype.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing directory at --output.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")


def _run_export(args: argparse.Namespace) -> int:
    from gqa_t5x.checkpoints import hf_export

    path = hf_export.export_huggingface_checkpoint(
        args.checkpoint,
        args.output,
        overwrite=args.overwrite,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    print(f"Wrote HuggingFace T5ForConditionalGeneration to {path}.")
    return 0


register(Subcommand("convert", "Convert a multi-head checkpoint to grouped-query attention.",
                    _add_convert_arguments, _run_convert, accepts_gin=True))
register(Subcommand("export", "Export a checkpoint to another framework (HuggingFace).",
                    _add_export_arguments, _run_export))


# --------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog=PROG, description="Grouped-query attention for T5.1.1 (T5X conventions)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in _REGISTRY.values():
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(_subcommand=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `gqa-t5x`; returns the exit code (2 for user errors)."""
    # TensorFlow (used by seqio/TFDS) logs device probing at start-up.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command_name = next((a for a in argv if not a.startswith("-")), "")
    try:
        rest, bindings = split_gin_flags(argv)
        args = parser.parse_args(rest)  # argparse exits with 2 on bad flags
        command: Subcommand = args._subcommand
        command_name = command.name
        if bindings and not command.accepts_gin:
            raise UsageError(f"{command.name} takes no --gin.* flags (got {bindings[0]!r}).")
        args.gin_bindings = bindings
        code = command.run(args)
    except (UsageError, *USER_ERRORS) as e:
        if os.environ.get("GQA_T5X_TRACEBACK"):
            raise
        text = str(e).strip()
        message = text.splitlines()[0] if text else type(e).__name__
        where = f"{PROG} {command_name}" if command_name else PROG
        print(f"{where}: error: {message}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)


if __name__ == "__main__":
    # Run the imported module's main so subcommands registered against
    # `gqa_t5x.cli` (not this `__main__` copy) are found.
    from gqa_t5x import cli as _cli

    sys.exit(_cli.main())
