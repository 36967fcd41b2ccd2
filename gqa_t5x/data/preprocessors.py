"""seqio preprocessors: T5 span corruption and the evaluation tasks' formats.

Span corruption (T5's pre-training objective, used by the paper to uptrain):
a stream of tokenized documents is cut into segments of `tokens_length`
tokens; in each segment a fraction `noise_density` of the tokens, split into
spans of mean length `mean_noise_span_length`, is removed from the inputs and
replaced by one sentinel per span; the targets hold the removed spans, each
preceded by its sentinel. Sentinels count down from the top of the vocabulary
(`<extra_id_0>` = vocab_size - 1). `span_corruption_lengths` chooses
`tokens_length` so that inputs (plus EOS) are exactly the configured input
length; for 512 inputs that is 568 tokens per segment and 114 targets.

The other preprocessors turn raw examples into `inputs`/`targets` strings
with T5's prefixes ("summarize: ", "translate English to German: ").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import seqio
import tensorflow as tf

from gqa_t5x.data import vocabularies

_AUTOTUNE = tf.data.AUTOTUNE


def require_features(dataset: tf.data.Dataset, keys: Iterable[str], where: str) -> None:
    """Raises a clear error when `dataset` lacks one of the features `keys`.

    Args:
      dataset: Dataset of feature dicts.
      keys: Feature names that must be present.
      where: Name of the caller, used in the message.
    """
    spec = dataset.element_spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} needs a dataset of dicts, got {spec}.")
    missing = [k for k in keys if k not in spec]
    if missing:
        raise ValueError(
            f"{where}: feature(s) {missing} not found; the examples have "
            f"{sorted(spec)}."
        )


# ------------------------------- span corruption -----------------------------


def _split_counts(
    tokens_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """Returns (noise tokens, noise spans) of a full segment (Python ints)."""
    num_noise = int(round(tokens_length * noise_density))
    num_noise = min(max(num_noise, 1), tokens_length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def span_corruption_lengths(
    inputs_length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[int, int]:
    """Returns (tokens per segment, targets length) for a given inputs length.

    The segment is the longest one whose corrupted inputs (kept tokens, one
    sentinel per noise span and EOS) fit `inputs_length`. The targets length
    counts noise tokens, one sentinel per span and EOS. For T5's settings,
    `span_corruption_lengths(512) == (568, 114)`.

    Args:
      inputs_length: Configured length of the `inputs` feature.
      noise_density: Fraction of tokens to corrupt.
      mean_noise_span_length: Mean length of a corrupted span.

    Returns:
      (tokens_length, targets_length).
    """
    if inputs_length < 3:
        raise ValueError(f"inputs_length must be >= 3, got {inputs_length}.")

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise, num_spans = _split_counts(
            tokens_length, noise_density, mean_noise_span_length
        )
        return (
            tokens_length - num_noise + num_spans + 1,
            num_noise + num_spans + 1,
        )

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def _random_partition(total: tf.Tensor, parts: tf.Tensor, seed: tf.Tensor):
    """Splits `total` items into `parts` non-empty runs of random lengths.

    Every composition of `total` into `parts` positive integers is equally
    likely: the `parts - 1` run boundaries are a uniformly random subset of the
    `total - 1` gaps between items.

    Args:
      total: Scalar int32, number of items (>= parts).
      parts: Scalar int32, number of runs (>= 1).
      seed: Stateless random seed, shape [2].

    Returns:
      int32 [parts] run lengths summing to `total`.
    """
    scores = tf.random.stateless_uniform([total - 1], seed=seed)
    cuts = tf.sort(tf.math.top_k(scores, k=parts - 1).indices) + 1
    bounds = tf.concat([[0], cuts, [total]], axis=0)
    return bounds[1:] - bounds[:-1]


def noise_span_mask(
    length: tf.Tensor,
    noise_density: float,
    mean_noise_span_length: float,
    seeds: tf.Tensor,
) -> tf.Tensor:
    """Returns a boolean mask marking the corrupted (noise) tokens.

    The mask alternates kept and noise spans, starting with a kept span and
    ending with a noise span; `round(length * noise_density)` tokens are
    noise, in `round(noise / mean_noise_span_length)` spans.

    Args:
      length: Scalar int32, number of tokens in the segment.
      noise_density: Fraction of noise tokens.
      mean_noise_span_length: Mean noise span length.
      seeds: Stateless seeds, shape [2, 2].

    Returns:
      bool [length].
    """
    n = tf.maximum(length, 2)
    num_noise = tf.cast(tf.round(tf.cast(n, tf.float32) * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, n - 1)
    num_spans = tf.cast(
        tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32
    )
    num_spans = tf.clip_by_value(num_spans, 1, n - num_noise)
    noise_lengths = _random_partition(num_noise, num_spans, seeds[0])
    kept_lengths = _random_partition(n - num_noise, num_spans, seeds[1])
    run_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
    run_is_noise = tf.tile(tf.constant([False, True]), [num_spans])
    return tf.repeat(run_is_noise, run_lengths)[:length]


def replace_spans_with_sentinels(
    tokens: tf.Tensor, span_mask: tf.Tensor, first_sentinel: int
) -> tf.Tensor:
    """Replaces every run of masked tokens by one sentinel.

    Runs get `first_sentinel`, `first_sentinel - 1`, ... in order.

    Args:
      tokens: int [n] token ids.
      span_mask: bool [n]; True marks tokens to replace.
      first_sentinel: Id of the first sentinel (`vocab_size - 1`).

    Returns:
      int [m] with m = n - masked tokens + number of runs.
    """
    previous = tf.concat([[False], span_mask[:-1]], axis=0)
    run_starts = tf.logical_and(span_mask, tf.logical_not(previous))
    run_index = tf.cumsum(tf.cast(run_starts, tokens.dtype))
    sentinels = tf.cast(first_sentinel + 1, tokens.dtype) - run_index
    replaced = tf.where(run_starts, sentinels, tokens)
    return tf.boolean_mask(replaced, tf.logical_not(span_mask & previous))


@seqio.map_over_dataset(num_seeds=1)
def _random_chunk(features, seed, *, key: str, max_length: int):
    """Keeps one of the aligned `max_length` windows of `features[key]`."""
    tokens = features[key]
    num_windows = (tf.size(tokens) + max_length - 1) // max_length
    window = tf.random.stateless_uniform(
        [], seed=seed, minval=0, maxval=num_windows, dtype=tf.int32
    )
    return {key: tokens[window * max_length : (window + 1) * max_length]}


def _concatenate_examples(
    dataset: tf.data.Dataset, key: str, batch_size: int
) -> tf.data.Dataset:
    """Concatenates the tokens of every `batch_size` consecutive examples."""
    dataset = dataset.map(lambda x: x[key], num_parallel_calls=_AUTOTUNE)
    dataset = dataset.ragged_batch(batch_size)
    return dataset.map(lambda x: {key: x.flat_values}, num_parallel_calls=_AUTOTUNE)


def _split_into_segments(
    dataset: tf.data.Dataset, key: str, segment_length: int
) -> tf.data.Dataset:
    """Cuts `features[key]` into segments of `segment_length` (last shorter)."""

    def segments(features):
        tokens = features[key]
        count = (tf.size(tokens) + segment_length - 1) // segment_length
        starts = tf.range(count) * segment_length
        return tf.data.Dataset.from_tensor_slices(starts).map(
            lambda start: {key: tokens[start : start + segment_length]}
        )

    return dataset.flat_map(segments)


@seqio.map_over_dataset(num_seeds=2)
def _corrupt_spans(
    features,
    seeds,
    *,
    noise_density: float,
    mean_noise_span_length: float,
    first_sentinel: int,
):
    tokens = features["targets"]
    mask = noise_span_mask(
        tf.size(tokens), noise_density, mean_noise_span_length, seeds
    )
    return {
        "inputs": replace_spans_with_sentinels(tokens, mask, first_sentinel),
        "targets": replace_spans_with_sentinels(
            tokens, tf.logical_not(mask), first_sentinel
        ),
    }


def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    merge_examples_to_reduce_padding: bool = True,
    merge_batch_size: int = 128,
    max_document_tokens: int = 65536,
) -> tf.data.Dataset:
    """T5's span-corruption objective on tokenized `targets`.

    Steps: drop empty documents; keep a random aligned window of at most
    `max_document_tokens` tokens per document; concatenate every
    `merge_batch_size` documents (no separator, as T5 does); cut into segments
    of `span_corruption_lengths(inputs)[0]` tokens; corrupt each segment.
    Apply `seqio.preprocessors.append_eos_after_trim` afterwards to add EOS.

    Args:
      dataset: Dataset with a tokenized int `targets` feature.
      sequence_length: Must hold `inputs` and `targets` lengths.
      output_features: Must hold a `targets` feature whose vocabulary has
        enough extra ids for the sentinels.
      noise_density: Fraction of tokens to corrupt (T5: 0.15).
      mean_noise_span_length: Mean corrupted span length (T5: 3.0).
      merge_examples_to_reduce_padding: Concatenate documents before
        segmenting (T5: True).
      merge_batch_size: Documents per concatenation (T5: 128).
      max_document_tokens: Window size of the random document chunk.

    Returns:
      Dataset of {'inputs', 'targets'} int32 token ids without EOS.
    """
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}.")
    if mean_noise_span_length < 1.0:
        raise ValueError(
            f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}."
        )
    if (
        sequence_length is None
        or sequence_length.get("inputs") is None
        or sequence_length.get("targets") is None
    ):
        raise ValueError(
            "span_corruption needs lengths for both 'inputs' and 'targets' "
            f"(TASK_FEATURE_LENGTHS), got {sequence_length}."
        )
    tokens_length, targets_length = span_corruption_lengths(
        sequence_length["inputs"], noise_density, mean_noise_span_length
    )
    if targets_length > sequence_length["targets"]:
        raise ValueError(
            f"Span corruption of {sequence_length['inputs']} input tokens "
            f"produces targets of up to {targets_length} tokens, more than the "
            f"configured targets length {sequence_length['targets']}; set "
            f"TASK_FEATURE_LENGTHS['targets'] >= {targets_length}."
        )
    if "targets" not in output_features:
        raise ValueError("span_corruption needs a 'targets' output feature.")
    vocabulary = output_features["targets"].vocabulary
    _, max_spans = _split_counts(tokens_length, noise_density, mean_noise_span_length)
    if vocabulary.extra_ids < max_spans:
        raise ValueError(
            f"Span corruption needs up to {max_spans} sentinels per example "
            f"but the vocabulary has {vocabulary.extra_ids} extra ids."
        )
    require_features(dataset, ["targets"], "span_corruption")

    dataset = dataset.map(lambda x: {"targets": x["targets"]})
    dataset = dataset.filter(lambda x: tf.size(x["targets"]) > 0)
    dataset = _random_chunk(dataset, key="targets", max_length=max_document_tokens)
    if merge_examples_to_reduce_padding:
        dataset = _concatenate_examples(dataset, "targets", merge_batch_size)
    dataset = _split_into_segments(dataset, "targets", tokens_length)
    return _corrupt_spans(
        dataset,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
        first_sentinel=vocabularies.sentinel_id(vocabulary, 0),
    )


# --------------------------- evaluation task formats -------------------------


def _prefixed_pair(
    dataset: tf.data.Dataset, source_key: str, target_key: str, prefix: str, name: str
) -> tf.data.Dataset:
    """{source, target} -> {'inputs': prefix + source, 'targets': target}."""
    require_features(dataset, [source_key, target_key], name)
    return dataset.map(
        lambda x: {
            "inputs": tf.strings.join([prefix, x[source_key]]),
            "targets": x[target_key],
        },
        num_parallel_calls=_AUTOTUNE,
    )


def summarize(
    dataset: tf.data.Dataset,
    article_key: str,
    summary_key: str,
    prefix: str = "summarize: ",
) -> tf.data.Dataset:
    """Maps {article, summary} to {'inputs': prefix + article, 'targets'}.

    Args:
      dataset: Raw examples.
      article_key: Feature with the document text.
      summary_key: Feature with the reference summary.
      prefix: Task prefix (T5: "summarize: ").

    Returns:
      Dataset of {'inputs', 'targets'} strings.
    """
    return _prefixed_pair(dataset, article_key, summary_key, prefix, "summarize")


def summarize_dialogue(
    dataset: tf.data.Dataset,
    utterances_key: str = "utt",
    speakers_key: str = "speaker",
    summary_key: str = "summary",
    prefix: str = "summarize: ",
) -> tf.data.Dataset:
    """Summarization of a transcript given as parallel speaker/utterance lists.

    The transcript becomes one line "SPEAKER: utterance" per turn (MediaSum's
    `speaker` and `utt` fields).

    Args:
      dataset: Raw examples with string vectors `utterances_key` and
        `speakers_key` of equal length and a string `summary_key`.
      utterances_key: Feature with the utterances.
      speakers_key: Feature with the speaker of each utterance.
      summary_key: Feature with the reference summary.
      prefix: Task prefix.

    Returns:
      Dataset of {'inputs', 'targets'} strings.
    """
    require_features(
        dataset, [utterances_key, speakers_key, summary_key], "summarize_dialogue"
    )

    def fn(x):
        utterances, speakers = x[utterances_key], x[speakers_key]
        check = tf.debugging.assert_equal(
            tf.size(utterances),
            tf.size(speakers),
            message=f"'{speakers_key}' and '{utterances_key}' differ in length",
        )
        with tf.control_dependencies([check]):
            turns = tf.strings.join([speakers, ": ", utterances])
        transcript = tf.strings.reduce_join(turns, separator="\n")
        return {
            "inputs": tf.strings.join([prefix, transcript]),
            "targets": x[summary_key],
        }

    return dataset.map(fn, num_parallel_calls=_AUTOTUNE)


def translate(
    dataset: tf.data.Dataset,
    source_key: str = "en",
    target_key: str = "de",
    prefix: str = "translate English to German: ",
) -> tf.data.Dataset:
    """Maps a sentence pair to {'inputs': prefix + source, 'targets': target}.

    Args:
      dataset: Raw examples.
      source_key: Feature with the source sentence.
      target_key: Feature with the reference translation.
      prefix: Task prefix (T5: "translate English to German: ").

    Returns:
      Dataset of {'inputs', 'targets'} strings.
    """
    return _prefixed_pair(dataset, source_key, target_key, prefix, "translate")


def question_answering(
    dataset: tf.data.Dataset,
    question_key: str = "question",
    context_key: str = "context",
    answers_key: str = "answers",
) -> tf.data.Dataset:
    """Maps {question, context, answers} to "question: Q context: C" -> answer.

    The target is the first answer; all answers are kept in `answers` for the
    metric (max over answers).

    Args:
      dataset: Raw examples; `answers_key` is a non-empty string vector.
      question_key: Feature with the question.
      context_key: Feature with the evidence text.
      answers_key: Feature with the acceptable answers.

    Returns:
      Dataset of {'inputs', 'targets', 'answers'}.
    """
    require_features(
        dataset, [question_key, context_key, answers_key], "question_answering"
    )

    def fn(x):
        answers = x[answers_key]
        check = tf.debugging.assert_positive(
            tf.size(answers), message=f"an example has an empty '{answers_key}'"
        )
        with tf.control_dependencies([check]):
            target = tf.identity(answers[0])
        return {
            "inputs": tf.strings.join(
                ["question: ", x[question_key], " context: ", x[context_key]]
            ),
            "targets": target,
            "answers": answers,
        }

    return dataset.map(fn, num_parallel_calls=_AUTOTUNE)
