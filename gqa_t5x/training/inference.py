"""The predictions-to-JSONL run behind `--run_mode=infer`.

`run_inference` reads a `.txt` (one input per line) or `.jsonl` file (field
`inputs`), tokenizes with a seqio vocabulary, decodes in fixed-size batches
with `models.predict_batch_with_aux` (the last one is padded with filler
rows, so one compilation serves the whole file) and writes one JSON line per
input, T5X-style:
`{"inputs": ..., "prediction": ..., "aux": {"scores": ..., "log_prob": ...}}`
plus any other fields of the input record. `infer` is the gin entry point
(`gin/runs/infer.gin`) that loads a checkpoint first.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.model import decoding
from gqa_t5x.model import layer_stack
from gqa_t5x.model import models
from gqa_t5x.model.config import T5Config
from gqa_t5x.storage import paths
from gqa_t5x.storage.paths import Path

EOS_ID = 1


# ------------------------------------------------------------- files / runs
def read_inputs(path: str | os.PathLike, input_field: str = "inputs") -> list[dict[str, Any]]:
    """Reads `.jsonl` records (with `input_field`) or text lines (`.txt`, other).

    Args:
      path: Input file (INPUT_FILE), local or gs://.
      input_field: JSONL field holding the input text.

    Returns:
      Records, each with the input text under 'inputs'.
    """
    path = paths.as_path(path, name="INPUT_FILE")
    if not path.is_file():
        raise FileNotFoundError(f"Input file {str(path)!r} does not exist.")
    records = []
    # The whole file, then its lines as a text file would give them (universal newlines).
    lines = io.StringIO(path.read_bytes().decode("utf-8"), newline=None)
    for lineno, line in enumerate(lines, 1):
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
    input_path = paths.as_path(input_path, name="INPUT_FILE")
    directory = paths.as_path(output_dir, name="INFER_OUTPUT_DIR") if output_dir else input_path.parent
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
      output_path: Output file, local or gs://, written whole or not at all.
        Default: `default_output_path` of the input file (next to it, or in
        `output_dir`).
      output_dir: Directory of the default output file (INFER_OUTPUT_DIR).
      input_length: Encoder length (TASK_FEATURE_LENGTHS['inputs']); longer
        inputs are truncated (their EOS kept) and counted in the log.
      max_decode_length: Output length (TASK_FEATURE_LENGTHS['targets']).
      batch_size: Examples per decoding batch (BATCH_SIZE).
      input_field: JSONL field with the input text.
      method: 'greedy', 'sample' or 'beam'.
      seed: Sampling seed (batch i uses fold_in(seed, i)).
      **decode_kwargs: Further `decoding.DecodingSpec` fields (beam_size,
        alpha, temperature, topk, eos_id).

    Returns:
      The path written. Process 0 prints one summary line: inputs decoded,
      the file, the time (compilation included) and truncated inputs.
    """
    started = time.time()
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
            output_path = paths.as_path(output_dir, name="INFER_OUTPUT_DIR") / "predictions.jsonl"
    output_path = paths.as_path(output_path, name="output_path")
    eos_id = decode_kwargs.pop("eos_id", getattr(vocabulary, "eos_id", EOS_ID))
    spec = decoding.DecodingSpec(
        method=method, max_decode_length=max_decode_length, eos_id=eos_id, **decode_kwargs
    )
    truncated = 0
    # Once for every batch: stacked (scanned config) and cast to the
    # config's param_dtype, and (CPU) the transposed decode kernels.
    params = decoding.prepare_params(params, config)
    kernels = decoding.step_kernels(params, config)
    with paths.replacing(output_path) as out:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            rows = []
            for record in chunk:
                ids, cut = _tokenize(vocabulary, record["inputs"], input_length)
                rows.append(ids)
                truncated += cut
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), start // batch_size)
            tokens, aux = models.predict_batch_with_aux(
                config,
                params,
                {"encoder_input_tokens": np.stack(rows)},
                spec,
                rng=rng,
                pad_batch_to=batch_size,
                kernels=kernels,
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
    if truncated:
        logging.warning("%d of %d inputs were longer than input_length=%d and were truncated.",
                        truncated, len(records), input_length)
    if jax.process_index() == 0:
        print(summary_line(len(records), output_path, time.time() - started, method=method,
                           batch_size=batch_size, max_decode_length=max_decode_length,
                           truncated=truncated, input_length=input_length), flush=True)
    return output_path


def summary_line(num_inputs: int, output_path: str | os.PathLike, seconds: float, *, method: str,
                 batch_size: int, max_decode_length: int, truncated: int, input_length: int) -> str:
    """The line `run_inference` ends with, e.g.

    "[infer] 2 inputs -> /tmp/in-predictions.jsonl in 3.2s (0.6 inputs/s; greedy
    decoding, batch 32, up to 256 output tokens; 0 truncated to input_length=512)".
    """
    rate = num_inputs / seconds if seconds > 0 else float("inf")
    noun = "input" if num_inputs == 1 else "inputs"
    return (f"[infer] {num_inputs} {noun} -> {output_path} in {seconds:.1f}s ({rate:.1f} inputs/s; "
            f"{method} decoding, batch {batch_size}, up to {max_decode_length} output tokens; "
            f"{truncated} truncated to input_length={input_length})")


def load_params(checkpoint_path: str | os.PathLike, allow_unusual_values: bool = False) -> tuple[T5Config, Any]:
    """Reads a checkpoint in any supported format -> (config, params), values checked."""
    from gqa_t5x import checkpoints

    return checkpoints.load(checkpoint_path, allow_unusual_values=allow_unusual_values)


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
    allow_unusual_values: bool = False,
    param_dtype: str | None = None,
    scan_layers: bool | None = None,
    attention_query_chunk: int | None = None,
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
      allow_unusual_values: ALLOW_UNUSUAL_VALUES: decode with a checkpoint
        holding non-finite values or |x| > 1e4 (refused otherwise).
      param_dtype: PARAM_DTYPE, the dtype the parameters are decoded with
        ('bfloat16', as T5X restores inference parameters, or 'float32');
        None keeps the checkpoint config's.
      scan_layers: SCAN_LAYERS, scan the layers (None: the checkpoint
        config's); the parameters are stacked once after loading.
      attention_query_chunk: ATTENTION_QUERY_CHUNK, queries per block of the
        encoder's attention (`T5Config.attention_query_chunk`; None: the
        checkpoint config's, one block unless it says otherwise).

    Returns:
      The predictions file path.
    """
    for key in ("inputs", "targets"):
        if key not in task_feature_lengths:
            raise ValueError(
                f"task_feature_lengths={dict(task_feature_lengths)} lacks {key!r}; "
                "set TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 256}."
            )
    from gqa_t5x import checkpoints
    from gqa_t5x.data import vocabularies  # seqio and TensorFlow: only when inferring from text

    with checkpoints.open_checkpoint(checkpoint_path, allow_unusual_values=True) as reader:  # metadata only
        # VOCAB_PATH = None (infer.gin): the vocabulary the checkpoint records.
        vocabularies.use_checkpoint_vocabulary(
            lambda: checkpoints.vocabulary.for_checkpoint(reader, None), str(checkpoint_path))
    config, params = load_params(checkpoint_path, allow_unusual_values)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
    if scan_layers is not None:
        config = config.replace(scan_layers=scan_layers)
    if attention_query_chunk is not None:
        config = config.replace(attention_query_chunk=attention_query_chunk)
    config = config.replace(dropout_rate=0.0)
    # On the host, before the device holds them: stacked for a scanned
    # config and cast to its param_dtype (bfloat16 never lands as float32).
    params = jax.tree_util.tree_map(jnp.asarray, layer_stack.model_params(params, config))
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
