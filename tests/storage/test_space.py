"""A full disk: the write's partial output goes, the previous checkpoint stays, one line says so.

Unit tests inject the error (ENOSPC from Python, tensorstore's text); the
end-to-end tests write into a real size-limited tmpfs mounted by the test
in a private mount namespace (`unshare -rm`), skipped with the reason where
mounting is not permitted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gqa_t5x import checkpoints
from gqa_t5x.storage import atomic
from gqa_t5x.storage import space

from paths import REPO, TESTS

TENSORSTORE_TEXT = ('RESOURCE_EXHAUSTED: Error writing "target.x/0" in OCDBT database at local file "/m/run/'
                    'checkpoint_4.orbax-checkpoint-tmp/": Failed to write 70664 bytes to file 5: No space left '
                    "on device [os_error_code='28']")


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    ValueError(TENSORSTORE_TEXT),
])
def test_full_disk_errors_are_recognised_in_any_clothes(error):
    assert space.is_out_of_space(error)
    try:  # Re-raised by another layer: found through the cause.
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("checkpoint save failed") from inner
    except RuntimeError as outer:
        assert space.is_out_of_space(outer)


@pytest.mark.parametrize("error", [OSError(errno.EACCES, "Permission denied"), ValueError("bad shape"), None])
def test_other_errors_are_not_taken_for_a_full_disk(error):
    assert not space.is_out_of_space(error)


def test_a_full_disk_inside_an_atomic_write_keeps_the_previous_directory(tmp_path):
    destination = tmp_path / "out"
    with atomic.AtomicDirectory(destination, marker="done", describe=lambda p: None) as target:
        (target.path / "data").write_text("previous")
        target.publish("ok")
    with pytest.raises(space.NoSpaceError) as raised:
        with atomic.AtomicDirectory(destination, marker="done", describe=lambda p: "a checkpoint",
                                    overwrite=True) as target:
            (target.path / "data").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(raised.value).startswith(f"no space left on {destination}: the write was stopped and its partial "
                                        "output removed")
    assert (destination / "data").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # No staging sibling is left.


def test_the_asyncio_and_absl_records_of_a_full_disk_are_dropped():
    import logging

    space.quiet_repeated_space_errors()
    record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Future exception was never retrieved",
                               None, (ValueError, ValueError(TENSORSTORE_TEXT), None))
    assert not logging.getLogger("asyncio").filter(record)
    other = logging.LogRecord("absl", logging.ERROR, __file__, 1, "something else failed", None, None)
    assert logging.getLogger("absl").filter(other)


# --------------------------------------------------------- a real full tmpfs
def _in_small_tmpfs(tmp_path: Path, size: str, script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `script` (bash) with a fresh tmpfs of `size` mounted at $MNT, in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed: cannot mount a size-limited filesystem")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"mounting a size-limited tmpfs is not permitted here: {probe.stderr.strip()}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, MNT=str(mnt), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_backend_optimization_level=0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(TESTS), os.environ.get("PYTHONPATH")])))
    wrapped = f"mount -t tmpfs -o size={size} tmpfs \"$MNT\" && {textwrap.dedent(script)}"
    return subprocess.run(["unshare", "-rm", "bash", "-c", wrapped], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def _tiny_checkpoint(path: Path) -> None:
    from gqa_t5x.model import initialization
    from training_utils import tiny_config

    config = tiny_config()
    checkpoints.save(path, config, initialization.init_params(config, seed=0), step=10)


@pytest.mark.slow
def test_convert_overwriting_onto_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    _tiny_checkpoint(tmp_path / "source")
    report = tmp_path / "report.json"
    done = _in_small_tmpfs(tmp_path, "800k", f"""  # One output (~484K) fits, two do not.
        set -u
        {sys.executable} -m gqa_t5x.cli convert --source {tmp_path / 'source'} --output "$MNT/out" \\
            --num_kv_heads 2 --no_progress || exit 90
        {sys.executable} -m gqa_t5x.cli convert --source {tmp_path / 'source'} --output "$MNT/out" \\
            --num_kv_heads 1 --no_progress --overwrite
        echo "status=$?"
        {sys.executable} -c "
import json, os, sys
from gqa_t5x import checkpoints
with checkpoints.open_checkpoint(os.environ['MNT'] + '/out') as r:
    kv = r.config.num_kv_heads
    ok = all(r.read(k).size for k in r.keys())
json.dump({{'kv': kv, 'readable': ok, 'entries': sorted(os.listdir(os.environ['MNT']))}}, open('{report}', 'w'))
"
    """)
    assert "status=1" in done.stdout, done.stdout + done.stderr
    ours = [line for line in done.stderr.splitlines() if line.startswith("gqa-t5x convert")]
    assert ours == [f"gqa-t5x convert: failed: no space left on {tmp_path / 'mnt' / 'out'}: the write was stopped "
                    "and its partial output removed; nothing at the destination changed (a checkpoint already "
                    "there is intact). Free space and rerun."], done.stderr
    kept = json.loads(report.read_text())
    assert kept == {"kv": 2, "readable": True, "entries": ["out"]}


@pytest.mark.slow
def test_training_onto_a_full_disk_keeps_the_last_checkpoint_and_removes_the_partial_one(tmp_path):
    report = tmp_path / "report.json"
    done = _in_small_tmpfs(tmp_path, "800k", f"""
        {sys.executable} {TESTS / 'training_utils.py'} --model_dir "$MNT/run" --steps 6 \\
            --checkpoint_period 2 --out {tmp_path / 'out.json'}
        echo "status=$?"
        {sys.executable} -c "
import json, os
from training_utils import read_checkpoint_params
run = os.environ['MNT'] + '/run'
params = read_checkpoint_params(run + '/checkpoint_2')
json.dump({{'entries': sorted(os.listdir(run)), 'finite': all(bool((v == v).all()) for v in params.values())}},
          open('{report}', 'w'))
"
    """)
    assert "status=1" in done.stdout, done.stdout + done.stderr[-3000:]
    run = tmp_path / "mnt" / "run"
    assert (f"NoSpaceError: no space left on {run}: checkpoint_4 could not be written and its partial output was "
            "removed; the newest complete checkpoint, checkpoint_2, is intact and a rerun resumes from it."
            ) in done.stderr, done.stderr[-3000:]
    assert "Future exception was never retrieved" not in done.stderr
    assert json.loads(report.read_text()) == {"entries": ["checkpoint_2", "train"], "finite": True}
