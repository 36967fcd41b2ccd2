"""`gqa-t5x plan` end to end on a tiny random checkpoint: files, table, fronts, flag errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gqa_t5x import checkpoints, cli
from gqa_t5x.experiments.planning import report
from gqa_t5x.model import initialization
from gqa_t5x.model.config import T5Config

SOURCE = T5Config(vocab_size=32, emb_dim=8, num_heads=4, head_dim=2, mlp_dim=8, num_encoder_layers=1,
                  num_decoder_layers=2, dropout_rate=0.0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    checkpoints.save(root / "ckpt", SOURCE, initialization.init_params(SOURCE, 3))
    rng = np.random.default_rng(4)
    targets = rng.integers(2, 32, size=(6, 3)).astype(np.int32)
    targets[0, 2:] = 0
    np.savez(root / "heldout.npz", encoder_input_tokens=rng.integers(2, 32, size=(6, 5)).astype(np.int32),
             decoder_target_tokens=targets)
    return root


def _argv(root, *extra):
    return ["plan", "--checkpoint", str(root / "ckpt"), "--examples", str(root / "heldout.npz"), "--device", "h100",
            "--input_length", "64", "--output_length", "16", "--batch", "4", "--output", str(root / "out"), *extra]


@pytest.mark.slow  # 8 s end to end; the fast tier keeps the table and flag tests
def test_cli_plan_writes_the_table_json_and_figure_with_fronts(inputs, capsys):
    assert cli.main(_argv(inputs, "--max_candidates", "4", "--per_layer", "1", "--kv_budget_fraction", "0.5")) == 0
    out = capsys.readouterr().out
    plan = json.loads((inputs / "out" / "plan.json").read_text())
    assert (inputs / "out" / "plan.png").stat().st_size > 0
    rows = plan["rows"]
    assert [r["candidate"] for r in rows][:3] == ["G=4", "G=2", "G=1"]
    assert {r["family"] for r in rows} == {"uniform", "per-layer"}
    source = rows[0]
    assert source["loss_vs_source"] == 0.0 and source["speedup"] == 1.0 and source["kv_fraction"] == 1.0
    assert all(r["within_budget"] for r in rows if r["family"] == "per-layer")
    front = [(r["time_per_sample_s"], r["loss"]) for r in rows if r["front_time"]]
    assert front and all(not (a <= x and b <= y and (a < x or b < y))
                         for x, y in front for a, b in ((r["time_per_sample_s"], r["loss"]) for r in rows))
    assert report.format_table(plan) in out and "G=1" in out
    assert max(len(line) for line in report.format_table(plan).splitlines()) <= 120
    markdown = (inputs / "out" / "plan.md").read_text()
    assert "| candidate |" in markdown and "plan.png" in markdown and "max(bytes / bandwidth, FLOPs / peak)" in markdown


@pytest.mark.slow  # 10 s: a second end-to-end plan
def test_cli_plan_lists_similarity_grouped_candidates_beside_contiguous_ones(inputs, capsys, tmp_path):
    argv = _argv(inputs, "--max_candidates", "40", "--per_layer", "0", "--groupings", "contiguous,similarity",
                 "--calibration", str(inputs / "heldout.npz"))
    argv[argv.index("--output") + 1] = str(tmp_path / "sim")
    assert cli.main(argv) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "sim" / "plan.json").read_text())["rows"]
    by_name = {r["candidate"]: r for r in rows}
    # Every converted candidate is listed with both groupings; the source (no conversion) once.
    assert {"G=2", "G=2 sim", "G=1", "G=1 sim"} <= set(by_name) and "G=4 sim" not in by_name
    # MQA has one group: the grouping cannot change it.
    assert by_name["G=1 sim"]["loss"] == pytest.approx(by_name["G=1"]["loss"], abs=1e-6)
    assert by_name["G=2 sim"]["time_per_sample_s"] == by_name["G=2"]["time_per_sample_s"]


def test_report_table_sorts_by_predicted_time_and_marks_both_fronts():
    rows = [
        {"candidate": "G=4", "family": "uniform", "method": "mean", "kv_bytes": {"total": 4 * 2**20},
         "kv_fraction": 1.0, "within_budget": False, "time_per_sample_s": 2e-3, "speedup": 1.0, "loss": 1.0,
         "loss_vs_source": 0.0, "front_time": True, "front_kv": True},
        {"candidate": "G=1", "family": "uniform", "method": "mean", "kv_bytes": {"total": 2**20},
         "kv_fraction": 0.25, "within_budget": True, "time_per_sample_s": 1e-3, "speedup": 2.0, "loss": 2.0,
         "loss_vs_source": 1.0, "front_time": True, "front_kv": False},
    ]
    header, body = report.table_rows({"rows": rows})
    assert [row[0] for row in body] == ["G=1", "G=4"]
    front = header.index("front")
    assert [row[front] for row in body] == ["T", "TK"]
    assert body[0][header.index("d loss")] == "+1.0000"


@pytest.mark.parametrize("extra,message", [
    (("--groupings", "contiguous,nearest"), "--groupings"),
    (("--methods", "mean,unknown"), "--methods"),
    (("--batch", "0"), "--batch"),
])
def test_cli_plan_names_the_bad_flag(inputs, capsys, extra, message):
    assert cli.main(_argv(inputs, *extra)) == 2
    assert message in capsys.readouterr().err


def test_cli_plan_names_a_missing_checkpoint(inputs, capsys, tmp_path):
    argv = _argv(inputs)
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "nothing")
    assert cli.main(argv) == 2
    assert "--checkpoint" in capsys.readouterr().err
