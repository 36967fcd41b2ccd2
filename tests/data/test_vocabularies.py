"""Tests of the T5 vocabulary and how gin chooses its file."""

from __future__ import annotations

import gin
import pytest
import seqio

from gqa_t5x import gin_config
from gqa_t5x.data import vocabularies

from paths import REPO

BIND = "gqa_t5x.data.vocabularies.vocabulary_path.path = %VOCAB_PATH"


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


def test_the_explicit_argument_is_the_result_with_no_gin_parsed():
    assert vocabularies.vocabulary_path("/explicit/spiece.model") == "/explicit/spiece.model"
    vocab = vocabularies.get_vocabulary("/explicit/spiece.model")
    assert vocab.sentencepiece_model_file == "/explicit/spiece.model"


def test_a_vocab_path_macro_that_nothing_binds_changes_nothing():
    # The path is an argument bound by gin files, not a macro read behind their back.
    gin.parse_config('VOCAB_PATH = "/macro.model"')
    assert vocabularies.vocabulary_path() == vocabularies.DEFAULT_VOCAB_PATH
    assert vocabularies.vocabulary_path("/argument.model") == "/argument.model"


def test_the_gin_binding_sets_the_path():
    gin.parse_config('gqa_t5x.data.vocabularies.vocabulary_path.path = "/binding.model"')
    assert vocabularies.vocabulary_path() == "/binding.model"


@pytest.mark.parametrize("gin_files", [
    ("gin/models/t5_1_1/tiny.gin", "gin/runs/uptrain.gin"),
    ("gin/models/t5_1_1/tiny.gin", "gin/runs/finetune.gin"),
    ("gin/models/t5_1_1/tiny.gin", "gin/runs/eval.gin"),
    ("gin/runs/infer.gin",),
], ids=lambda files: files[-1])
def test_run_gins_bind_the_path_to_the_vocab_path_macro(gin_files, monkeypatch):
    monkeypatch.chdir(REPO)
    gin_config.parse_gin(list(gin_files), ["VOCAB_PATH='/flag/spiece.model'"], check_required=False)
    assert vocabularies.vocabulary_path() == "/flag/spiece.model"


def _gin_files():
    return sorted(p for folder in ("gin", "configs") for p in (REPO / folder).rglob("*.gin"))


@pytest.mark.parametrize("path", _gin_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_gin_files_that_set_or_use_the_vocabulary_bind_its_path(path):
    """A file that names VOCAB_PATH or builds vocabularies binds the path, except
    the model gins (their VOCAB_PATH is bound by the run gins they go with) and
    experiment gins (used on top of a run gin)."""
    text = path.read_text()
    relative = path.relative_to(REPO).as_posix()
    if relative.startswith(("gin/models/", "configs/")):
        return
    sets_it = any(line.startswith("VOCAB_PATH =") for line in text.splitlines())
    if sets_it or "get_vocabulary()" in text:
        assert "vocabulary_path.path = %VOCAB_PATH" in text, relative


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


def test_vocabulary_created_before_gin_is_parsed_follows_the_binding(vocab_file):
    vocab = vocabularies.get_vocabulary()  # as at task registration time
    gin.parse_config(f'VOCAB_PATH = "{vocab_file}"\n{BIND}')
    assert vocab.sentencepiece_model_file == vocab_file
    assert vocab.vocab_size == 32100
    assert vocab == seqio.SentencePieceVocabulary(vocab_file, extra_ids=100)


def test_missing_vocab_file_error_names_the_file_and_the_macro(tmp_path):
    missing = str(tmp_path / "nope.model")
    gin.parse_config(f'VOCAB_PATH = "{missing}"\n{BIND}')
    with pytest.raises(FileNotFoundError, match="VOCAB_PATH") as info:
        vocabularies.get_vocabulary().encode("hello")
    assert missing in str(info.value)


def test_sentinel_index_out_of_range_is_rejected(vocab_file):
    vocab = vocabularies.get_vocabulary(vocab_file)
    with pytest.raises(ValueError, match="100 extra ids"):
        vocabularies.sentinel_id(vocab, 100)
