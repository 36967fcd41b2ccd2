"""`gqa_t5x.runtime`: process-wide settings; here, TensorFlow kept off the accelerators, quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gqa_t5x import runtime
from paths import REPO

_NOTICES = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1.1 1 port.cc:153] oneDNN custom operations are on. You may see slightly different ...\n"
    "I0000 00:00:1.2 1 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\n"
    "E0000 00:00:1.3 1 cuda_executor.cc:1228] failed call to cuInit: INTERNAL: CUDA error: UNKNOWN ERROR (303)\n"
)


def test_tensorflows_start_up_notices_are_dropped_and_everything_else_is_kept(capfd):
    with runtime._stderr_without(runtime._TENSORFLOW_NOTICES):
        os.write(2, _NOTICES.encode())
        os.write(2, b"E0000 real_error.cc:1] Could not open file /data/x: permission denied\n")
        print("python warning", file=sys.stderr)
    err = capfd.readouterr().err  # (pytest sends sys.stderr around file descriptor 2)
    assert sorted(err.splitlines()) == ["E0000 real_error.cc:1] Could not open file /data/x: permission denied",
                                        "python warning"]


def test_stderr_is_restored_even_when_the_body_raises(capfd):
    with pytest.raises(ValueError):
        with runtime._stderr_without(runtime._TENSORFLOW_NOTICES):
            os.write(2, b"kept\n")
            raise ValueError("x")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "kept\nafter\n"


@pytest.mark.slow
def test_tensorflow_sees_no_gpu_and_prints_nothing_on_import(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    script = ("from gqa_t5x import runtime; print(runtime.keep_tensorflow_off_accelerators()); "
              "import tensorflow as tf; print(tf.config.get_visible_devices('GPU'))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.stdout.split() == ["True", "[]"] and result.stderr == "", result.stderr
