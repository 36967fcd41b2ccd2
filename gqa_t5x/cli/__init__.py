"""The `gqa-t5x` command line: one table of subcommands, one error policy.

    gqa-t5x convert --source SRC --output DST --num_kv_heads 8 [--method mean]
    gqa-t5x convert --gin_file=gin/runs/convert.gin --gin.SOURCE=\\"SRC\\" ...
    gqa-t5x export --checkpoint DST --format huggingface --output OUT
    gqa-t5x train|eval|infer --gin_file=... --gin.MACRO=value
    gqa-t5x cache --gin_file=... --gin.DATA_CACHE_DIR=\\"DIR\\" [--num_shards N --shard_index I]
    gqa-t5x bench | plan | sweep | quickstart | report | reproduce ...
    gqa-t5x list [tasks|methods|formats|presets]

`python -m gqa_t5x.main` is T5X's launcher command line (`--run_mode=...`)
with the same flags and the same error policy (`launcher_main`).

Every subcommand is one `Command` in `COMMANDS`: its flags, examples for its
`--help` (which also shows defaults and which flags are required) and a `run`
function that calls the feature's Python API (imported when the command
runs: importing this package imports neither JAX nor TensorFlow, so the
process settings of `_start_process` come first). Adding one = one entry.
Flags are matched whole, never by prefix (`parse_flags`). The pipeline's
subcommands live in `cli/pipeline.py`, the experiments' in
`cli/experiments.py`, `list` in `cli/listing.py`, the `Command` record,
shared flags and the help format in `cli/command.py`; this module holds the
table and the error policy.

Errors end the process with ONE line on stderr (`gqa-t5x <cmd>: error: ...`;
the traceback with `--debug` or GQA_T5X_TRACEBACK=1) and the exit status of
`gqa_t5x.errors`: 2 for usage/configuration errors, 1 for runs that failed
after starting. The process then ends at once (`os._exit`), so threads of
tf.data or the checkpointer can neither hang nor abort it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from collections.abc import Sequence

from gqa_t5x import errors
from gqa_t5x.cli import experiments, listing, pipeline
from gqa_t5x.cli.command import LAUNCHER_PROG, PROG, Command, HelpFormatter, shell_lines
from gqa_t5x.errors import UsageError

_MODEL = "--gin_file=gin/models/t5_1_1/small.gin"

COMMANDS: tuple[Command, ...] = (
    Command("convert", "Convert a multi-head checkpoint to grouped-query attention.",
            pipeline.convert_arguments, pipeline.run_convert, accepts_gin=True,
            usage=pipeline.CONVERT_USAGE,
            examples=(
                f"{PROG} convert --source /ckpts/t5_1_1_xxl/checkpoint_1000000 --output /ckpts/gqa8_xxl "
                "--num_kv_heads 8",
                f"{PROG} convert --source ./t5_v1_1_small_hf --output ./mqa_small --num_kv_heads 1 "
                "--method first",
                f"{PROG} convert --gin_file=gin/runs/convert.gin --gin.SOURCE=\\\"/ckpts/t5_1_1_xxl\\\" "
                "--gin.OUTPUT=\\\"/ckpts/gqa8_xxl\\\" --gin.NUM_KV_HEADS=8",
            )),
    Command("export", "Export a checkpoint to another framework (HuggingFace).",
            pipeline.export_arguments, pipeline.run_export,
            examples=(f"{PROG} export --checkpoint /ckpts/gqa8_xxl --format huggingface --output /exports/gqa8_xxl",)),
    Command("train", f"Uptrain or fine-tune with gin configs ({LAUNCHER_PROG} --run_mode=train).",
            pipeline.launcher_arguments, pipeline.run_mode_command("train"), accepts_gin=True,
            uses_tensorflow=True,
            examples=(
                f"{PROG} train {_MODEL} --gin_file=gin/runs/uptrain.gin --gin.NUM_KV_HEADS=8 "
                "--gin.INITIAL_CHECKPOINT_PATH=\\\"/ckpts/gqa8_small\\\" --gin.MODEL_DIR=\\\"/runs/gqa8_uptrain\\\"",
                f"{PROG} train {_MODEL} --gin_file=gin/runs/finetune.gin --gin.NUM_KV_HEADS=8 "
                "--gin.INITIAL_CHECKPOINT_PATH=\\\"/runs/gqa8_uptrain/checkpoint_1050000\\\" "
                "--gin.TRAIN_STEPS=1100000 --gin.MODEL_DIR=\\\"/runs/gqa8_cnn\\\"",
            )),
    Command("eval", f"Evaluate a checkpoint with gin configs ({LAUNCHER_PROG} --run_mode=eval).",
            pipeline.launcher_arguments, pipeline.run_mode_command("eval"), accepts_gin=True,
            uses_tensorflow=True,
            examples=(
                f"{PROG} eval {_MODEL} --gin_file=gin/runs/eval.gin "
                "--gin.CHECKPOINT_PATH=\\\"/runs/gqa8_cnn/best/checkpoint_1080000\\\" "
                "--gin.EVAL_OUTPUT_DIR=\\\"/runs/gqa8_cnn/eval_best\\\"",
            )),
    Command("infer", f"Decode an input file with gin configs ({LAUNCHER_PROG} --run_mode=infer).",
            pipeline.launcher_arguments, pipeline.run_mode_command("infer"), accepts_gin=True,
            uses_tensorflow=True,
            examples=(
                f"{PROG} infer --gin_file=gin/runs/infer.gin "
                "--gin.CHECKPOINT_PATH=\\\"/runs/gqa8_cnn/checkpoint_1100000\\\" "
                "--gin.INPUT_FILE=\\\"articles.txt\\\" --gin.INFER_OUTPUT_DIR=\\\"/tmp/predictions\\\"",
            )),
    Command("cache", "Write the training data cache (DATA_CACHE_DIR) of a training run's gin.",
            pipeline.cache_arguments, pipeline.run_cache, accepts_gin=True, uses_tensorflow=True,
            examples=(
                f"{PROG} cache {_MODEL} --gin_file=gin/runs/uptrain.gin "
                "--gin.DATA_CACHE_DIR=\\\"gs://bucket/c4_cache\\\" --max_rows=102400000",
            )),
    Command("bench", "Time per sample of greedy decoding vs number of kv heads (and HuggingFace).",
            experiments.bench_arguments, experiments.run_bench, accepts_gin=True,
            examples=(
                f"{PROG} bench --gin_file gin/models/t5_1_1/xxl.gin --num_encoder_layers 2 "
                "--num_decoder_layers 2 --num_kv_heads 1,8,64 --output bench/xxl_2_layers",
                f"{PROG} bench --preset paper --num_partitions 4 --output bench/paper",
            )),
    Command("plan", "Rank kv-head configurations: predicted time and KV bytes vs alpha-0 loss (Pareto).",
            experiments.plan_arguments, experiments.run_plan,
            examples=(
                f"{PROG} plan --checkpoint /runs/pretrain/checkpoint_4000 --examples /runs/data/heldout_wikipedia.npz "
                "--device h100 --input_length 2048 --output_length 512 --batch 32 --output /tmp/plan_h100",
                f"{PROG} plan --checkpoint CKPT --examples HELDOUT.npz --device cpu --input_length 512 "
                "--output_length 128 --batch 16 --kv_budget_fraction 0.125 --methods mean,align --output /tmp/plan_cpu",
            )),
    Command("sweep", "Run or print an ablation sweep (convert -> uptrain -> fine-tune -> eval).",
            experiments.sweep_arguments, experiments.run_sweep, accepts_gin=True, uses_tensorflow=True,
            examples=(
                f"{PROG} sweep configs/sweeps/tiny_shared_data.gin --output /tmp/tiny_sweep --report",
                f"{PROG} sweep configs/sweeps/paper_groups.gin --output gs://bucket/sweeps/groups --mode print",
            )),
    Command("quickstart", "Run the whole GQA pipeline on a small model, CPU only, no downloads.",
            experiments.quickstart_arguments, experiments.run_quickstart, uses_tensorflow=True,
            examples=(f"{PROG} quickstart --output quickstart_out",
                      f"{PROG} quickstart --output /tmp/qs --reduced")),
    Command("report", "Collect run results into the paper's Table 1 and figures.",
            experiments.report_arguments, experiments.run_report,
            examples=(f"{PROG} report /tmp/tiny_sweep --output /tmp/tiny_sweep/report",)),
    Command("reproduce", "Run the GQA paper's study at small scale (resumable) and write its report.",
            experiments.reproduce_arguments, experiments.run_reproduce, uses_tensorflow=True,
            examples=(f"{PROG} reproduce --output /tmp/gqa_reproduction --seeds 0,1,2",
                      f"{PROG} reproduce --output /tmp/repro_check --reduced")),
    Command("compare-plan", "Uptrain planned kv-head configurations on a study's model; compare with its uniform GQA.",
            experiments.compare_plan_arguments, experiments.run_compare_plan, uses_tensorflow=True,
            examples=(f"{PROG} compare-plan --study /tmp/gqa_reproduction --output /tmp/planned "
                      "--variant 1,1/4,4 --variant 2,2/1,4",)),
    Command("compare-studies", "Compare two runs of the study (other seeds): verdicts and every estimate.",
            experiments.compare_studies_arguments, experiments.run_compare_studies,
            examples=(f"{PROG} compare-studies /tmp/gqa_reproduction /tmp/gqa_rerun --output /tmp/replication",
                      f"{PROG} compare-studies docs/reproduction.json /tmp/gqa_rerun --output docs/replication")),
    Command("list", "List registered tasks, conversion methods, checkpoint formats or bench presets.",
            listing.list_arguments, listing.run_list,
            examples=(f"{PROG} list methods", f"{PROG} list tasks", f"{PROG} list")),
)


# --------------------------------------------------------------------- main
_DEBUG_HELP = "Show tracebacks of errors, and TensorFlow's and XLA's C++ logs (as GQA_T5X_TRACEBACK=1 does)."

def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command of `COMMANDS`.

    No parser matches flag prefixes (`allow_abbrev=False`): `--num_kv_head`
    is an error, not `--num_kv_heads`.
    """
    parser = argparse.ArgumentParser(
        prog=PROG, description="Grouped-query attention for T5.1.1 (T5X conventions).",
        formatter_class=HelpFormatter, allow_abbrev=False,
        epilog=f"Run '{PROG} COMMAND --help' for a command's flags and examples.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parser.set_defaults(_parsers={})
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help,
                               epilog=command.epilog(), usage=command.usage,
                               formatter_class=HelpFormatter, allow_abbrev=False)
        command.add_arguments(child)
        child.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
        # The groups of required flags come first, before the optional ones.
        child._action_groups.sort(key=lambda group: not (group.title or "").startswith(("positional", "required")))
        child.set_defaults(_command=command)
        parser.get_default("_parsers")[command.name] = child
    return parser


def build_launcher_parser() -> argparse.ArgumentParser:
    """The flags of `python -m gqa_t5x.main` (T5X's launcher)."""
    from gqa_t5x import launcher

    examples = [f"{LAUNCHER_PROG} {_MODEL} --gin_file=gin/runs/uptrain.gin --gin.NUM_KV_HEADS=8 "
                "--gin.INITIAL_CHECKPOINT_PATH=\\\"/ckpts/gqa8_small\\\" --gin.MODEL_DIR=\\\"/runs/gqa8\\\" "
                "--run_mode=train",
                f"{LAUNCHER_PROG} --gin_file=gin/runs/convert.gin --gin.SOURCE=\\\"/ckpts/t5_1_1_xxl\\\" "
                "--gin.OUTPUT=\\\"/ckpts/gqa8_xxl\\\" --gin.NUM_KV_HEADS=8 --run_mode=convert"]
    parser = argparse.ArgumentParser(prog=LAUNCHER_PROG, description=launcher.__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter, allow_abbrev=False,
                                     epilog="examples:\n" + "\n".join(map(shell_lines, examples)))
    pipeline.launcher_arguments(parser)
    parser.add_argument("--run_mode", choices=tuple(launcher.RUN_MODES), default="train",
                        help="train (uptrain/finetune), eval, infer or convert.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    return parser


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """`parser.parse_args(argv)`, naming the closest flag of an unknown one.

    Exits with status 2 (argparse's) on a bad flag: flags are matched whole,
    never by prefix, so `--num_kv_head` is refused with "did you mean
    --num_kv_heads?" in the usage of the command it was given to, before
    any other complaint (such as a required flag it was meant to be).
    """
    commands = parser.get_default("_parsers") or {}
    child = parser
    for arg in argv:
        if arg in commands:
            child = commands[arg]
            break
        if not arg.startswith("-"):
            break
    known = sorted({flag for p in (parser, child) for action in p._actions for flag in action.option_strings})
    for arg in argv:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if name.startswith("--") and name not in known:
            close = [f for f in known if f.startswith(name)] or difflib.get_close_matches(name, known, 1, 0.8)
            hint = f" (did you mean {close[0]}? flags are never abbreviated)" if close else ""
            child.error(f"unrecognized arguments: {arg}{hint}")
    return parser.parse_args(argv)


def _report_error(error: BaseException, where: str, debug: bool) -> int:
    """Prints one line (or the traceback) for `error`; returns the exit status."""
    status = errors.exit_status(error)
    if debug:
        traceback.print_exception(error)
    else:
        kind = {errors.EXIT_USAGE: "error", errors.EXIT_PREEMPTED: "stopped"}.get(status, "failed")
        message = errors.describe(error)
        explained = isinstance(getattr(error, "cause", error), errors.ExplainedFailure)
        if status == errors.EXIT_FAILURE and not isinstance(error, errors.RunError) and not explained:
            message = f"{type(error).__name__}: {message}"
        print(f"{where}: {kind}: {message}", file=sys.stderr)
        if status == errors.EXIT_FAILURE and not explained:
            print(f"{where}: (run with --debug or GQA_T5X_TRACEBACK=1 for the traceback)", file=sys.stderr)
    sys.stderr.flush()
    return status


def _debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or bool(os.environ.get("GQA_T5X_TRACEBACK"))


def _start_process(debug: bool) -> None:
    """The process-wide settings every command starts with (`gqa_t5x.runtime`).

    TensorFlow's and XLA's C++ runtime logs are silenced with
    TF_CPP_MIN_LOG_LEVEL=3, unless the user set it or asked for `--debug`.
    It must be set before JAX is imported (JAX sets 1 when unset), so
    importing `gqa_t5x.cli` imports neither JAX nor TensorFlow. TensorFlow's
    start-up notices, printed before that setting applies ("Could not find
    cuda drivers", "failed call to cuInit" with JAX_PLATFORMS=cpu, oneDNN),
    are dropped by `runtime.keep_tensorflow_off_accelerators`, which the
    commands that use TensorFlow call first. Failures still surface: as
    Python exceptions, one line each.

    Args:
      debug: `--debug` or GQA_T5X_TRACEBACK: keep the C++ logs.
    """
    from gqa_t5x import runtime

    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    runtime.return_freed_buffers_to_os()  # streaming conversion and checkpoint reads


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `gqa-t5x` in this process; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    _start_process(debug)
    where = PROG
    try:
        from gqa_t5x import gin_config, runtime

        rest, bindings = gin_config.split_gin_flags(argv)
        args = parse_flags(build_parser(), rest)  # argparse exits with 2 on bad flags
        command: Command = args._command
        where = f"{PROG} {command.name}"
        if bindings and not command.accepts_gin:
            raise UsageError(f"{command.name} takes no --gin.* flags (got --gin.{bindings[0]}).")
        # `--gin_bindings=X` and `--gin.X` flags, in command-line order of kind.
        args.gin_bindings = [*getattr(args, "gin_bindings", []), *bindings]
        if command.uses_tensorflow:
            runtime.keep_tensorflow_off_accelerators(quiet=not debug)
        code = command.run(args)
    except BaseException as error:  # noqa: BLE001 - every error gets one line and a status
        if isinstance(error, SystemExit):
            raise
        return _report_error(error, where, debug)
    return 0 if code is None else int(code)


def launcher_main(argv: Sequence[str] | None = None) -> int:
    """Runs `python -m gqa_t5x.main` in this process; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    _start_process(debug)
    try:
        from gqa_t5x import gin_config, runtime

        rest, bindings = gin_config.split_gin_flags(argv)
        args = parse_flags(build_launcher_parser(), rest)
        args.gin_bindings = [*args.gin_bindings, *bindings]
        if args.run_mode != "convert":
            runtime.keep_tensorflow_off_accelerators(quiet=not debug)
        pipeline.launch(args, args.run_mode)
    except BaseException as error:  # noqa: BLE001
        if isinstance(error, SystemExit):
            raise
        return _report_error(error, LAUNCHER_PROG, debug)
    return 0


def exit_process(status: int) -> None:
    """Ends the process with `status`; after an error, at once.

    Python's normal shutdown joins non-daemon threads and runs C++ static
    destructors; after an exception in an input pipeline that can hang (a
    tf.data prefetch thread blocked on a queue) or abort (`terminate called
    without an active exception`). Output is flushed first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if status != 0:
        os._exit(status)
    sys.exit(0)


def entry() -> None:
    """Console script `gqa-t5x`."""
    exit_process(main())

