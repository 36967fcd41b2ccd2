"""`gqa-t5x compare-plan`: planned kv heads uptrained on a study's model, paired with its uniform GQA."""

from __future__ import annotations

import json

import pytest

from gqa_t5x import checkpoints
from gqa_t5x import cli
from gqa_t5x.experiments.study import planned
from gqa_t5x.experiments.study.settings import StudySettings

# One worker builds the session's reduced study (about 2 minutes) for this module and test_reproduction.py.
pytestmark = [pytest.mark.study, pytest.mark.xdist_group("reduced_study")]


def test_a_variant_is_self_and_cross_counts_and_anything_else_is_refused_by_name():
    variant = planned.parse_variant("1,1/2,4", reference=2)
    assert variant.decoder_self == (1, 1) and variant.decoder_cross == (2, 4)
    assert variant.name == "self1-1_cross2-4_mean"
    assert variant.bindings() == ("DECODER_SELF_KV_HEADS=(1, 1)", "DECODER_CROSS_KV_HEADS=(2, 4)")
    assert planned.parse_variant("1/4", 2, grouping="similarity").name == "self1_cross4_mean_similarity"
    for text in ("1,1", "1,x/2", "1/2/3"):
        with pytest.raises(ValueError, match=f"'{text}' is not SELF/CROSS kv-head counts"):
            planned.parse_variant(text, reference=2)


@pytest.mark.slow
def test_compare_plan_uptrains_each_seed_on_the_studys_rows_and_pairs_it_with_the_uniform_run(reduced_study, tmp_path,
                                                                                                 capsys):
    study, out = reduced_study, tmp_path / "planned"
    s = StudySettings.reduced()
    # Refused before anything is written: a count that does not divide the heads, a reference not run.
    assert cli.main(["compare-plan", "--study", str(study), "--output", str(out), "--variant", "3/2"]) == 2
    assert "decoder_self_kv_heads[0]=3" in capsys.readouterr().err
    assert cli.main(["compare-plan", "--study", str(study), "--output", str(out), "--variant", "1/4",
                     "--reference", "8"]) == 2
    assert "no uniform GQA-8 to compare with" in capsys.readouterr().err
    assert not out.exists()

    args = ["compare-plan", "--study", str(study), "--output", str(out), "--variant", "1/4", "--seeds", "0,1",
            "--input_length", "100", "--output_length", "10"]
    assert cli.main(args) == 0
    results = json.loads((out / "planned.json").read_text())
    [variant] = results["variants"]
    assert variant["reference"] == f"GQA-{s.gqa_kv_heads}" and [c["alpha"] for c in variant["cells"]] == [0.0, 0.05]
    # Cache numbers by hand: one decoder layer, keys + values of head_dim 4.
    head_dim = s.head_dim
    assert variant["kv_cache_numbers"] == 2 * head_dim * (1 * 10 + 4 * 100)
    assert variant["reference_kv_cache_numbers"] == 2 * head_dim * s.gqa_kv_heads * (10 + 100)
    for cell in variant["cells"]:
        d = cell["difference"]
        assert d["low"] <= d["mean"] <= d["high"] and 0 <= cell["holm_p"] <= 1
    assert variant["cells"][1]["difference"]["n"] == 2  # paired over both seeds
    # Each seed read the rows the study's uniform run of that seed read, with a fresh optimizer state.
    for seed in (0, 1):
        ours = json.loads((out / "markers" / f"uptrain_self1_cross4_mean_s{seed}.done.json").read_text())
        theirs = json.loads((study / "markers" / f"uptrain_g{s.gqa_kv_heads}_mean_s{seed}.done.json").read_text())
        assert ours["data_row"] == theirs["data_row"] and ours["optimizer_state"] is None
    final = out / "uptrain" / "self1_cross4_mean_s0" / f"checkpoint_{s.pretrain_steps + s.alpha_steps(0.05)}"
    with checkpoints.open_checkpoint(final) as reader:
        assert reader.config.layer_kv_heads("self") == (1,) and reader.config.layer_kv_heads("cross") == (4,)
        assert reader.shape("decoder/layers_0/self_attention/key/kernel") == (s.emb_dim, head_dim)
    assert "| 1 / 4 | mean | GQA-2 |" in (out / "planned.md").read_text()
    # A rerun resumes: nothing is trained or scored again.
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "[uptrain]" not in capsys.readouterr().out


@pytest.mark.slow
def test_compare_plan_with_the_similarity_grouping_collects_its_own_statistics_and_records_the_groups(
        reduced_study, tmp_path):
    out = tmp_path / "similar"
    assert cli.main(["compare-plan", "--study", str(reduced_study), "--output", str(out), "--variant", "2/2",
                     "--grouping", "similarity", "--seeds", "0,1"]) == 0
    from gqa_t5x.conversion import calibration

    statistics = calibration.load_statistics(out / "stats" / "calibration.npz")
    assert any("key_second_moment" in layer for layer in statistics.values())  # cross-attention's inputs
    with checkpoints.open_checkpoint(out / "convert" / "self2_cross2_mean_similarity") as reader:
        record = reader.metadata["conversion"]["grouping"]
    assert record["name"] == "similarity" and "decoder/layers_0/encoder_decoder_attention" in record["layers"]
    [variant] = json.loads((out / "planned.json").read_text())["variants"]
    assert variant["grouping"] == "similarity" and variant["kv_cache_numbers"] == variant["reference_kv_cache_numbers"]
