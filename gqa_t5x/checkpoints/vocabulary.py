"""The vocabulary a checkpoint was trained with: recorded, verified, exported.

Every checkpoint we write records its SentencePiece model under the metadata
key `vocabulary` (`record`): `{"path": ..., "sha256": ..., "extra_ids": 100}`.
Training checkpoints take it from the run's vocabulary (VOCAB_PATH),
conversions from the source checkpoint or `gqa-t5x convert --vocab`. So eval,
infer and export need no VOCAB_PATH for our checkpoints (`for_checkpoint`),
and a file that changed since the checkpoint was written is refused instead
of silently tokenising differently (`read_model`).

The HuggingFace export writes the model beside the weights as HuggingFace's
T5 tokenizer expects it (`write_hf_tokenizer`: `spiece.model`,
`tokenizer_config.json`, `special_tokens_map.json`), so
`AutoTokenizer.from_pretrained(export_dir)` gives T5's tokenizer with its 100
sentinels, the same ids as seqio's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from gqa_t5x.checkpoints.base import CheckpointError
from gqa_t5x.storage import paths

KEY = "vocabulary"
DEFAULT_EXTRA_IDS = 100
HF_MODEL_FILE = "spiece.model"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS = "special_tokens_map.json"


def _read(path: str) -> bytes:
    file = paths.as_path(path, name="the vocabulary file")
    if not file.is_file():
        raise FileNotFoundError(
            f"SentencePiece model file {path} does not exist; pass the file the model was trained with "
            "(T5.1.1: cc_all.32000 sentencepiece.model) with --vocab (or the gin macro VOCAB_PATH)."
        )
    return file.read_bytes()


def record(path: str, extra_ids: int = DEFAULT_EXTRA_IDS) -> dict[str, Any]:
    """The metadata entry of a vocabulary: its path, content hash and sentinels.

    Args:
      path: The SentencePiece model file, local or gs://.
      extra_ids: Sentinel ids appended after its pieces (T5: 100).

    Returns:
      `{"path": path, "sha256": hex digest, "extra_ids": extra_ids}`.

    Raises:
      FileNotFoundError: no file at `path`.
    """
    if not isinstance(extra_ids, int) or extra_ids < 0:
        raise ValueError(f"extra_ids={extra_ids!r} must be a non-negative integer.")
    path = str(paths.absolute(paths.as_path(path, name="the vocabulary file")))
    return {"path": path, "sha256": hashlib.sha256(_read(path)).hexdigest(), "extra_ids": extra_ids}


def recorded(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The vocabulary record in checkpoint metadata, or None when there is none."""
    entry = (metadata or {}).get(KEY)
    if entry is None:
        return None
    if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
        raise CheckpointError(f"The checkpoint metadata's {KEY!r} entry is not a vocabulary record: {entry!r}.")
    return dict(entry)


def read_model(entry: Mapping[str, Any], *, source: str) -> bytes:
    """The bytes of a recorded SentencePiece model, checked against its hash.

    Args:
      entry: A `record`.
      source: The checkpoint that recorded it, named in errors.

    Raises:
      FileNotFoundError: the file is gone.
      CheckpointError: the file's content differs from what was recorded.
    """
    data = _read(entry["path"])
    digest = hashlib.sha256(data).hexdigest()
    if entry.get("sha256") and digest != entry["sha256"]:
        raise CheckpointError(
            f"{source} was written with the vocabulary {entry['path']} of sha256 {entry['sha256'][:12]}..., "
            f"but that file now has sha256 {digest[:12]}...; pass the original file with --vocab (or "
            "VOCAB_PATH)."
        )
    return data


def for_checkpoint(reader: Any, given: str | None) -> dict[str, Any] | None:
    """The vocabulary to use with a checkpoint: `given`, else the recorded one.

    Args:
      reader: An open `CheckpointReader` (its `metadata`, if any).
      given: A path the user passed (--vocab / VOCAB_PATH), or None.

    Returns:
      A `record` (hash checked), or None when neither is known.
    """
    if given:
        return record(given)
    entry = recorded(getattr(reader, "metadata", None))
    if entry is not None:
        read_model(entry, source=reader.path)
    return entry


def write_hf_tokenizer(directory: paths.Path, model: bytes, *, extra_ids: int, vocab_size: int) -> list[str]:
    """Writes HuggingFace's T5 tokenizer files for a SentencePiece model.

    Args:
      directory: The export directory (its staging path).
      model: The SentencePiece model's bytes.
      extra_ids: Sentinels after its pieces (`<extra_id_0>` is the last id).
      vocab_size: The model's embedding rows; pieces + extra_ids must fit.

    Returns:
      The file names written.

    Raises:
      ValueError: the bytes are not a SentencePiece model, or its ids do not
        fit the embedding.
    """
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model)
    except Exception as error:  # noqa: BLE001 - sentencepiece raises RuntimeError or OSError
        raise ValueError(f"The vocabulary file is not a SentencePiece model: {error}") from None
    pieces = processor.GetPieceSize()
    if pieces + extra_ids > vocab_size:
        raise ValueError(
            f"The vocabulary has {pieces} pieces + {extra_ids} sentinels = {pieces + extra_ids} ids, more than "
            f"the model's vocab_size={vocab_size}: it is not the vocabulary this model was trained with."
        )
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "additional_special_tokens": sentinels}
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids, "model_max_length": 512,
              "legacy": True, **special}
    paths.write_file(directory / HF_MODEL_FILE, model)
    paths.write_file(directory / HF_TOKENIZER_CONFIG, json.dumps(config, indent=2) + "\n")
    paths.write_file(directory / HF_SPECIAL_TOKENS, json.dumps(special, indent=2) + "\n")
    return [HF_MODEL_FILE, HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS]
