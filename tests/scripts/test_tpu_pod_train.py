"""scripts/tpu_pod_train.sh relaunches a worker after exit status 75 (preempted).

`gcloud` is replaced by a script that runs the worker command locally (as
`gcloud compute tpus tpu-vm ssh --worker=all --command=...` would on each
worker), and `python3` by one that exits as told: 75 (preempted after
saving) then 0, or a failure, which must end the worker at once.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from paths import REPO

SCRIPT = REPO / "scripts" / "tpu_pod_train.sh"

FAKE_GCLOUD = """#!/usr/bin/env bash
for arg in "$@"; do
  case "$arg" in --command=*) exec bash -c "${arg#--command=}" ;; esac
done
exit 0
"""

FAKE_PYTHON = """#!/usr/bin/env bash
calls=$(( $(cat "$CALLS" 2>/dev/null || echo 0) + 1 )); echo "$calls" > "$CALLS"
echo "python3 $* (call $calls)"
read -r -a statuses <<< "$STATUSES"
exit "${statuses[$((calls - 1))]:-0}"
"""


def _run(tmp_path: Path, statuses: str) -> tuple[subprocess.CompletedProcess, int]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("gcloud", FAKE_GCLOUD), ("python3", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path),
               REMOTE_DIR=str(tmp_path), PROJECT="p", MAX_RESTARTS="2", RESTART_DELAY_S="0", CALLS=str(tmp_path / "calls"),
               STATUSES=statuses)
    done = subprocess.run(["bash", str(SCRIPT), "tpu", "zone", "gs://b/run", "gs://b/ckpt/checkpoint_1000"],
                          env=env, capture_output=True, text=True, timeout=120)
    return done, int((tmp_path / "calls").read_text())


def test_a_preempted_worker_is_relaunched_and_the_run_ends_with_its_status(tmp_path):
    done, calls = _run(tmp_path, "75 0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls == 2
    assert "preempted (exit 75): relaunch 1 of 2" in done.stdout
    log = (tmp_path / "gqa_t5x_train.log").read_text()
    assert "-m gqa_t5x.main" in log and "--multi_host" in log and "(call 2)" in log


def test_a_failure_is_not_retried_and_restarts_are_bounded(tmp_path):
    done, calls = _run(tmp_path / "failed", "1 0")
    assert (done.returncode, calls) == (1, 1), done.stdout
    done, calls = _run(tmp_path / "always_preempted", "75 75 75 75")
    assert (done.returncode, calls) == (75, 3), done.stdout
