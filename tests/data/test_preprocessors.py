"""Tests of span corruption (synthetic and on real C4) and the task formats."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from gqa_t5x.data import preprocessors
from gqa_t5x.data import vocabularies
from span_corruption_utils import undo_span_corruption

LENGTHS = {"inputs": 512, "targets": 114}


class _ToyVocabulary(seqio.PassThroughVocabulary):
    """Ids 0..999 plus 100 sentinels (1000..1099); EOS = 1."""

    def __init__(self):
        super().__init__(size=1000, eos_id=1)
        self._extra_ids = 100


def _features(vocab):
    return {
        "inputs": seqio.Feature(vocab, add_eos=True, required=False),
        "targets": seqio.Feature(vocab, add_eos=True),
    }


def _token_dataset(docs):
    return tf.data.Dataset.from_generator(
        lambda: ({"targets": np.asarray(d, np.int32)} for d in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )


def _run_span_corruption(ds, vocab, seed=0, lengths=LENGTHS, **kwargs):
    features = _features(vocab)
    with seqio.utils.map_seed_manager(seed):
        ds = preprocessors.span_corruption(ds, lengths, features, **kwargs)
    ds = seqio.preprocessors.append_eos_after_trim(ds, features, lengths)
    return list(ds.as_numpy_iterator())


def _sentinels(ids, vocab):
    return [int(i) for i in ids if i >= vocab.vocab_size - vocab.extra_ids]


# --------------------------------- lengths -----------------------------------


def test_span_corruption_lengths_are_t5s_568_tokens_to_512_inputs_114_targets():
    assert preprocessors.span_corruption_lengths(512) == (568, 114)


@pytest.mark.parametrize("inputs_length", [64, 128, 512, 1024])
def test_span_corruption_lengths_pick_the_longest_segment_that_fits(inputs_length):
    tokens, targets = preprocessors.span_corruption_lengths(inputs_length)

    def corrupted_inputs(n):  # kept + one sentinel per span + EOS
        noise = round(n * 0.15)
        return n - noise + max(round(noise / 3.0), 1) + 1

    assert corrupted_inputs(tokens) == inputs_length
    assert corrupted_inputs(tokens + 1) > inputs_length
    noise = round(tokens * 0.15)
    assert targets == noise + round(noise / 3.0) + 1


# ------------------------------- noise mask ----------------------------------


@pytest.mark.parametrize("length", [2, 10, 100, 568])
def test_noise_mask_has_t5s_noise_count_and_span_count(length):
    seeds = tf.constant([[1, 2], [3, 4]], tf.int64)
    mask = preprocessors.noise_span_mask(tf.constant(length), 0.15, 3.0, seeds).numpy()
    noise = min(max(round(length * 0.15), 1), length - 1)
    spans = max(round(noise / 3.0), 1)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert mask.shape == (length,)
    assert mask.sum() == noise
    assert starts.sum() == spans
    assert not mask[0] and mask[-1]  # kept span first, noise span last


def test_noise_mask_is_a_function_of_the_seeds():
    def mask(a, b):
        seeds = tf.constant([[a, b], [b, a]], tf.int64)
        return preprocessors.noise_span_mask(tf.constant(568), 0.15, 3.0, seeds).numpy()

    np.testing.assert_array_equal(mask(1, 2), mask(1, 2))
    assert not np.array_equal(mask(1, 2), mask(5, 6))


def test_random_partition_draws_every_composition_about_equally_often():
    counts = collections.Counter()
    for i in range(600):
        parts = preprocessors._random_partition(
            tf.constant(5), tf.constant(3), tf.constant([i, 7], tf.int64)
        ).numpy()
        assert parts.sum() == 5 and (parts >= 1).all()
        counts[tuple(parts)] += 1
    # 5 = a + b + c with a, b, c >= 1 has 6 compositions: ~100 draws each.
    assert len(counts) == 6
    assert all(60 <= c <= 140 for c in counts.values()), counts


def test_replace_spans_with_sentinels_on_a_hand_worked_example():
    tokens = tf.constant([10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    mask = tf.constant([0, 0, 1, 1, 0, 0, 0, 1, 0, 1]) > 0
    inputs = preprocessors.replace_spans_with_sentinels(tokens, mask, 99)
    targets = preprocessors.replace_spans_with_sentinels(
        tokens, tf.logical_not(mask), 99
    )
    assert inputs.numpy().tolist() == [10, 11, 99, 14, 15, 16, 98, 18, 97]
    assert targets.numpy().tolist() == [99, 12, 13, 98, 17, 97, 19]


# ----------------------------- span corruption -------------------------------


def test_span_corruption_on_synthetic_documents_round_trips_and_is_seeded():
    vocab = _ToyVocabulary()
    rng = np.random.RandomState(0)
    docs = [rng.randint(3, 1000, size=n) for n in rng.randint(1, 900, size=300)]
    first = _run_span_corruption(_token_dataset(docs), vocab, seed=0)
    again = _run_span_corruption(_token_dataset(docs), vocab, seed=0)
    other = _run_span_corruption(_token_dataset(docs), vocab, seed=1)
    restored = [
        undo_span_corruption(e["inputs"], e["targets"], vocab)[0]
        for e in first
    ]
    np.testing.assert_array_equal(np.concatenate(restored), np.concatenate(docs))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert any(
        not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other)
    )


def test_span_corruption_without_merging_keeps_documents_apart():
    vocab = _ToyVocabulary()
    docs = [np.arange(3, 103), np.arange(200, 230)]
    out = _run_span_corruption(
        _token_dataset(docs), vocab, merge_examples_to_reduce_padding=False
    )
    restored = [
        undo_span_corruption(e["inputs"], e["targets"], vocab)[0]
        for e in out
    ]
    assert [r.tolist() for r in restored] == [d.tolist() for d in docs]


def test_span_corruption_keeps_one_aligned_window_of_long_documents():
    vocab = _ToyVocabulary()
    doc = np.arange(3, 253)  # 250 tokens -> windows [0:100), [100:200), [200:250)
    out = _run_span_corruption(
        _token_dataset([doc] * 12),
        vocab,
        max_document_tokens=100,
        merge_examples_to_reduce_padding=False,
    )
    assert len(out) == 12  # one window per document, each one segment
    windows = collections.Counter()
    for ex in out:
        kept = undo_span_corruption(ex["inputs"], ex["targets"], vocab)[0]
        np.testing.assert_array_equal(kept, np.arange(kept[0], kept[0] + len(kept)))
        windows[(int(kept[0]), len(kept))] += 1
    assert set(windows) <= {(3, 100), (103, 100), (203, 50)}
    assert len(windows) >= 2


def test_span_corruption_rejects_a_targets_length_below_114_for_512_inputs():
    with pytest.raises(ValueError, match=r"114.*TASK_FEATURE_LENGTHS"):
        _run_span_corruption(
            _token_dataset([np.arange(3, 50)]),
            _ToyVocabulary(),
            lengths={"inputs": 512, "targets": 100},
        )


def test_span_corruption_rejects_lengths_needing_more_sentinels_than_extra_ids():
    with pytest.raises(ValueError, match="100 extra ids"):
        _run_span_corruption(
            _token_dataset([np.arange(3, 50)]),
            _ToyVocabulary(),
            lengths={"inputs": 2048, "targets": 512},
        )


def test_span_corruption_requires_both_feature_lengths():
    with pytest.raises(ValueError, match="TASK_FEATURE_LENGTHS"):
        _run_span_corruption(
            _token_dataset([np.arange(3, 50)]),
            _ToyVocabulary(),
            lengths={"inputs": 512},
        )


def test_undo_span_corruption_rejects_out_of_order_sentinels():
    vocab = _ToyVocabulary()
    with pytest.raises(ValueError, match="sentinel"):
        undo_span_corruption([5, 1098, 6], [1099, 7], vocab)


def raw_text_start(raw: tf.data.Dataset) -> str:
    return next(iter(raw))["text"].numpy().decode()


@pytest.mark.slow
def test_span_corruption_on_real_c4_matches_t5_statistics(shared_dir):
    """1,000 real C4 documents, real T5 vocabulary, T5's settings."""
    c4_dir = shared_dir / "data" / "c4" / "en" / "3.0.1"
    vocab_file = (
        shared_dir / "fixtures" / "t5_vocab" / "cc_all.32000.sentencepiece.model"
    )
    vocab = vocabularies.get_vocabulary(str(vocab_file))
    raw = tfds.builder_from_directory(str(c4_dir)).as_dataset(
        split="train", shuffle_files=False
    )
    tokenized = raw.map(lambda x: {"targets": vocab.encode_tf(x["text"])})
    docs = [d["targets"] for d in tokenized.as_numpy_iterator()]
    assert len(docs) == 1000
    out = _run_span_corruption(tokenized, vocab, seed=0)

    noise = total = spans = 0
    restored = []
    for ex in out:
        inputs, targets = ex["inputs"], ex["targets"]
        assert len(inputs) <= 512 and len(targets) <= 114
        assert inputs[-1] == 1 and targets[-1] == 1  # EOS
        # Sentinels count down from the top of the vocabulary, in both.
        top = vocab.vocab_size - 1
        count = len(_sentinels(inputs, vocab))
        assert _sentinels(inputs, vocab) == list(range(top, top - count, -1))
        assert _sentinels(targets, vocab) == _sentinels(inputs, vocab)
        assert targets[0] == top
        tokens, mask = undo_span_corruption(inputs, targets, vocab)
        if len(tokens) == 568:  # every full segment is exactly 512 -> 114
            assert (len(inputs), len(targets)) == (512, 114)
        restored.append(tokens)
        noise += mask.sum()
        total += len(mask)
        spans += count
    # Only the last segment of each merged batch of 128 documents is short.
    assert sum(len(ex["inputs"]) < 512 for ex in out) <= -(-1000 // 128)
    assert len(out) > 800
    stream = np.concatenate(docs)  # T5 merges documents without separators
    np.testing.assert_array_equal(np.concatenate(restored), stream)
    assert noise / total == pytest.approx(0.15, abs=0.01)
    assert noise / spans == pytest.approx(3.0, abs=0.3)
    # As text: the first segment decodes to the start of the first document
    # (SentencePiece normalises whitespace).
    decoded = vocab.decode(restored[0].tolist())[:200]
    assert " ".join(raw_text_start(raw).split()).startswith(decoded)


# ------------------------------ task formats ---------------------------------


def _strings(examples):
    keys = list(examples[0])
    return tf.data.Dataset.from_tensor_slices(
        {k: [e[k] for e in examples] for k in keys}
    )


def _as_text(ds):
    return [
        {k: v.decode() if isinstance(v, bytes) else v for k, v in ex.items()}
        for ex in ds.as_numpy_iterator()
    ]


def test_summarize_prefixes_the_article_and_targets_the_summary():
    ds = _strings([{"article": "A long story.", "highlights": "Short."}])
    out = _as_text(preprocessors.summarize(ds, "article", "highlights"))
    assert out == [{"inputs": "summarize: A long story.", "targets": "Short."}]


def test_summarize_names_the_missing_field():
    ds = _strings([{"story": "x", "highlights": "y"}])
    with pytest.raises(ValueError, match=r"\['article'\].*'highlights', 'story'"):
        preprocessors.summarize(ds, "article", "highlights")


def test_translate_uses_t5s_english_to_german_prefix():
    ds = _strings([{"en": "Good morning .", "de": "Guten Morgen ."}])
    out = _as_text(preprocessors.translate(ds))
    assert out == [
        {
            "inputs": "translate English to German: Good morning .",
            "targets": "Guten Morgen .",
        }
    ]


def test_summarize_dialogue_writes_one_speaker_line_per_turn():
    ds = tf.data.Dataset.from_tensors(
        {
            "utt": ["Hello.", "Hi there."],
            "speaker": ["HOST", "GUEST"],
            "summary": "Greetings.",
        }
    )
    out = _as_text(preprocessors.summarize_dialogue(ds))
    assert out == [
        {"inputs": "summarize: HOST: Hello.\nGUEST: Hi there.", "targets": "Greetings."}
    ]


def test_summarize_dialogue_fails_on_unequal_speaker_and_utterance_lists():
    ds = tf.data.Dataset.from_tensors(
        {"utt": ["a", "b"], "speaker": ["X"], "summary": "s"}
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="differ in length"):
        list(preprocessors.summarize_dialogue(ds).as_numpy_iterator())


def test_question_answering_targets_first_answer_and_keeps_all_answers():
    ds = tf.data.Dataset.from_tensors(
        {"question": "Who?", "context": "Ann met Bob.", "answers": ["Ann", "ann"]}
    )
    (ex,) = list(preprocessors.question_answering(ds).as_numpy_iterator())
    assert ex["inputs"] == b"question: Who? context: Ann met Bob."
    assert ex["targets"] == b"Ann"
    assert ex["answers"].tolist() == [b"Ann", b"ann"]


def test_question_answering_fails_on_an_example_without_answers():
    ds = tf.data.Dataset.from_tensors(
        {"question": "Who?", "context": "c", "answers": tf.constant([], tf.string)}
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty 'answers'"):
        list(
            itertools.islice(
                preprocessors.question_answering(ds).as_numpy_iterator(), 1
            )
        )
