"""The `gqa-t5x` command line: one table of subcommands, one error policy.

    gqa-t5x convert --source SRC --output DST --num_kv_heads 8 [--method mean]
    gqa-t5x convert --gin_file=gin/runs/convert.gin --gin.SOURCE=\\"SRC\\" ...
    gqa-t5x export --checkpoint DST --format huggingface --output OUT
    gqa-t5x train|eval|infer --gin_file=... --gin.MACRO=value
    gqa-t5x cache --gin_file=... --gin.DATA_CACHE_DIR=\\"DIR\\" [--num_shards N --shard_index I]
    gqa-t5x bench | sweep | quickstart | report | reproduce ...

`python -m gqa_t5x.main` is T5X's launcher command line (`--run_mode=...`)
with the same flags and the same error policy (`launcher_main`).

Every subcommand is one `Command` in `COMMANDS`: its flags and a `run`
function that calls the feature's Python API (imported when the command
runs, so `gqa-t5x --help` imports nothing heavy). Adding one = one entry.

Errors end the process with ONE line on stderr (`gqa-t5x <cmd>: error: ...`;
the traceback with `--debug` or GQA_T5X_TRACEBACK=1) and the exit status of
`gqa_t5x.errors`: 2 for usage/configuration errors, 1 for runs that failed
after starting. The process then ends at once (`os._exit`), so threads of
tf.data or the checkpointer can neither hang nor abort it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from gqa_t5x import errors, gin_config
from gqa_t5x.errors import UsageError

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
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    accepts_gin: bool = False


# ------------------------------------------------------------------ convert
def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="Source checkpoint: T5X (legacy/Orbax), Mesh TF, HuggingFace or ours.")
    parser.add_argument("--output", help="Directory of the converted checkpoint (our format).")
    parser.add_argument("--num_kv_heads", type=int, help="Key/value heads of decoder self- and cross-attention.")
    parser.add_argument("--method", default="mean", help="A registered conversion method (docs/conversion.md): "
                        "mean (paper), first, random (paper ablations), align, lsq (needs --calibration), ...")
    parser.add_argument("--calibration", default=None,
                        help="Calibration statistics (.npz from conversion.save_statistics) for data-aware methods (lsq).")
    parser.add_argument("--source_format", "--format", dest="source_format", default=None,
                        help="Format of --source when its directory holds several (e.g. gqa_t5x, huggingface).")
    parser.add_argument("--allow_unusual_values", action="store_true",
                        help="Convert even if source values are non-finite or |x| > 1e4 (a corrupt file, usually).")
    parser.add_argument("--convert_encoder", action="store_true", help="Also convert encoder self-attention.")
    parser.add_argument("--encoder_num_kv_heads", type=int, help="Encoder target with --convert_encoder (default: --num_kv_heads).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of methods that draw random numbers.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing checkpoint at --output.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    _add_gin_arguments(parser)


def _run_convert(args: argparse.Namespace) -> int:
    if args.gin_file or args.gin_bindings:
        given = [f"--{k}" for k in ("source", "output", "num_kv_heads", "source_format", "calibration")
                 if getattr(args, k) is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)} cannot be combined with --gin_file; bind "
                f"--gin.SOURCE / --gin.OUTPUT / --gin.NUM_KV_HEADS instead."
            )
        if not args.gin_file:
            raise UsageError("--gin.* bindings need --gin_file (e.g. gin/runs/convert.gin).")
        _launch(args, "convert")
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
        allow_unusual_values=args.allow_unusual_values,
        source_format=args.source_format,
        calibration=args.calibration,
    )
    print(
        f"Wrote {args.output}: num_heads={config.num_heads}, "
        f"num_kv_heads={config.num_kv_heads}, "
        f"encoder_num_kv_heads={config.encoder_num_kv_heads}, method={args.method}."
    )
    return 0


# ------------------------------------------------------------------- export
def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Checkpoint to export (any readable format).")
    parser.add_argument("--format", required=True, choices=("huggingface",), help="Output format.")
    parser.add_argument("--source_format", default=None,
                        help="Format of --checkpoint when its directory holds several.")
    parser.add_argument("--output", required=True, help="Output directory.")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="Tensor dtype.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing directory at --output.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")


def _run_export(args: argparse.Namespace) -> int:
    from gqa_t5x import checkpoints

    path = checkpoints.export_huggingface_checkpoint(
        args.checkpoint, args.output, overwrite=args.overwrite, dtype=args.dtype,
        progress=not args.no_progress, format=args.source_format,
    )
    print(f"Wrote HuggingFace T5ForConditionalGeneration to {path}.")
    return 0


# ----------------------------------------------------- train / eval / infer
def _add_gin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[],
                        help="Gin file (repeatable): model gin, run gin, experiment gins.")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="Gin binding, e.g. 'TRAIN_STEPS=1050000' (repeatable; as --gin.X=v).")
    parser.add_argument("--gin_search_paths", action="append", default=[],
                        help="Extra gin search paths (comma-separated or repeated).")


def _launcher_arguments(parser: argparse.ArgumentParser) -> None:
    _add_gin_arguments(parser)
    parser.add_argument("--tfds_data_dir", default=None, help="TFDS data dir override for every seqio task.")
    parser.add_argument("--multi_host", action="store_true",
                        help="Call jax.distributed.initialize() (TPU pods / multi-process).")
    parser.add_argument("--coordinator_address", default=None,
                        help="host:port of process 0 (auto-detected on Cloud TPU).")
    parser.add_argument("--process_count", type=int, default=None, help="Number of processes.")
    parser.add_argument("--process_index", type=int, default=None, help="This process's index.")


def _launch(args: argparse.Namespace, run_mode: str):
    from gqa_t5x import launcher

    request = launcher.Launch(
        run_mode=run_mode,
        gin_files=tuple(args.gin_file),
        gin_bindings=tuple(args.gin_bindings),
        gin_search_paths=tuple(p for entry in args.gin_search_paths for p in entry.split(",") if p),
        tfds_data_dir=getattr(args, "tfds_data_dir", None),
    )
    distributed = None
    if getattr(args, "multi_host", False):
        distributed = launcher.Distributed(args.coordinator_address, args.process_count, args.process_index)
    return launcher.launch(request, distributed=distributed)


def _run_mode_command(run_mode: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        _launch(args, run_mode)
        return 0

    return run


# -------------------------------------------------------------------- cache
def _cache_arguments(parser: argparse.ArgumentParser) -> None:
    _add_gin_arguments(parser)
    parser.add_argument("--tfds_data_dir", default=None, help="TFDS data dir override for every seqio task.")
    parser.add_argument("--num_shards", type=int, default=1,
                        help="Workers writing the cache in parallel (fixes the row order; default 1).")
    parser.add_argument("--shard_index", type=int, default=None,
                        help="This worker's shard (default: write every shard in this process).")
    parser.add_argument("--max_rows", type=int, default=None,
                        help="Rows to cache (default: one pass over the split); a run needs "
                        "training steps x BATCH_SIZE rows to see each row once.")
    parser.add_argument("--rows_per_file", type=int, default=None,
                        help="Rows per ArrayRecord file (default 100,000).")


def _run_cache(args: argparse.Namespace) -> int:
    import gin

    from gqa_t5x.data import cache

    if not args.gin_file:
        raise UsageError(
            "--gin_file is required: pass the training run's gin files (model gin, "
            "run gin, experiment gins) and --gin flags, plus --gin.DATA_CACHE_DIR."
        )
    if args.tfds_data_dir:
        import seqio

        seqio.set_tfds_data_dir_override(args.tfds_data_dir)
    gin_config.parse_gin(args.gin_file, args.gin_bindings,
                         [p for entry in args.gin_search_paths for p in entry.split(",") if p],
                         check_required=False)
    try:
        reference = gin.query_parameter("gqa_t5x.training.trainer.train.train_dataset_cfg")
    except ValueError:
        raise UsageError("The gin files configure no training run: include gin/runs/uptrain.gin "
                         "or gin/runs/finetune.gin, as the training command does.") from None
    cfg = reference.scoped_configurable_fn()
    if not cfg.cache_dir:
        raise UsageError('DATA_CACHE_DIR is not set: pass --gin.DATA_CACHE_DIR=\\"/path/or/gs/url\\" '
                         "(and the same flag to training).")
    extra = {"rows_per_file": args.rows_per_file} if args.rows_per_file else {}
    shards = cache.write_cache(cfg, cfg.cache_dir, num_shards=args.num_shards,
                               shard_index=args.shard_index, max_rows=args.max_rows, **extra)
    rows = sum(record.rows for record in shards.values())
    print(f"Wrote {cfg.cache_dir}: shard(s) {sorted(shards)} of {args.num_shards}, {rows} rows "
          f"of {cfg.mixture_or_task_name} {dict(cfg.task_feature_lengths)} (pack={cfg.pack}, "
          f"seed={cfg.seed}).")
    return 0


# -------------------------------------------------------------------- bench
def _int_list(minimum: int) -> Callable[[str], tuple[int, ...]]:
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


_ints = _int_list(1)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_t5x.experiments.bench import presets

    parser.add_argument("--preset", choices=sorted(presets.PRESETS),
                        help="A named setting; 'paper' = XXL, 24+24 layers, input 2048, output 512, batch 32, "
                             "bfloat16, kv heads 1,8,64, no HuggingFace (for an accelerator). Flags given "
                             "explicitly override it.")
    parser.add_argument("--gin_file", help="Model gin (sizes); default gin/models/t5_1_1/large.gin.")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="Activation dtype (default float32; weights stay float32; XLA:CPU runs "
                             "bfloat16 products slowly).")
    parser.add_argument("--num_encoder_layers", type=int, help="Override the gin's encoder depth (fit a CPU).")
    parser.add_argument("--num_decoder_layers", type=int, help="Override the gin's decoder depth.")
    parser.add_argument("--num_kv_heads", type=_ints, help="kv heads to sweep, e.g. 1,8,64 (default: powers of 2 up to num_heads).")
    parser.add_argument("--input_length", type=_ints, help="Encoder length(s) (default 512).")
    parser.add_argument("--output_length", type=_ints, help="Decoded tokens per sample (default 128).")
    parser.add_argument("--batch_size", type=_ints, help="Batch cap(s): the largest batch that fits up to it is used (default 16).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs after the warm-up (fastest reported).")
    parser.add_argument("--no_huggingface", action="store_true", default=None,
                        help="Skip the HuggingFace transformers comparison.")
    parser.add_argument("--huggingface_repeats", type=int, default=1, help="Timed HuggingFace runs after its warm-up.")
    parser.add_argument("--memory_fraction", type=float, default=0.5, help="Share of available RAM a run may use.")
    parser.add_argument("--label", help="Name of the shape in the reports.")
    parser.add_argument("--output", default="bench_decode", help="Report prefix: writes PREFIX.json/.md/.png.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of weights and inputs.")
    parser.add_argument("--bandwidth_mb", type=int, default=256, help="Buffer of the bandwidth measurement (MB).")
    parser.add_argument("--num_partitions", type=int, default=1,
                        help="Model-parallel shards (T5X's num_partitions): heads and MLP split over a 'model' "
                             "mesh axis, the batch over 'data' (default 1; with one device, no mesh).")
    parser.add_argument("--cpu_devices", type=int, default=None,
                        help="Split the host CPU into N XLA devices (jax_num_cpu_devices), e.g. "
                             "--cpu_devices 2 --num_partitions 2 to run the model split over two cores.")


def _resolve_bench_flags(args: argparse.Namespace) -> None:
    """Fills unset flags from `--preset`, then from `presets.DEFAULTS`."""
    from gqa_t5x.experiments.bench import presets

    for name, value in presets.resolve(args.preset, {k: getattr(args, k) for k in presets.DEFAULTS}).items():
        setattr(args, name, value)


def _run_bench(args: argparse.Namespace) -> int:
    from gqa_t5x.experiments.bench import benchmark
    from gqa_t5x.experiments.bench import report as bench_report
    from gqa_t5x.model.config import check_kv_heads

    _resolve_bench_flags(args)
    if args.cpu_devices is not None:
        from gqa_t5x import runtime

        if args.cpu_devices < 1:
            raise UsageError(f"--cpu_devices={args.cpu_devices} must be >= 1.")
        try:
            runtime.use_cpu_devices(args.cpu_devices)
        except RuntimeError as error:
            raise UsageError(f"--cpu_devices={args.cpu_devices}: {error}") from None
    config = gin_config.model_config_from_gin(args.gin_file, args.gin_bindings)
    overrides = {k: getattr(args, k) for k in ("num_encoder_layers", "num_decoder_layers")
                 if getattr(args, k) is not None}
    config = config.replace(dtype=args.dtype, dropout_rate=0.0, num_kv_heads=None, **overrides)
    powers = {2**i for i in range(config.num_heads.bit_length()) if config.num_heads % 2**i == 0}
    kv = args.num_kv_heads or tuple(sorted(powers | {config.num_heads}))
    for g in kv:
        try:
            check_kv_heads(config.num_heads, g, name="--num_kv_heads")
        except ValueError as error:
            raise UsageError(str(error)) from None
    for flag in ("repeats", "huggingface_repeats"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag}={getattr(args, flag)} must be >= 1.")
    if not 0 < args.memory_fraction <= 1:
        raise UsageError(f"--memory_fraction={args.memory_fraction} must be in (0, 1].")
    import jax

    if args.num_partitions < 1 or jax.device_count() % args.num_partitions:
        raise UsageError(f"--num_partitions={args.num_partitions} must divide the number of devices "
                         f"({jax.device_count()}: {jax.devices()[0].platform}); on CPU add --cpu_devices N.")
    settings = benchmark.BenchSettings(
        config=config, num_kv_heads=kv, input_lengths=args.input_length, output_lengths=args.output_length,
        batch_caps=args.batch_size, repeats=args.repeats, huggingface=not args.no_huggingface,
        huggingface_repeats=args.huggingface_repeats, memory_fraction=args.memory_fraction,
        seed=args.seed, label=args.label or os.path.splitext(os.path.basename(args.gin_file))[0],
        bandwidth_mb=args.bandwidth_mb, num_partitions=args.num_partitions,
    )
    results = benchmark.run_benchmark(settings)
    print(bench_report.format_table(results))
    paths = bench_report.write_reports(results, args.output)
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# -------------------------------------------------------------------- sweep
def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_gin", help="Sweep gin file (configs/sweeps/*.gin).")
    parser.add_argument("--output", required=True, help="Directory of the sweep's runs.")
    parser.add_argument("--mode", default="local", choices=("local", "print"),
                        help="local: run the points here, one after another; print: print one command per run.")
    parser.add_argument("--launcher", default="", help="Prefix of printed commands (e.g. 'bash scripts/tpu_pod_run.sh ... --').")
    parser.add_argument("--report", action="store_true", help="Write the Table 1 report into OUTPUT/report afterwards.")


def _run_sweep(args: argparse.Namespace) -> int:
    from gqa_t5x.experiments.sweeps import report, sweep

    spec = sweep.load_spec(args.sweep_gin, args.gin_bindings)
    num_heads = gin_config.model_config_from_gin(spec.model_gin).num_heads
    spec.validate(num_heads)
    points = sweep.expand(spec, num_heads)
    print(f"Sweep {spec.name!r}: {len(points)} points -> {args.output}")
    if args.mode == "local":
        _compilation_cache(args.output)
    runner = sweep.Runner(spec, args.output, mode=args.mode, launcher=args.launcher)
    results, failed = runner.run(points)
    if args.mode == "local":
        print(f"{len(results)} of {len(points)} points finished" + (f"; failed: {', '.join(failed)}" if failed else ""))
        if args.report and results:
            from gqa_t5x.storage import paths

            files = report.write_report([args.output], paths.as_path(args.output, name="--output") / "report")
            print(files["table_md"].read_text())
    return errors.EXIT_FAILURE if failed else 0


def _compilation_cache(output: str) -> None:
    """Runs of one model shape (a sweep's points, the study's stages) compile once: OUTPUT/.jax_cache."""
    from gqa_t5x import runtime
    from gqa_t5x.storage import paths

    runtime.enable_compilation_cache(paths.as_path(output, name="--output") / ".jax_cache")


# --------------------------------------------------------------- quickstart
def _quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="quickstart_out", help="Output directory (default: ./quickstart_out).")
    parser.add_argument("--reduced", action="store_true", help="A seconds-scale run (what the tests use).")


def _run_quickstart(args: argparse.Namespace) -> int:
    from gqa_t5x.experiments.study import quickstart

    settings = quickstart.reduced_settings() if args.reduced else None
    command = f"{PROG} quickstart --output {args.output}" + (" --reduced" if args.reduced else "")
    _compilation_cache(args.output)
    quickstart.run_quickstart(args.output, settings, command=command)
    return 0


# ---------------------------------------------------------------- reproduce
def _reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True,
                        help="Directory of the study's runs; rerun the same command to continue a stopped study.")
    parser.add_argument("--seeds", type=_int_list(0), default=(0, 1, 2),
                        help="Seeds of uptraining/fine-tuning data order and random conversion (default 0,1,2).")
    parser.add_argument("--pretrain_seed", type=int, default=100, help="Seed of pre-training (default 100).")
    parser.add_argument("--report_dir", default=None,
                        help="Where reproduction.md, reproduction.json and reproduction/*.png go (default: "
                             "OUTPUT/report; pass docs to refresh a checkout's committed report).")
    parser.add_argument("--shared_dir", default=None,
                        help="The shared data folder with data/wikipedia_en, data/c4, data/wmt_ende "
                             "(default: $GQA_T5X_SHARED, else ../shared beside the source checkout when "
                             "gqa_t5x runs from one (editable install), else ../shared of the working "
                             "directory).")
    parser.add_argument("--reduced", action="store_true", help="Seconds-scale sizes that check the machinery (tests).")


def _run_reproduce(args: argparse.Namespace) -> int:
    from gqa_t5x.experiments.study import reproduction
    from gqa_t5x.experiments.study import settings as reproduction_settings

    settings = reproduction_settings.StudySettings.reduced() if args.reduced else None
    command = " ".join([PROG, "reproduce", "--output", args.output, "--seeds", ",".join(map(str, args.seeds)),
                        *(["--pretrain_seed", str(args.pretrain_seed)] if args.pretrain_seed != 100 else []),
                        *(["--report_dir", args.report_dir] if args.report_dir else []),
                        *(["--reduced"] if args.reduced else [])])
    _compilation_cache(args.output)
    reproduction.run_study(args.output, settings=settings, seeds=args.seeds, pretrain_seed=args.pretrain_seed,
                           shared_dir=args.shared_dir, report_dir=args.report_dir, command=command)
    return 0


# ------------------------------------------------------------------- report
def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", help="Run directories (or folders of them).")
    parser.add_argument("--output", required=True, help="Directory for the table and figures.")
    parser.add_argument("--no_paper", action="store_true", help="Leave out the paper's reference numbers.")


def _run_report(args: argparse.Namespace) -> int:
    from gqa_t5x.experiments.sweeps import report

    files = report.write_report(args.run_dirs, args.output, include_paper=not args.no_paper)
    print(files["table_md"].read_text())
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


COMMANDS: tuple[Command, ...] = (
    Command("convert", "Convert a multi-head checkpoint to grouped-query attention.",
            _convert_arguments, _run_convert, accepts_gin=True),
    Command("export", "Export a checkpoint to another framework (HuggingFace).",
            _export_arguments, _run_export),
    Command("train", f"Uptrain or fine-tune with gin configs ({LAUNCHER_PROG} --run_mode=train).",
            _launcher_arguments, _run_mode_command("train"), accepts_gin=True),
    Command("eval", f"Evaluate a checkpoint with gin configs ({LAUNCHER_PROG} --run_mode=eval).",
            _launcher_arguments, _run_mode_command("eval"), accepts_gin=True),
    Command("infer", f"Decode an input file with gin configs ({LAUNCHER_PROG} --run_mode=infer).",
            _launcher_arguments, _run_mode_command("infer"), accepts_gin=True),
    Command("cache", "Write the training data cache (DATA_CACHE_DIR) of a training run's gin.",
            _cache_arguments, _run_cache, accepts_gin=True),
    Command("bench", "Time per sample of greedy decoding vs number of kv heads (and HuggingFace).",
            _bench_arguments, _run_bench, accepts_gin=True),
    Command("sweep", "Run or print an ablation sweep (convert -> uptrain -> fine-tune -> eval).",
            _sweep_arguments, _run_sweep, accepts_gin=True),
    Command("quickstart", "Run the whole GQA pipeline on a small model, CPU only, no downloads.",
            _quickstart_arguments, _run_quickstart),
    Command("report", "Collect run results into the paper's Table 1 and figures.",
            _report_arguments, _run_report),
    Command("reproduce", "Run the GQA paper's study at small scale (resumable) and write its report.",
            _reproduce_arguments, _run_reproduce),
)


# --------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command of `COMMANDS`."""
    parser = argparse.ArgumentParser(prog=PROG, description="Grouped-query attention for T5.1.1 (T5X conventions).")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks of errors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(_command=command)
    return parser


def build_launcher_parser() -> argparse.ArgumentParser:
    """The flags of `python -m gqa_t5x.main` (T5X's launcher)."""
    from gqa_t5x import launcher

    parser = argparse.ArgumentParser(prog=LAUNCHER_PROG, description=launcher.__doc__.splitlines()[0])
    _launcher_arguments(parser)
    parser.add_argument("--run_mode", choices=tuple(launcher.RUN_MODES), default="train",
                        help="train (uptrain/finetune), eval, infer or convert.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks of errors.")
    return parser


def _report_error(error: BaseException, where: str, debug: bool) -> int:
    """Prints one line (or the traceback) for `error`; returns the exit status."""
    status = errors.exit_status(error)
    if debug:
        traceback.print_exception(error)
    else:
        kind = "error" if status == errors.EXIT_USAGE else "failed"
        message = errors.describe(error)
        if status == errors.EXIT_FAILURE and not isinstance(error, errors.RunError):
            message = f"{type(error).__name__}: {message}"
        print(f"{where}: {kind}: {message}", file=sys.stderr)
        if status == errors.EXIT_FAILURE:
            print(f"{where}: (run with --debug or GQA_T5X_TRACEBACK=1 for the traceback)", file=sys.stderr)
    sys.stderr.flush()
    return status


def _debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or bool(os.environ.get("GQA_T5X_TRACEBACK"))


def _start_process() -> None:
    """The process-wide settings every command starts with (`gqa_t5x.runtime`)."""
    from gqa_t5x import runtime

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # seqio/TFDS log device probing
    runtime.return_freed_buffers_to_os()  # streaming conversion and checkpoint reads


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `gqa-t5x` in this process; returns the exit status."""
    _start_process()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    where = PROG
    try:
        rest, bindings = gin_config.split_gin_flags(argv)
        args = build_parser().parse_args(rest)  # argparse exits with 2 on bad flags
        command: Command = args._command
        where = f"{PROG} {command.name}"
        if bindings and not command.accepts_gin:
            raise UsageError(f"{command.name} takes no --gin.* flags (got --gin.{bindings[0]}).")
        # `--gin_bindings=X` and `--gin.X` flags, in command-line order of kind.
        args.gin_bindings = [*getattr(args, "gin_bindings", []), *bindings]
        code = command.run(args)
    except BaseException as error:  # noqa: BLE001 - every error gets one line and a status
        if isinstance(error, SystemExit):
            raise
        return _report_error(error, where, debug)
    return 0 if code is None else int(code)


def launcher_main(argv: Sequence[str] | None = None) -> int:
    """Runs `python -m gqa_t5x.main` in this process; returns the exit status."""
    _start_process()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        rest, bindings = gin_config.split_gin_flags(argv)
        args = build_launcher_parser().parse_args(rest)
        args.gin_bindings = [*args.gin_bindings, *bindings]
        _launch(args, args.run_mode)
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


if __name__ == "__main__":
    entry()
