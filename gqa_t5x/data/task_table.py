"""The task table: everything the project knows about each task, in one place.

One `TaskSpec` per task holds its seqio name, the short key sweeps and
reports use, the paper's feature lengths, what it reads, its preprocessing,
its metrics, the metric that picks the best checkpoint, its Table 1 column
and its gin file. `tasks.py` registers every spec with seqio (and
`tasks.register_task` adds new ones); sweeps, reports and the trainer look
tasks up here (`by_key`, `by_name`, `primary_metric`, `paper_column`,
`gin_file`, `feature_lengths`).

Built-in tasks: `gqa_c4_span_corruption` (uptraining, C4),
`gqa_corpus_span_corruption` (the same objective on any local text corpus),
and the paper's seven evaluation tasks, in Table 1 order: CNN/DailyMail,
arXiv, PubMed, MediaSum, Multi-News (ROUGE), WMT14 En-De (BLEU), TriviaQA
(F1). `gqa_eval_mixture` mixes the seven at equal rates.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

import seqio
import tensorflow as tf

from gqa_t5x.data import metrics
from gqa_t5x.data import postprocessors
from gqa_t5x.data import preprocessors
from gqa_t5x.data.sources import SourceSpec

EVAL_MIXTURE = "gqa_eval_mixture"
_FEATURES = ("inputs", "targets")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: its data, preprocessing, metrics and where reports show it.

    The registered seqio task runs: raw examples -> `text_preprocessors` ->
    tokenize (T5 vocabulary) -> cache placeholder -> `token_preprocessors` ->
    EOS appended after trimming to the feature lengths.

    Attributes:
      name: seqio task name (`MIXTURE_OR_TASK_NAME`), e.g. 'gqa_cnn_dailymail'.
      key: Short key used by sweeps and reports, e.g. 'cnn_dailymail'.
      feature_lengths: The paper's {'inputs': int, 'targets': int}
        (`TASK_FEATURE_LENGTHS`).
      source: What the task reads (`gqa_t5x.data.tasks.<source.location>`).
      text_preprocessors: Raw examples -> 'inputs'/'targets' strings.
      token_preprocessors: Applied to token ids after tokenization (e.g.
        span corruption).
      metric_fns: seqio metric functions (`(targets, predictions)` or
        `(targets, scores)`).
      postprocess_fn: seqio postprocessor of targets and predictions.
      primary_metric: Metric that picks the best fine-tuning checkpoint and
        is reported in sweeps (rouge1 / bleu / f1), or None.
      paper_column: Column label in the paper's Table 1 (e.g. 'CNN'), or None
        for tasks the paper does not report.
      gin_file: Task gin setting `MIXTURE_OR_TASK_NAME` and
        `TASK_FEATURE_LENGTHS`, relative to the repository root, or None.
      requires_inputs: False when the raw examples have no 'inputs' (the
        token preprocessors make them, as span corruption does).
    """

    name: str
    key: str
    feature_lengths: Mapping[str, int]
    source: SourceSpec
    text_preprocessors: tuple[Callable[..., tf.data.Dataset], ...]
    token_preprocessors: tuple[Callable[..., tf.data.Dataset], ...] = ()
    metric_fns: tuple[Callable[..., Mapping[str, float]], ...] = ()
    postprocess_fn: Callable[..., Any] | None = None
    primary_metric: str | None = None
    paper_column: str | None = None
    gin_file: str | None = None
    requires_inputs: bool = True

    def __post_init__(self) -> None:
        for attribute in ("name", "key"):
            if not getattr(self, attribute).isidentifier():
                raise ValueError(
                    f"TaskSpec.{attribute}={getattr(self, attribute)!r} must be "
                    "a non-empty identifier (letters, digits, underscores)."
                )
        if self.name == self.key:
            raise ValueError(
                f"TaskSpec {self.name!r}: name and key must differ (e.g. "
                f"name 'gqa_{self.key}', key {self.key!r})."
            )
        lengths = dict(self.feature_lengths)
        if sorted(lengths) != sorted(_FEATURES) or not all(
            isinstance(v, int) and v > 0 for v in lengths.values()
        ):
            raise ValueError(
                f"TaskSpec {self.name!r}: feature_lengths={lengths} must be "
                "{'inputs': positive int, 'targets': positive int}."
            )
        object.__setattr__(self, "feature_lengths", types.MappingProxyType(lengths))
        for attribute in ("text_preprocessors", "token_preprocessors", "metric_fns"):
            object.__setattr__(self, attribute, tuple(getattr(self, attribute)))
        if self.primary_metric is not None and not self.metric_fns:
            raise ValueError(
                f"TaskSpec {self.name!r}: primary_metric={self.primary_metric!r} "
                "but the task has no metric_fns."
            )


# ------------------------------ task definitions -----------------------------


def _triviaqa_from_tfds(x: dict) -> dict:
    """TFDS trivia_qa/rc -> question, evidence context, acceptable answers."""
    wiki = tf.strings.reduce_join(x["entity_pages"]["wiki_context"], separator="\n")
    search = tf.strings.reduce_join(
        x["search_results"]["search_context"], separator="\n"
    )
    return {
        "question": x["question"],
        "context": tf.strings.join([wiki, search], separator="\n"),
        "answers": tf.concat([[x["answer"]["value"]], x["answer"]["aliases"]], 0),
    }


def _span_corruption_task(
    name: str, key: str, source: SourceSpec, gin_file: str
) -> TaskSpec:
    """T5's span corruption of the `text` field (C4's pre-training chain).

    Held-out evaluation scores the targets (`metrics.token_loss`).
    """
    return TaskSpec(
        name=name,
        key=key,
        feature_lengths={"inputs": 512, "targets": 114},
        source=source,
        text_preprocessors=(
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
        ),
        token_preprocessors=(preprocessors.span_corruption,),
        metric_fns=(metrics.token_loss,),
        postprocess_fn=postprocessors.target_token_count,
        gin_file=gin_file,
        requires_inputs=False,
    )


def _summarization_task(
    key: str,
    column: str,
    tfds_name: str | None,
    document: str,
    summary: str,
    lengths: Mapping[str, int],
) -> TaskSpec:
    """`summarize: {document}` -> `{summary}`, scored with ROUGE."""
    return TaskSpec(
        name=f"gqa_{key}",
        key=key,
        feature_lengths=lengths,
        source=SourceSpec(
            f"{key}_data", {document: False, summary: False}, tfds_name=tfds_name
        ),
        text_preprocessors=(
            functools.partial(
                preprocessors.summarize, article_key=document, summary_key=summary
            ),
        ),
        metric_fns=(metrics.rouge,),
        primary_metric="rouge1",
        paper_column=column,
        gin_file=f"gin/tasks/{key}.gin",
    )


_SHORT = {"inputs": 512, "targets": 256}
_LONG = {"inputs": 2048, "targets": 512}

BUILTIN_TASKS: tuple[TaskSpec, ...] = (
    _span_corruption_task(
        "gqa_c4_span_corruption",
        "c4_span_corruption",
        SourceSpec("c4_data", {"text": False}, ("train", "validation"), "c4/en:3.1.0"),
        "gin/tasks/c4_span_corruption.gin",
    ),
    _span_corruption_task(
        "gqa_corpus_span_corruption",
        "corpus_span_corruption",
        SourceSpec("corpus_data", {"text": False}, ("train", "validation")),
        "gin/tasks/corpus_span_corruption.gin",
    ),
    _summarization_task(
        "cnn_dailymail", "CNN", "cnn_dailymail:3.4.0", "article", "highlights", _SHORT
    ),
    _summarization_task(
        "arxiv", "arXiv", "scientific_papers/arxiv:1.1.1", "article", "abstract", _LONG
    ),
    _summarization_task(
        "pubmed", "PubMed", "scientific_papers/pubmed:1.1.1", "article", "abstract", _LONG
    ),
    TaskSpec(
        name="gqa_mediasum",
        key="mediasum",
        feature_lengths=_LONG,
        source=SourceSpec(
            "mediasum_data", {"utt": True, "speaker": True, "summary": False}
        ),
        text_preprocessors=(preprocessors.summarize_dialogue,),
        metric_fns=(metrics.rouge,),
        primary_metric="rouge1",
        paper_column="MediaSum",
        gin_file="gin/tasks/mediasum.gin",
    ),
    _summarization_task(
        "multi_news", "MultiNews", "multi_news:2.1.0", "document", "summary", _LONG
    ),
    TaskSpec(
        name="gqa_wmt14_ende",
        key="wmt14_ende",
        feature_lengths=_SHORT,
        source=SourceSpec(
            "wmt14_ende_data",
            {"en": False, "de": False},
            tfds_name="wmt14_translate/de-en:1.0.0",
            text_pair_fields=("en", "de"),
        ),
        text_preprocessors=(preprocessors.translate,),
        metric_fns=(metrics.bleu,),
        primary_metric="bleu",
        paper_column="WMT",
        gin_file="gin/tasks/wmt14_ende.gin",
    ),
    TaskSpec(
        name="gqa_triviaqa",
        key="triviaqa",
        feature_lengths={"inputs": 2048, "targets": 32},
        source=SourceSpec(
            "triviaqa_data",
            {"question": False, "context": False, "answers": True},
            ("train", "validation"),
            "trivia_qa/rc:1.1.0",
            from_tfds=_triviaqa_from_tfds,
        ),
        text_preprocessors=(preprocessors.question_answering,),
        metric_fns=(metrics.trivia_qa,),
        postprocess_fn=postprocessors.qa_postprocess,
        primary_metric="f1",
        paper_column="TriviaQA",
        gin_file="gin/tasks/triviaqa.gin",
    ),
)

# The paper's seven evaluation tasks, mixed at equal rates as EVAL_MIXTURE.
EVAL_MIXTURE_TASKS: tuple[str, ...] = tuple(
    s.name for s in BUILTIN_TASKS if s.paper_column is not None
)

# ----------------------------------- table -----------------------------------

# seqio name -> spec, in registration order (built-in tasks first).
_TABLE: dict[str, TaskSpec] = {}


def add(spec: TaskSpec) -> None:
    """Puts `spec` in the table (replacing a spec of the same name).

    Use `gqa_t5x.data.tasks.register_task`, which also registers the seqio
    task; this only records the spec.

    Raises:
      ValueError: its key or name is already used by another task.
    """
    for other in _TABLE.values():
        if other.name == spec.name:
            continue
        clashes = {spec.name, spec.key} & {other.name, other.key}
        if clashes:
            raise ValueError(
                f"Task {spec.name!r} (key {spec.key!r}) clashes with the "
                f"registered task {other.name!r} (key {other.key!r}) on "
                f"{sorted(clashes)}; choose another name/key."
            )
    if spec.name == EVAL_MIXTURE or spec.key == EVAL_MIXTURE:
        raise ValueError(f"{EVAL_MIXTURE!r} is the evaluation mixture's name.")
    _TABLE[spec.name] = spec


for _spec in BUILTIN_TASKS:
    add(_spec)


def task_specs() -> tuple[TaskSpec, ...]:
    """Every task in the table, built-in ones first."""
    return tuple(_TABLE.values())


def _known() -> str:
    return ", ".join(f"{s.key} ({s.name})" for s in _TABLE.values())


def by_key(key: str) -> TaskSpec:
    """The task with short key `key` (e.g. 'cnn_dailymail')."""
    for spec in _TABLE.values():
        if spec.key == key:
            return spec
    raise KeyError(f"Unknown task key {key!r}; known: {_known()}.")


def by_name(name: str) -> TaskSpec:
    """The task with seqio name `name` (e.g. 'gqa_cnn_dailymail')."""
    if name not in _TABLE:
        raise KeyError(
            f"Task {name!r} is not in the task table (register it with "
            f"gqa_t5x.data.tasks.register_task); known: {_known()}."
        )
    return _TABLE[name]


def lookup(task: str) -> TaskSpec:
    """The task with seqio name or short key `task`."""
    return by_name(task) if task in _TABLE else by_key(task)


def primary_metric(task: str) -> str | None:
    """The metric that picks the best checkpoint of `task` (name or key)."""
    return lookup(task).primary_metric


def paper_column(task: str) -> str | None:
    """The Table 1 column label of `task` (name or key), None if not reported."""
    return lookup(task).paper_column


def gin_file(task: str) -> str:
    """The task gin of `task` (name or key), relative to the repository root."""
    spec = lookup(task)
    if spec.gin_file is None:
        raise KeyError(
            f"Task {spec.name!r} has no gin file; give its TaskSpec a gin_file "
            "that sets MIXTURE_OR_TASK_NAME and TASK_FEATURE_LENGTHS."
        )
    return spec.gin_file


def paper_tasks() -> tuple[TaskSpec, ...]:
    """The tasks of the paper's Table 1 (those with a column), in its order."""
    return tuple(s for s in _TABLE.values() if s.paper_column is not None)


def feature_lengths(task_or_mixture: str) -> dict[str, int]:
    """The paper's feature lengths of a task (name or key), or of the mixture.

    Args:
      task_or_mixture: A task, or `gqa_eval_mixture` (largest over its tasks).

    Returns:
      {'inputs': int, 'targets': int}.
    """
    if task_or_mixture == EVAL_MIXTURE:
        return {
            k: max(by_name(t).feature_lengths[k] for t in EVAL_MIXTURE_TASKS)
            for k in _FEATURES
        }
    return dict(lookup(task_or_mixture).feature_lengths)

