"""`gqa-t5x quickstart`: the paper's whole pipeline on one CPU, no downloads.

1. Builds a corpus from the docstrings of this machine's Python standard
   library and trains a SentencePiece vocabulary on it (`local_corpus`).
2. Pre-trains a small multi-head T5.1.1 model from scratch on it with T5's
   span corruption (`gin/runs/uptrain.gin` with no initial checkpoint).
3. Runs a sweep (`gqa_t5x.experiments.sweep`) from that checkpoint: converts it to GQA
   and MQA with each conversion method, uptrains for alpha of its
   pre-training steps, fine-tunes on docstring summarisation (a docstring's
   body -> its one-line summary; fed through the CNN/DailyMail task's
   local-file path), evaluates ROUGE with greedy decoding, times decoding.
4. Prints the Table-1-style comparison and writes the plots (`report`).

The numbers are whatever this small run produces; they show the pipeline,
not the paper's results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

from gqa_t5x import gin_config, launcher
from gqa_t5x.data import local_corpus, metrics, preprocessors, task_table, tasks
from gqa_t5x.data.sources import SourceSpec
from gqa_t5x.experiments import report
from gqa_t5x.experiments import sweep
from gqa_t5x.storage import paths


@dataclasses.dataclass(frozen=True)
class QuickstartSettings:
    """Sizes of the quickstart run (defaults: about 10 minutes on 2 cores)."""

    emb_dim: int = 128
    num_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 256
    num_layers: int = 2
    vocab_pieces: int = 2000
    max_docs: int | None = None
    input_length: int = 128
    target_length: int = 32
    batch_size: int = 16
    pretrain_steps: int = 600
    alpha: float = 0.05
    finetune_steps: int = 120
    eval_examples: int = 64
    num_kv_heads: tuple[int, ...] = (1, 2)
    methods: tuple[str, ...] = ("mean", "first", "random", "align")
    timing_batch: int = 8

    @classmethod
    def reduced(cls) -> "QuickstartSettings":
        """A minute-scale setting for tests: one GQA point, few steps."""
        return cls(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, vocab_pieces=600,
                   max_docs=400, input_length=64, target_length=16, batch_size=8,
                   pretrain_steps=20, alpha=0.1, finetune_steps=4, eval_examples=8,
                   num_kv_heads=(1,), methods=("mean",), timing_batch=2)


def _vocab_size(pieces: int) -> int:
    # SentencePiece pieces + 100 sentinels, padded to a multiple of 128.
    return -(-(pieces + 100) // 128) * 128


def docstring_task(gin_file: Path, s: QuickstartSettings) -> task_table.TaskSpec:
    """Docstring summarisation (body -> one-line summary), ROUGE-1, as a task."""
    return task_table.TaskSpec(
        name="gqa_docstring_summary",
        key="docstring_summary",
        feature_lengths={"inputs": s.input_length, "targets": s.target_length},
        source=SourceSpec("docstring_summary_data", {"article": False, "highlights": False},
                          splits=("train", "validation")),
        text_preprocessors=(functools.partial(
            preprocessors.summarize, article_key="article", summary_key="highlights"),),
        metric_fns=(metrics.rouge,),
        primary_metric="rouge1",
        gin_file=str(gin_file),
    )


def write_task_gin(path: Path, spec: task_table.TaskSpec) -> Path:
    """The task gin of `spec` (MIXTURE_OR_TASK_NAME and TASK_FEATURE_LENGTHS)."""
    path.write_text(
        f"# Written by `gqa-t5x quickstart`: the {spec.key} task.\n"
        f"MIXTURE_OR_TASK_NAME = {spec.name!r}\n"
        f"TASK_FEATURE_LENGTHS = {dict(spec.feature_lengths)!r}\n"
    )
    return path


def write_experiment_gin(path: Path, data: dict[str, Path], s: QuickstartSettings) -> Path:
    """The quickstart's experiment gin: model shape, data locations, lengths."""
    files = {
        "c4": {"train": str(data["pretrain_train"]), "validation": str(data["pretrain_validation"])},
        "summ": {"train": str(data["summarize_train"]), "validation": str(data["summarize_validation"])},
    }
    text = f"""# Written by `gqa-t5x quickstart`: a small T5.1.1 on this machine's text.
from __gin__ import dynamic_registration
from gqa_t5x.model import network
from gqa_t5x.data import tasks

VOCAB_PATH = {json.dumps(str(data['vocab']))}
tasks.c4_data.files = {json.dumps(files['c4'])}
tasks.docstring_summary_data.files = {json.dumps(files['summ'])}

network.T5Config:
  vocab_size = {_vocab_size(s.vocab_pieces)}
  emb_dim = {s.emb_dim}
  num_heads = {s.num_heads}
  head_dim = {s.head_dim}
  mlp_dim = {s.mlp_dim}
  num_encoder_layers = {s.num_layers}
  num_decoder_layers = {s.num_layers}

ACTIVATION_DTYPE = 'float32'
TASK_FEATURE_LENGTHS = {{'inputs': {s.input_length}, 'targets': {s.target_length}}}
BATCH_SIZE = {s.batch_size}
PRETRAIN_STEPS = {s.pretrain_steps}
CHECKPOINT_PERIOD = 1000000
KEEP_CHECKPOINTS = 1
LOG_EVERY = 10
EVAL_PERIOD = {s.finetune_steps}
EVAL_BATCH_SIZE = 32
NUM_EVAL_EXAMPLES = {s.eval_examples}
"""
    path.write_text(text)
    return path


def run_quickstart(output_dir: str | Path, settings: QuickstartSettings | None = None,
                   log=print) -> dict[str, Path]:
    """Runs the whole pipeline; returns the report's files.

    Rerunning with the same `output_dir` skips the finished parts.
    """
    s = settings or QuickstartSettings()
    # SentencePiece trains from and writes local files: the quickstart runs on local disk.
    out = Path(paths.local_file(output_dir, purpose="gqa-t5x quickstart (SentencePiece, local corpora)")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data_dir = out / "data"
    if not (data_dir / "spm.model").exists():
        log("[1/4] collecting docstrings of the Python standard library, training a vocabulary")
        data = local_corpus.build_corpus(data_dir, max_docs=s.max_docs, vocab_size=s.vocab_pieces)
    else:
        data = {k: data_dir / f"{k}.jsonl" for k in
                ("pretrain_train", "pretrain_validation", "summarize_train", "summarize_validation")}
        data["vocab"] = data_dir / "spm.model"
    task = docstring_task(out / "docstring_summary.gin", s)
    write_task_gin(out / "docstring_summary.gin", task)
    tasks.register_task(task)  # before any gin file binds its data location
    experiment = write_experiment_gin(out / "quickstart.gin", data, s)
    model_gin = str(gin_config.GIN_DIR / "models" / "t5_1_1" / "small.gin")

    pretrain_dir = out / "pretrain_mha"
    try:
        base = sweep.latest_checkpoint(pretrain_dir)
    except FileNotFoundError:
        base = None
    if base is None or not base.endswith(f"checkpoint_{s.pretrain_steps}"):
        log(f"[2/4] pre-training an MHA model ({s.num_heads} heads) for {s.pretrain_steps} steps")
        sweep.enable_compilation_cache(out / "runs" / ".jax_cache")
        launcher.launch(launcher.Launch(
            run_mode="train",
            gin_files=(model_gin, "gin/runs/uptrain.gin", str(experiment)),
            gin_bindings=(f"MODEL_DIR={json.dumps(str(pretrain_dir))}", "INITIAL_CHECKPOINT_PATH=None",
                          f"TRAIN_STEPS={s.pretrain_steps}"),
        ))
        base = sweep.latest_checkpoint(pretrain_dir)

    log("[3/4] converting, uptraining, fine-tuning and evaluating each variant")
    spec = sweep.SweepSpec(
        name="quickstart", model_gin=model_gin, base_checkpoint=base,
        num_kv_heads=s.num_kv_heads, methods=s.methods, alphas=(s.alpha,),
        tasks=("docstring_summary",), gin_files=(str(experiment),),
        finetune_steps=s.finetune_steps, timing_batch=s.timing_batch,
        timing_input_length=s.input_length, timing_output_length=s.target_length,
        timing_dtype="float32", final_eval=False,
    )
    spec.validate(s.num_heads)
    points = sweep.expand(spec, s.num_heads)
    results, failed = sweep.Runner(spec, out / "runs", log=log).run(points)
    if failed:
        raise RuntimeError(f"Quickstart points failed: {failed}; see their failed.json under {out / 'runs'}.")

    log("[4/4] report")
    files = report.write_report([out / "runs"], out / "report")
    log(files["table_md"].read_text())
    for name, path in files.items():
        log(f"{name}: {path}")
    log(f"quickstart finished in {time.time() - start:.0f}s; outputs in {out}")
    return files
