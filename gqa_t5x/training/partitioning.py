"""Device mesh, logical axis rules and shardings (T5X `PjitPartitioner` style).

The mesh has two axes, `data` and `model` (`num_partitions` devices along
`model`, the rest along `data`). Every parameter's logical axis names are
declared by the layer that creates it (`model/layers.py`, T5X's
`kernel_axes`) and read from the network by `param_tree.param_axes(config)`;
logical names map to mesh axes with T5X's standard rules:

    batch -> data      vocab -> model     mlp -> model     heads -> model
    joined_kv -> model kv_joined_kv -> model   embed, relpos_buckets -> None
    layers -> None

`layers` is the stacked axis of a scanned model's parameters
(`T5Config.scan_layers`, `model/layer_stack.py`): never split, so each
device holds its shard of every layer, as it does unscanned.

`kv_joined_kv` is the width of a key/value kernel (`kv_heads * head_dim`).
It is split over `model` only when the layer's key/value heads divide evenly
over the model shards; otherwise (e.g. MQA, or GQA-2 on 4 shards) the
key/value kernels are REPLICATED rather than cutting heads apart. Any other
dimension that does not divide by its mesh axis is replicated as well (listed
by `Partitioner.replicated_params`).

Optimizer-state leaves take the sharding of their parameter: same shape ->
same spec; Adafactor's factored row/column statistics (one dimension removed)
keep the specs of the remaining dimensions; scalars are replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gqa_t5x.model import layer_stack
from gqa_t5x.model import param_tree
from gqa_t5x.model.config import T5Config

DATA_AXIS = "data"
MODEL_AXIS = "model"

LogicalRules = Sequence[tuple[str, str | None]]

STANDARD_LOGICAL_AXIS_RULES: LogicalRules = (
    ("batch", DATA_AXIS),
    ("vocab", MODEL_AXIS),
    ("mlp", MODEL_AXIS),
    ("heads", MODEL_AXIS),
    ("joined_kv", MODEL_AXIS),
    ("kv_joined_kv", MODEL_AXIS),
    ("embed", None),
    ("relpos_buckets", None),
    ("length", None),
    ("layers", None),
)


def create_mesh(num_partitions: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` with `num_partitions` model shards.

    Args:
      num_partitions: Size of the `model` axis.
      devices: Devices to use (default: all, across hosts).

    Returns:
      A `jax.sharding.Mesh` with axes ('data', 'model').
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_partitions < 1 or len(devices) % num_partitions:
        raise ValueError(
            f"partitioning.Partitioner.num_partitions={num_partitions} must divide "
            f"the number of devices ({len(devices)})."
        )
    shape = (len(devices) // num_partitions, num_partitions)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Topologies mesh_utils does not model (e.g. host CPU devices): keep
        # the device order.
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


class Partitioner:
    """Places parameters, optimizer state and batches on a (data, model) mesh.

    Attributes:
      num_partitions: Model-parallel shards (size of the `model` axis).
      logical_axis_rules: Logical name -> mesh axis (or None = replicated).
      mesh: The device mesh.
    """

    def __init__(
        self,
        num_partitions: int = 1,
        logical_axis_rules: LogicalRules | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.num_partitions = int(num_partitions)
        self.logical_axis_rules = tuple(logical_axis_rules or STANDARD_LOGICAL_AXIS_RULES)
        self._rules = dict(self.logical_axis_rules)
        self.mesh = create_mesh(self.num_partitions, devices)
        self.replicated_params: list[str] = []

    @property
    def data_shards(self) -> int:
        return self.mesh.shape[DATA_AXIS]

    # ------------------------------------------------------------- parameters
    def _param_spec(
        self, path: str, shape: tuple[int, ...], axes: tuple[str, ...], config: T5Config
    ) -> PartitionSpec:
        if len(axes) != len(shape):
            raise ValueError(f"Parameter {path!r} has shape {shape} but logical axes {axes}.")
        spec: list[str | None] = []
        for dim, (name, size) in enumerate(zip(axes, shape)):
            if name not in self._rules:
                raise ValueError(
                    f"Logical axis {name!r} of {path!r} has no rule in "
                    f"logical_axis_rules {self.logical_axis_rules}."
                )
            mesh_axis = self._rules[name]
            if mesh_axis is not None:
                shards = self.mesh.shape[mesh_axis]
                splittable = size % shards == 0
                if name == "kv_joined_kv":
                    kv_heads = size // config.head_dim
                    # Never cut a key/value head across shards: replicate.
                    splittable = kv_heads % shards == 0
                if not splittable:
                    mesh_axis = None
                    if shards > 1:
                        self.replicated_params.append(f"{path}[{dim}]")
            spec.append(mesh_axis)
        return PartitionSpec(*spec)

    def param_specs(self, params: Any, config: T5Config) -> Any:
        """PartitionSpecs for a params tree (arrays or ShapeDtypeStructs).

        Args:
          params: A parameter tree of the network built from `config`:
            the unscanned tree, or a scanned model's stacked one.
          config: Its config; the network declares each parameter's logical
            axes (`param_tree.param_axes`; stacked leaves add `layers`).

        Returns:
          A tree of `PartitionSpec`s with the structure of `params`.
        """
        self.replicated_params = []
        logical = layer_stack.model_param_axes(config, stacked=layer_stack.is_stacked(params))

        def spec(keypath: Sequence[Any], leaf: Any) -> PartitionSpec:
            path = param_tree.keypath_str(keypath)
            if path not in logical:
                raise ValueError(
                    f"{path!r} is not a parameter of the network built from "
                    "`config`; pass the config the parameters were made for."
                )
            return self._param_spec(path, tuple(leaf.shape), logical[path], config)

        return jax.tree_util.tree_map_with_path(spec, params)

    def param_shardings(self, params: Any, config: T5Config) -> Any:
        """NamedShardings for a params tree."""
        return jax.tree_util.tree_map(
            lambda s: NamedSharding(self.mesh, s), self.param_specs(params, config),
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )

    # -------------------------------------------------------- optimizer state
    def opt_state_shardings(self, opt_state: Any, params: Any, param_shardings: Any) -> Any:
        """Shardings for an optax state whose sub-trees mirror `params`.

        Args:
          opt_state: Optimizer state (arrays or ShapeDtypeStructs).
          params: The parameter tree (for shapes).
          param_shardings: `param_shardings(params)`.

        Returns:
          A tree of NamedShardings with the structure of `opt_state`.
        """
        flat_params = {
            param_tree.keypath_str(p): (tuple(x.shape), s.spec)
            for (p, x), s in zip(
                jax.tree_util.tree_leaves_with_path(params),
                jax.tree_util.tree_leaves(param_shardings),
            )
        }
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def spec_for(path: Sequence[Any], leaf: Any) -> NamedSharding:
            shape = tuple(np.shape(leaf))
            if not shape:
                return replicated
            key = param_tree.keypath_str(path)
            match = next((k for k in flat_params if key.endswith("/" + k) or key == k), None)
            if match is None:
                return replicated
            p_shape, p_spec = flat_params[match]
            p_spec = tuple(p_spec) + (None,) * (len(p_shape) - len(p_spec))
            if shape == p_shape:
                return NamedSharding(self.mesh, PartitionSpec(*p_spec))
            if len(shape) == len(p_shape) - 1:
                # A factored statistic: the parameter with one dimension removed.
                for drop in range(len(p_shape) - 1, -1, -1):
                    if p_shape[:drop] + p_shape[drop + 1 :] == shape:
                        return NamedSharding(
                            self.mesh, PartitionSpec(*(p_spec[:drop] + p_spec[drop + 1 :]))
                        )
            return replicated

        return jax.tree_util.tree_map_with_path(spec_for, opt_state)

    # ----------------------------------------------------------------- batches
    @property
    def data_sharding(self) -> NamedSharding:
        """Sharding of `[batch, length]` features: batch over `data`."""
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def check_batch_size(self, batch_size: int) -> None:
        """Raises when BATCH_SIZE cannot be split over data shards and hosts."""
        shards = self.data_shards
        hosts = jax.process_count()
        if batch_size % shards or batch_size % hosts:
            raise ValueError(
                f"BATCH_SIZE={batch_size} must be divisible by the {shards} data "
                f"shards (devices / num_partitions) and the {hosts} host(s)."
            )

    def host_rows(self, global_batch_size: int) -> np.ndarray:
        """Rows of the global batch this process's devices hold, in order.

        With batches sharded over `data`, a process holds the slices of the
        data shards of its devices: on a mesh whose data axis spans hosts,
        its 1/hosts of the batch; where the data axis lies within each host
        (the model axis spans hosts), the whole batch. A host's input
        pipeline reads exactly these rows; `host_local_to_global` takes them
        in this order (the order `jax.make_array_from_process_local_data`
        expects: each distinct slice once, by position).

        Args:
          global_batch_size: BATCH_SIZE.

        Returns:
          Sorted int64 global row indices.
        """
        self.check_batch_size(global_batch_size)
        index_map = self.data_sharding.addressable_devices_indices_map((global_batch_size,))
        slices = {
            (idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
            for idx in index_map.values()
        }
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in sorted(slices)])

    def host_local_to_global(
        self, batch: Mapping[str, np.ndarray], global_batch_size: int
    ) -> dict[str, jax.Array]:
        """Assembles this host's rows of a batch into global sharded arrays.

        Args:
          batch: This host's rows (`host_rows(global_batch_size)`, in that
            order) of each `[rows, ...]` numpy feature.
          global_batch_size: BATCH_SIZE.

        Returns:
          Global `[global_batch_size, ...]` `jax.Array`s sharded over `data`.
        """
        sharding = self.data_sharding
        return {
            k: jax.make_array_from_process_local_data(
                sharding, np.asarray(v), (global_batch_size, *np.shape(v)[1:])
            )
            for k, v in batch.items()
        }
