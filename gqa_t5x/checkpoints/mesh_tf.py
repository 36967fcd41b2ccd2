"""Mesh TensorFlow (original T5) checkpoints: `model.ckpt-<step>.{index,data-*}`.

Variables are read one at a time with `tf.train.load_checkpoint` (TensorFlow's
bundle reader seeks to a single tensor; it reads gs:// itself). Names map to
T5X paths with `mesh_tf_to_t5x` (`shared/embedding` ->
`token_embedder/embedding`, `decoder/block_001/layer_002/DenseReluDense/wo/kernel`
-> `decoder/layers_1/mlp/wo/kernel`, ...); shapes are identical to T5X's, so
no transpose. `global_step` gives `step`; Adafactor slots (`*_slot_vr`,
`*_slot_vc`, `*_slot_v`, `*_slot_m`) are skipped.
"""

from __future__ import annotations

import os
import re

import numpy as np

from gqa_t5x.checkpoints import registry
from gqa_t5x.checkpoints.base import (
    SUBLAYERS,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReader,
    CorruptCheckpointError,
)
from gqa_t5x.model.config import T5Config
from gqa_t5x.storage import paths
from gqa_t5x.storage.paths import Path, PathLike

FORMAT = "mesh_tf"
STATE_FILE = "checkpoint"  # TensorFlow's text file naming the latest checkpoint
_IGNORED = re.compile(r"(.*_slot_(vr|vc|v|m)|global_step|.*/Adafactor.*|.*beta\d_power)$")

# ------------------------------------------------------------------ names
_FIXED = {
    "shared/embedding": "token_embedder/embedding",
    "decoder/logits/kernel": "decoder/logits_dense/kernel",
    "encoder/rms_norm/scale": "encoder/encoder_norm/scale",
    "decoder/rms_norm/scale": "decoder/decoder_norm/scale",
    "encoder/block_000/layer_000/SelfAttention/relative_attention_bias": "encoder/relpos_bias/rel_embedding",
    "decoder/block_000/layer_000/SelfAttention/relative_attention_bias": "decoder/relpos_bias/rel_embedding",
}
_PROJECTIONS = {"q": "query", "k": "key", "v": "value", "o": "out"}


def mesh_tf_to_t5x(name: str) -> str | None:
    """Maps a Mesh TensorFlow variable name to its T5X parameter path.

    Args:
      name: e.g. 'encoder/block_003/layer_000/SelfAttention/k'.

    Returns:
      The T5X path ('encoder/layers_3/attention/key/kernel'), or None for
      variables that are not model parameters (optimizer slots, step) or
      unknown.
    """
    if name in _FIXED:
        return _FIXED[name]
    m = re.fullmatch(r"(encoder|decoder)/block_(\d{3})/layer_(\d{3})/(.+)", name)
    if m is None:
        return None
    side, block, index, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if index >= len(SUBLAYERS[side]):
        return None
    module, norm = SUBLAYERS[side][index]
    prefix = f"{side}/layers_{block}"
    if rest == "rms_norm/scale":
        return f"{prefix}/{norm}/scale"
    if module == "mlp":
        m2 = re.fullmatch(r"DenseReluDense/(wi|wi_\d+|wo)/kernel", rest)
        return f"{prefix}/mlp/{m2.group(1)}/kernel" if m2 else None
    m2 = re.fullmatch(r"(\w+)/([qkvo])", rest)
    expected = "EncDecAttention" if index == 1 else "SelfAttention"
    if m2 is None or m2.group(1) != expected:
        return None
    return f"{prefix}/{module}/{_PROJECTIONS[m2.group(2)]}/kernel"


# -------------------------------------------------------------- detection
def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError as e:
        raise CheckpointError(
            "Reading Mesh TensorFlow checkpoints needs tensorflow (pip install tensorflow)."
        ) from e
    return tf


def find_prefix(path: PathLike | Path) -> Path | None:
    """The checkpoint prefix (`.../model.ckpt-1000000`) named by `path`.

    Accepts the prefix itself, its `.index` file, or a directory with a
    TensorFlow `checkpoint` state file (its latest checkpoint) or exactly one
    `.index` file.

    Raises:
      CheckpointError: a directory with several `.index` files and no state
        file naming the latest.
    """
    path = paths.as_path(path)
    if path.name.endswith(".index") and path.is_file():
        return path.parent / path.name[: -len(".index")]
    if path.name and (path.parent / f"{path.name}.index").is_file():
        return path
    if not path.is_dir():
        return None
    state = path / STATE_FILE
    if state.is_file():
        try:
            with state.open("rb") as f:
                head = f.read(4096)
        except OSError:
            head = b""
        m = re.search(rb'model_checkpoint_path:\s*"([^"]+)"', head)
        if m:
            named = m.group(1).decode()
            prefix = paths.as_path(named) if paths.is_remote(named) or os.path.isabs(named) else path / named
            if (prefix.parent / f"{prefix.name}.index").is_file():
                return prefix
            # A moved checkpoint keeps an absolute path; fall back to its basename here.
            local = path / prefix.name
            if (path / f"{prefix.name}.index").is_file():
                return local
    indexes = [n for n in paths.listdir(path) if n.endswith(".index")]
    if len(indexes) == 1:
        return path / indexes[0][: -len(".index")]
    if len(indexes) > 1:
        raise CheckpointError(
            f"{path} holds {len(indexes)} TensorFlow checkpoints "
            f"({', '.join(i[:-6] for i in indexes[:4])}) and no '{STATE_FILE}' state "
            f"file naming the latest; pass the prefix of one, e.g. "
            f"{path / indexes[-1][:-6]}."
        )
    return None


def detect(path: Path) -> Path | None:
    """The prefix of the TensorFlow checkpoint `path` names (see `find_prefix`)."""
    if path.name == STATE_FILE and path.is_file():
        path = path.parent
    return find_prefix(path)


# ----------------------------------------------------------------- reader
class MeshTFReader(CheckpointReader):
    """Reads a Mesh TensorFlow T5 checkpoint lazily (one variable per read)."""

    format = FORMAT

    def __init__(
        self,
        path: PathLike | Path,
        *,
        config: T5Config | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
    ):
        prefix = find_prefix(path)
        if prefix is None:
            raise CheckpointNotFoundError(f"No TensorFlow checkpoint (.index) at {path}.")
        super().__init__(prefix)
        tf = _tf()
        try:
            self._reader = tf.train.load_checkpoint(self.path)
            var_shapes = self._reader.get_variable_to_shape_map()
        except Exception as e:
            raise CorruptCheckpointError(
                f"{prefix}: unreadable TensorFlow checkpoint index ({prefix}.index): {e}"
            ) from e
        self._names: dict[str, str] = {}
        unknown = []
        for var in var_shapes:
            path_t5x = mesh_tf_to_t5x(var)
            if path_t5x is not None:
                self._names[path_t5x] = var
            elif not _IGNORED.fullmatch(var):
                unknown.append(var)
        if unknown:
            raise CheckpointError(
                f"{prefix}: variables {sorted(unknown)[:5]} have no T5X equivalent "
                f"(not a T5.1.1 Mesh TensorFlow checkpoint?)."
            )
        if "global_step" in var_shapes:
            self.step = int(self._get("global_step"))
        shapes = {k: tuple(var_shapes[v]) for k, v in self._names.items()}
        self._setup(shapes, config=config, num_heads=num_heads, head_dim=head_dim)

    def _get(self, var: str) -> np.ndarray:
        try:
            return np.asarray(self._reader.get_tensor(var))
        except Exception as e:
            raise CorruptCheckpointError(
                f"{self.path}: cannot read variable {var!r} from the data files "
                f"({self.path}.data-*; truncated or corrupted?): {e}"
            ) from e

    def _load(self, key: str) -> np.ndarray:
        return self._get(self._names[key])

    def _close(self) -> None:
        self._reader = None


registry.register_format(
    registry.CheckpointFormat(
        name=FORMAT,
        doc="a TensorFlow '<prefix>.index' (give the prefix, the .index file, or a "
        "directory with a 'checkpoint' state file or exactly one .index)",
        detect=detect,
        reader=MeshTFReader,
    )
)
