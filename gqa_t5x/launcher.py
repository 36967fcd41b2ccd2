"""T5X-style launcher: gin files + bindings -> one run mode.

    python -m gqa_t5x.main \\
      --gin_file=gin/models/t5_1_1/small.gin \\
      --gin_file=gin/runs/uptrain.gin \\
      --gin.MODEL_DIR=\\"/tmp/gqa8_small\\" \\
      --gin.INITIAL_CHECKPOINT_PATH=\\"/ckpts/gqa8_small/checkpoint_1000000\\" \\
      --gin.NUM_KV_HEADS=8 \\
      --run_mode=train

A run is described by a `Launch` (run mode, gin files, bindings): the command
line (`gqa_t5x.cli`), `python -m gqa_t5x.main` and the sweeps all build one and
call `launch`; `Launch.command_line()` renders the equivalent shell command
(what `gqa-t5x sweep --mode print` prints).

Each run mode calls the function its run gin configures (`RUN_MODES`):
train -> `trainer.train` (uptrain.gin / finetune.gin), eval ->
`evaluation.evaluate` (eval.gin), infer -> `inference.infer` (infer.gin),
convert -> `converter.convert_checkpoint` (convert.gin).

The resolved configuration is written to `<output dir>/config.gin` (MODEL_DIR,
else EVAL_OUTPUT_DIR / INFER_OUTPUT_DIR) only once the run has validated its
inputs (the run function's `on_validated` callback), so a rejected launch never
overwrites the record of an earlier one; the configuration an earlier launch
wrote is kept as `config-<its UTC time>.gin`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import inspect
import logging
import shlex
from collections.abc import Callable, Sequence
from typing import Any

from gqa_t5x import gin_config
from gqa_t5x.errors import Preempted, RunError, UsageError


@dataclasses.dataclass(frozen=True)
class RunMode:
    """What `--run_mode=<name>` runs.

    Attributes:
      module: Module of the run function.
      function: Name of the gin-configured run function in `module`.
      run_gins: Run gins that configure it (for error messages).
      output_macros: Macros naming where `config.gin` is written, in order of
        preference.
      example_gin_files: The `--gin_file` flags of a typical launch (what an
        error suggests when none is given).
    """

    module: str
    function: str
    run_gins: str
    output_macros: tuple[str, ...] = ()
    example_gin_files: tuple[str, ...] = ()


RUN_MODES: dict[str, RunMode] = {
    "train": RunMode("gqa_t5x.training.trainer", "train",
                     "gin/runs/uptrain.gin or gin/runs/finetune.gin", ("MODEL_DIR",),
                     ("gin/models/t5_1_1/small.gin", "gin/runs/uptrain.gin")),
    "eval": RunMode("gqa_t5x.training.evaluation", "evaluate", "gin/runs/eval.gin",
                    ("MODEL_DIR", "EVAL_OUTPUT_DIR"), ("gin/models/t5_1_1/small.gin", "gin/runs/eval.gin")),
    "infer": RunMode("gqa_t5x.training.inference", "infer", "gin/runs/infer.gin",
                     ("MODEL_DIR", "INFER_OUTPUT_DIR"), ("gin/runs/infer.gin",)),
    "convert": RunMode("gqa_t5x.conversion.converter", "convert_checkpoint", "gin/runs/convert.gin",
                       example_gin_files=("gin/runs/convert.gin",)),
}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launcher run (what `python -m gqa_t5x.main` is given).

    Attributes:
      run_mode: One of `RUN_MODES`.
      gin_files: Model gin, run gin, experiment gins, in order.
      gin_bindings: 'MACRO=value' bindings (the `--gin.` prefix stripped);
        later bindings win.
      gin_search_paths: Extra gin search paths.
      tfds_data_dir: TFDS data dir override for every seqio task.
    """

    run_mode: str
    gin_files: tuple[str, ...]
    gin_bindings: tuple[str, ...] = ()
    gin_search_paths: tuple[str, ...] = ()
    tfds_data_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "gin_files", tuple(self.gin_files))
        object.__setattr__(self, "gin_bindings", tuple(self.gin_bindings))
        object.__setattr__(self, "gin_search_paths", tuple(self.gin_search_paths))
        if self.run_mode not in RUN_MODES:
            raise UsageError(f"--run_mode={self.run_mode!r}; choose one of {list(RUN_MODES)}.")
        if not self.gin_files:
            mode = RUN_MODES[self.run_mode]
            example = " ".join(f"--gin_file={name}" for name in mode.example_gin_files)
            raise UsageError(
                f"--gin_file is required: the run gin of --run_mode={self.run_mode} is "
                f"{mode.run_gins}, e.g. {example}."
            )

    def command_line(self, prefix: Sequence[str] = ("python", "-m", "gqa_t5x.main")) -> str:
        """The shell command that runs this launch."""
        argv = [*prefix, *(f"--gin_file={f}" for f in self.gin_files)]
        argv += [f"--gin_search_paths={p}" for p in self.gin_search_paths]
        argv += [f"--gin.{b}" for b in self.gin_bindings]
        if self.tfds_data_dir:
            argv.append(f"--tfds_data_dir={self.tfds_data_dir}")
        argv.append(f"--run_mode={self.run_mode}")
        return " ".join(shlex.quote(a) for a in argv)


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Multi-process start-up (`jax.distributed.initialize`), T5X's flags.

    On Cloud TPU every field may be None (auto-detected).
    """

    coordinator_address: str | None = None
    process_count: int | None = None
    process_index: int | None = None

    def initialize(self) -> None:
        import jax

        jax.distributed.initialize(
            coordinator_address=self.coordinator_address,
            num_processes=self.process_count,
            process_id=self.process_index,
        )


def write_config(output_dir: str, config_str: str, *, name: str = "output directory") -> str:
    """Writes `output_dir/config.gin`, keeping an earlier launch's as a copy.

    Each file is written whole or not at all (`storage.replace_file`), on
    local disk and on gs:// alike.

    Args:
      output_dir: MODEL_DIR (or an eval/infer output directory), local or gs://.
      config_str: The parsed gin configuration.
      name: The macro naming `output_dir`, for errors.

    Returns:
      The path written.
    """
    from gqa_t5x.storage import paths

    directory = paths.as_path(output_dir, name=name)
    path = directory / "config.gin"
    if path.exists():
        previous = path.read_text()
        if previous != config_str:
            stamp = datetime.datetime.fromtimestamp(path.stat().mtime, datetime.timezone.utc)
            paths.replace_file(directory / f"config-{stamp:%Y%m%dT%H%M%S}.gin", previous)
    paths.replace_file(path, config_str)
    return str(path)


def run_function(run_mode: str) -> Callable[..., Any]:
    """The (unconfigured) function `--run_mode=run_mode` calls."""
    mode = RUN_MODES[run_mode]
    return getattr(importlib.import_module(mode.module), mode.function)


def launch(request: Launch, *, distributed: Distributed | None = None) -> Any:
    """Parses gin, validates, runs the run mode and records its configuration.

    Args:
      request: The run.
      distributed: Multi-process start-up (None: a single process).

    Returns:
      What the run function returns (e.g. `trainer.TrainSummary`).

    Raises:
      UsageError, ValueError, FileNotFoundError: the launch is invalid (nothing
        was written).
      RunError: the run failed after validating its inputs.
    """
    if distributed is not None:
        distributed.initialize()
    if request.tfds_data_dir:
        import seqio

        seqio.set_tfds_data_dir_override(request.tfds_data_dir)
    import gin

    config_str = gin_config.parse_gin(request.gin_files, request.gin_bindings, request.gin_search_paths)
    fn = run_function(request.run_mode)
    try:
        configured = gin.get_configurable(fn)
    except ValueError as e:
        mode = RUN_MODES[request.run_mode]
        raise UsageError(
            f"--run_mode={request.run_mode} needs {mode.module}.{mode.function} to be "
            f"configured by its run gin ({mode.run_gins}): {e}"
        ) from e
    validated = False

    def record() -> None:
        import jax

        macros = RUN_MODES[request.run_mode].output_macros
        named = ((m, gin_config.macro_value(m)) for m in macros)
        macro, output_dir = next(((m, v) for m, v in named if isinstance(v, str)), (None, None))
        if output_dir and jax.process_index() == 0:
            logging.info("Wrote %s", write_config(output_dir, config_str, name=macro))

    def on_validated() -> None:
        nonlocal validated
        record()
        validated = True

    takes_hook = "on_validated" in inspect.signature(fn).parameters
    if not takes_hook:
        record()  # The run function validates nothing the gin parse has not.
    try:
        return configured(on_validated=on_validated) if takes_hook else configured()
    except (RunError, KeyboardInterrupt, Preempted):
        raise
    except Exception as e:
        if validated:
            raise RunError(e) from e
        raise
