"""The planner: Pareto fronts, the time model, device ceilings, examples and settings errors."""

from __future__ import annotations

import numpy as np
import pytest

from gqa_t5x.experiments import roofline
from gqa_t5x.experiments.planning import planner
from gqa_t5x.model.config import T5Config

CONFIG = T5Config(vocab_size=32, emb_dim=8, num_heads=4, head_dim=2, mlp_dim=8, num_encoder_layers=1,
                  num_decoder_layers=2, dropout_rate=0.0, num_kv_heads=2)


def test_pareto_front_on_hand_made_points():
    points = [(1.0, 5.0), (2.0, 4.0), (2.0, 4.5), (3.0, 4.0), (4.0, 3.0), (4.0, 3.0), (5.0, 3.5)]
    assert planner.pareto_front(points) == [True, True, False, False, True, True, False]
    assert planner.pareto_front([]) == []
    assert planner.pareto_front([(1.0, 1.0)]) == [True]


def test_predicted_time_per_sample_is_the_phase_bounds_over_the_batch():
    device = planner.Device("test", bandwidth_gbs=10.0, peak_gflops=3.0, dtype="bfloat16", source="hand-made")
    got = planner.predict(CONFIG, device, batch=4, input_length=6, output_length=5)
    bound = {name: cost.bound_s(10.0, 3.0) for name, cost in (
        ("encoder", roofline.encoder_cost(CONFIG, 4, 6, 2)),
        ("cache_build", roofline.cache_build_cost(CONFIG, 4, 6, 2)),
        ("decode_step", roofline.decode_step_cost(CONFIG, 4, 6, 5, itemsize=2)))}
    assert got["phase_s"] == pytest.approx(bound)
    assert got["time_per_sample_s"] == pytest.approx(
        (bound["encoder"] + bound["cache_build"] + 5 * bound["decode_step"]) / 4)
    assert got["kv_bytes"]["total"] == 2 * (2 * 4 * 2 * 2 * 2 * 5 + 2 * 4 * 2 * 2 * 2 * 6)  # bfloat16: 2 bytes
    assert got["kv_bytes_per_sample"] == got["kv_bytes"]["total"] / 4


def test_device_presets_use_the_published_peaks_and_cpu_is_measured():
    h100 = planner.device_ceilings("h100")
    assert (h100.bandwidth_gbs, h100.peak_gflops, h100.dtype) == (3350.0, 989_000.0, "bfloat16")
    assert planner.device_ceilings("a100", "float32").peak_gflops == 19_500.0
    for preset in planner.DEVICES:
        if preset != "cpu":
            assert planner.device_ceilings(preset).bandwidth_gbs > 0
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        planner.device_ceilings("tpu-v4", "float32")
    with pytest.raises(ValueError, match="--device='gpu'"):
        planner.device_ceilings("gpu")
    measured = {"bandwidth_gbs": {"best": 12.5}, "matmul_peak_gflops": 40.0, "device_kind": "cpu"}
    cpu = planner.device_ceilings("cpu", measure=lambda dtype: measured)
    assert (cpu.bandwidth_gbs, cpu.peak_gflops, cpu.dtype, cpu.itemsize) == (12.5, 40.0, "float32", 4)


def test_load_examples_keeps_evenly_spaced_rows_and_names_the_file_when_wrong(tmp_path):
    path = tmp_path / "heldout.npz"
    enc = np.arange(10 * 3).reshape(10, 3)
    np.savez(path, encoder_input_tokens=enc, decoder_target_tokens=enc[:, :2], article=np.arange(10))
    got = planner.load_examples(path, max_examples=4)
    np.testing.assert_array_equal(got["encoder_input_tokens"][:, 0], [0, 9, 18, 27])  # rows 0, 3, 6, 9
    assert got["decoder_target_tokens"].dtype == np.int32 and set(got) == set(planner.EXAMPLE_FEATURES)
    assert planner.load_examples(path)["encoder_input_tokens"].shape == (10, 3)
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=enc)
    with pytest.raises(ValueError, match=r"--examples .*bad.npz lacks"):
        planner.load_examples(bad)
    with pytest.raises(FileNotFoundError, match="--examples"):
        planner.load_examples(tmp_path / "missing.npz")


@pytest.mark.parametrize("changes,flag", [
    (dict(batch=0), "--batch"),
    (dict(kv_budget_bytes=10.0, kv_budget_fraction=0.5), "--kv_budget_bytes or --kv_budget_fraction"),
    (dict(kv_budget_fraction=1.5), "--kv_budget_fraction"),
    (dict(methods=("mean", "nearest")), "--methods"),
    (dict(methods=("lsq",)), "--calibration"),
    (dict(device="tpu"), "--device"),
    (dict(max_examples=0), "--max_examples"),
])
def test_invalid_settings_name_their_flag(changes, flag):
    base = dict(checkpoint="c", examples="e.npz", device="h100", input_length=8, output_length=4, batch=2)
    settings = planner.PlanSettings(**{**base, **changes})
    with pytest.raises(ValueError, match=flag):
        settings.validate()


def test_similarity_grouping_needs_calibration_statistics_and_unknown_groupings_are_refused():
    base = dict(checkpoint="c", examples="e.npz", device="h100", input_length=8, output_length=4, batch=2)
    with pytest.raises(ValueError, match="--groupings similarity needs calibration statistics: pass --calibration"):
        planner.PlanSettings(**base, groupings=("contiguous", "similarity")).validate()
    planner.PlanSettings(**base, groupings=("contiguous", "similarity"), calibration="cal.npz").validate()
    with pytest.raises(ValueError, match="--groupings=nearest: choose from"):
        planner.PlanSettings(**base, groupings=("nearest",)).validate()