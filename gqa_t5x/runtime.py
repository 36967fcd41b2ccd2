"""Process-wide settings, made only by explicit calls from entry points.

Importing a module of this package, opening a checkpoint or constructing a
runner changes nothing outside itself. What does change the whole process
lives here and is called by the command line (`cli.py`) when a command
starts, or by a user's own script that wants the same behaviour:

* `return_freed_buffers_to_os()`: glibc's allocator tuning that keeps a
  streaming conversion's resident memory at the tensors actually alive.
* `enable_compilation_cache(directory)`: JAX's persistent compilation cache,
  so runs with the same shapes compile once (sweeps, the study).
* `use_cpu_devices(count)`: the host CPU as `count` XLA devices (a mesh on
  one machine), before JAX's backend starts.
* `keep_tensorflow_off_accelerators()`: TensorFlow (seqio, tf.data) sees no
  GPU, as in T5X, so it neither claims accelerator memory JAX needs nor
  initialises CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_allocator_tuned = False


def return_freed_buffers_to_os() -> bool:
    """Makes glibc give freed large buffers straight back to the OS.

    By default glibc raises its mmap threshold after a large buffer is freed,
    so later tensor-sized buffers come from per-thread heaps that keep the
    memory after `free`. Reading hundreds of large tensors from tensorstore's
    thread pool then grows resident memory by (threads x tensor size). A fixed
    4 MiB threshold keeps a streaming conversion's footprint at the tensors
    actually alive. Once per process; a no-op off glibc.

    Returns:
      True when the threshold is set (now or by an earlier call).
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _allocator_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 4 << 20))
    except (OSError, AttributeError):
        _allocator_tuned = False
    return _allocator_tuned


def enable_compilation_cache(directory: str | os.PathLike) -> str:
    """Turns on JAX's persistent compilation cache in `directory`.

    A cache directory the user configured (`JAX_COMPILATION_CACHE_DIR` or
    `jax.config`) is kept. Every compilation is cached, however short.

    Args:
      directory: Local path or gs:// URL (JAX reads both through epath).

    Returns:
      The cache directory in effect.
    """
    import jax

    from gqa_t5x.storage import paths

    if jax.config.jax_compilation_cache_dir:
        return str(jax.config.jax_compilation_cache_dir)
    directory = paths.as_path(directory, name="compilation cache directory")
    paths.makedirs(directory)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(directory)


def use_cpu_devices(count: int) -> None:
    """Makes the CPU backend `count` XLA devices; must precede any JAX computation.

    Raises:
      ValueError: count < 1.
      RuntimeError: JAX's CPU backend already started in this process, so its
        device count is fixed.
    """
    import jax

    if count < 1:
        raise ValueError(f"CPU device count {count} must be >= 1.")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as error:
        raise RuntimeError("JAX's CPU backend was already initialised in this process, so its device "
                           f"count is fixed ({error}).") from None


# TensorFlow's start-up notices, printed by its C++ code (absl logging before
# it is initialised, so TF_CPP_MIN_LOG_LEVEL does not reach them) while it is
# imported and while it looks for GPUs: nothing a user of this package acts on.
_TENSORFLOW_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers"
    r"|failed call to cuInit"
    r"|cpu_feature_guard\.cc"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
)


@contextlib.contextmanager
def _stderr_without(noise: re.Pattern[str]) -> Iterator[None]:
    """Captures file descriptor 2 (C++ and Python alike); re-emits the lines `noise` does not match."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not noise.search(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def keep_tensorflow_off_accelerators(*, quiet: bool = True) -> bool:
    """Hides the GPUs from TensorFlow, as T5X's entry points do.

    TensorFlow only prepares data here (seqio, tf.data); left alone, its
    first operation claims most of every GPU's memory, which JAX needs. Must
    run before TensorFlow's runtime starts (its first operation); a no-op
    when TensorFlow is not installed.

    Importing TensorFlow and listing its GPUs print start-up notices from
    C++ ("Could not find cuda drivers", "failed call to cuInit" when JAX runs
    on the CPU of a machine with CUDA libraries, oneDNN); with `quiet` those
    lines, and only those, are dropped from stderr while this runs.

    Args:
      quiet: Drop TensorFlow's start-up notices (`_TENSORFLOW_NOTICES`).

    Returns:
      True when TensorFlow now sees no GPU; False when it is not installed or
      its runtime had already started (its devices are then fixed).
    """
    with _stderr_without(_TENSORFLOW_NOTICES) if quiet else contextlib.nullcontext():
        try:
            import tensorflow as tf
        except ImportError:
            return False
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError as error:  # "Visible devices cannot be modified after being initialized"
            logging.info("TensorFlow's devices are already initialised; not hiding its GPUs: %s", error)
            return False
    return True
