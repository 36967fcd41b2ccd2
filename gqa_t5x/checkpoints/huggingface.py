"""HuggingFace T5: reading checkpoints, exporting ours, and the mapping between them.

This module owns everything HuggingFace-specific except tensor file IO
(`hf_files`): parameter names (`hf_name` / `hf_to_t5x`), the one table of
activations (`ACTIVATIONS`), config.json in both directions
(`config_overrides` / `hf_config_dict`), the reader and the export.

Layout. `nn.Linear` weights are `[out, in]`, the transpose of T5X kernels, and
the relative position bias is `[buckets, heads]`; the reader returns T5X
layout and the export writes HuggingFace's.

Output projection. HuggingFace's T5 scales the decoder output by
d_model**-0.5 before `lm_head` when `scale_decoder_outputs` is true
(transformers >= 5) or, in older configs, when `tie_word_embeddings` is true
(T5.0). That is T5X's `logits_via_embedding=True` (which also divides by
sqrt(emb)) when `lm_head` is absent or equal to `shared`. Without scaling
the logits are `y @ lm_head.T`: T5X's `decoder/logits_dense/kernel` =
`lm_head.T`, or `shared.T` when transformers tied `lm_head` to `shared` and
saved only the latter (transformers 5 always ties at construction).

Export. HuggingFace's T5 has no grouped-query attention, so every key/value
head of a GQA layer is repeated for the query heads of its group (query head h
reads kv head h // (H/G), contiguous groups): the exported model computes
exactly what the GQA model computes and is as large as the multi-head model.
The directory is written through `storage.AtomicDirectory` with config.json
as the completion marker (written last), one tensor at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gqa_t5x.checkpoints import registry
from gqa_t5x.checkpoints import vocabulary
from gqa_t5x.checkpoints.base import (
    SUBLAYERS,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReader,
    CorruptCheckpointError,
)
from gqa_t5x.checkpoints.hf_files import (
    WEIGHT_FILES,
    WRITE_DTYPES,
    SafetensorsWriter,
    is_weights_file,
    open_weights,
)
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config
from gqa_t5x.storage import atomic, paths
from gqa_t5x.storage.paths import Path, PathLike

FORMAT = "huggingface"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
EXPORT_WEIGHTS_FILE = "model.safetensors"

# ------------------------------------------------------------- activations
# (our activation, HuggingFace ACT2FN name) pairs that compute the same
# function. Export uses the first pair of an activation of ours; reading, the
# first pair of a HuggingFace name. T5X's 'gelu' is the tanh approximation,
# which HuggingFace calls 'gelu_new' ('gelu_pytorch_tanh' too); HuggingFace's
# plain 'gelu' is the exact erf form, which T5X does not have.
ACTIVATIONS: tuple[tuple[str, str], ...] = (
    ("gelu", "gelu_new"),
    ("gelu", "gelu_pytorch_tanh"),
    ("gelu_new", "gelu_new"),
    ("relu", "relu"),
    ("linear", "linear"),
    ("silu", "silu"),
    ("swish", "swish"),
    ("tanh", "tanh"),
)


def _first(pairs: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


_TO_HF = _first(list(ACTIVATIONS))
_FROM_HF = _first([(hf, ours) for ours, hf in ACTIVATIONS])


def feed_forward_proj(activations: tuple[str, ...]) -> str:
    """HuggingFace's `feed_forward_proj` for our `mlp_activations`.

    Raises:
      ValueError: no HuggingFace T5 MLP computes these activations.
    """
    activations = tuple(activations)
    if activations == ("gelu", "linear"):
        return "gated-gelu"  # T5 v1.1's name; HuggingFace reads it as gelu_new
    if len(activations) == 1 and activations[0] in _TO_HF:
        return _TO_HF[activations[0]]
    if len(activations) == 2 and activations[1] == "linear" and activations[0] in _TO_HF:
        return f"gated-{_TO_HF[activations[0]]}"
    raise ValueError(
        f"mlp_activations={activations} has no HuggingFace T5 equivalent; HuggingFace "
        f"T5 has one activation (a,) or a gated pair (a, 'linear'), a in {sorted(_TO_HF)}."
    )


def mlp_activations(proj: str, *, source: str) -> tuple[str, ...]:
    """Our `mlp_activations` for HuggingFace's `feed_forward_proj`.

    Raises:
      CheckpointError: the activation has no T5X equivalent.
    """
    if proj == "gated-gelu":  # HuggingFace maps it to gelu_new
        return ("gelu", "linear")
    gated = proj.startswith("gated-")
    act = proj[len("gated-"):] if gated else proj
    if act not in _FROM_HF:
        raise CheckpointError(
            f"{source}: feed_forward_proj={proj!r} is not supported; supported: "
            f"'gated-gelu' and [gated-]<act> with <act> in {sorted(_FROM_HF)} "
            f"(HuggingFace's exact-erf 'gelu' has no T5X equivalent)."
        )
    return (_FROM_HF[act], "linear") if gated else (_FROM_HF[act],)


# ------------------------------------------------------------------- names
_FIXED = {
    "token_embedder/embedding": ("shared.weight", False),
    "decoder/logits_dense/kernel": ("lm_head.weight", True),
    "encoder/encoder_norm/scale": ("encoder.final_layer_norm.weight", False),
    "decoder/decoder_norm/scale": ("decoder.final_layer_norm.weight", False),
    "encoder/relpos_bias/rel_embedding": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True),
    "decoder/relpos_bias/rel_embedding": ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True),
}
_FIXED_INV = {name: (path, t) for path, (name, t) in _FIXED.items()}
_PROJECTIONS = {"query": "q", "key": "k", "value": "v", "out": "o"}
_PROJECTIONS_INV = {v: k for k, v in _PROJECTIONS.items()}
# Names HuggingFace saves that have no parameter of their own.
_TIED_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_IGNORED = {
    *_TIED_EMBEDDINGS,
    # HuggingFace ignores this one too (`_keys_to_ignore_on_load_unexpected`).
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
}


def _attention_module(side: str, index: int) -> str:
    return "EncDecAttention" if (side, index) == ("decoder", 1) else "SelfAttention"


def hf_name(path: str) -> tuple[str, bool]:
    """Maps a T5X parameter path to (HuggingFace state-dict name, needs_transpose).

    Raises:
      KeyError: `path` is not a T5.1.1 parameter.
    """
    if path in _FIXED:
        return _FIXED[path]
    m = re.fullmatch(r"(encoder|decoder)/layers_(\d+)/(.+)", path)
    if m:
        side, block, rest = m.groups()
        for index, (module, norm) in enumerate(SUBLAYERS[side]):
            layer = f"{side}.block.{block}.layer.{index}"
            if rest == f"{norm}/scale":
                return f"{layer}.layer_norm.weight", False
            if module == "mlp":
                m2 = re.fullmatch(r"mlp/(wi|wi_\d+|wo)/kernel", rest)
                if m2:
                    return f"{layer}.DenseReluDense.{m2.group(1)}.weight", True
            else:
                m2 = re.fullmatch(rf"{module}/(query|key|value|out)/kernel", rest)
                if m2:
                    return f"{layer}.{_attention_module(side, index)}.{_PROJECTIONS[m2.group(1)]}.weight", True
    raise KeyError(f"No HuggingFace name for T5X parameter {path!r}.")


def hf_to_t5x(name: str) -> tuple[str, bool] | None:
    """Maps a HuggingFace T5 state-dict name to (T5X path, needs_transpose).

    The inverse of `hf_name`; None for names without a T5X parameter of their
    own (the tied aliases `encoder.embed_tokens.weight`, ...) or unknown.
    """
    if name in _FIXED_INV:
        return _FIXED_INV[name]
    m = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)\.weight", name)
    if m is None:
        return None
    side, block, index, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    if index >= len(SUBLAYERS[side]):
        return None
    module, norm = SUBLAYERS[side][index]
    prefix = f"{side}/layers_{block}"
    if rest == "layer_norm":
        return f"{prefix}/{norm}/scale", False
    if module == "mlp":
        m2 = re.fullmatch(r"DenseReluDense\.(wi|wi_\d+|wo)", rest)
        return (f"{prefix}/mlp/{m2.group(1)}/kernel", True) if m2 else None
    m2 = re.fullmatch(rf"{_attention_module(side, index)}\.([qkvo])", rest)
    return (f"{prefix}/{module}/{_PROJECTIONS_INV[m2.group(1)]}/kernel", True) if m2 else None


# ------------------------------------------------------------------ config
def config_overrides(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """T5Config fields stated by a HuggingFace T5 config.json.

    Args:
      hf: the parsed config.json.
      source: path named in errors.

    Returns:
      Fields that tensor shapes must agree with (sizes) or cannot tell
      (activations, relative attention settings, dropout).
    """
    model_type = hf.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not a T5 encoder-decoder "
            f"('t5' or 'mt5'); umt5/longt5 have other parameters."
        )
    out = {
        "vocab_size": hf.get("vocab_size"),
        "emb_dim": hf.get("d_model"),
        "num_heads": hf.get("num_heads"),
        "head_dim": hf.get("d_kv"),
        "mlp_dim": hf.get("d_ff"),
        "num_encoder_layers": hf.get("num_layers"),
        "num_decoder_layers": hf.get("num_decoder_layers") or hf.get("num_layers"),
        "mlp_activations": mlp_activations(hf.get("feed_forward_proj", "relu"), source=source),
        "relative_attention_num_buckets": hf.get("relative_attention_num_buckets"),
        "relative_attention_max_distance": hf.get("relative_attention_max_distance"),
        "dropout_rate": hf.get("dropout_rate"),
    }
    return {k: v for k, v in out.items() if v is not None}


def hf_config_dict(config: T5Config, dtype: str = "float32") -> dict[str, Any]:
    """The HuggingFace `config.json` of `config` (T5 v1.1 conventions).

    Args:
      config: Our model config.
      dtype: 'float32' or 'bfloat16', recorded as the model's dtype.

    Returns:
      A JSON-serialisable dict for `transformers.T5Config`.

    Raises:
      ValueError: the MLP activations have no HuggingFace T5 equivalent, an
        unknown dtype, or key/value heads that differ per layer or kind.
    """
    if not config.uniform_kv_heads:
        raise ValueError(
            "the HuggingFace T5 config holds one kv-head count; this model has "
            f"{config.describe_kv_heads()} (counts per layer or attention kind), which the export cannot "
            "record: export a model with uniform num_kv_heads / encoder_num_kv_heads."
        )
    if dtype not in WRITE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(WRITE_DTYPES)}.")
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": float(config.dropout_rate),
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "feed_forward_proj": feed_forward_proj(config.mlp_activations),
        # T5.1.1 does not tie the output projection to the embedding; HF reads
        # False as "untied lm_head, no d_model**-0.5 rescaling of the decoder
        # output", True as T5X's logits_via_embedding (which rescales too).
        "tie_word_embeddings": bool(config.logits_via_embedding),
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "torch_dtype": dtype,
        "gqa_t5x": {
            "num_kv_heads": config.num_kv_heads,
            "encoder_num_kv_heads": config.encoder_num_kv_heads,
            "note": "key/value heads repeated per group for HuggingFace T5",
        },
    }


# --------------------------------------------------------------- detection
def is_hf_dir(path: PathLike | Path) -> bool:
    """True for a directory with config.json and HuggingFace weight files."""
    path = paths.as_path(path)
    return (path / CONFIG_FILE).is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def detect(path: Path) -> Path | None:
    """The model directory when `path` is one (or its config.json / weights)."""
    if (path.name == CONFIG_FILE or is_weights_file(path.name)) and path.is_file():
        return path.parent if is_hf_dir(path.parent) else None
    return path if is_hf_dir(path) else None


# ------------------------------------------------------------------ reader
class HuggingFaceReader(CheckpointReader):
    """Reads a HuggingFace T5 checkpoint directory lazily in T5X names/layout."""

    format = FORMAT

    def __init__(
        self,
        path: PathLike | Path,
        *,
        config: T5Config | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
    ):
        path = paths.as_path(path)
        if path.name == CONFIG_FILE or is_weights_file(path.name):
            path = path.parent
        if not is_hf_dir(path):
            raise CheckpointNotFoundError(f"No HuggingFace T5 checkpoint (config.json + weights) at {path}.")
        super().__init__(path)
        self._files: list[Any] = []
        try:
            self._index(path, config=config, num_heads=num_heads, head_dim=head_dim)
        except BaseException:
            self.close()
            raise

    def _index(self, path: Path, *, config: T5Config | None, num_heads: int | None, head_dim: int | None) -> None:
        try:
            hf = json.loads((path / CONFIG_FILE).read_text())
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{path / CONFIG_FILE}: unreadable: {e}") from e
        self.hf_config = hf
        self._by_name, self._files = open_weights(path)
        overrides = config_overrides(hf, str(path))
        self._entries: dict[str, tuple[str, bool]] = {}
        unknown = []
        for name in self._by_name:
            mapped = hf_to_t5x(name)
            if mapped is not None:
                self._entries[mapped[0]] = (name, mapped[1])
            elif name not in _IGNORED:
                unknown.append(name)
        if unknown:
            raise CheckpointError(
                f"{path}: tensors {sorted(unknown)[:5]} have no T5X equivalent "
                f"(not a T5 / T5.1.1 model?)."
            )
        emb_name = next((n for n in ("shared.weight", *_TIED_EMBEDDINGS) if n in self._by_name), None)
        if emb_name is None:
            raise CheckpointError(f"{path}: missing the embedding 'shared.weight'.")
        self._entries["token_embedder/embedding"] = (emb_name, False)
        scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
        head = self._entries.get("decoder/logits_dense/kernel")
        if scaled:
            if head is not None:
                if not np.array_equal(self._raw(head[0]), self._raw(emb_name)):
                    raise CheckpointError(
                        f"{path}: lm_head.weight differs from shared.weight but the "
                        f"config scales decoder outputs (tied T5.0 semantics); this "
                        f"combination has no T5X equivalent."
                    )
                del self._entries["decoder/logits_dense/kernel"]
            overrides["logits_via_embedding"] = True
        else:
            if head is None:
                # Tied by transformers and saved once: logits = y @ shared.T, unscaled.
                self._entries["decoder/logits_dense/kernel"] = (emb_name, True)
            overrides["logits_via_embedding"] = False
        shapes = {}
        for key, (name, transpose) in self._entries.items():
            shape = tuple(self._by_name[name].shape(name))
            shapes[key] = shape[::-1] if transpose else shape
        if config is not None:
            overrides = {}
        self._setup(shapes, config=config, num_heads=num_heads, head_dim=head_dim, overrides=overrides)

    def _raw(self, name: str) -> np.ndarray:
        file = self._by_name[name]
        try:
            return file.read(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CorruptCheckpointError(f"{file.path}: cannot read tensor {name!r}: {e}") from e

    def _load(self, key: str) -> np.ndarray:
        name, transpose = self._entries[key]
        array = self._raw(name)
        return array.T if transpose else array

    def _close(self) -> None:
        for f in self._files:
            f.close()
        self._files, self._by_name = [], {}


# ------------------------------------------------------------------ export
def repeat_kv_heads(kernel: np.ndarray, num_heads: int, head_dim: int) -> np.ndarray:
    """[emb, G*head_dim] -> [emb, H*head_dim], each kv head repeated H/G times."""
    emb, width = kernel.shape
    kv_heads = width // head_dim
    if kv_heads * head_dim != width or num_heads % kv_heads:
        raise ValueError(
            f"A key/value kernel of width {width} does not hold a divisor of "
            f"num_heads={num_heads} heads of size {head_dim}."
        )
    heads = kernel.reshape(emb, kv_heads, 1, head_dim)  # [emb, G, 1, d]
    heads = np.broadcast_to(heads, (emb, kv_heads, num_heads // kv_heads, head_dim))
    return np.ascontiguousarray(heads.reshape(emb, num_heads * head_dim))


def _export(
    directory: PathLike | Path,
    config: T5Config,
    get: Callable[[str], np.ndarray],
    *,
    overwrite: bool,
    dtype: str,
    progress: bool,
    tokenizer: dict[str, Any] | None = None,
    source: str = "",
) -> Path:
    from tqdm.auto import tqdm

    hf_config = hf_config_dict(config, dtype)  # validates before any writing
    model = None
    if tokenizer is not None:  # Read and hash-checked before any writing.
        model = vocabulary.read_model(tokenizer, source=source or tokenizer["path"])
    mha_shapes = param_tree.param_shapes(
        config.replace(num_kv_heads=config.num_heads, encoder_num_kv_heads=config.num_heads)
    )
    tensors = []  # (our path, HF name, transpose, HF shape, repeat kv heads)
    for path, shape in param_tree.param_shapes(config).items():
        name, transpose = hf_name(path)
        full = tuple(mha_shapes[path])
        tensors.append((path, name, transpose, full[::-1] if transpose else full, full != tuple(shape)))
    with atomic.AtomicDirectory(
        paths.as_path(directory, name="--output"),
        marker=CONFIG_FILE,
        describe=registry.describe_existing,
        overwrite=overwrite,
    ) as target:
        with SafetensorsWriter(
            target.path / EXPORT_WEIGHTS_FILE, [(t[1], t[3]) for t in tensors], dtype, {"format": "pt"}
        ) as writer:
            for path, name, transpose, _, repeat in tqdm(
                tensors, desc="export huggingface", unit="param", disable=not progress
            ):
                array = np.asarray(get(path), np.float32)
                if repeat:
                    array = repeat_kv_heads(array, config.num_heads, config.head_dim)
                writer.write(name, array.T if transpose else array)
                del array
        if model is not None:
            vocabulary.write_hf_tokenizer(target.path, model, extra_ids=int(tokenizer["extra_ids"]),
                                          vocab_size=config.vocab_size)
        generation = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
        paths.write_file(target.path / GENERATION_CONFIG_FILE, json.dumps(generation, indent=2) + "\n")
        return target.publish(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")


def export_huggingface(
    directory: PathLike | Path,
    config: T5Config,
    params: Mapping[str, Any],
    *,
    overwrite: bool = False,
    dtype: str = "float32",
    progress: bool = False,
    vocab: str | None = None,
) -> Path:
    """Writes `params` as a HuggingFace `T5ForConditionalGeneration` directory.

    Args:
      directory: Output directory, local or gs:// (absent, empty, or a
        checkpoint replaced with `overwrite`).
      config: Config of `params` (GQA key/value heads are repeated per group).
      params: Nested parameter dict with `param_shapes(config)`.
      overwrite: Replace a checkpoint already at `directory`.
      dtype: 'float32' (default) or 'bfloat16' tensors.
      progress: Show a progress bar.
      vocab: The SentencePiece model the weights were trained with; written
        with HuggingFace's T5 tokenizer files (`vocabulary.write_hf_tokenizer`)
        so `AutoTokenizer` loads it. None exports the weights alone.

    Returns:
      The output directory, holding `model.safetensors`, `config.json`,
      `generation_config.json` and, with `vocab`, the tokenizer files.

    Raises:
      ValueError: params missing or misshapen, activations or dtype HuggingFace
        cannot express (nothing is written).
      FileExistsError: see `storage.check_destination`.
    """
    flat = param_tree.flatten(params)
    for path, shape in param_tree.param_shapes(config).items():
        if path not in flat:
            raise ValueError(f"params lack {path!r} (shape {shape}) of the config.")
        if tuple(np.shape(flat[path])) != tuple(shape):
            raise ValueError(
                f"params[{path!r}] has shape {tuple(np.shape(flat[path]))}; the "
                f"config needs {tuple(shape)}."
            )
    tokenizer = vocabulary.record(vocab) if vocab else None
    return _export(directory, config, lambda p: flat[p], overwrite=overwrite, dtype=dtype, progress=progress,
                   tokenizer=tokenizer)


def export_huggingface_checkpoint(
    checkpoint: PathLike | Path,
    directory: PathLike | Path,
    *,
    overwrite: bool = False,
    dtype: str = "float32",
    progress: bool = True,
    format: str | None = None,
    allow_unusual_values: bool = False,
    vocab: str | None = None,
    weights_only: bool = False,
) -> Path:
    """Streams a checkpoint on disk (any readable format) to a HuggingFace directory.

    Args:
      checkpoint: Path of the checkpoint (e.g. the output of `gqa-t5x convert`).
      directory: Output directory.
      overwrite: Replace a checkpoint already at `directory`.
      dtype: 'float32' or 'bfloat16' tensors.
      progress: Show a progress bar over parameters.
      format: Format of `checkpoint` when its directory holds several.
      allow_unusual_values: Export even if values are non-finite or |x| > 1e4
        (refused otherwise, leaving nothing at `directory`).
      vocab: The SentencePiece model to export with the weights; None takes
        the one the checkpoint records (every checkpoint we write records
        it: `vocabulary`).
      weights_only: Export without a tokenizer when neither is known.

    Returns:
      The output directory.

    Raises:
      CheckpointError: no vocabulary is known and not `weights_only`, or the
        recorded file changed (nothing is written).
    """
    source = paths.as_path(checkpoint, name="--checkpoint")
    target = paths.as_path(directory, name="--output")
    if paths.is_same_or_inside(target, source):
        raise ValueError(f"--output {target} must not be (inside) the checkpoint {source}.")
    with registry.open_checkpoint(source, format=format, allow_unusual_values=allow_unusual_values) as reader:
        tokenizer = None if weights_only and not vocab else vocabulary.for_checkpoint(reader, vocab)
        if tokenizer is None and not weights_only:
            raise CheckpointError(
                f"{source} records no vocabulary, so the export would hold no tokenizer and HuggingFace would "
                "tokenise with a wrong one: pass the SentencePiece model the checkpoint was trained with, "
                "--vocab /path/to/spiece.model (T5.1.1: cc_all.32000 sentencepiece.model), or --weights_only."
            )
        return _export(target, reader.config, reader.read, overwrite=overwrite, dtype=dtype, progress=progress,
                       tokenizer=tokenizer, source=str(source))


registry.register_format(
    registry.CheckpointFormat(
        name=FORMAT,
        doc=f"{CONFIG_FILE} + {' / '.join(WEIGHT_FILES)} (that preference order)",
        detect=detect,
        reader=HuggingFaceReader,
        exporter=export_huggingface_checkpoint,
    )
)
