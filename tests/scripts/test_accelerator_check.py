"""scripts/accelerator_check: each step bounded and kept; the whole check dry-runs on a CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from paths import REPO


def _module():
    spec = importlib.util.spec_from_file_location("accelerator_check", REPO / "scripts" / "accelerator_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_step_that_hangs_after_writing_its_result_is_killed_and_reported(tmp_path):
    check = _module()
    hang = [sys.executable, "-c", "import json, sys, time; open(sys.argv[1] + '.json', 'w').write(json.dumps("
            "{'x': 1})); print('done', flush=True); time.sleep(60)", "{out}"]
    step = check._run_step("hang", 3, hang, tmp_path)
    assert step["status"] == "timed out after 3 s (its result was written: the process did not exit after finishing)"
    assert step["result"] == {"x": 1} and step["wall_s"] < 30
    assert "done" in (tmp_path / "hang.log").read_text()
    failed = check._run_step("fail", 30, [sys.executable, "-c", "raise SystemExit(3)"], tmp_path)
    assert failed["status"] == "failed (exit 3)" and failed["result"] is None


@pytest.mark.slow
def test_the_accelerator_check_dry_runs_every_step_on_a_cpu(tmp_path):
    done = subprocess.run(["bash", str(REPO / "scripts" / "accelerator_check.sh"), str(tmp_path), "--dry_run"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "accelerator_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["parity", "paper", "huggingface", "train"]
    assert all(s["status"] == "ok" for s in report["steps"])
    steps = {s["step"]: s["result"] for s in report["steps"]}
    assert steps["parity"]["max_relative_logit_difference"] < 1e-4
    assert [r["variant"] for r in steps["paper"]["rows"]] == ["MHA", "GQA-2", "MQA"]
    assert steps["huggingface"]["huggingface"] and len(steps["train"]["results"]) == 2
    markdown = (tmp_path / "accelerator_check.md").read_text()
    assert "No accelerator: these numbers come from a CPU" in markdown
    for name in ("parity", "paper", "huggingface", "train"):
        assert (tmp_path / f"{name}.log").exists()
