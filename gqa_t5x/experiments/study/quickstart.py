"""`gqa-t5x quickstart`: the paper's conversion ablation on one CPU, no downloads.

1. Builds a corpus from the docstrings of this machine's Python standard
   library and trains a SentencePiece vocabulary on it (`local_corpus`).
2. Pre-trains a small multi-head T5.1.1 (8 query heads) from scratch on it
   with T5's span corruption.
3. Converts it to MQA and GQA-2 with every conversion method (mean, first,
   random, align, lsq), without uptraining (alpha = 0).
4. Scores every model on fixed held-out docstring examples (loss per target
   token and token accuracy) and reports, with 95% intervals, whether the
   paper's ordering mean > first > random holds at alpha = 0, whether GQA
   loses less than MQA, and how align and lsq compare with mean.

It is the reproduction study (`reproduction.py`) with its quickstart
settings (`StudySettings.quickstart()`): the same stages, evaluation,
statistics and report, stopped before uptraining. What it does not show
(uptraining, downstream quality, speed) is said in its report.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from gqa_t5x.data import local_corpus
from gqa_t5x.experiments.study import reproduction
from gqa_t5x.experiments.study.data import Corpus
from gqa_t5x.experiments.study.settings import StudySettings
from gqa_t5x.storage import paths

DEFAULT_SEEDS = tuple(range(8))  # seeds of `random`: 8 resolve its spread at alpha = 0


def reduced_settings() -> StudySettings:
    """A minutes-scale quickstart for the tests; it checks the machinery only (`StudySettings.is_reduced`)."""
    return dataclasses.replace(
        StudySettings.quickstart(), emb_dim=32, head_dim=4, mlp_dim=64, num_layers=1, vocab_pieces=400,
        input_length=32, target_length=8, batch_size=8, pretrain_steps=20, curve_points=2,
        methods=("mean", "first", "random", "lsq"), heldout_examples=(("docstrings", 48),),
        calibration_examples=16, bootstrap_resamples=200)


def run_quickstart(output_dir: str | os.PathLike, settings: StudySettings | None = None, *,
                   seeds: Sequence[int] = DEFAULT_SEEDS, max_docs: int | None = None,
                   command: str | None = None, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Runs the quickstart (resumable: rerunning skips what is finished).

    Args:
      output_dir: Where everything goes; the report is in `output_dir/report`.
      settings: Study settings (default `StudySettings.quickstart()`); must be
        `conversion_only`.
      seeds: Seeds of the `random` conversion (its interval is over them).
      max_docs: Use at most this many docstrings (a seeded subset).
      command: The command line shown in the report.
      log: Progress messages.

    Returns:
      Name -> path of each report file (`markdown`, `json`, figures).
    """
    settings = settings or StudySettings.quickstart()
    if not settings.conversion_only:
        raise ValueError("The quickstart's settings must be conversion_only (it does not uptrain).")
    settings.validate()
    # SentencePiece trains from and writes local files: the quickstart runs on local disk.
    out = Path(paths.local_file(output_dir, purpose="gqa-t5x quickstart (SentencePiece, local corpora)")).resolve()
    # Refuse an OUTPUT the run cannot use before writing the corpus into it.
    reproduction.check_output(out, settings, reproduction.DEFAULT_PRETRAIN_SEED, own=("corpus",))
    corpus_dir = out / "corpus"
    if not (corpus_dir / "spm.model").exists():
        log("[quickstart] collecting docstrings of the Python standard library, training a vocabulary")
        local_corpus.build_corpus(corpus_dir, max_docs=max_docs, vocab_size=settings.vocab_pieces,
                                  validation_fraction=0.2)
    corpus = Corpus(train=str(corpus_dir / "pretrain_train.jsonl"),
                    validation=str(corpus_dir / "pretrain_validation.jsonl"), vocab=corpus_dir / "spm.model")
    return reproduction.run_study(out, settings=settings, seeds=seeds, corpus=corpus, report_dir=out / "report",
                                  command=command or f"gqa-t5x quickstart --output {output_dir}", log=log)
