"""Registers the task table with seqio on import; `register_task` adds tasks.

`import gqa_t5x.data.tasks` registers every task of `task_table.BUILTIN_TASKS`
and the mixture `gqa_eval_mixture` of the paper's seven evaluation tasks
(equal rates), the way T5X users expect (`MIXTURE_OR_TASK_NAME`).

Registering a `TaskSpec` also creates the gin-configurable location of its
data, `gqa_t5x.data.tasks.<spec.source.location>` (e.g.
`gqa_t5x.data.tasks.cnn_dailymail_data.files = {"validation":
"/data/cnn/validation.jsonl"}`; arguments in `sources.py`). Tasks sharing a
location share its configurable.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import gin
import seqio

from gqa_t5x.data import task_table
from gqa_t5x.data import vocabularies
from gqa_t5x.data.sources import ConfigurableDataSource
from gqa_t5x.data.sources import DataLocation
from gqa_t5x.data.task_table import TaskSpec

# Location configurables created so far, by name (also attributes of this
# module, so gin files can bind `tasks.<location>` with dynamic registration).
_LOCATIONS: dict[str, Callable[..., DataLocation]] = {}


def _check_location_name(location: str) -> None:
    if location not in _LOCATIONS and hasattr(sys.modules[__name__], location):
        raise ValueError(
            f"SourceSpec.location={location!r} would shadow "
            f"{__name__}.{location}; choose another name (e.g. '{location}_data')."
        )


def _location_configurable(location: str) -> Callable[..., DataLocation]:
    """The gin configurable `gqa_t5x.data.tasks.<location>` (created once)."""
    if location in _LOCATIONS:
        return _LOCATIONS[location]
    _check_location_name(location)

    def where(
        tfds_data_dir: str | None = None,
        tfds_builder_dir: str | None = None,
        files: Mapping[str, Any] | None = None,
        file_format: str | None = None,
        compression: str | None = None,
        field_map: Mapping[str, str] | None = None,
    ) -> DataLocation:
        return DataLocation(
            tfds_data_dir, tfds_builder_dir, files, file_format, compression, field_map
        )

    where.__name__ = where.__qualname__ = location
    where.__doc__ = (
        f"Returns where {location} is read from (bind the arguments in gin); "
        "see gqa_t5x.data.sources for what each argument means."
    )
    configurable = gin.configurable(location, module=__name__)(where)
    setattr(sys.modules[__name__], location, configurable)
    _LOCATIONS[location] = configurable
    return configurable


def register_task(spec: TaskSpec) -> seqio.Task:
    """Adds `spec` to the task table and registers it with seqio.

    A task of the same name is replaced (registering twice is harmless).
    The task's data location becomes `gqa_t5x.data.tasks.<location>`.

    Args:
      spec: The task (see `task_table.TaskSpec`).

    Returns:
      The registered `seqio.Task`.

    Raises:
      ValueError: the spec's name or key belongs to another task.
    """
    location = spec.source.location
    _check_location_name(location)
    task_table.add(spec)
    source = ConfigurableDataSource(
        spec.source, _location_configurable(location), f"{__name__}.{location}"
    )
    vocabulary = vocabularies.get_vocabulary()
    seqio.TaskRegistry.remove(spec.name)
    return seqio.TaskRegistry.add(
        spec.name,
        source=source,
        preprocessors=[
            *spec.text_preprocessors,
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            *spec.token_preprocessors,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features={
            "inputs": seqio.Feature(
                vocabulary, add_eos=True, required=spec.requires_inputs
            ),
            "targets": seqio.Feature(vocabulary, add_eos=True),
        },
        postprocess_fn=spec.postprocess_fn,
        metric_fns=list(spec.metric_fns),
    )


for _spec in task_table.BUILTIN_TASKS:
    register_task(_spec)
seqio.MixtureRegistry.remove(task_table.EVAL_MIXTURE)
seqio.MixtureRegistry.add(
    task_table.EVAL_MIXTURE, [(name, 1.0) for name in task_table.EVAL_MIXTURE_TASKS]
)
