"""Tests of the T5 vocabulary and how gin chooses its file."""

from __future__ import annotations

import gin
import pytest
import seqio

from gqa_t5x.data import vocabularies


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def vocab_file(shared_dir):
    path = shared_dir / "fixtures" / "t5_vocab" / "cc_all.32000.sentencepiece.model"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return str(path)


def test_default_path_is_the_public_t5_vocabulary():
    assert vocabularies.vocabulary_path() == (
        "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
    )


def test_vocab_path_macro_overrides_the_default():
    gin.parse_config('VOCAB_PATH = "/some/where/spiece.model"')
    assert vocabularies.vocabulary_path() == "/some/where/spiece.model"


def test_explicit_binding_takes_precedence_over_the_macro():
    gin.parse_config(
        'VOCAB_PATH = "/macro.model"\n'
        'gqa_t5x.data.vocabularies.vocabulary_path.path = "/binding.model"'
    )
    assert vocabularies.vocabulary_path() == "/binding.model"


def test_real_vocab_encodes_reference_sentence_and_has_100_sentinels(vocab_file):
    vocab = vocabularies.get_vocabulary(vocab_file)
    assert vocab.encode("Hello World!, how are you?") == [
        8774,
        1150,
        55,
        6,
        149,
        33,
        25,
        58,
    ]
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.vocab_size == 32100
    assert vocab.extra_ids == 100
    assert vocabularies.sentinel_id(vocab, 0) == 32099
    assert vocabularies.sentinel_id(vocab, 99) == 32000
    assert vocab.tokenizer.id_to_piece(32099) == "▁<extra_id_0>"
    assert vocab.tokenizer.id_to_piece(32000) == "▁<extra_id_99>"


def test_vocabulary_created_before_gin_is_parsed_follows_the_macro(vocab_file):
    vocab = vocabularies.get_vocabulary()  # as at task registration time
    gin.parse_config(f'VOCAB_PATH = "{vocab_file}"')
    assert vocab.sentencepiece_model_file == vocab_file
    assert vocab.vocab_size == 32100
    assert vocab == seqio.SentencePieceVocabulary(vocab_file, extra_ids=100)


def test_missing_vocab_file_error_names_the_file_and_the_macro(tmp_path):
    missing = str(tmp_path / "nope.model")
    gin.parse_config(f'VOCAB_PATH = "{missing}"')
    with pytest.raises(FileNotFoundError, match="VOCAB_PATH") as info:
        vocabularies.get_vocabulary().encode("hello")
    assert missing in str(info.value)


def test_sentinel_index_out_of_range_is_rejected(vocab_file):
    vocab = vocabularies.get_vocabulary(vocab_file)
    with pytest.raises(ValueError, match="100 extra ids"):
        vocabularies.sentinel_id(vocab, 100)
