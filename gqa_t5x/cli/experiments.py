"""The experiments' subcommands: bench, plan, sweep, quickstart, reproduce, report.

Each is a pair of functions: `*_arguments(parser)` adds its flags and
`run_*(args)` calls the application's Python API (imported when it runs).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gqa_t5x import errors
from gqa_t5x.cli.command import PROG, int_list, ints
from gqa_t5x.errors import UsageError


# -------------------------------------------------------------------- bench
def bench_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_t5x.experiments.bench import presets

    parser.add_argument("--preset", choices=sorted(presets.PRESETS),
                        help="A named setting; 'paper' = XXL, 24+24 layers, input 2048, output 512, batch 32, "
                             "bfloat16, kv heads 1,8,64, no HuggingFace (for an accelerator). Flags given "
                             "explicitly override it.")
    parser.add_argument("--gin_file", help="Model gin (sizes); default gin/models/t5_1_1/large.gin.")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="Activation dtype (default float32; XLA:CPU runs bfloat16 products slowly).")
    parser.add_argument("--param_dtype", choices=("float32", "bfloat16"),
                        help="Dtype of the weights (default float32; 'paper': bfloat16, T5X's inference "
                             "dtype, half the bytes a decode step reads).")
    parser.add_argument("--scan_layers", action="store_true", default=None,
                        help="Scan the layers (one compiled layer per stack: XXL compiles like 2+2 layers).")
    parser.add_argument("--num_encoder_layers", type=int, help="Override the gin's encoder depth (fit a CPU).")
    parser.add_argument("--num_decoder_layers", type=int, help="Override the gin's decoder depth.")
    parser.add_argument("--num_kv_heads", type=ints, help="kv heads to sweep, e.g. 1,8,64 (default: powers of 2 up to num_heads).")
    parser.add_argument("--input_length", type=ints, help="Encoder length(s) (default 512).")
    parser.add_argument("--output_length", type=ints, help="Decoded tokens per sample (default 128).")
    parser.add_argument("--batch_size", type=ints, help="Batch cap(s): the largest batch that fits up to it is used (default 16).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs after the warm-up (fastest reported).")
    parser.add_argument("--no_huggingface", action="store_true", default=None,
                        help="Skip the HuggingFace transformers comparison.")
    parser.add_argument("--huggingface_repeats", type=int, default=1, help="Timed HuggingFace runs after its warm-up.")
    parser.add_argument("--huggingface_alone", action="store_true",
                        help="Time only HuggingFace T5, on its own random weights made on the device in --dtype, "
                             "with JAX kept off the device: on an accelerator, where this process would hold "
                             "JAX's share of it (75%% by default) beside HuggingFace; e.g. --preset paper "
                             "--huggingface_alone. Writes PREFIX.json.")
    parser.add_argument("--memory_fraction", type=float,
                        help="Share of the free memory (the device's, else the host's RAM) a run may plan to use "
                             "(default 0.5; 'paper': 0.9).")
    parser.add_argument("--attention_query_chunk", type=int,
                        help="Queries per block of the encoder's attention (T5Config.attention_query_chunk): one "
                             "layer holds [batch, heads, chunk, input_length] logits instead of the whole square; "
                             "0 = one block (default: the gin's ATTENTION_QUERY_CHUNK; 'paper': 256).")
    parser.add_argument("--label", help="Name of the shape in the reports.")
    parser.add_argument("--output", default="bench_decode", help="Report prefix: writes PREFIX.json/.md/.png.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of weights and inputs.")
    parser.add_argument("--bandwidth_mb", type=int, default=None,
                        help="Buffer of the bandwidth measurement in MB (default: 256 on a CPU, 1024 on an "
                        "accelerator, beyond its caches).")
    parser.add_argument("--num_partitions", type=int, default=1,
                        help="Model-parallel shards (T5X's num_partitions): heads and MLP split over a 'model' "
                             "mesh axis, the batch over 'data' (default 1; with one device, no mesh).")
    parser.add_argument("--cpu_devices", type=int, default=None,
                        help="Split the host CPU into N XLA devices (jax_num_cpu_devices), e.g. "
                             "--cpu_devices 2 --num_partitions 2 to run the model split over two cores.")


def resolve_bench_flags(args: argparse.Namespace) -> None:
    """Fills unset flags from `--preset`, then from `presets.DEFAULTS`."""
    from gqa_t5x.experiments.bench import presets

    for name, value in presets.resolve(args.preset, {k: getattr(args, k) for k in presets.DEFAULTS}).items():
        setattr(args, name, value)


def run_bench(args: argparse.Namespace) -> int:
    from gqa_t5x import gin_config
    from gqa_t5x.experiments.bench import benchmark
    from gqa_t5x.experiments.bench import report as bench_report
    from gqa_t5x.model.config import check_kv_heads

    resolve_bench_flags(args)
    if args.huggingface_alone:
        import jax

        jax.config.update("jax_platforms", "cpu")  # before any device use: the device is HuggingFace's alone
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
    if args.attention_query_chunk is not None:
        if args.attention_query_chunk < 0:
            raise UsageError(f"--attention_query_chunk={args.attention_query_chunk} must be >= 0 (0 = one block).")
        overrides["attention_query_chunk"] = args.attention_query_chunk or None
    config = config.replace(dtype=args.dtype, param_dtype=args.param_dtype, dropout_rate=0.0, num_kv_heads=None,
                            scan_layers=bool(args.scan_layers or config.scan_layers), **overrides)
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

    if args.huggingface_alone:
        return _run_huggingface_alone(args, config)

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


def _run_huggingface_alone(args: argparse.Namespace, config) -> int:
    import itertools
    import json

    from gqa_t5x.experiments.bench import huggingface_peer

    runs = [huggingface_peer.time_alone(config, n_in, n_out, batch, args.dtype, args.seed, args.huggingface_repeats,
                                        log=lambda line: print(line, flush=True))
            for n_in, n_out, batch in itertools.product(args.input_length, args.output_length, args.batch_size)]
    result = {**runs[-1], "huggingface": [row for run in runs for row in run["huggingface"]],
              "label": args.label or os.path.splitext(os.path.basename(args.gin_file))[0],
              "model_gin": args.gin_file, "seed": args.seed}
    path = Path(args.output + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {path}")
    return 0


# --------------------------------------------------------------------- plan
def plan_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_t5x.experiments.planning import planner

    required = parser.add_argument_group("required")
    required.add_argument("--checkpoint", required=True, help="The source (multi-head) checkpoint, any format.")
    required.add_argument("--examples", required=True,
                          help="Held-out span-corruption examples: a .npz with encoder_input_tokens [n, in] and "
                               "decoder_target_tokens [n, out], as `gqa-t5x reproduce` writes (data/heldout_*.npz).")
    required.add_argument("--device", required=True, choices=sorted(planner.DEVICES),
                          help="Ceilings of the prediction: cpu = this machine, measured; the others their data "
                               "sheets' bandwidth and dense matmul peak.")
    required.add_argument("--input_length", type=int, required=True, help="Encoder tokens per sample predicted.")
    required.add_argument("--output_length", type=int, required=True, help="Decoded tokens per sample predicted.")
    required.add_argument("--batch", type=int, required=True, help="Samples decoded together.")
    required.add_argument("--output", required=True, help="Directory of plan.md, plan.json and plan.png.")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--kv_budget_bytes", type=float,
                        help="KV-cache bytes (whole batch) the per-layer candidates must fit.")
    budget.add_argument("--kv_budget_fraction", type=float,
                        help="Or that share of the source's KV cache (default 0.25 when neither is given).")
    parser.add_argument("--methods", type=names, default=("mean",),
                        help="Conversion methods evaluated for every candidate, e.g. mean,align.")
    parser.add_argument("--groupings", type=names, default=("contiguous",),
                        help="Query-head groupings of converted candidates: contiguous[,similarity] "
                             "(similarity where conversion.convert offers it).")
    parser.add_argument("--max_candidates", type=int, default=40, help="Most candidate configurations.")
    parser.add_argument("--per_layer", type=int, default=8, help="Most per-layer candidates under the budget.")
    parser.add_argument("--max_examples", type=int, default=512,
                        help="Held-out rows scored, evenly spaced over --examples.")
    parser.add_argument("--calibration", help="A .npz of training examples (same keys as --examples) for the "
                                              "statistics of data-aware methods (lsq).")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="Dtype of the predicted run (default: float32 on cpu, bfloat16 on accelerators).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of methods that draw random numbers.")


def names(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated names."""
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def run_plan(args: argparse.Namespace) -> int:
    from gqa_t5x.experiments.planning import planner
    from gqa_t5x.experiments.planning import report as plan_report

    settings = planner.PlanSettings(
        checkpoint=args.checkpoint, examples=args.examples, device=args.device, input_length=args.input_length,
        output_length=args.output_length, batch=args.batch, kv_budget_bytes=args.kv_budget_bytes,
        kv_budget_fraction=args.kv_budget_fraction, methods=args.methods, groupings=args.groupings,
        per_layer=args.per_layer, max_candidates=args.max_candidates, max_examples=args.max_examples,
        calibration=args.calibration, dtype=args.dtype, seed=args.seed)
    try:
        settings.validate()
    except ValueError as error:
        raise UsageError(str(error)) from None
    for flag in ("checkpoint", "examples", "calibration"):
        value = getattr(args, flag)
        if value and not value.startswith("gs://") and not os.path.exists(value):
            raise UsageError(f"--{flag} {value}: no such file or directory.")
    plan = planner.run_plan(settings)
    print(plan_report.format_table(plan))
    paths = plan_report.write_reports(plan, args.output)
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# -------------------------------------------------------------------- sweep
def sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_gin", help="Sweep gin file (configs/sweeps/*.gin).")
    parser.add_argument_group("required").add_argument("--output", required=True, help="Directory of the sweep's runs.")
    parser.add_argument("--mode", default="local", choices=("local", "print"),
                        help="local: run the points here, one after another; print: print one command per run.")
    parser.add_argument("--launcher", default="", help="Prefix of printed commands (e.g. 'bash scripts/tpu_pod_run.sh ... --').")
    parser.add_argument("--report", action="store_true", help="Write the Table 1 report into OUTPUT/report afterwards.")


def run_sweep(args: argparse.Namespace) -> int:
    from gqa_t5x import gin_config
    from gqa_t5x.experiments.sweeps import report, sweep

    spec = sweep.load_spec(args.sweep_gin, args.gin_bindings)
    num_heads = gin_config.model_config_from_gin(spec.model_gin).num_heads
    spec.validate(num_heads)
    points = sweep.expand(spec, num_heads)
    print(f"Sweep {spec.name!r}: {len(points)} points -> {args.output}")
    if args.mode == "local":
        compilation_cache(args.output)
    runner = sweep.Runner(spec, args.output, mode=args.mode, launcher=args.launcher)
    results, failed = runner.run(points)
    if args.mode == "local":
        print(f"{len(results)} of {len(points)} points finished" + (f"; failed: {', '.join(failed)}" if failed else ""))
        if args.report and results:
            from gqa_t5x.storage import paths

            files = report.write_report([args.output], paths.as_path(args.output, name="--output") / "report")
            print(files["table_md"].read_text())
    return errors.EXIT_FAILURE if failed else 0


def compilation_cache(output: str) -> None:
    """Runs of one model shape (a sweep's points, the study's stages) compile once: OUTPUT/.jax_cache."""
    from gqa_t5x import runtime
    from gqa_t5x.storage import paths

    runtime.enable_compilation_cache(paths.as_path(output, name="--output") / ".jax_cache")


# --------------------------------------------------------------- quickstart
def quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="quickstart_out", help="Output directory (default: ./quickstart_out).")
    parser.add_argument("--reduced", action="store_true",
                        help="A reduced run that checks the machinery (1-2 minutes on 2 CPU cores; what the "
                             "tests use; its verdicts are not meaningful).")


def run_quickstart(args: argparse.Namespace) -> int:
    from gqa_t5x.experiments.study import quickstart

    settings = quickstart.reduced_settings() if args.reduced else None
    command = f"{PROG} quickstart --output {args.output}" + (" --reduced" if args.reduced else "")
    compilation_cache(args.output)
    quickstart.run_quickstart(args.output, settings, command=command)
    return 0


# ---------------------------------------------------------------- reproduce
def reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("required").add_argument(
        "--output", required=True,
        help="Directory of the study's runs; rerun the same command to continue a stopped study.")
    parser.add_argument("--seeds", type=int_list(0), default=None,
                        help="Seeds of uptraining and fine-tuning: seed s reads its own rows of data after "
                        "pre-training's (default 0,1,2,3,4; 0,1 with --reduced; `random` conversion uses these "
                        "and the next integers, twice as many in all).")
    parser.add_argument("--pretrain_seed", type=int, default=100, help="Seed of pre-training (default 100).")
    parser.add_argument("--report_dir", default=None,
                        help="Where reproduction.md, reproduction.json and reproduction/*.png go (default: "
                             "OUTPUT/report; pass docs to refresh a checkout's committed report).")
    parser.add_argument("--shared_dir", default=None,
                        help="The shared data folder with data/wikipedia_en, data/c4, data/wmt_ende "
                             "(default: $GQA_T5X_SHARED, else ../shared beside the source checkout when "
                             "gqa_t5x runs from one (editable install), else ../shared of the working "
                             "directory).")
    parser.add_argument("--preset", choices=("cpu", "gpu", "reduced"), default=None,
                        help="Study sizes: cpu (default; about 2 hours on 2 CPU cores), gpu (a larger model for one "
                             "GPU, see docs/experiments.md), reduced (minutes; checks the machinery, what the tests "
                             "use; its verdicts are not meaningful).")
    parser.add_argument("--reduced", action="store_true", help="Same as --preset reduced.")


def run_reproduce(args: argparse.Namespace) -> int:
    from gqa_t5x.experiments.study import reproduction
    from gqa_t5x.experiments.study import settings as reproduction_settings

    if args.reduced and args.preset not in (None, "reduced"):
        raise errors.UsageError(f"--reduced and --preset {args.preset} contradict each other; give one of them.")
    preset = "reduced" if args.reduced else args.preset or "cpu"
    settings = reproduction_settings.StudySettings.preset(preset)
    if args.seeds is None:
        args.seeds = reproduction_settings.StudySettings.PRESET_SEEDS[preset]
    command = " ".join([PROG, "reproduce", "--output", args.output, "--seeds", ",".join(map(str, args.seeds)),
                        *(["--pretrain_seed", str(args.pretrain_seed)] if args.pretrain_seed != 100 else []),
                        *(["--report_dir", args.report_dir] if args.report_dir else []),
                        *(["--reduced"] if preset == "reduced" else ["--preset", preset] if preset != "cpu" else [])])
    compilation_cache(args.output)
    reproduction.run_study(args.output, settings=settings, seeds=args.seeds, pretrain_seed=args.pretrain_seed,
                           shared_dir=args.shared_dir, report_dir=args.report_dir, command=command)
    return 0


# ------------------------------------------------------------------- report
def report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", help="Run directories (or folders of them).")
    parser.add_argument_group("required").add_argument("--output", required=True,
                                                       help="Directory for the table and figures.")
    parser.add_argument("--no_paper", action="store_true", help="Leave out the paper's reference numbers.")


def run_report(args: argparse.Namespace) -> int:
    from gqa_t5x.experiments.sweeps import report

    files = report.write_report(args.run_dirs, args.output, include_paper=not args.no_paper)
    print(files["table_md"].read_text())
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


# ---------------------------------------------------------------- compare-plan
def compare_plan_arguments(parser: argparse.ArgumentParser) -> None:
    required = parser.add_argument_group("required")
    required.add_argument("--study", required=True, help="A finished `gqa-t5x reproduce` OUTPUT (read only).")
    required.add_argument("--output", required=True, help="Directory of this comparison's runs (resumable).")
    required.add_argument("--variant", action="append", required=True, metavar="SELF/CROSS",
                          help="Decoder self / cross kv heads, one per decoder layer, e.g. 1,1/4,4 (repeatable).")
    parser.add_argument("--reference", type=int, default=None,
                        help="The study's uniform GQA-G to compare with (default: the study's GQA variant).")
    parser.add_argument("--method", default="mean", help="Conversion method (default mean, as the study's GQA).")
    parser.add_argument("--grouping", default="contiguous", help="Conversion grouping (contiguous or similarity).")
    parser.add_argument("--seeds", type=int_list(0), default=(0, 1, 2, 3, 4),
                        help="Uptraining seeds; each is paired with the study's run of that seed.")
    parser.add_argument("--input_length", type=int, default=2048, help="Input length at which caches are compared.")
    parser.add_argument("--output_length", type=int, default=512, help="Output length at which caches are compared.")
    parser.add_argument("--report", default=None, help="Markdown file to write (default OUTPUT/planned.md).")


def run_compare_plan(args: argparse.Namespace) -> int:
    from gqa_t5x.experiments.study import planned

    try:
        settings, _ = planned.settings_of(Path(args.study))
        reference = args.reference or settings.gqa_kv_heads
        variants = [planned.parse_variant(v, reference, args.method, args.grouping) for v in args.variant]
        planned.check_variants(args.study, variants)
    except ValueError as e:
        raise UsageError(str(e)) from e
    compilation_cache(args.output)
    results = planned.run_planned(args.study, args.output, variants, seeds=args.seeds,
                                  shape=(args.input_length, args.output_length))
    text = planned.markdown(results)
    report = Path(args.report) if args.report else Path(args.output) / "planned.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    print(text + f"report: {report}")
    return 0


# ------------------------------------------------------------- compare-studies
def compare_studies_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("first", help="A finished study: its OUTPUT, its report folder or its reproduction.json.")
    parser.add_argument("second", help="Another run of the same settings (other --seeds / --pretrain_seed).")
    parser.add_argument_group("required").add_argument(
        "--output", required=True, help="Directory for replication.md and replication.json.")


def run_compare_studies(args: argparse.Namespace) -> int:
    from gqa_t5x.experiments.study import replication

    try:
        result = replication.compare(replication.load(args.first), replication.load(args.second))
    except ValueError as e:
        raise UsageError(str(e)) from e
    files = replication.write(result, args.output)
    print(files["markdown"].read_text() + f"report: {files['markdown']}")
    return 0
