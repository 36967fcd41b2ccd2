"""Mesh TensorFlow (original T5) checkpoints: `model.ckpt-<step>.{index,data-*}`.

Variables are read one at a time with `tf.train.load_checkpoint` (TensorFlow's
bundle reader seeks to a single tensor). Names map to T5X paths with
`param_tree.mesh_tf_to_t5x` (`shared/embedding` -> `token_embedder/embedding`, ...);
shapes are identical to T5X's, so no transpose. `global_step` gives `step`;
Adafactor slots (`*_slot_vr`, `*_slot_vc`, `*_slot_v`, `*_slot_m`) are skipped.
"""

from __future__ import annotations

import os
import re

import numpy as np

from gqa_t5x.model.config import T5Config
from gqa_t5x.model import param_tree
from gqa_t5x.checkpoints.base import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReader,
    CorruptCheckpointError,
)

_IGNORED = re.compile(r"(.*_slot_(vr|vc|v|m)|global_step|.*/Adafactor.*|.*beta\d_power)$")


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError as e:
        raise CheckpointError(
            "Reading Mesh TensorFlow checkpoints needs tensorflow (pip install tensorflow)."
        ) from e
    return tf


def find_prefix(path: str) -> str | None:
    """The checkpoint prefix (`.../model.ckpt-1000000`) named by `path`.

    Accepts the prefix itself, its `.index` file, or a directory with a
    TensorFlow `checkpoint` state file (its latest checkpoint) or exactly one
    `.index` file.
    """
    path = os.fspath(path)
    if path.endswith(".index") and os.path.isfile(path):
        return path[: -len(".index")]
    if os.path.isfile(path + ".index"):
        return path
    if not os.path.isdir(path):
        return None
    state = os.path.join(path, "checkpoint")
    if os.path.isfile(state):
        try:
            with open(state, "rb") as f:
                head = f.read(4096)
        except OSError:
            head = b""
        m = re.search(rb'model_checkpoint_path:\s*"([^"]+)"', head)
        if m:
            prefix = m.group(1).decode()
            prefix = prefix if os.path.isabs(prefix) else os.path.join(path, prefix)
            if os.path.isfile(prefix + ".index"):
                return prefix
            # A moved checkpoint keeps an absolute path; fall back to its basename here.
            local = os.path.join(path, os.path.basename(prefix))
            if os.path.isfile(local + ".index"):
                return local
    indexes = sorted(f for f in os.listdir(path) if f.endswith(".index"))
    if len(indexes) == 1:
        return os.path.join(path, indexes[0][: -len(".index")])
    if len(indexes) > 1:
        raise CheckpointError(
            f"{path} holds {len(indexes)} TensorFlow checkpoints "
            f"({', '.join(i[:-6] for i in indexes[:4])}) and no 'checkpoint' state "
            f"file naming the latest; pass the prefix of one, e.g. "
            f"{os.path.join(path, indexes[-1][:-6])}."
        )
    return None


class MeshTFReader(CheckpointReader):
    """Reads a Mesh TensorFlow T5 checkpoint lazily (one variable per read)."""

    format = "mesh_tf"

    def __init__(
        self,
        path: str,
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
            self._reader = tf.train.load_checkpoint(prefix)
            var_shapes = self._reader.get_variable_to_shape_map()
        except Exception as e:
            raise CorruptCheckpointError(
                f"{prefix}: unreadable TensorFlow checkpoint index ({prefix}.index): {e}"
            ) from e
        self._names: dict[str, str] = {}
        unknown = []
        for var, shape in var_shapes.items():
            path_t5x = param_tree.mesh_tf_to_t5x(var)
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
