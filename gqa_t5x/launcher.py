"""T5X-style launcher: `python -m gqa_t5x.main --gin_file=... --run_mode=train`.

    python -m gqa_t5x.main \\
      --gin_file=gin/models/t5_1_1/small.gin \\
      --gin_file=gin/runs/uptrain.gin \\
      --gin.MODEL_DIR=\\"/tmp/gqa8_small\\" \\
      --gin.INITIAL_CHECKPOINT_PATH=\\"/ckpts/gqa8_small/checkpoint_1000000\\" \\
      --gin.NUM_KV_HEADS=8 \\
      --run_mode=train

Flags (T5X names): `--gin_file` (repeatable; model gin, then run gin, then
experiment gins), `--gin.MACRO=value` / `--gin_bindings=...` (last wins),
`--gin_search_paths` (comma-separated or repeated; the repository root is
always searched), `--tfds_data_dir`, `--run_mode=train|eval|infer`,
multi-host start-up (`--multi_host` and optionally `--coordinator_address`,
`--process_count`, `--process_index`).

Each run mode calls the gin-configured function of its run gin:
train -> `trainer.train` (uptrain.gin / finetune.gin), eval ->
`evaluation.evaluate` (eval.gin), infer -> `inference.infer` (infer.gin).
The resolved configuration is written to `MODEL_DIR/config.gin` (eval:
EVAL_OUTPUT_DIR, infer: INFER_OUTPUT_DIR when MODEL_DIR is not set) before
the run starts. A macro left at `%gin.REQUIRED` stops the launch with an
error naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

RUN_MODES = ("train", "eval", "infer")
_OUTPUT_MACROS = {
    "train": ("MODEL_DIR",),
    "eval": ("MODEL_DIR", "EVAL_OUTPUT_DIR"),
    "infer": ("MODEL_DIR", "INFER_OUTPUT_DIR"),
}
_REQUIRED = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*%gin\.REQUIRED\s*$", re.M)


class UsageError(ValueError):
    """A launch error to report in one line (exit code 2)."""


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--gin.MACRO=value` flags from the others.

    Args:
      argv: Command-line arguments.

    Returns:
      (remaining arguments, bindings such as 'MODEL_DIR="/tmp/x"').
    """
    rest: list[str] = []
    bindings: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--gin.") and arg != "--gin.":
            binding = arg[len("--gin."):]
            if "=" not in binding:
                if i + 1 >= len(args):
                    raise UsageError(f"{arg} needs a value: {arg}=VALUE.")
                binding, i = f"{binding}={args[i + 1]}", i + 1
            bindings.append(binding)
        else:
            rest.append(arg)
        i += 1
    return rest, bindings


def build_parser() -> argparse.ArgumentParser:
    """The launcher's flags (besides `--gin.MACRO=value`)."""
    parser = argparse.ArgumentParser(
        prog="python -m gqa_t5x.main",
        description="Train / evaluate / infer with gin configs (T5X conventions).",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser, *, with_run_mode: bool = True) -> None:
    """Adds the launcher's flags to `parser` (shared with `gqa-t5x train`)."""
    parser.add_argument("--gin_file", action="append", default=[],
                        help="Gin file (repeatable): model gin, run gin, experiment gins.")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="Gin binding, e.g. 'TRAIN_STEPS=1050000' (repeatable).")
    parser.add_argument("--gin_search_paths", action="append", default=[],
                        help="Extra gin search paths (comma-separated or repeated).")
    parser.add_argument("--tfds_data_dir", default=None,
                        help="TFDS data dir override for every seqio task.")
    if with_run_mode:
        parser.add_argument("--run_mode", choices=RUN_MODES, default=None,
                            help="train (uptrain/finetune), eval or infer.")
    parser.add_argument("--multi_host", action="store_true",
                        help="Call jax.distributed.initialize() (TPU pods / multi-process).")
    parser.add_argument("--coordinator_address", default=None,
                        help="host:port of process 0 (auto-detected on Cloud TPU).")
    parser.add_argument("--process_count", type=int, default=None, help="Number of processes.")
    parser.add_argument("--process_index", type=int, default=None, help="This process's index.")


def required_macros_missing(config_str: str) -> list[str]:
    """Macros whose value is still `%gin.REQUIRED` in a gin config string."""
    return sorted(set(_REQUIRED.findall(config_str)))


def _macro(name: str) -> Any:
    import gin

    try:
        return gin.query_parameter(f"{name}/gin.macro.value")
    except ValueError:
        return None


def _run_function(run_mode: str):
    if run_mode == "train":
        from gqa_t5x.training import trainer

        return trainer.train
    if run_mode == "eval":
        from gqa_t5x.training import evaluation

        return evaluation.evaluate
    from gqa_t5x.training import inference

    return inference.infer


def write_config(output_dir: str, config_str: str) -> str:
    """Writes `output_dir/config.gin` atomically; returns its path."""
    import tensorflow as tf

    tf.io.gfile.makedirs(output_dir)
    path = os.path.join(output_dir, "config.gin")
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(config_str)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return path


def run(args: argparse.Namespace, gin_bindings: Sequence[str]) -> Any:
    """Parses gin, checks macros, writes config.gin and runs the run mode.

    Args:
      args: Parsed flags (see `add_arguments`).
      gin_bindings: Bindings from `--gin.MACRO=value` flags.

    Returns:
      What the run function returns (e.g. `trainer.TrainSummary`).
    """
    run_mode = getattr(args, "run_mode", None) or "train"
    if not args.gin_file:
        raise UsageError(
            "--gin_file is required, e.g. --gin_file=gin/models/t5_1_1/small.gin "
            "--gin_file=gin/runs/uptrain.gin."
        )
    if args.multi_host:
        import jax

        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.process_count,
            process_id=args.process_index,
        )
    if args.tfds_data_dir:
        import seqio

        seqio.set_tfds_data_dir_override(args.tfds_data_dir)
    import gin

    from gqa_t5x import gin_config

    search_paths = [p for entry in args.gin_search_paths for p in entry.split(",") if p]
    bindings = [*args.gin_bindings, *gin_bindings]
    try:
        gin_config.parse_gin(args.gin_file, bindings, search_paths)
        missing: list[str] = []
    except ValueError as e:
        # Gin's finalize hook stops at the first `%gin.REQUIRED` it meets; the
        # parsed config still lists all of them.
        found = re.search(r"(\S+?)/(?:gin\.)?macro\.value set to `%gin\.REQUIRED`", str(e))
        if found is None:
            raise
        missing = required_macros_missing(gin.config_str()) or [found.group(1)]
    config_str = gin.config_str()
    missing = missing or required_macros_missing(config_str)
    if missing:
        raise UsageError(
            f"Required gin macro(s) not set: {', '.join(missing)}; pass e.g. "
            f"--gin.{missing[0]}=... (strings in escaped quotes: "
            f"--gin.{missing[0]}=\\\"/path\\\")."
        )
    fn = _run_function(run_mode)
    try:
        configured = gin.get_configurable(fn)
    except ValueError as e:
        raise UsageError(
            f"--run_mode={run_mode} needs {fn.__module__}.{fn.__name__} to be "
            f"configured by the run gin (e.g. gin/runs/{run_mode}.gin): {e}"
        ) from e
    import jax

    output_dir = next((_macro(m) for m in _OUTPUT_MACROS[run_mode] if isinstance(_macro(m), str)), None)
    if output_dir and jax.process_index() == 0:
        path = write_config(output_dir, config_str)
        logging.info("Wrote %s", path)
    return configured()


def _cli_run(run_mode: str):
    def run_subcommand(args: argparse.Namespace) -> int:
        args.run_mode = run_mode
        run(args, args.gin_bindings)
        return 0

    return run_subcommand


def _register() -> None:
    """`gqa-t5x train` / `gqa-t5x eval`: this launcher as CLI subcommands."""
    from gqa_t5x import cli

    add = lambda parser: add_arguments(parser, with_run_mode=False)  # noqa: E731
    cli.register(cli.Subcommand(
        "train", "Uptrain or fine-tune with gin configs (python -m gqa_t5x.main --run_mode=train).",
        add, _cli_run("train"), accepts_gin=True))
    cli.register(cli.Subcommand(
        "eval", "Evaluate a checkpoint with gin configs (python -m gqa_t5x.main --run_mode=eval).",
        add, _cli_run("eval"), accepts_gin=True))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the launcher; returns the exit code (2 for configuration errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        rest, bindings = split_gin_flags(argv)
        args = build_parser().parse_args(rest)
        run(args, bindings)
    except (UsageError, FileNotFoundError) as e:
        if os.environ.get("GQA_T5X_TRACEBACK"):
            raise
        print(f"gqa_t5x.main: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # trainer.NonFiniteLossError
        if os.environ.get("GQA_T5X_TRACEBACK"):
            raise
        print(f"gqa_t5x.main: training stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:  # Imported: register the subcommands once.
    _register()
