"""Failures are loud and lose nothing: killed runs, corrupted values, gs:// paths."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conversion_utils import T5X_TINY, flat, random_params, tiny_config
from flax import serialization
from paths import REPO

from gqa_t5x import checkpoints, conversion, storage
from gqa_t5x.model import param_tree

_KILLED_CONVERSION = textwrap.dedent(
    """
    import sys, time
    from gqa_t5x import conversion

    source, output, ready = sys.argv[1:4]

    def hang(path):  # the first parameter is written: tell the test, then wait to be killed
        open(ready, "w").close()
        time.sleep(600)

    conversion.convert_checkpoint(source, output, 2, progress=False, on_param=hang)
    """
)


@pytest.mark.slow
def test_a_killed_conversion_leaves_a_leftover_the_next_one_removes_and_reports(tmp_path, caplog):
    config = tiny_config()
    params = random_params(config, seed=1)
    source, out, ready = tmp_path / "mha", tmp_path / "out", tmp_path / "ready"
    checkpoints.save(source, config, params)
    script = tmp_path / "convert.py"
    script.write_text(_KILLED_CONVERSION)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(source), str(out), str(ready)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    leftovers = sorted(tmp_path.glob(".out" + storage.STAGING_TAG + "*"))
    assert len(leftovers) == 1 and not out.exists()
    assert storage.writer_of(leftovers[0]).pid == proc.pid
    with caplog.at_level(logging.WARNING, logger="gqa_t5x.storage"):
        conversion.convert_checkpoint(source, out, 2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert.py", "mha", "out", "ready"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"Removed 1 leftover(s) of killed writes to {out}: {leftovers[0].name}"]
    _, expected = conversion.convert(config, params, 2)
    _, got = checkpoints.load(out)
    for path, value in flat(expected).items():
        np.testing.assert_array_equal(flat(got)[path], value, err_msg=path)


# --------------------------------------------------------- unusual values
def _flip_exponent_bit(file, value: np.float32) -> np.float32:
    """Flips the second-highest exponent bit of `value`'s bytes in `file` (once)."""
    data = bytearray(file.read_bytes())
    raw = np.float32(value).tobytes()
    assert data.count(raw) == 1
    at = data.index(raw) + 3  # little-endian: sign and high exponent bits
    data[at] ^= 0x40
    file.write_bytes(bytes(data))
    return np.frombuffer(bytes(data[at - 3 : at + 1]), np.float32)[0]


@pytest.mark.skipif(not T5X_TINY.exists(), reason=f"T5X fixture not found at {T5X_TINY}")
def test_a_flipped_byte_in_a_t5x_msgpack_stops_the_conversion_naming_the_parameter(tmp_path):
    source = tmp_path / "checkpoint_0"
    shutil.copytree(T5X_TINY, source)
    key = "decoder/layers_1/mlp/wo/kernel"
    target = param_tree.flatten(serialization.msgpack_restore((source / "checkpoint").read_bytes())["optimizer"]["target"])
    corrupted = _flip_exponent_bit(source / "checkpoint", target[key][2, 5])
    assert abs(corrupted) > 1e15 and np.isfinite(corrupted)
    with pytest.raises(conversion.UnusualValuesError) as info:
        conversion.convert_checkpoint(source, tmp_path / "out", 2, progress=False)
    message = str(info.value)
    assert f"{source}: parameter '{key}'" in message and "(2, 5)" in message
    assert "--allow_unusual_values" in message and "ALLOW_UNUSUAL_VALUES = True" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_0"]  # nothing written
    conversion.convert_checkpoint(source, tmp_path / "out", 2, progress=False, allow_unusual_values=True)
    loaded = checkpoints.load(tmp_path / "out", allow_unusual_values=True)[1]  # Its readers refuse it too.
    assert loaded["decoder"]["layers_1"]["mlp"]["wo"]["kernel"][2, 5] == corrupted


@pytest.mark.parametrize("bad", [np.nan, np.inf, -2e4])
def test_non_finite_or_huge_values_in_converted_kernels_are_refused(tmp_path, bad):
    config = tiny_config()
    params = flat(random_params(config))
    key = "decoder/layers_1/encoder_decoder_attention/value/kernel"
    params[key] = params[key].copy()
    params[key][7, 3] = bad
    checkpoints.save(tmp_path / "src", config, param_tree.unflatten(params))
    kind = "implausibly large" if np.isfinite(bad) else "non-finite"
    with pytest.raises(conversion.UnusualValuesError, match=f"parameter '{key}' holds 1 {kind}.*at index \\(7, 3\\)"):
        conversion.convert_checkpoint(tmp_path / "src", tmp_path / "out", 1, method="align", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_values_at_the_limit_of_trained_t5_weights_pass():
    weights = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32) * 11.6  # t5-v1_1 embedding std
    weights[0, 0] = conversion.MAX_ABS_VALUE
    conversion.check_values(weights, key="token_embedder/embedding", source="x")


# ------------------------------------------------------------------ gs://
class _Opened(Exception):
    pass


def test_gs_urls_reach_the_readers_as_urls(monkeypatch):
    from gqa_t5x.checkpoints import registry

    seen = []

    def record(path, **_):
        seen.append(path)
        raise _Opened

    monkeypatch.setattr(checkpoints, "open_checkpoint", record)
    monkeypatch.setattr(registry, "open_checkpoint", record)
    source = "gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000"
    with pytest.raises(_Opened):
        conversion.convert_checkpoint(source, "gs://my-bucket/gqa8/checkpoint_1000000", 8, progress=False)
    with pytest.raises(_Opened):
        checkpoints.export_huggingface_checkpoint("gs://my-bucket/gqa8/checkpoint_1000000", "gs://my-bucket/hf")
    assert [str(p) for p in seen] == [source, "gs://my-bucket/gqa8/checkpoint_1000000"]
    with pytest.raises(ValueError, match="must not be \\(inside\\) the source"):
        conversion.convert_checkpoint(source, source + "/gqa", 8, progress=False)
