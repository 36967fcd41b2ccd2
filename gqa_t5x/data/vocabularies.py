"""The T5 SentencePiece vocabulary (32,000 pieces + 100 sentinel ids).

T5, T5.1.1 and the GQA paper all use the SentencePiece model that T5X calls
`gs://t5-data/vocabs/cc_all.32000/sentencepiece.model`, with 100 extra ids
appended as span-corruption sentinels: `<extra_id_0>` is id 32099, counting
down to `<extra_id_99>` = 32000. The vocabulary therefore has 32,100 ids and
the model pads its embedding to 32,128.

Where the model file lives is resolved when the vocabulary is first used, not
when tasks are registered, so gin files parsed after `import gqa_t5x.data.tasks`
still take effect. Precedence:

1. `gqa_t5x.data.vocabularies.vocabulary_path.path = "/path/spiece.model"`
   (an explicit gin binding);
2. the gin macro `VOCAB_PATH` (e.g. `--gin.VOCAB_PATH="/path/spiece.model"`);
3. `DEFAULT_VOCAB_PATH` (the public gs:// file).
"""

from __future__ import annotations

import gin
import seqio
import tensorflow as tf

DEFAULT_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
DEFAULT_EXTRA_IDS = 100
VOCAB_PATH_MACRO = "VOCAB_PATH"


def _macro_value(name: str) -> str | None:
    """Returns the value of gin macro `name`, or None when it is not defined."""
    try:
        return gin.query_parameter(f"{name}/gin.macro.value")
    except ValueError:
        return None


@gin.configurable(module="gqa_t5x.data.vocabularies")
def vocabulary_path(path: str | None = None) -> str:
    """Returns the SentencePiece model file to use.

    Args:
      path: Explicit path (local or gs://). When None, the gin macro
        `VOCAB_PATH` is used if defined, else `DEFAULT_VOCAB_PATH`.

    Returns:
      The path of the SentencePiece model file.
    """
    if path is None:
        path = _macro_value(VOCAB_PATH_MACRO)
    if path is None:
        path = DEFAULT_VOCAB_PATH
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"The vocabulary path must be a non-empty string, got {path!r}; "
            f"set the gin macro {VOCAB_PATH_MACRO} or "
            "`gqa_t5x.data.vocabularies.vocabulary_path.path`."
        )
    return path


class T5Vocabulary(seqio.SentencePieceVocabulary):
    """`seqio.SentencePieceVocabulary` whose model file is resolved lazily.

    With `sentencepiece_model_file=None` the file comes from
    `vocabulary_path()` whenever the model is needed, so tasks registered at
    import time follow the gin configuration parsed later. A missing file
    raises `FileNotFoundError` naming the path and the gin macro that sets it.
    """

    def __init__(
        self,
        sentencepiece_model_file: str | None = None,
        extra_ids: int = DEFAULT_EXTRA_IDS,
    ):
        """Creates the vocabulary.

        Args:
          sentencepiece_model_file: Fixed path, or None to resolve through gin.
          extra_ids: Number of sentinel ids appended after the 32,000 pieces.
        """
        if extra_ids < 0:
            raise ValueError(f"extra_ids must be >= 0, got {extra_ids}.")
        self._fixed_path = sentencepiece_model_file
        super().__init__(sentencepiece_model_file or "", extra_ids=extra_ids)

    @property
    def sentencepiece_model_file(self) -> str:
        return self._fixed_path or vocabulary_path()

    def _model_context(self):
        path = self.sentencepiece_model_file
        if path != self._sentencepiece_model_file or self._model is None:
            try:
                exists = tf.io.gfile.exists(path)
            except tf.errors.OpError as e:
                raise OSError(
                    f"Cannot read SentencePiece model file {path!r}: "
                    f"{e.message}. Without access to it, set the gin macro "
                    f"{VOCAB_PATH_MACRO} to a local copy."
                ) from e
            if not exists:
                raise FileNotFoundError(
                    f"SentencePiece model file {path!r} does not exist. Point "
                    "the vocabulary at the T5 model file with the gin macro "
                    f"{VOCAB_PATH_MACRO} (or `gqa_t5x.data.vocabularies."
                    "vocabulary_path.path`)."
                )
            self._sentencepiece_model_file = path
            self._model = None
        return super()._model_context()

    def __getstate__(self):
        state = super().__getstate__()
        state["_sentencepiece_model_file"] = self.sentencepiece_model_file
        return state

    def __eq__(self, other):
        if not isinstance(other, seqio.SentencePieceVocabulary):
            return False
        return (
            self.sentencepiece_model_file == other.sentencepiece_model_file
            and self.extra_ids == other.extra_ids
        )

    def __hash__(self):
        return hash((self.sentencepiece_model_file, self.extra_ids))


@gin.configurable(module="gqa_t5x.data.vocabularies")
def get_vocabulary(
    sentencepiece_model_file: str | None = None,
    extra_ids: int = DEFAULT_EXTRA_IDS,
) -> T5Vocabulary:
    """Returns the T5 vocabulary with `extra_ids` sentinels.

    Usable from gin as `VOCABULARY = @gqa_t5x.data.vocabularies.get_vocabulary()`.

    Args:
      sentencepiece_model_file: Fixed model path; None follows `VOCAB_PATH`.
      extra_ids: Number of sentinel ids (T5: 100).

    Returns:
      A `T5Vocabulary` (a `seqio.SentencePieceVocabulary`).
    """
    return T5Vocabulary(sentencepiece_model_file, extra_ids=extra_ids)


def sentinel_id(vocabulary: seqio.Vocabulary, index: int = 0) -> int:
    """Returns the id of sentinel `<extra_id_{index}>`.

    Sentinels count down from the top of the vocabulary: index 0 is
    `vocab_size - 1`.

    Args:
      vocabulary: A vocabulary with extra ids.
      index: Sentinel number, 0 <= index < vocabulary.extra_ids.

    Returns:
      The token id.
    """
    if not 0 <= index < vocabulary.extra_ids:
        raise ValueError(
            f"Sentinel index {index} is out of range: the vocabulary has "
            f"{vocabulary.extra_ids} extra ids."
        )
    return vocabulary.vocab_size - 1 - index
