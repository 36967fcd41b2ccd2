"""Tests of gqa_t5x/experiments/study/settings.py: the study's runs, their data rows and names."""

from __future__ import annotations

import dataclasses

import pytest

from gqa_t5x.experiments.study import settings as ss
from gqa_t5x.experiments.study.settings import StudySettings

SEEDS = (0, 1, 2, 3, 4)


def test_uptraining_continues_after_pretraining_rows_with_a_disjoint_stretch_per_seed():
    s = StudySettings()
    stretches = [range(s.data_row(seed), s.data_row(seed) + s.uptrain_rows) for seed in SEEDS]
    assert stretches[0].start == s.pretrain_steps * s.batch_size  # the row after pre-training's last
    for a, b in zip(stretches, stretches[1:]):
        assert a.stop <= b.start  # no row read by two seeds
    assert s.uptrain_rows == s.alpha_steps(max(s.alphas)) * s.batch_size


def test_a_replayed_run_starts_at_row_zero_and_a_negative_seed_is_refused():
    s = StudySettings()
    assert s.data_row(3, replay=True) == 0
    with pytest.raises(ValueError, match="non-negative"):
        s.data_row(-1)


def test_the_cache_holds_every_row_any_run_reads():
    s = StudySettings()
    runs = s.uptrain_runs(SEEDS)
    last = max(s.data_row(r.seed, r.replays) + s.alpha_steps(max(r.alphas)) * s.batch_size for r in runs)
    assert last <= s.cache_rows(SEEDS) < last + s.uptrain_rows


def test_the_study_runs_five_seeds_ten_for_random_the_2x2_and_the_kept_state_recipe():
    s = StudySettings()
    runs = s.uptrain_runs(SEEDS)
    seeds_of = lambda kv, method: sorted(r.seed for r in runs if (r.kv_heads, r.method) == (kv, method))
    assert seeds_of(16, None) == list(SEEDS)
    assert seeds_of(1, "random") == list(range(10)) and not seeds_of(2, "random")  # C1 is MQA's (Fig. 4)
    assert seeds_of(1, "align-keep") == list(SEEDS) and seeds_of(2, "align-keep") == list(SEEDS)
    assert seeds_of(1, "mean-keep") == list(SEEDS) and seeds_of(2, "mean-keep") == list(SEEDS)
    assert not seeds_of(4, "mean-keep")  # the groups curve runs the paper's recipe only
    assert seeds_of(16, ss.FRESH) == list(SEEDS)
    assert seeds_of(16, ss.REPLAY) == [0] and seeds_of(16, ss.REPLAY_FRESH) == [0]  # same data for every seed
    assert seeds_of(4, "mean") == list(SEEDS) and not seeds_of(4, "align")
    alphas = {(r.kv_heads, r.method): r.alphas for r in runs}
    assert alphas[(1, "mean")] == alphas[(16, None)] == (0.025, 0.05, 0.1)  # Fig. 5's curve
    # where align reaches mean at 0.05, down to 8x less uptraining
    assert alphas[(1, "align")] == alphas[(1, "align-keep")] == (0.00625, 0.0125, 0.025, 0.05)
    assert alphas[(1, "first")] == alphas[(16, ss.FRESH)] == alphas[(4, "mean")] == (0.05,)
    assert alphas[(1, "mean-keep")] == alphas[(2, "mean-keep")] == (0.05,)  # does keeping help mean at 0.05?
    names = [ss.uptrain_run(r.kv_heads, 16, r.method, r.seed) for r in runs]
    assert len(set(names)) == len(names)


def test_recipes_say_which_runs_keep_the_optimizer_state_and_which_replay_the_data():
    run = lambda method: ss.UptrainRun(16 if method in (None, *ss.MHA_RECIPES) else 1, method, 0, (0.05,))
    assert run(None).keeps_state and not run(None).replays
    assert not run(ss.FRESH).keeps_state and not run(ss.FRESH).replays
    assert run(ss.REPLAY).keeps_state and run(ss.REPLAY).replays
    assert not run(ss.REPLAY_FRESH).keeps_state and run(ss.REPLAY_FRESH).replays
    assert run("align-keep").keeps_state and not run("align").keeps_state


def test_labels_and_evaluation_keys():
    assert ss.split_label("align-keep") == ("align", "keep") and ss.split_label("mean") == ("mean", None)
    assert ss.eval_key(1, 16, "align-keep", 0.05, 3) == "g1_align-keep_a0.05_s3"
    assert ss.eval_key(1, 16, "align-keep", 0.0, 3) == "g1_align_a0"  # not uptrained: the recipe does not apply
    assert ss.eval_key(16, 16, ss.REPLAY, 0.05, 0) == "mha-replay_a0.05_s0"
    assert ss.eval_key(16, 16, None, 0.05, 0) == "mha_a0.05_s0"
    assert ss.conversion_name(1, "align-keep", None) == "g1_align"


@pytest.mark.parametrize("changes, message", [
    ({"group_kv_heads": (3,)}, "group_kv_heads"),
    ({"group_kv_heads": (2,)}, "repeats gqa_kv_heads"),
    ({"keep_state_methods": ("svd",)}, "keep_state_methods"),
    ({"curve_methods": ("svd",)}, "curve_methods"),
])
def test_invalid_settings_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(StudySettings(), **changes).validate()


def test_the_default_reduced_and_quickstart_settings_are_valid():
    for settings in (StudySettings(), StudySettings.reduced(), StudySettings.quickstart()):
        settings.validate()
    assert StudySettings().num_heads // StudySettings().gqa_kv_heads == 8  # the paper's GQA-8 of 64 heads


def test_presets_name_the_cpu_gpu_and_reduced_settings_and_the_gpu_one_keeps_the_papers_head_ratio():
    assert StudySettings.preset("cpu") == StudySettings()
    assert StudySettings.preset("reduced") == StudySettings.reduced()
    gpu = StudySettings.preset("gpu")
    gpu.validate()
    assert gpu.num_heads // gpu.gqa_kv_heads == 8 and gpu.emb_dim == gpu.num_heads * gpu.head_dim == 512
    assert gpu.cache_rows(SEEDS) == 2 * StudySettings().cache_rows(SEEDS) == 256_000
    assert gpu.timing_model == (1024, 64, 2816, 24) and not gpu.is_reduced
    with pytest.raises(ValueError, match="--preset 'tpu' is not a study preset; choose one of cpu, gpu, reduced"):
        StudySettings.preset("tpu")
