"""Sweeps: expansion, validation, printed launch commands, failure isolation,
resumption, and a real tiny sweep end to end."""

from __future__ import annotations

import json
import os

import pytest

from gqa_t5x import cli
from gqa_t5x.experiments.sweeps import sweep

from paths import REPO


def _spec(**kw) -> sweep.SweepSpec:
    base = dict(name="t", model_gin="gin/models/t5_1_1/tiny.gin", base_checkpoint="/ckpt/checkpoint_0",
                num_kv_heads=(1, 2, 4), methods=("mean", "first"), alphas=(0.05,), tasks=("cnn_dailymail",))
    base.update(kw)
    return sweep.SweepSpec(**base)


def test_expand_gives_one_mha_point_plus_groups_times_methods_times_alphas():
    points = sweep.expand(_spec(alphas=(0.0, 0.05)), num_heads=4)
    names = [p.name for p in points]
    assert names[0] == "mha_a0" and points[0].method is None and points[0].num_kv_heads == points[0].num_heads
    assert sorted(names[1:]) == sorted(
        f"g{g}_{m}_a{a}" for g in (1, 2) for m in ("mean", "first") for a in ("0", "0.05")
    )
    assert {p.label for p in points if p.num_kv_heads == 1} >= {"MQA mean a=0.05", "MQA first a=0"}


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(num_kv_heads=(3,)), r"num_heads=4 is not divisible by SweepSpec.num_kv_heads=3; choose a divisor of 4: \[1, 2, 4\]"),
        (dict(methods=("median",)), "unknown method"),
        (dict(tasks=("squad",)), "unknown task"),
        (dict(base_checkpoint=""), "base_checkpoint is required"),
        (dict(alphas=(-0.1,)), "alphas must be >= 0"),
    ],
)
def test_invalid_sweeps_are_rejected_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        _spec(**changes).validate(num_heads=4)


def test_paper_sweep_gins_parse_and_cover_the_papers_ablations():
    groups = sweep.load_spec(os.path.join(REPO, "configs/sweeps/paper_groups.gin"))
    assert list(groups.num_kv_heads) == [1, 4, 8, 16, 32] and groups.model_gin.endswith("xxl.gin")
    alpha = sweep.load_spec(os.path.join(REPO, "configs/sweeps/paper_alpha.gin"))
    assert list(alpha.alphas) == [0.0, 0.05, 0.1]
    methods = sweep.load_spec(os.path.join(REPO, "configs/sweeps/paper_methods.gin"))
    assert list(methods.methods) == ["mean", "first", "random", "align"]
    for spec in (groups, alpha, methods):
        spec.validate(64 if spec.model_gin.endswith("xxl.gin") else 16)


def test_print_mode_prints_one_launch_command_per_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = cli.main(["sweep", "configs/sweeps/paper_methods.gin", "--output", str(tmp_path / "s"),
                     "--mode", "print", "--launcher", "scripts/tpu_pod_run.sh my-v4-128 us-central2-b --"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    converts = [l for l in lines if "gin/runs/convert.gin" in l]
    assert len(converts) == 4 and any("--gin.METHOD=\"align\"" in l for l in converts)
    # A conversion runs once, not on every worker of the slice.
    assert all(l.startswith("python -m gqa_t5x.main") and l.endswith("--run_mode=convert") for l in converts)
    uptrains = [l for l in lines if "gin/runs/uptrain.gin" in l]
    finetunes = [l for l in lines if "gin/runs/finetune.gin" in l]
    evals = [l for l in lines if "gin/runs/eval.gin" in l]
    assert len(uptrains) == 4  # the MHA point is not uptrained (alpha 0, as in the paper)
    assert len(finetunes) == len(evals) == 5 * 3  # 5 points x 3 tasks
    assert all(l.startswith("scripts/tpu_pod_run.sh my-v4-128 us-central2-b -- python -m gqa_t5x.main") for l in uptrains + finetunes)
    assert "--gin.NUM_KV_HEADS=1" in uptrains[0] and "--gin.UPTRAIN_ALPHA=0.05" in uptrains[0]
    assert not (tmp_path / "s").exists()  # Printing writes nothing.
    # Every command runs as printed: later stages find their input when they run, no placeholders.
    assert not [l for l in lines if "checkpoint_<" in l]
    newest = "@gqa_t5x.checkpoints.steps.latest_checkpoint()"
    uptrained = [l for l in finetunes if "/uptrain" in l]
    assert len(uptrained) == 4 * 3 and all(f"--gin.INITIAL_CHECKPOINT_PATH={newest}" in l for l in uptrained)
    assert all(f"--gin.CHECKPOINT_PATH={newest}" in l and "/best" in l for l in evals)


class _FakeStages(sweep.Runner):
    """Stages that only record calls; point 'g2_first_a0.05' fails once."""

    calls: list[str] = []
    fail_once = {"g2_first_a0.05"}

    def convert(self, point, run_dir):
        self.calls.append(f"convert {point.name}")
        return "ckpt"

    def uptrain(self, point, run_dir, initial):
        if point.name in self.fail_once:
            self.fail_once.discard(point.name)
            raise RuntimeError("simulated preemption-free crash")
        self.calls.append(f"uptrain {point.name}")
        return initial

    def finetune_and_eval(self, point, run_dir, initial, task):
        self.calls.append(f"finetune {point.name}")
        return 10.0 * point.num_kv_heads

    def time_per_sample(self, point, run_dir, checkpoint):
        return 0.01 * point.num_kv_heads


def test_a_failed_point_is_recorded_the_others_finish_and_a_rerun_only_redoes_it(tmp_path):
    spec = _spec()
    points = sweep.expand(spec, 4)
    runner = _FakeStages(spec, tmp_path, log=lambda s: None)
    results, failed = runner.run(points)
    assert failed == ["g2_first_a0.05"] and len(results) == 4
    failure = json.loads((tmp_path / "g2_first_a0.05" / "failed.json").read_text())
    assert "simulated" in failure["error"]
    assert not (tmp_path / "g2_first_a0.05" / "results.json").exists()

    _FakeStages.calls.clear()
    results, failed = _FakeStages(spec, tmp_path, log=lambda s: None).run(points)
    assert failed == [] and len(results) == 5
    assert _FakeStages.calls == ["convert g2_first_a0.05", "uptrain g2_first_a0.05", "finetune g2_first_a0.05"]
    assert not (tmp_path / "g2_first_a0.05" / "failed.json").exists()
    saved = json.loads((tmp_path / "g1_mean_a0.05" / "results.json").read_text())
    assert saved["scores"] == {"cnn_dailymail": 10.0} and saved["num_kv_heads"] == 1


@pytest.mark.slow
def test_tiny_sweep_runs_end_to_end_is_resumable_and_reports(shared_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "sweep"
    argv = ["sweep", "configs/sweeps/tiny_shared_data.gin", "--output", str(out), "--report"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    results = sorted(out.glob("*/results.json"))
    assert [p.parent.name for p in results] == sorted(
        ["mha_a0", "g1_mean_a0.05", "g1_first_a0.05", "g2_mean_a0.05", "g2_first_a0.05"])
    for path in results:
        r = json.loads(path.read_text())
        assert set(r["scores"]) == {"cnn_dailymail"} and r["time_per_sample"] > 0
    # Uptraining ran alpha * PRETRAIN_STEPS = 0.05 * 200 = 10 steps from step 0.
    assert (out / "g1_mean_a0.05" / "uptrain" / "checkpoint_10").is_dir()
    # Fine-tuning ran finetune_steps = 4 more (TRAIN_STEPS = @gqa_t5x.training.trainer.steps_after_checkpoint()).
    assert (out / "g1_mean_a0.05" / "finetune_cnn_dailymail" / "checkpoint_14").is_dir()
    for name in ("table1.md", "table1.csv", "quality_vs_time.png", "alpha.png", "methods.png", "time_vs_groups.png"):
        assert (out / "report" / name).stat().st_size > 0
    assert "| MQA mean a=0.05 |" in first

    mtimes = {p: p.stat().st_mtime_ns for p in results}
    assert cli.main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("finished earlier; skipped") == 5 and "[train]" not in second
    assert {p: p.stat().st_mtime_ns for p in results} == mtimes
