"""The pipeline's subcommands: convert, export, train / eval / infer, cache.

Each is a pair of functions: `*_arguments(parser)` adds its flags and
`run_*(args)` calls the feature's Python API (imported when it runs, so
that importing the command line imports neither JAX nor TensorFlow).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from gqa_t5x.cli.command import add_gin_arguments
from gqa_t5x.errors import UsageError


# ------------------------------------------------------------------ convert
_PER_KIND_FLAGS = ("decoder_self_kv_heads", "decoder_cross_kv_heads", "encoder_layer_kv_heads")


def kv_counts(text: str) -> int | tuple[int, ...]:
    """'4' -> 4 (every layer); '1,1,2,2' -> (1, 1, 2, 2) (one per layer)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        counts = tuple(int(p) for p in parts)
    except ValueError:
        counts = ()
    if not counts:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a key/value head count or a comma-separated list of one per layer (e.g. 1,1,2,2)")
    return counts[0] if len(counts) == 1 and "," not in text else counts


CONVERT_USAGE = (
    "%(prog)s --source SOURCE --output OUTPUT --num_kv_heads NUM_KV_HEADS [--method METHOD] [options]\n"
    "       %(prog)s --gin_file=gin/runs/convert.gin --gin.SOURCE=... --gin.OUTPUT=... [--gin.X=v ...]"
)


def convert_arguments(parser: argparse.ArgumentParser) -> None:
    required = parser.add_argument_group("required (or --gin_file with --gin.SOURCE/OUTPUT/NUM_KV_HEADS)")
    required.add_argument("--source", help="Source checkpoint: T5X (legacy/Orbax), Mesh TF, HuggingFace or ours.")
    required.add_argument("--output", help="Directory of the converted checkpoint (our format).")
    required.add_argument("--num_kv_heads", type=int,
                          help="Key/value heads of decoder self- and cross-attention (a divisor of num_heads).")
    parser.add_argument("--method", default="mean", help="A registered conversion method (`gqa-t5x list methods`): "
                        "mean (paper), first, random (paper ablations), align, lsq (needs --calibration), ...")
    parser.add_argument("--calibration", default=None,
                        help="Calibration statistics (.npz from conversion.save_statistics) for data-aware methods (lsq).")
    parser.add_argument("--grouping", default=None, metavar="contiguous|similarity|PATH",
                        help="Which source kv heads each group pools: contiguous (default), similarity (chosen from "
                             "--calibration; `gqa-t5x list groupings`), or a converted checkpoint / its conversion "
                             "record JSON to reproduce its groups without calibration.")
    parser.add_argument("--source_format", "--format", dest="source_format", default=None,
                        help="Format of --source when its directory holds several (`gqa-t5x list formats`).")
    parser.add_argument("--allow_unusual_values", action="store_true",
                        help="Convert even if source values are non-finite or |x| > 1e4 (a corrupt file, usually).")
    parser.add_argument("--vocab", default=None,
                        help="SentencePiece model of the source, recorded in the output for eval/infer/export "
                        "(default: the source's record, if it has one).")
    parser.add_argument("--convert_encoder", action="store_true", help="Also convert encoder self-attention.")
    parser.add_argument("--encoder_num_kv_heads", type=int, help="Encoder target with --convert_encoder (default: --num_kv_heads).")
    per_kind = parser.add_argument_group(
        "per layer and attention kind (override --num_kv_heads / --encoder_num_kv_heads for their kind)")
    per_kind.add_argument("--decoder_self_kv_heads", type=kv_counts, metavar="G[,G...]",
                          help="Decoder self-attention targets: one count for every layer or one per decoder "
                          "layer, e.g. 1,1,2,2.")
    per_kind.add_argument("--decoder_cross_kv_heads", type=kv_counts, metavar="G[,G...]",
                          help="Encoder-decoder attention targets, as --decoder_self_kv_heads.")
    per_kind.add_argument("--encoder_layer_kv_heads", type=kv_counts, metavar="G[,G...]",
                          help="Encoder self-attention targets per layer, with --convert_encoder.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of methods that draw random numbers.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing checkpoint at --output.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    add_gin_arguments(parser)


def run_convert(args: argparse.Namespace) -> int:
    if args.gin_file or args.gin_bindings:
        given = [f"--{k}" for k in ("source", "output", "num_kv_heads", "source_format", "calibration", "vocab",
                                    "grouping", *_PER_KIND_FLAGS)
                 if getattr(args, k) is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)} cannot be combined with --gin_file; bind "
                f"--gin.SOURCE / --gin.OUTPUT / --gin.NUM_KV_HEADS instead."
            )
        if not args.gin_file:
            raise UsageError("--gin.* bindings need --gin_file (e.g. gin/runs/convert.gin).")
        launch(args, "convert")
        return 0
    from gqa_t5x import conversion

    for flag in ("source", "output"):
        if getattr(args, flag) is None:
            raise UsageError(f"--{flag} is required (or use --gin_file).")
    if args.num_kv_heads is None and all(getattr(args, k) is None for k in _PER_KIND_FLAGS):
        raise UsageError("--num_kv_heads is required (or per kind: --decoder_self_kv_heads / "
                         "--decoder_cross_kv_heads / --encoder_layer_kv_heads; or use --gin_file).")
    config = conversion.convert_checkpoint(
        args.source,
        args.output,
        args.num_kv_heads,
        method=args.method,
        convert_encoder=args.convert_encoder,
        encoder_num_kv_heads=args.encoder_num_kv_heads,
        decoder_self_kv_heads=args.decoder_self_kv_heads,
        decoder_cross_kv_heads=args.decoder_cross_kv_heads,
        encoder_layer_kv_heads=args.encoder_layer_kv_heads,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        seed=args.seed,
        allow_unusual_values=args.allow_unusual_values,
        source_format=args.source_format,
        calibration=args.calibration,
        vocab=args.vocab,
        grouping=args.grouping or "contiguous",
    )
    print(f"Wrote {args.output}: num_heads={config.num_heads}, {config.describe_kv_heads()}, method={args.method}"
          + (f", grouping={args.grouping}." if args.grouping else "."))
    return 0


# ------------------------------------------------------------------- export
def export_arguments(parser: argparse.ArgumentParser) -> None:
    required = parser.add_argument_group("required")
    required.add_argument("--checkpoint", required=True, help="Checkpoint to export (any readable format).")
    required.add_argument("--format", required=True, choices=("huggingface",), help="Output format.")
    required.add_argument("--output", required=True, help="Output directory.")
    parser.add_argument("--source_format", default=None,
                        help="Format of --checkpoint when its directory holds several (`gqa-t5x list formats`).")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="Tensor dtype.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing directory at --output.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    parser.add_argument("--allow_unusual_values", action="store_true",
                        help="Export even if values are non-finite or |x| > 1e4 (a corrupt file, usually).")
    parser.add_argument("--vocab", default=None,
                        help="SentencePiece model written beside the weights for HuggingFace's tokenizer "
                        "(default: the one the checkpoint records; our checkpoints record it).")
    parser.add_argument("--weights_only", action="store_true",
                        help="Export without a tokenizer when the checkpoint records no vocabulary and no --vocab.")


def run_export(args: argparse.Namespace) -> int:
    from gqa_t5x import checkpoints

    path = checkpoints.export_huggingface_checkpoint(
        args.checkpoint, args.output, overwrite=args.overwrite, dtype=args.dtype,
        progress=not args.no_progress, format=args.source_format,
        allow_unusual_values=args.allow_unusual_values, vocab=args.vocab, weights_only=args.weights_only,
    )
    with_tokenizer = (path / checkpoints.vocabulary.HF_MODEL_FILE).exists()
    print(f"Wrote HuggingFace T5ForConditionalGeneration{' and its T5 tokenizer' if with_tokenizer else ''} "
          f"to {path}.")
    return 0


# ----------------------------------------------------- train / eval / infer
def launcher_arguments(parser: argparse.ArgumentParser) -> None:
    add_gin_arguments(parser)
    parser.add_argument("--tfds_data_dir", default=None, help="TFDS data dir override for every seqio task.")
    parser.add_argument("--multi_host", action="store_true",
                        help="Call jax.distributed.initialize() (TPU pods / multi-process).")
    parser.add_argument("--coordinator_address", default=None,
                        help="host:port of process 0 (auto-detected on Cloud TPU).")
    parser.add_argument("--process_count", type=int, default=None, help="Number of processes.")
    parser.add_argument("--process_index", type=int, default=None, help="This process's index.")
    parser.add_argument("--allow_unusual_values", action="store_true",
                        help="Restore checkpoints even if values are non-finite or |x| > 1e4 (a corrupt file, "
                        "usually); the same as --gin.ALLOW_UNUSUAL_VALUES=True.")


def launch(args: argparse.Namespace, run_mode: str):
    from gqa_t5x import launcher

    request = launcher.Launch(
        run_mode=run_mode,
        gin_files=tuple(args.gin_file),
        gin_bindings=(*args.gin_bindings,
                      *(["ALLOW_UNUSUAL_VALUES=True"] if getattr(args, "allow_unusual_values", False) else [])),
        gin_search_paths=tuple(p for entry in args.gin_search_paths for p in entry.split(",") if p),
        tfds_data_dir=getattr(args, "tfds_data_dir", None),
    )
    distributed = None
    if getattr(args, "multi_host", False):
        distributed = launcher.Distributed(args.coordinator_address, args.process_count, args.process_index)
    return launcher.launch(request, distributed=distributed)


def run_mode_command(run_mode: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        launch(args, run_mode)
        return 0

    return run


# -------------------------------------------------------------------- cache
def cache_arguments(parser: argparse.ArgumentParser) -> None:
    add_gin_arguments(parser)
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


def run_cache(args: argparse.Namespace) -> int:
    from gqa_t5x import gin_config
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
        cfg = cache.configured_dataset()
    except ValueError as e:
        raise UsageError(str(e)) from None
    extra = {"rows_per_file": args.rows_per_file} if args.rows_per_file else {}
    shards = cache.write_cache(cfg, cfg.cache_dir, num_shards=args.num_shards,
                               shard_index=args.shard_index, max_rows=args.max_rows, **extra)
    rows = sum(record.rows for record in shards.values())
    print(f"Wrote {cfg.cache_dir}: shard(s) {sorted(shards)} of {args.num_shards}, {rows} rows "
          f"of {cfg.mixture_or_task_name} {dict(cfg.task_feature_lengths)} (pack={cfg.pack}, "
          f"seed={cfg.seed}).")
    return 0
