"""Shared test settings: quiet TensorFlow, CPU JAX, the ../shared location,
and a Google Cloud Storage emulator on loopback for the gs:// tests."""

from __future__ import annotations

import os
import re
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, inherited by the
# subprocesses tests start: many tests compile the same tiny models (a new
# closure per test is a new jit, the same HLO), and on a 2-core CI machine
# compiling is most of a test's time. Empty at the start of every session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _jax_cache = tempfile.mkdtemp(prefix="gqa-t5x-tests-jax-cache-")
    atexit.register(shutil.rmtree, _jax_cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

import gcs_emulator as emulation  # noqa: E402
from paths import SHARED  # noqa: E402

GCS_TEST_BUCKET = "gqa-tests"


def pytest_collection_modifyitems(config, items):
    """Runs the `slow` tests first, each group in its collected order.

    With two workers (`pytest.ini`: `-n 2 --dist loadgroup`) the long tests then
    start early and the many short ones fill the end, so one worker does not sit
    idle while the other finishes a long test (longest-first scheduling). Every
    worker sorts the same collection the same way, as xdist requires.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder; tests needing it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared fixtures not found at {SHARED}")
    return SHARED


def _use_emulator_in_this_process(environ: dict[str, str], mp: pytest.MonkeyPatch) -> None:
    """Points this process's gs:// clients at the emulator (what a user's
    environment would do before starting Python)."""
    import fsspec
    from etils.epath import gpath

    from gqa_t5x.storage import paths

    for key, value in environ.items():
        mp.setenv(key, value)
    for key in ("EPATH_USE_TF", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        mp.delenv(key, raising=False)  # configure_clients sets the emulator defaults
    mp.setitem(fsspec.config.conf, "gcs", dict(fsspec.config.conf.get("gcs", {})))  # restored afterwards
    paths.configure_clients()
    # etils reads EPATH_USE_TF once per process; forget an earlier reading.
    gpath._is_tf_installed.cache_clear()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> Iterator[emulation.Emulator]:
    """fake-gcs-server (in memory) + the TLS proxy for TensorFlow, for the session.

    While it runs, this process and its subprocesses use it for every gs://
    URL: the emulator's variables are set and `paths.configure_clients`
    applied. Skips (with the reason, as a warning) only if it cannot start.
    """
    try:
        emulator = emulation.start(tmp_path_factory.mktemp("gcs_emulator"))
    except emulation.EmulatorUnavailable as e:
        reason = f"GCS emulator unavailable: {e}"
        warnings.warn(pytest.PytestWarning(reason))
        pytest.skip(reason)
    try:
        emulator.create_bucket(GCS_TEST_BUCKET)
        with pytest.MonkeyPatch.context() as mp:
            _use_emulator_in_this_process(emulator.environ, mp)
            yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def gcs_dir(gcs_emulator, request) -> str:
    """A fresh gs:// prefix for one test: gs://gqa-tests/<test name>-<random>."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    return f"gs://{GCS_TEST_BUCKET}/{name}-{uuid.uuid4().hex[:6]}"
