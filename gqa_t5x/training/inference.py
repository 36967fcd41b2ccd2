"""Inference: `predict_batch` / `score_batch` (T5X `EncoderDecoderModel` style)
and the predictions-to-JSONL run behind `--run_mode=infer`.

Batches are dicts of int arrays with T5X feature names:
`encoder_input_tokens` `[batch, enc_len]` (0 = padding), and for scoring
`decoder_target_tokens` `[batch, dec_len]`, optionally `decoder_input_tokens`
(default: targets shifted right, starting from 0) and `decoder_loss_weights`
(default: `decoder_target_tokens > 0`).

`run_inference` reads a `.txt` (one input per line) or `.jsonl` file (field
`inputs`), tokenizes with a seqio vocabulary, decodes in fixed-size batches
(the last one is padded with filler rows, so one compilation serves the whole
file) and writes one JSON line per input, T5X-style:
`{"inputs": ..., "prediction": ..., "aux": {"scores": ..., "log_prob": ...}}`
plus any other fields of the input record. `infer` is the gin entry point
(`gin/runs/infer.gin`) that loads a checkpoint first.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import decoding
from gqa_t5x.model import network
from gqa_t5x.model.config import T5Config

Array = jax.Array
EOS_ID = 1


# ------------------------------------------------------------------ scoring
@functools.lru_cache(maxsize=16)
def _scorer(config: T5Config, with_log_probs: bool):
    model = network.Transformer(config)

    @jax.jit
    def score(params, encoder_input_tokens, decoder_input_tokens, targets, weights):
        # The network derives its padding masks from `decoder_target_tokens > 0`;
        # pass the weights instead so that a decoded pad id (0) inside a
        # sequence is scored like HuggingFace and the cached decoder do.
        mask_tokens = (weights > 0).astype(jnp.int32)
        logits = model.apply(
            {"params": params},
            encoder_input_tokens,
            decoder_input_tokens,
            mask_tokens,
            enable_dropout=False,
        )  # [batch, dec_len, vocab]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        scores = jnp.sum(token_lp * weights, axis=-1)  # [batch]
        return (scores, log_probs) if with_log_probs else scores

    return score


def shift_right(targets: Any) -> np.ndarray:
    """Decoder inputs for `targets` `[batch, len]`: start id 0, then targets[:-1]."""
    targets = np.asarray(targets)
    out = np.zeros_like(targets)
    out[..., 1:] = targets[..., :-1]
    return out


def _require(batch: Mapping[str, Any], key: str) -> np.ndarray:
    if key not in batch:
        raise ValueError(f"batch lacks {key!r}; it has {sorted(batch)}.")
    value = np.asarray(batch[key])
    if value.ndim != 2:
        raise ValueError(f"batch[{key!r}] must be [batch, length]; got shape {value.shape}.")
    return value


def score_batch(
    config: T5Config, params: Any, batch: Mapping[str, Any], *, return_token_log_probs: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Teacher-forced log-likelihood of `decoder_target_tokens` per example.

    Args:
      config: Model config.
      params: Model parameters.
      batch: `encoder_input_tokens`, `decoder_target_tokens`, optional
        `decoder_input_tokens` and `decoder_loss_weights`.
      return_token_log_probs: Also return the full log-softmax
        `[batch, dec_len, vocab]`.

    Returns:
      `[batch]` float32 sums of log p(target) over weighted positions (and the
      log-probabilities when asked).
    """
    encoder_input_tokens = _require(batch, "encoder_input_tokens").astype(np.int32)
    targets = _require(batch, "decoder_target_tokens").astype(np.int32)
    if "decoder_input_tokens" in batch:
        decoder_input_tokens = _require(batch, "decoder_input_tokens").astype(np.int32)
    else:
        decoder_input_tokens = shift_right(targets)
    weights = np.asarray(batch.get("decoder_loss_weights", targets > 0), np.float32)
    if weights.shape != targets.shape or decoder_input_tokens.shape != targets.shape:
        raise ValueError(
            "decoder_input_tokens / decoder_loss_weights must have the shape of "
            f"decoder_target_tokens {targets.shape}; got {decoder_input_tokens.shape} / "
            f"{weights.shape}."
        )
    out = _scorer(config, bool(return_token_log_probs))(
        params, encoder_input_tokens, decoder_input_tokens, targets, weights
    )
    if return_token_log_probs:
        return np.asarray(out[0]), np.asarray(out[1])
    return np.asarray(out)


def loss_weights_from_lengths(tokens: Any, lengths: Any) -> np.ndarray:
    """`decoder_loss_weights` covering the first `lengths` tokens of each row."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return (np.arange(tokens.shape[-1]) < lengths[..., None]).astype(np.float32)


# --------------------------------------------------------------- prediction
def _pad_rows(tokens: np.ndarray, rows: int | None) -> np.ndarray:
    if rows is None or rows == tokens.shape[0]:
        return tokens
    if rows < tokens.shape[0]:
        raise ValueError(f"pad_batch_to={rows} is smaller than the batch ({tokens.shape[0]}).")
    filler = np.zeros((rows - tokens.shape[0], tokens.shape[1]), tokens.dtype)
    return np.concatenate([tokens, filler], axis=0)


def predict_batch_with_aux(
    config: T5Config,
    params: Any,
    batch: Mapping[str, Any],
    *,
    method: str = "greedy",
    max_decode_length: int | None = None,
    rng: Any = None,
    eos_id: int | None = EOS_ID,
    temperature: float = 1.0,
    topk: int = 0,
    beam_size: int = 4,
    alpha: float = 0.6,
    return_all_decodes: bool = False,
    pad_batch_to: int | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decodes a batch; returns the decodes and per-example scores.

    Args:
      config: Model config.
      params: Model parameters.
      batch: `encoder_input_tokens` `[batch, enc_len]`; when
        `max_decode_length` is None the length of `decoder_input_tokens` or
        `decoder_target_tokens` is used (as T5X does).
      method: 'greedy' (the paper's), 'sample' or 'beam'.
      max_decode_length: Output length limit.
      rng: PRNG key or int seed for sampling.
      eos_id: End-of-sequence id.
      temperature: Sampling temperature.
      topk: Top-k cut-off for sampling (0 = none).
      beam_size: Beams for 'beam'.
      alpha: Brevity-penalty exponent for 'beam'.
      return_all_decodes: For 'beam', return every beam `[batch, beams, len]`
        (best first) instead of the best `[batch, len]`.
      pad_batch_to: Append all-padding filler rows up to this many (stripped
        from the outputs) so differently sized batches share one compilation.

    Returns:
      (decodes, aux) with aux keys `scores`, `log_probs`, `lengths`.
    """
    encoder_input_tokens = _require(batch, "encoder_input_tokens").astype(np.int32)
    if max_decode_length is None:
        for key in ("decoder_input_tokens", "decoder_target_tokens"):
            if key in batch:
                max_decode_length = int(np.shape(batch[key])[1])
                break
        else:
            raise ValueError(
                "max_decode_length is required when the batch has no "
                "decoder_input_tokens / decoder_target_tokens."
            )
    n = encoder_input_tokens.shape[0]
    result = decoding.decode(
        config,
        params,
        _pad_rows(encoder_input_tokens, pad_batch_to),
        max_decode_length=max_decode_length,
        method=method,
        eos_id=eos_id,
        rng=rng,
        temperature=temperature,
        topk=topk,
        beam_size=beam_size,
        alpha=alpha,
    )
    tokens, log_probs = np.asarray(result.tokens)[:n], np.asarray(result.log_probs)[:n]
    scores, lengths = np.asarray(result.scores)[:n], np.asarray(result.lengths)[:n]
    if method == "beam" and not return_all_decodes:
        tokens, log_probs, scores, lengths = tokens[:, 0], log_probs[:, 0], scores[:, 0], lengths[:, 0]
    return tokens, {"scores": scores, "log_probs": log_probs, "lengths": lengths}


def predict_batch(config: T5Config, params: Any, batch: Mapping[str, Any], **kwargs: Any) -> np.ndarray:
    """Decoded ids `[batch, len]` (see `predict_batch_with_aux` for arguments)."""
    return predict_batch_with_aux(config, params, batch, **kwargs)[0]


# ------------------------------------------------------------- files / runs
def read_inputs(path: str | os.PathLike, input_field: str = "inputs") -> list[dict[str, Any]]:
    """Reads `.jsonl` records (with `input_field`) or text lines (`.txt`, other).

    Args:
      path: Input file.
      input_field: JSONL field holding the input text.

    Returns:
      Records, each with the input text under 'inputs'.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Input file {str(path)!r} does not exist.")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if path.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e}).") from e
                if not isinstance(record, dict) or input_field not in record:
                    raise ValueError(f"{path}:{lineno}: record lacks the field {input_field!r}.")
                record = dict(record)
                record["inputs"] = str(record.pop(input_field))
            else:
                record = {"inputs": line}
            records.append(record)
    return records


def default_output_path(input_path: str | os.PathLike, output_dir: str | os.PathLike | None) -> Path:
    """`<output_dir or the input's directory>/<input stem>-predictions.jsonl`."""
    input_path = Path(input_path)
    directory = Path(output_dir) if output_dir else input_path.parent
    return directory / f"{input_path.stem}-predictions.jsonl"


def _tokenize(vocabulary: Any, text: str, length: int) -> tuple[np.ndarray, bool]:
    """Ids + EOS, truncated to `length` (EOS kept) and padded with 0."""
    ids = list(vocabulary.encode(text))
    truncated = len(ids) + 1 > length
    ids = ids[: length - 1] + [vocabulary.eos_id]
    out = np.zeros((length,), np.int32)
    out[: len(ids)] = ids
    return out, truncated


def _detokenize(vocabulary: Any, ids: np.ndarray, length: int, eos_id: int | None) -> str:
    ids = [int(t) for t in ids[:length]]
    if eos_id is not None and ids and ids[-1] == eos_id:
        ids = ids[:-1]
    return vocabulary.decode(ids)


def run_inference(
    config: T5Config,
    params: Any,
    inputs: str | os.PathLike | Sequence[str] | Iterable[Mapping[str, Any]],
    vocabulary: Any,
    *,
    output_path: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    input_length: int = 512,
    max_decode_length: int = 256,
    batch_size: int = 32,
    input_field: str = "inputs",
    method: str = "greedy",
    seed: int = 0,
    **decode_kwargs: Any,
) -> Path:
    """Decodes every input and writes predictions as JSONL.

    Args:
      config: Model config.
      params: Model parameters.
      inputs: A `.jsonl` / text file, a list of strings, or records with an
        'inputs' text field.
      vocabulary: A seqio vocabulary (`encode`, `decode`, `eos_id`).
      output_path: Output file. Default: `default_output_path` of the input
        file (next to it, or in `output_dir`).
      output_dir: Directory of the default output file (INFER_OUTPUT_DIR).
      input_length: Encoder length (TASK_FEATURE_LENGTHS['inputs']); longer
        inputs are truncated (their EOS kept) and counted in the log.
      max_decode_length: Output length (TASK_FEATURE_LENGTHS['targets']).
      batch_size: Examples per decoding batch (BATCH_SIZE).
      input_field: JSONL field with the input text.
      method: 'greedy', 'sample' or 'beam'.
      seed: Sampling seed (batch i uses fold_in(seed, i)).
      **decode_kwargs: Further `predict_batch_with_aux` arguments (beam_size,
        alpha, temperature, topk).

    Returns:
      The path written.
    """
    for name, value in (("input_length", input_length), ("max_decode_length", max_decode_length), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if isinstance(inputs, (str, os.PathLike)):
        records = read_inputs(inputs, input_field)
        if output_path is None:
            output_path = default_output_path(inputs, output_dir)
    else:
        records = [{"inputs": r} if isinstance(r, str) else dict(r) for r in inputs]
        if output_path is None:
            if output_dir is None:
                raise ValueError("output_path or output_dir is required when inputs are not a file.")
            output_path = Path(output_dir) / "predictions.jsonl"
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    eos_id = decode_kwargs.pop("eos_id", getattr(vocabulary, "eos_id", EOS_ID))
    tmp = output_path.with_name(output_path.name + ".tmp")
    truncated = 0
    with tmp.open("w", encoding="utf-8") as out:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            rows = []
            for record in chunk:
                ids, cut = _tokenize(vocabulary, record["inputs"], input_length)
                rows.append(ids)
                truncated += cut
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), start // batch_size)
            tokens, aux = predict_batch_with_aux(
                config,
                params,
                {"encoder_input_tokens": np.stack(rows)},
                method=method,
                max_decode_length=max_decode_length,
                rng=rng,
                eos_id=eos_id,
                pad_batch_to=batch_size,
                **decode_kwargs,
            )
            for i, record in enumerate(chunk):
                length = int(aux["lengths"][i])
                line = dict(record)
                line["prediction"] = _detokenize(vocabulary, tokens[i], length, eos_id)
                line["aux"] = {
                    "scores": float(aux["scores"][i]),
                    "log_prob": float(aux["log_probs"][i]),
                    "prediction_ids": [int(t) for t in tokens[i, :length]],
                }
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, output_path)
    if truncated:
        logging.warning("%d of %d inputs were longer than input_length=%d and were truncated.",
                        truncated, len(records), input_length)
    logging.info("Wrote %d predictions to %s.", len(records), output_path)
    return output_path


def load_params(checkpoint_path: str | os.PathLike) -> tuple[T5Config, Any]:
    """Reads a checkpoint in any supported format -> (config, params)."""
    from gqa_t5x import checkpoints

    return checkpoints.load(checkpoint_path)


def infer(
    *,
    checkpoint_path: str,
    input_file: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    vocabulary: Any,
    output_dir: str | None = None,
    output_path: str | None = None,
    input_field: str = "inputs",
    method: str = "greedy",
    beam_size: int = 4,
    alpha: float = 0.6,
    temperature: float = 1.0,
    topk: int = 0,
    seed: int = 0,
    dtype: str | None = None,
) -> str:
    """`--run_mode=infer`: checkpoint + input file -> predictions JSONL.

    Args:
      checkpoint_path: Any checkpoint `checkpoints.open_checkpoint` reads
        (CHECKPOINT_PATH); its config decides the model shape.
      input_file: `.jsonl` / text inputs (INPUT_FILE).
      task_feature_lengths: {'inputs': enc_len, 'targets': max output length}
        (TASK_FEATURE_LENGTHS).
      batch_size: Decoding batch size (BATCH_SIZE).
      vocabulary: seqio vocabulary.
      output_dir: INFER_OUTPUT_DIR; None writes next to the input file.
      output_path: Explicit output file (overrides output_dir).
      input_field: JSONL field holding the input text.
      method: 'greedy' (paper), 'sample' or 'beam'.
      beam_size: Beams for 'beam'.
      alpha: Brevity penalty for 'beam'.
      temperature: Sampling temperature.
      topk: Sampling top-k.
      seed: Sampling seed.
      dtype: Activation dtype override ('float32' / 'bfloat16').

    Returns:
      The predictions file path.
    """
    for key in ("inputs", "targets"):
        if key not in task_feature_lengths:
            raise ValueError(
                f"task_feature_lengths={dict(task_feature_lengths)} lacks {key!r}; "
                "set TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 256}."
            )
    config, params = load_params(checkpoint_path)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    config = config.replace(dropout_rate=0.0)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    path = run_inference(
        config,
        params,
        input_file,
        vocabulary,
        output_path=output_path,
        output_dir=output_dir,
        input_length=int(task_feature_lengths["inputs"]),
        max_decode_length=int(task_feature_lengths["targets"]),
        batch_size=batch_size,
        input_field=input_field,
        method=method,
        seed=seed,
        beam_size=beam_size,
        alpha=alpha,
        temperature=temperature,
        topk=topk,
    )
    return str(path)
