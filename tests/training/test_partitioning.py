"""Mesh, logical axis rules, batch checks and sharded training equivalence.

The equivalence test trains the same tiny model in a subprocess with 8
simulated CPU devices (XLA_FLAGS set before jax is imported) on a single
device and on meshes (data, model) = (8,1), (4,2), (2,4) and checks that
the loss trajectories agree. The model is MQA in the decoder (one kv head,
replicated on every model axis) and multi-head in the encoder (4 kv heads,
split over 2 or 4 model shards), so both kv placements are exercised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gqa_t5x.training import partitioning

from paths import REPO, TESTS

# One worker runs the module's four sharded trainings (one subprocess) once.
pytestmark = pytest.mark.xdist_group("sharded_runs")


def test_mesh_rejects_num_partitions_that_do_not_divide_the_devices():
    with pytest.raises(ValueError, match="num_partitions=3"):
        partitioning.create_mesh(3, jax.devices()[:1] * 4)


def _eight_device_env() -> dict[str, str]:
    """Environment of a subprocess whose jax sees 8 simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


_BATCH_SIZE_CHECK = """
import json
import jax
from gqa_t5x.training import partitioning

p = partitioning.Partitioner(num_partitions=2, devices=jax.devices()[:8])
p.check_batch_size(8)
try:
    p.check_batch_size(6)
    error = None
except ValueError as e:
    error = str(e)
print(json.dumps({"mesh": dict(p.mesh.shape), "error": error}))
"""


def test_batch_size_must_divide_over_data_shards():
    proc = subprocess.run([sys.executable, "-c", _BATCH_SIZE_CHECK], env=_eight_device_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mesh"] == {"data": 4, "model": 2}
    assert result["error"] is not None and "BATCH_SIZE=6 must be divisible by the 4 data shards" in result["error"]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    env = _eight_device_env()
    runs = "1:1,1;1:8,1;1:4,2;1:2,4"
    proc = subprocess.run(
        [sys.executable, str(TESTS / "training_utils.py"), "--model_dir", str(out / "runs"),
         "--steps", "3", "--checkpoint_period", "100", "--dropout", "0.0",
         "--runs", runs, "--out", str(out / "result.json")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())["runs"]


@pytest.mark.parametrize("run", ["1:8,1", "1:4,2", "1:2,4"])
@pytest.mark.slow
def test_sharded_training_matches_single_device_loss_trajectory(sharded_runs, run):
    got, want = sharded_runs[run]["losses"], sharded_runs["1:1,1"]["losses"]
    assert len(got) == len(want) == 3
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert want[-1] < want[0]  # The model trains at all.


@pytest.mark.slow
def test_kv_heads_are_split_when_divisible_and_replicated_otherwise(sharded_runs):
    kv = "decoder/layers_0/self_attention/key/kernel"
    cross_v = "decoder/layers_1/encoder_decoder_attention/value/kernel"
    query = "decoder/layers_0/self_attention/query/kernel"
    enc_kv = "encoder/layers_0/attention/key/kernel"
    mqa_on_2 = sharded_runs["1:4,2"]["specs"]
    assert mqa_on_2[kv] == [None, None] and mqa_on_2[query] == [None, "model"]
    # Encoder self-attention stays multi-head (4 kv heads): split.
    assert mqa_on_2[enc_kv] == [None, "model"]
    mqa_on_4 = sharded_runs["1:2,4"]["specs"]
    assert mqa_on_4[kv] == [None, None] and mqa_on_4[cross_v] == [None, None]
    assert mqa_on_4[query] == [None, "model"]
    assert f"{kv}[1]" in sharded_runs["1:2,4"]["replicated"]
    assert mqa_on_4[enc_kv] == [None, "model"]
    assert sharded_runs["1:8,1"]["replicated"] == []
