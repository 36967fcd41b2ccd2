"""scripts/accelerator_check: each step bounded and kept; the whole check dry-runs on a CPU."""

from __future__ import annotations

import importlib.util
import json
import os
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


# What the GPU image lacks (jax, flax, optax, orbax, tensorstore, torch and transformers only, plus
# gin-config): a sitecustomize that makes these imports fail as if they were not installed.
NOT_ON_THE_GPU_IMAGE = ("tensorflow", "seqio", "tensorflow_datasets", "clu")


def _gpu_image_env(tmp_path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"for name in {NOT_ON_THE_GPU_IMAGE!r}:\n"
        "    sys.modules[name] = None  # imports fail; importlib.util.find_spec gives None\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))


@pytest.mark.slow
def test_the_accelerator_check_dry_runs_every_step_on_a_cpu_without_tensorflow_seqio_or_clu(tmp_path):
    env = _gpu_image_env(tmp_path)
    for name in NOT_ON_THE_GPU_IMAGE:  # the block holds in the check's processes
        assert subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True).returncode
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(REPO / "scripts" / "accelerator_check.sh"), str(out), "--dry_run"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "accelerator_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["parity", "paper", "huggingface", "train"]
    assert all(s["status"] == "ok" for s in report["steps"])
    steps = {s["step"]: s["result"] for s in report["steps"]}
    assert steps["parity"]["max_relative_logit_difference"] < 1e-4
    assert [r["variant"] for r in steps["paper"]["rows"]] == ["MHA", "GQA-2", "MQA"]
    assert len(steps["train"]["results"]) == 2
    # HuggingFace ran in its own process, at the paper step's shape and batch.
    (hf,) = steps["huggingface"]["huggingface"]
    assert (hf["input_length"], hf["output_length"], hf["batch"]) == (16, 4, steps["paper"]["rows"][0]["batch"])
    assert steps["huggingface"]["weights"] == "HuggingFace's random initialisation"
    markdown = (out / "accelerator_check.md").read_text()
    assert "No accelerator: these numbers come from a CPU" in markdown
    assert "Against HuggingFace T5 on the same device (cpu, float32, batch 2, its own process)" in markdown
    assert markdown.count("| MHA |") == 1 and "| MQA |" in markdown
    for name in ("parity", "paper", "huggingface", "train"):
        assert (out / f"{name}.log").exists()


def _step(name, result):
    return {"step": name, "result": result}


def test_the_report_sets_each_paper_row_against_huggingface_and_says_when_batches_differ():
    check = _module()
    paper = {"rows": [{"variant": "MHA", "time_per_sample_s": 0.05, "batch": 32},
                      {"variant": "MQA", "time_per_sample_s": 0.02, "batch": 32}]}
    hf = {"device": "NVIDIA H100 80GB HBM3", "huggingface": [{"time_per_sample_s": 0.1, "batch": 32, "dtype": "bfloat16"}]}
    lines = check._versus_huggingface([_step("parity", {}), _step("paper", paper), _step("huggingface", hf)])
    assert "| MHA | 0.0500 (32) | 0.1000 | 2.00x | no |" in lines
    assert "| MQA | 0.0200 (32) | 0.1000 | 5.00x | yes |" in lines
    assert not any("smaller batch" in line for line in lines)
    paper["rows"][0]["batch"] = 16
    lines = check._versus_huggingface([_step("paper", paper), _step("huggingface", hf)])
    assert any("Ours ran a smaller batch than HuggingFace" in line for line in lines)
    # A step that failed leaves no table (and no error).
    assert check._versus_huggingface([_step("paper", None), _step("huggingface", hf)]) == []
