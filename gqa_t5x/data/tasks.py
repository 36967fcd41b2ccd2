"""Registers the task table with seqio on import; `register_task` adds tasks.

`import gqa_t5x.data.tasks` registers every task of `task_table.BUILTIN_TASKS`
and the mixture `gqa_eval_mixture` of the paper's seven evaluation tasks
(equal rates), the way T5X users expect (`MIXTURE_OR_TASK_NAME`).

Where a task's data lives is a gin configurable of this module returning a
`DataLocation` (arguments in `sources.py`), one per data set; tasks sharing a
data set share it. The built-in tasks' locations are defined below by name:

    c4_data, corpus_data, cnn_dailymail_data, arxiv_data, pubmed_data,
    mediasum_data, multi_news_data, wmt14_ende_data, triviaqa_data

e.g. `gqa_t5x.data.tasks.cnn_dailymail_data.files = {"validation":
"/data/cnn/validation.jsonl"}` (or `tasks.cnn_dailymail_data.files` with gin's
dynamic registration). `define_location` makes one; `register_task` calls it
for a new task whose location is not defined yet, which gin then knows by its
full name `gqa_t5x.data.tasks.<location>` (a caller that wants the shorter
dynamic-registration name keeps the returned configurable in its own module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import gin
import seqio

from gqa_t5x.data import task_table
from gqa_t5x.data import vocabularies
from gqa_t5x.data.sources import ConfigurableDataSource
from gqa_t5x.data.sources import DataLocation
from gqa_t5x.data.task_table import TaskSpec

# Every location defined so far (built-in and added), by name.
_LOCATIONS: dict[str, Callable[..., DataLocation]] = {}


def _check_location_name(location: str) -> None:
    if location not in _LOCATIONS and location in globals():
        raise ValueError(
            f"SourceSpec.location={location!r} would shadow "
            f"{__name__}.{location}; choose another name (e.g. '{location}_data')."
        )


def define_location(location: str) -> Callable[..., DataLocation]:
    """Registers the gin configurable `gqa_t5x.data.tasks.<location>` (once).

    Args:
      location: A `SourceSpec.location` (a Python identifier that is not
        already a name of this module).

    Returns:
      The configurable: called with no arguments it returns the `DataLocation`
      the gin configuration binds (`tfds_data_dir`, `tfds_builder_dir`,
      `files`, `file_format`, `compression`, `field_map`,
      `shuffle_buffer_size`; see `sources.py`).
      Defining a location twice returns the first configurable.
    """
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
        shuffle_buffer_size: int = 16384,
    ) -> DataLocation:
        return DataLocation(
            tfds_data_dir, tfds_builder_dir, files, file_format, compression, field_map,
            shuffle_buffer_size,
        )

    where.__name__ = where.__qualname__ = location
    where.__doc__ = (
        f"Returns where {location} is read from (bind the arguments in gin); "
        "see gqa_t5x.data.sources for what each argument means."
    )
    configurable = gin.configurable(location, module=__name__)(where)
    _LOCATIONS[location] = configurable
    return configurable


# The built-in tasks' data locations (`task_table.BUILTIN_TASKS`' `source.location`).
c4_data = define_location("c4_data")
corpus_data = define_location("corpus_data")
cnn_dailymail_data = define_location("cnn_dailymail_data")
arxiv_data = define_location("arxiv_data")
pubmed_data = define_location("pubmed_data")
mediasum_data = define_location("mediasum_data")
multi_news_data = define_location("multi_news_data")
wmt14_ende_data = define_location("wmt14_ende_data")
triviaqa_data = define_location("triviaqa_data")


def register_task(spec: TaskSpec) -> seqio.Task:
    """Adds `spec` to the task table and registers it with seqio.

    A task of the same name is replaced (registering twice is harmless).
    Its data location is `gqa_t5x.data.tasks.<location>`, defined by
    `define_location` unless it already is.

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
        spec.source, define_location(location), f"{__name__}.{location}"
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


def _register_builtin_tasks() -> None:
    """Registers `BUILTIN_TASKS` and the evaluation mixture with seqio."""
    undefined = sorted(
        {s.source.location for s in task_table.BUILTIN_TASKS} - set(_LOCATIONS)
    )
    if undefined:
        raise RuntimeError(
            f"Built-in task location(s) {undefined} have no definition in "
            f"{__name__}; add `<name> = define_location('<name>')` next to the others."
        )
    for spec in task_table.BUILTIN_TASKS:
        register_task(spec)
    seqio.MixtureRegistry.remove(task_table.EVAL_MIXTURE)
    seqio.MixtureRegistry.add(
        task_table.EVAL_MIXTURE, [(name, 1.0) for name in task_table.EVAL_MIXTURE_TASKS]
    )


_register_builtin_tasks()
