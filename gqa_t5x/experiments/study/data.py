"""The reproduction study's data: vocabulary, corpora, gins, held-out examples.

Everything is derived once into `OUTPUT/data` (a marker makes it resumable):

* a SentencePiece vocabulary trained on Wikipedia lines plus the WMT
  training sentences (both languages, as T5's vocabulary covers German);
* the WMT En-De pairs whose inputs and targets fit `wmt_length` tokens;
* three gins: `study.gin` (model shape, vocabulary, data locations),
  `pretrain.gin` (span corruption, lengths, batch, learning-rate schedule)
  and `wmt.gin` (fine-tuning lengths and batch);
* fixed held-out span-corruption examples (`heldout_<set>.npz`): evenly spaced
  over the whole validation split of Wikipedia and of the C4 sample, the same
  examples for every evaluation, so comparisons are paired; each with the
  index of the article it was cut from (`article`, `article_ids`), so the
  bootstrap resamples articles, not examples;
* calibration examples for `lsq` (`calibration.npz`) from the TRAIN split;
* the WMT validation pairs as token ids (`heldout_wmt.npz`), for the
  teacher-forced loss of the fine-tuned models.

A caller may give its own corpus and vocabulary (`Corpus`, the quickstart's
docstrings); then no vocabulary is trained, and WMT and C4 are only read
when the settings need them.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gqa_t5x.experiments.study.settings import StudySettings

CORPUS_TASK = "gqa_corpus_span_corruption"
WMT_TASK = "gqa_wmt14_ende"
WMT_SET = "wmt"
C4 = "c4"
C4_TASK = "gqa_c4_span_corruption"
WMT_PREFIX = "translate English to German: "  # preprocessors.translate's
_FEATURES = ("encoder_input_tokens", "decoder_target_tokens")


def heldout_task(name: str) -> str:
    """The task of a held-out set: 'c4' is the C4 sample, any other name the corpus."""
    return C4_TASK if name == C4 else CORPUS_TASK


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A pre-training corpus given by the caller (the quickstart's docstrings).

    Attributes:
      train: Train file pattern (JSON lines with `text`, gzip'd or not).
      validation: Validation file pattern.
      vocab: Its SentencePiece model (T5's special ids), trained by the caller.
    """

    train: str
    validation: str
    vocab: Path


@dataclasses.dataclass(frozen=True)
class StudyData:
    """Where the study's derived data lives (all under OUTPUT/data)."""

    root: Path

    @property
    def vocab(self) -> Path:
        return self.root / "spm.model"

    @property
    def gin_dir(self) -> Path:
        return self.root / "gin"

    @property
    def study_gin(self) -> Path:
        return self.gin_dir / "study.gin"

    @property
    def pretrain_gin(self) -> Path:
        return self.gin_dir / "pretrain.gin"

    @property
    def wmt_gin(self) -> Path:
        return self.gin_dir / "wmt.gin"

    def heldout(self, name: str) -> Path:
        return self.root / f"heldout_{name}.npz"

    @property
    def cache(self) -> Path:
        """The training data cache (`Stages.write_cache`)."""
        return self.root / "cache"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.npz"

    @property
    def info(self) -> Path:
        return self.root / "data.json"


def _read_texts(pattern_files: list[Path], limit: int | None = None) -> list[str]:
    texts: list[str] = []
    for path in pattern_files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                if limit is not None and len(texts) >= limit:
                    return texts
    return texts


def _write_jsonl_gz(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)


def wikipedia_files(shared: Path, data: StudyData, settings: StudySettings) -> dict[str, str]:
    """Wikipedia's train/validation file patterns (a local subset when asked)."""
    source = shared / "data" / "wikipedia_en"
    train = sorted(source.glob("train-*-of-00016.jsonl.gz"))
    validation = sorted(source.glob("validation-*.jsonl.gz"))
    if not train or not validation:
        raise FileNotFoundError(f"The Wikipedia corpus is missing under {source} (train-*-of-00016.jsonl.gz, "
                                "validation-*.jsonl.gz); point --shared_dir at the shared data folder.")
    if settings.corpus_articles is None:
        return {"train": str(source / "train-*-of-00016.jsonl.gz"), "validation": str(source / "validation-*.jsonl.gz")}
    local = data.root / "corpus"
    subset = {"train": _read_texts(train, settings.corpus_articles),
              "validation": _read_texts(validation, max(10, settings.corpus_articles // 10))}
    for split, texts in subset.items():
        _write_jsonl_gz(local / f"{split}-00000-of-00001.jsonl.gz", texts)
    return {split: str(local / f"{split}-00000-of-00001.jsonl.gz") for split in subset}


def train_vocabulary(data: StudyData, corpus_train: list[Path], wmt_dir: Path, settings: StudySettings,
                     seed: int = 0) -> Path:
    """Trains the study's SentencePiece model (T5's ids: pad 0, eos 1, unk 2, no bos).

    Args:
      data: Output locations.
      corpus_train: Train files of the corpus (gzip'd JSON lines, `text`).
      wmt_dir: Folder of the WMT `src-train.txt` / `tgt-train.txt`.
      settings: `vocab_pieces`, `vocab_sentences` (corpus lines; a quarter as
        many sentences of each WMT language are added).
      seed: Seed of the line sample.

    Returns:
      The model file.
    """
    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [line for text in _read_texts(corpus_train) for line in text.split("\n") if line.strip()]
    sample = rng.sample(lines, min(settings.vocab_sentences, len(lines)))
    for name in ("src-train.txt", "tgt-train.txt"):
        wmt = (wmt_dir / name).read_text(encoding="utf-8").splitlines()
        sample += rng.sample(wmt, min(settings.vocab_sentences // 4, len(wmt)))
    text_file = data.root / "vocab_training_text.txt"
    text_file.write_text("\n".join(sample) + "\n", encoding="utf-8")
    prefix = data.root / "spm"
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(prefix), vocab_size=settings.vocab_pieces, model_type="unigram",
        character_coverage=0.9995, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, input_sentence_size=len(sample),
        shuffle_input_sentence=False, num_threads=2, minloglevel=2)
    text_file.unlink()
    return data.vocab


def filter_wmt(data: StudyData, vocab: Path, wmt_dir: Path, settings: StudySettings) -> dict[str, list[str]]:
    """Writes the WMT pairs whose prefixed input and target fit `wmt_length` tokens.

    Args:
      data: Output locations.
      vocab: The SentencePiece model that measures the lengths.
      wmt_dir: Folder of the WMT `src-*.txt` / `tgt-*.txt` files.
      settings: `wmt_length`, `bleu_examples`.

    Returns:
      {'train': [en, de], 'validation': [en, de]} file paths; validation keeps
      the first `bleu_examples` fitting pairs.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(vocab))
    limit = settings.wmt_length - 1  # room for EOS
    out: dict[str, list[str]] = {}
    counts = {}
    for split, suffix, keep in (("train", "train", None), ("validation", "val", settings.bleu_examples)):
        en = (wmt_dir / f"src-{suffix}.txt").read_text(encoding="utf-8").splitlines()
        de = (wmt_dir / f"tgt-{suffix}.txt").read_text(encoding="utf-8").splitlines()
        pairs = [(e, d) for e, d in zip(en, de)
                 if len(sp.encode(WMT_PREFIX + e)) <= limit and len(sp.encode(d)) <= limit and e.strip() and d.strip()]
        if keep is not None:
            pairs = pairs[:keep]
        counts[split] = {"kept": len(pairs), "of": len(en)}
        paths = [data.root / "wmt" / f"{lang}-{split}.txt" for lang in ("en", "de")]
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, side in zip(paths, zip(*pairs)):
            path.write_text("\n".join(side) + "\n", encoding="utf-8")
        out[split] = [str(p) for p in paths]
    out["counts"] = counts  # type: ignore[assignment]
    return out


def write_gins(data: StudyData, settings: StudySettings, corpus: dict[str, str], vocab: Path, c4_dir: Path | None,
               wmt: dict[str, list[str]] | None) -> None:
    """Writes study.gin, pretrain.gin and wmt.gin (see the module docstring)."""
    data.gin_dir.mkdir(parents=True, exist_ok=True)
    s = settings
    locations = [f"gqa_t5x.data.tasks.corpus_data.files = {json.dumps(corpus)}"]
    if c4_dir is not None:
        locations.append(f"gqa_t5x.data.tasks.c4_data.tfds_builder_dir = {json.dumps(str(c4_dir))}")
    if wmt is not None:
        files = {k: wmt[k] for k in ("train", "validation")}
        locations.append(f"gqa_t5x.data.tasks.wmt14_ende_data.files = {json.dumps(files)}")
    where = "\n".join(locations)
    data.study_gin.write_text(f"""# Written by `gqa-t5x reproduce`: the study's model, vocabulary and data.
from __gin__ import dynamic_registration
from gqa_t5x.model import network
import gqa_t5x.data.tasks
import gqa_t5x.data.vocabularies

VOCAB_PATH = {json.dumps(str(vocab))}
gqa_t5x.data.vocabularies.vocabulary_path.path = %VOCAB_PATH
ACTIVATION_DTYPE = 'float32'
{where}

network.T5Config:
  vocab_size = {s.vocab_size}
  emb_dim = {s.emb_dim}
  num_heads = {s.num_heads}
  head_dim = {s.head_dim}
  mlp_dim = {s.mlp_dim}
  num_encoder_layers = {s.num_layers}
  num_decoder_layers = {s.num_layers}
""")
    base_lr = s.peak_learning_rate * s.warmup_steps ** 0.5
    data.pretrain_gin.write_text(f"""# Written by `gqa-t5x reproduce`: span-corruption pre-training / uptraining.
# T5's schedule lr = base / sqrt(max(step, warmup)) with base = {s.peak_learning_rate} * sqrt(warmup):
# {s.peak_learning_rate} for the first {s.warmup_steps} steps, then 1/sqrt decay by global step.
from __gin__ import dynamic_registration
from gqa_t5x.training import optimizers

MIXTURE_OR_TASK_NAME = 'gqa_corpus_span_corruption'
TASK_FEATURE_LENGTHS = {{'inputs': {s.input_length}, 'targets': {s.target_length}}}
BATCH_SIZE = {s.batch_size}
PRETRAIN_STEPS = {s.pretrain_steps}
LOG_EVERY = {max(1, min(50, s.pretrain_steps // 20))}
optimizers.rsqrt_schedule.base_learning_rate = {base_lr!r}
optimizers.rsqrt_schedule.warmup_steps = {s.warmup_steps}
""")
    data.wmt_gin.write_text(f"""# Written by `gqa-t5x reproduce`: WMT En-De fine-tuning at the study's scale.
MIXTURE_OR_TASK_NAME = 'gqa_wmt14_ende'
TASK_FEATURE_LENGTHS = {{'inputs': {s.wmt_length}, 'targets': {s.wmt_length}}}
BATCH_SIZE = {s.finetune_batch}
EVAL_BATCH_SIZE = 64
CHECKPOINT_PERIOD = {s.finetune_steps}
KEEP_CHECKPOINTS = 1
LOG_EVERY = {max(1, min(50, s.finetune_steps))}
""")


def parse_study_gin(data: StudyData) -> None:
    """Parses study.gin so the tasks see the study's vocabulary and files."""
    from gqa_t5x import gin_config

    gin_config.parse_gin([str(data.study_gin)], [])


def build_examples(task: str, split: str, settings: StudySettings, count: int, *,
                   every: bool = True, lengths: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Fixed span-corruption examples of a task split (parse the study gin first).

    Args:
      task: A registered span-corruption task.
      split: 'validation' (held-out) or 'train' (calibration).
      settings: Lengths.
      count: Examples to keep (at most; a split with fewer keeps them all).
      every: Read the whole split and keep `count` evenly spaced examples
        (held-out); False keeps the first `count` (calibration).
      lengths: (inputs, targets) lengths (default: the span-corruption ones).

    Returns:
      {'encoder_input_tokens': [n, in], 'decoder_target_tokens': [n, out]}
      int32, 'available': the examples the split has, and 'kept': the
      indices of the kept ones among them.

    Raises:
      ValueError: the split has fewer than 2 examples.
    """
    from gqa_t5x.data import datasets

    inputs, targets = lengths or (settings.input_length, settings.target_length)
    cfg = datasets.DatasetConfig(task, {"inputs": inputs, "targets": targets},
                                 split, batch_size=1, shuffle=False, seed=0, pack=False)
    rows: dict[str, list[np.ndarray]] = {k: [] for k in _FEATURES}
    for batch in datasets.numpy_batches(datasets.get_dataset(cfg, num_epochs=1)):
        for k in _FEATURES:
            rows[k].append(batch[k][0])
        if not every and len(rows[_FEATURES[0]]) >= count:
            break
    total = len(rows[_FEATURES[0]])
    if total < 2:
        raise ValueError(f"{task} ({split}) has only {total} examples; the study needs at least 2.")
    count = min(count, total)
    keep = np.linspace(0, total - 1, count).round().astype(int) if every else np.arange(count)
    return ({k: np.stack(rows[k])[keep].astype(np.int32) for k in _FEATURES}
            | {"available": np.asarray(total), "kept": keep})


def article_ids(task: str, split: str, settings: StudySettings, examples: int,
                max_document_tokens: int = 65536, merge_batch_size: int = 128) -> np.ndarray:
    """The article each unshuffled span-corruption example of a split starts in.

    Follows `preprocessors.span_corruption` (defaults: no window of a document
    below 65,536 tokens, 128 documents concatenated, segments of
    `span_corruption_lengths(inputs)[0]` tokens): document lengths come from
    the task's own vocabulary, in the order the source reads the split
    unshuffled. An example spanning two articles counts for the first.

    Args:
      task: A registered span-corruption task.
      split: Its split.
      settings: The input length.
      examples: The examples the pipeline produced (`build_examples`' 'available').

    Returns:
      [examples] int32 article indices (in the split's reading order).

    Raises:
      ValueError: a document is longer than `max_document_tokens` (its window
        is random), or the count differs from `examples` (the pipeline is not
        the one followed here).
    """
    import seqio

    from gqa_t5x.data import preprocessors

    task_obj = seqio.get_mixture_or_task(task)
    vocabulary = task_obj.output_features["targets"].vocabulary
    segment, _ = preprocessors.span_corruption_lengths(settings.input_length)
    texts = [x["text"].decode("utf-8") for x in task_obj.source.get_dataset(split, shuffle=False).as_numpy_iterator()]
    lengths = [(i, len(vocabulary.encode(t))) for i, t in enumerate(texts)]
    lengths = [(i, n) for i, n in lengths if n > 0]
    too_long = [i for i, n in lengths if n > max_document_tokens]
    if too_long:
        raise ValueError(f"{task} ({split}): article(s) {too_long[:5]} exceed {max_document_tokens} tokens; "
                         "their span-corruption window is random, so examples cannot be traced to articles.")
    ids: list[int] = []
    for g in range(0, len(lengths), merge_batch_size):
        group = lengths[g:g + merge_batch_size]
        ends = np.cumsum([n for _, n in group])
        starts = np.arange(0, int(ends[-1]), segment)
        ids.extend(group[k][0] for k in np.searchsorted(ends, starts, side="right"))
    if len(ids) != examples:
        raise ValueError(f"{task} ({split}): {len(ids)} segments traced to articles, but the pipeline made "
                         f"{examples} examples; the article clusters would be wrong.")
    return np.asarray(ids, np.int32)


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez, atomically."""
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Reads a `.npz` written by `save_arrays`."""
    with np.load(path) as f:
        return {k: np.asarray(f[k]) for k in f.files}


def prepare_data(output: Path, settings: StudySettings, shared: Path | None, log: Callable[[str], None] = print,
                 *, corpus: Corpus | None = None) -> StudyData:
    """Builds (or finds) everything under OUTPUT/data.

    Args:
      output: The study's output directory.
      settings: The study's settings.
      shared: The shared data folder (`data/wikipedia_en`, `data/c4`,
        `data/wmt_ende`); may be None with a `corpus`, no 'c4' set and
        `conversion_only`.
      log: Progress messages.
      corpus: Pre-train on this corpus with its vocabulary instead of
        Wikipedia with a vocabulary trained here.

    Returns:
      The `StudyData`.
    """
    data = StudyData(output / "data")
    if data.info.exists():
        return data
    data.root.mkdir(parents=True, exist_ok=True)
    needs_c4 = any(name == C4 for name, _ in settings.heldout_examples)
    needs_wmt = not settings.conversion_only
    wmt_dir = c4_dir = None
    if needs_wmt or needs_c4 or corpus is None:
        if shared is None:
            raise FileNotFoundError("The study needs the shared data folder (--shared_dir).")
        wmt_dir, c4_dir = shared / "data" / "wmt_ende", shared / "data" / "c4" / "en" / "3.0.1"
        for needed, wanted in ((wmt_dir / "src-train.txt", needs_wmt or corpus is None), (c4_dir, needs_c4)):
            if wanted and not needed.exists():
                raise FileNotFoundError(f"{needed} is missing; point --shared_dir at the shared data folder.")
    if corpus is None:
        files = wikipedia_files(shared, data, settings)
        log(f"[data] vocabulary: {settings.vocab_pieces} SentencePiece pieces on corpus lines + WMT sentences")
        vocab = train_vocabulary(data, sorted(Path(files["train"]).parent.glob(Path(files["train"]).name)),
                                 wmt_dir, settings)
    else:
        files, vocab = {"train": corpus.train, "validation": corpus.validation}, corpus.vocab
    wmt = filter_wmt(data, vocab, wmt_dir, settings) if needs_wmt else None
    write_gins(data, settings, files, vocab, c4_dir if needs_c4 else None, wmt)
    parse_study_gin(data)
    sizes = {}
    for name, count in settings.heldout_examples:
        log(f"[data] held-out {name}: {count} span-corruption examples spread over the validation split")
        arrays = build_examples(heldout_task(name), "validation", settings, count)
        available = int(arrays.pop("available"))
        every = article_ids(heldout_task(name), "validation", settings, available)
        arrays["article"] = every[arrays.pop("kept")]
        sizes[name] = {"examples": int(arrays[_FEATURES[0]].shape[0]), "available": available,
                       "articles": int(len(np.unique(arrays["article"])))}
        save_arrays(data.heldout(name), arrays)
    arrays = build_examples(CORPUS_TASK, "train", settings, settings.calibration_examples, every=False)
    arrays.pop("available"), arrays.pop("kept")
    save_arrays(data.calibration, arrays)
    if wmt is not None:
        arrays = build_examples(WMT_TASK, "validation", settings, settings.bleu_examples,
                                lengths=(settings.wmt_length, settings.wmt_length))
        arrays.pop("available"), arrays.pop("kept")
        save_arrays(data.heldout(WMT_SET), arrays)
    info = {"corpus": files, "vocab": str(vocab), "wmt": wmt, "heldout": sizes, "vocab_size": settings.vocab_size}
    tmp = data.info.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, data.info)
    return data
