"""The T5 SentencePiece vocabulary (32,000 pieces + 100 sentinel ids).

T5, T5.1.1 and the GQA paper all use the SentencePiece model that T5X calls
`gs://t5-data/vocabs/cc_all.32000/sentencepiece.model`, with 100 extra ids
appended as span-corruption sentinels: `<extra_id_0>` is id 32099, counting
down to `<extra_id_99>` = 32000. The vocabulary therefore has 32,100 ids and
the model pads its embedding to 32,128.

Where the model file lives is the `path` argument of the gin configurable
`vocabulary_path` (`DEFAULT_VOCAB_PATH`, the public gs:// file, when unbound).
The gin files that name a vocabulary bind it to their macro `VOCAB_PATH`:

    gqa_t5x.data.vocabularies.vocabulary_path.path = %VOCAB_PATH

(`gin/runs/train_common.gin`, `eval.gin`, `infer.gin`, and the task gins that
point at local data), so `--gin.VOCAB_PATH="/path/spiece.model"` chooses the
file. Nothing here reads gin macros itself: without that binding the macro
has no effect.

A vocabulary made with no fixed file (`get_vocabulary()`, as the tasks do when
they are registered at import time) calls `vocabulary_path()` when it is first
used, so gin files parsed after `import gqa_t5x.data.tasks` still take effect.
"""

from __future__ import annotations

from collections.abc import Callable

import gin
import seqio
import tensorflow as tf

DEFAULT_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
DEFAULT_EXTRA_IDS = 100
# The gin macro the gin files bind `vocabulary_path.path` to; named in errors.
VOCAB_PATH_MACRO = "VOCAB_PATH"
PATH_BINDING = "gqa_t5x.data.vocabularies.vocabulary_path.path"


@gin.configurable(module="gqa_t5x.data.vocabularies")
def vocabulary_path(path: str | None = None) -> str:
    """Returns the SentencePiece model file to use: `path`, or the default.

    Args:
      path: Local or gs:// path of the model file; None is
        `DEFAULT_VOCAB_PATH`. Gin files bind it to `%VOCAB_PATH`.

    Returns:
      The path of the SentencePiece model file.
    """
    if path is None:
        path = DEFAULT_VOCAB_PATH
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"The vocabulary path must be a non-empty string, got {path!r}; "
            f"set the gin macro {VOCAB_PATH_MACRO} (with a run gin, which binds "
            f"{PATH_BINDING} to it) or bind {PATH_BINDING}."
        )
    return path


class T5Vocabulary(seqio.SentencePieceVocabulary):
    """`seqio.SentencePieceVocabulary` whose model file is resolved lazily.

    With `sentencepiece_model_file=None` the file comes from
    `vocabulary_path()` (its gin binding) whenever the model is needed, so
    tasks registered at import time follow the gin configuration parsed
    later. A missing file raises `FileNotFoundError` naming the path and the
    gin setting that chooses it.
    """

    def __init__(
        self,
        sentencepiece_model_file: str | None = None,
        extra_ids: int = DEFAULT_EXTRA_IDS,
    ):
        """Creates the vocabulary.

        Args:
          sentencepiece_model_file: Fixed path, or None for `vocabulary_path()`.
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
                    f"{VOCAB_PATH_MACRO} (or {PATH_BINDING}) to a local copy."
                ) from e
            if not exists:
                raise FileNotFoundError(
                    f"SentencePiece model file {path!r} does not exist. Point "
                    "the vocabulary at the T5 model file with the gin macro "
                    f"{VOCAB_PATH_MACRO} (or {PATH_BINDING})."
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
      sentencepiece_model_file: Fixed model path; None follows
        `vocabulary_path()` (gin: `VOCAB_PATH`).
      extra_ids: Number of sentinel ids (T5: 100).

    Returns:
      A `T5Vocabulary` (a `seqio.SentencePieceVocabulary`).
    """
    return T5Vocabulary(sentencepiece_model_file, extra_ids=extra_ids)


def use_checkpoint_vocabulary(recorded: Callable[[], dict | None], checkpoint: str) -> str | None:
    """Chooses the vocabulary of eval / infer: VOCAB_PATH, else the checkpoint's record.

    `gin/runs/eval.gin` and `infer.gin` set `VOCAB_PATH = None`, which means
    "the checkpoint's": a checkpoint written by gqa_t5x records its vocabulary
    (`checkpoints.vocabulary`), which is then bound as `vocabulary_path.path`,
    so the tasks' and the model's vocabularies follow it. Nothing falls back
    to the network. Without any gin binding (library use) nothing changes.

    Args:
      recorded: Returns the checkpoint's vocabulary record (path, sha256,
        extra_ids; hash checked) or None; called only when VOCAB_PATH is None.
      checkpoint: CHECKPOINT_PATH, named in the error.

    Returns:
      The SentencePiece model path in use; None when gin binds none.

    Raises:
      ValueError: VOCAB_PATH is None and the checkpoint records none.
    """
    try:
        value = gin.query_parameter(PATH_BINDING)
    except ValueError:
        return None  # Unbound: `vocabulary_path()`'s default applies, as before.
    if hasattr(value, "scoped_configurable_fn"):  # %VOCAB_PATH: evaluate the macro
        value = value.scoped_configurable_fn()
    if value:
        return value
    entry = recorded()
    if not entry:
        raise ValueError(
            f"CHECKPOINT_PATH={checkpoint} records no vocabulary (checkpoints written by T5X, or converted "
            f"without --vocab, do not) and {VOCAB_PATH_MACRO} is None; set it, e.g. "
            f"--gin.{VOCAB_PATH_MACRO}=\"'/path/to/sentencepiece.model'\" (T5.1.1: {DEFAULT_VOCAB_PATH})."
        )
    with gin.unlock_config():
        gin.bind_parameter(PATH_BINDING, entry["path"])
    return entry["path"]


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
