"""Evaluation metrics with the signatures and numbers of `t5.evaluation.metrics`.

The decoding metrics are `fn(targets, predictions) -> dict[str, float]`, the
form seqio's evaluator calls, and return percentages (0-100).

* `rouge`: ROUGE-1/2/Lsum F-measure from `rouge-score`, no stemming, with
  " . " turned into " .\\n" so that ROUGE-Lsum sees sentence boundaries (T5's
  convention). T5 reports the median of 1,000 bootstrap resamples of the mean
  with numpy's unseeded global RNG; here the resampling uses a fixed seed, so
  scores are reproducible, and `bootstrap=False` gives the plain mean.
* `bleu`: sacrebleu corpus BLEU, `tokenize="intl"`, exponential smoothing.
* `trivia_qa`: max over the acceptable answers of token F1 / exact match after
  T5's TriviaQA answer normalisation.
* `token_loss`: the one score metric, `fn(targets, scores)`: held-out
  cross-entropy per target token of the pre-training tasks.

`scale(name)` says what each reported number is measured in, for consoles
and reports ("rouge1 = 44.70 (percent, 0-100)").
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

_DEFAULT_ROUGE_KEYS = ("rouge1", "rouge2", "rougeLsum")

# What each metric's number is measured in (see `scale`).
_PERCENT = "percent, 0-100"
_SCALES: dict[str, str] = {
    "bleu": "BLEU, 0-100",
    "em": _PERCENT,
    "f1": _PERCENT,
    "cross_ent_loss": "nats per target token",
    "perplexity": "per target token, >= 1",
}


def scale(name: str) -> str | None:
    """What the value of metric `name` ('rouge1' or 'task/rouge1') is measured in.

    Args:
      name: A metric these functions return, with or without its task.

    Returns:
      E.g. 'percent, 0-100' for ROUGE, exact match and F1, 'BLEU, 0-100',
      'nats per target token' for `cross_ent_loss`; None for a metric this
      module does not compute.
    """
    metric = name.rsplit("/", 1)[-1]
    if metric.startswith("rouge"):
        return _PERCENT
    return _SCALES.get(metric)


def _check_pairs(targets: Sequence, predictions: Sequence, metric: str) -> None:
    if len(targets) != len(predictions):
        raise ValueError(
            f"{metric}: {len(targets)} targets but {len(predictions)} "
            "predictions; they must be paired one to one."
        )
    if not targets:
        raise ValueError(f"{metric}: no examples to score.")


def _mark_sentences(text: str) -> str:
    """Puts T5-style " . " sentence ends on separate lines (for ROUGE-Lsum)."""
    return text.replace(" . ", " .\n")


def _bootstrap_medians(scores: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """Per column: median over resamples (with replacement) of the mean.

    Columns are resampled one after the other from a single seeded
    `RandomState`, the order in which rouge-score's `BootstrapAggregator`
    draws them; with `np.random.seed(seed)` before T5's `rouge` the two give
    identical numbers.
    """
    rng = np.random.RandomState(seed)
    n, num_columns = scores.shape
    medians = []
    for column in range(num_columns):
        means = [
            scores[rng.choice(n, size=n), column].mean() for _ in range(num_samples)
        ]
        medians.append(np.percentile(means, 50))
    return np.asarray(medians)


def rouge(
    targets: Sequence[str],
    predictions: Sequence[str],
    score_keys: Sequence[str] = _DEFAULT_ROUGE_KEYS,
    bootstrap: bool = True,
    num_bootstrap_samples: int = 1000,
    seed: int = 0,
    **scorer_kwargs,
) -> dict[str, float]:
    """Corpus ROUGE F-measure, as `t5.evaluation.metrics.rouge`.

    Args:
      targets: Reference summaries.
      predictions: Generated summaries, one per target.
      score_keys: ROUGE types to report (rouge-score names).
      bootstrap: Report the median of bootstrap means (T5's "mid") instead of
        the plain mean over examples.
      num_bootstrap_samples: Bootstrap resamples (rouge-score's default 1000).
      seed: Seed of the bootstrap resampling.
      **scorer_kwargs: Passed to `rouge_scorer.RougeScorer` (e.g.
        `use_stemmer`; T5 uses none).

    Returns:
      {score_key: F-measure * 100}.
    """
    _check_pairs(targets, predictions, "rouge")
    scorer = rouge_scorer.RougeScorer(rouge_types=list(score_keys), **scorer_kwargs)
    rows = []
    for target, prediction in zip(targets, predictions):
        result = scorer.score(
            target=_mark_sentences(target), prediction=_mark_sentences(prediction)
        )
        rows.append([result[key].fmeasure for key in score_keys])
    matrix = np.asarray(rows, dtype=np.float64)
    if bootstrap:
        summary = _bootstrap_medians(matrix, num_bootstrap_samples, seed)
    else:
        summary = matrix.mean(axis=0)
    return {key: float(value) * 100 for key, value in zip(score_keys, summary)}


def bleu(
    targets: Sequence[str] | Sequence[Sequence[str]],
    predictions: Sequence[str],
    tokenizer: str = "intl",
) -> dict[str, float]:
    """Corpus BLEU with sacrebleu, as `t5.evaluation.metrics.bleu`.

    Args:
      targets: One reference per prediction, or per prediction a list of
        references (every example must then have the same number).
      predictions: Translations, one per target.
      tokenizer: sacrebleu tokenizer (T5: "intl").

    Returns:
      {'bleu': corpus BLEU}.
    """
    _check_pairs(targets, predictions, "bleu")
    if isinstance(targets[0], str):
        reference_streams = [list(targets)]
    else:
        counts = {len(refs) for refs in targets}
        if len(counts) != 1:
            raise ValueError(
                "bleu: every prediction needs the same number of references, "
                f"got counts {sorted(counts)}."
            )
        reference_streams = [list(stream) for stream in zip(*targets)]
    score = sacrebleu.corpus_bleu(
        list(predictions),
        reference_streams,
        smooth_method="exp",
        smooth_value=0.0,
        force=False,
        lowercase=False,
        tokenize=tokenizer,
        use_effective_order=False,
    )
    return {"bleu": float(score.score)}


_TRIVIA_QA_PUNCTUATION = frozenset(string.punctuation + "‘’´`_")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_trivia_qa(answer: str) -> str:
    """T5's TriviaQA answer normalisation.

    Lower-case; every punctuation character (ASCII punctuation and ‘ ’ ´ ` _)
    becomes a space; the articles a/an/the become spaces; runs of whitespace
    collapse to one space; leading/trailing whitespace is removed.

    Args:
      answer: Raw answer text.

    Returns:
      The normalised answer.
    """
    text = answer.lower()
    text = "".join(" " if c in _TRIVIA_QA_PUNCTUATION else c for c in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _token_f1(target: str, prediction: str) -> float:
    target_tokens, prediction_tokens = target.split(), prediction.split()
    overlap = collections.Counter(target_tokens) & collections.Counter(
        prediction_tokens
    )
    same = sum(overlap.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


def trivia_qa(
    targets: Sequence[Sequence[str]], predictions: Sequence[str]
) -> dict[str, float]:
    """TriviaQA exact match and F1, as `t5.evaluation.metrics.trivia_qa`.

    Args:
      targets: Per example, the list of acceptable answers.
      predictions: One predicted answer per example.

    Returns:
      {'em': mean max exact match * 100, 'f1': mean max token F1 * 100}.
    """
    _check_pairs(targets, predictions, "trivia_qa")
    exact, f1 = [], []
    for answers, prediction in zip(targets, predictions):
        if isinstance(answers, str) or not answers:
            raise ValueError(
                "trivia_qa: each target must be a non-empty list of answers, "
                f"got {answers!r}."
            )
        answers = [normalize_trivia_qa(a) for a in answers]
        prediction = normalize_trivia_qa(prediction)
        exact.append(max(float(a == prediction) for a in answers))
        f1.append(max(_token_f1(a, prediction) for a in answers))
    return {"em": float(np.mean(exact)) * 100, "f1": float(np.mean(f1)) * 100}


def token_loss(targets: Sequence[int], scores: Sequence[float]) -> dict[str, float]:
    """Held-out cross-entropy per target token, from the model's scores.

    A seqio score metric (positional arguments `targets, scores`): the
    targets are each example's token count (`postprocessors.target_token_count`)
    and the scores the log-likelihood summed over those tokens
    (`EncoderDecoderModel.score_batch`), so the result is the training log's
    `cross_ent_loss` (without z-loss) on held-out data.

    Args:
      targets: Target tokens per example (EOS included).
      scores: Log-likelihood of each example's targets.

    Returns:
      {'cross_ent_loss': -sum(scores) / sum(targets), 'perplexity':
      exp(cross_ent_loss)}.
    """
    if len(targets) != len(scores):
        raise ValueError(
            f"token_loss: {len(targets)} token counts but {len(scores)} scores; "
            "they must be paired one to one."
        )
    tokens = int(np.sum(targets))
    if tokens <= 0:
        raise ValueError("token_loss: no target tokens to score.")
    loss = -float(np.sum(np.asarray(scores, np.float64))) / tokens
    return {"cross_ent_loss": loss, "perplexity": float(np.exp(loss))}
