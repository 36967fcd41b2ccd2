"""Two studies compared (`replication.py`, `gqa-t5x compare-studies`), on the committed study's results."""

from __future__ import annotations

import copy
import json
import math

import pytest

from gqa_t5x import cli
from gqa_t5x.experiments.study import replication
from paths import REPO

COMMITTED = REPO / "docs" / "reproduction.json"


@pytest.fixture(scope="module")
def study() -> dict:
    return replication.load(COMMITTED)


def test_consistency_is_the_independent_difference_interval_holding_zero():
    a = {"low": 0.9, "high": 1.1}
    b = {"low": 1.1, "high": 1.3}  # half-widths 0.1 each: allowed = 0.1 * sqrt(2) = 0.1414
    far = replication.compare_values(1.0, a, 1.2, b)
    assert far["difference"] == pytest.approx(-0.2) and far["allowed"] == pytest.approx(0.1 * math.sqrt(2))
    assert far["consistent"] is False
    near = replication.compare_values(1.0, a, 1.14, {"low": 1.04, "high": 1.24})
    assert near["consistent"] is True
    no_interval = replication.compare_values(1.0, None, 1.2, b)
    assert no_interval["difference"] == pytest.approx(-0.2) and no_interval["consistent"] is None
    exact = replication.compare_values(0.87, {"low": 0.87, "high": 0.87}, 0.85, {"low": 0.85, "high": 0.85})
    assert exact["difference"] == pytest.approx(0.02) and exact["consistent"] is None
    missing = replication.compare_values(None, None, 1.2, b)
    assert missing["difference"] is None and missing["consistent"] is None


def test_a_study_against_itself_replicates_every_verdict_and_quantity_and_says_it_is_no_replication(study):
    result = replication.compare(study, copy.deepcopy(study))
    s = result["summary"]
    assert s["claims"] == len(study["claims"]) >= 5 and s["claims_replicated"] == s["claims"]
    assert s["beyond"] == len(study["beyond_paper"]) and s["beyond_replicated"] == s["beyond"]
    assert s["compared"] >= 40 and s["consistent"] == s["compared"] and not s["inconsistent"]
    assert all(r["difference"] == 0 for r in result["rows"] if r["difference"] is not None)
    sections = {r["section"] for r in result["rows"]}
    assert {"C1 (primary)", "C2 (primary)", "C4 (primary)", "B-align", "kept optimizer state", "groups",
            "uptraining saving", "recipe 2x2", "pre-training"} <= sections
    assert "determinism check, not a replication" in result["independence"]
    assert s["opposite_sign"] == [] and "Every quantity has the same sign in both runs." in replication.markdown(result)


def test_a_changed_verdict_and_a_moved_estimate_are_named(study):
    other = copy.deepcopy(study)
    other["seeds"] = [5, 6, 7, 8, 9]
    for session in other["sessions"]:
        session["pretrain_seed"] = 101
    c2 = next(c for c in other["claims"] if c["id"] == "C2")
    c2["verdict"] = "reproduced"
    iv = c2["primary"]["interval"]
    shift = 3 * (iv["high"] - iv["low"])
    c2["primary"]["estimate"] += shift
    iv["low"] += shift
    iv["high"] += shift
    result = replication.compare(study, other)
    assert result["summary"]["claims_replicated"] == result["summary"]["claims"] - 1
    assert [v["id"] for v in result["claims"] if not v["replicates"]] == ["C2"]
    assert result["summary"]["inconsistent"] == [f"C2 (primary): {c2['primary']['name']}"]
    assert result["summary"]["opposite_sign"] == [f"C2 (primary): {c2['primary']['name']}"]  # -0.0125 -> +0.0046
    assert "no uptraining seed is shared, and the pre-training seeds differ" == result["independence"]
    text = replication.markdown(result)
    assert "| C2 | " in text and "| **no** |" in text and "Not consistent: C2 (primary)" in text


def test_studies_of_different_settings_or_presets_are_refused_naming_the_fields(study):
    other = copy.deepcopy(study)
    other["settings"]["num_heads"] = 8
    other["settings"]["pretrain_steps"] = 2000
    with pytest.raises(ValueError, match=r"differ in num_heads, pretrain_steps \(num_heads: 16 vs 8"):
        replication.compare(study, other)
    reduced = copy.deepcopy(study)
    reduced["reduced_run"] = True
    with pytest.raises(ValueError, match="reduced run"):
        replication.compare(study, reduced)


def test_load_finds_the_report_of_a_study_output_and_names_what_is_missing(tmp_path):
    (tmp_path / "out" / "report").mkdir(parents=True)
    (tmp_path / "out" / "report" / "reproduction.json").write_text(COMMITTED.read_text())
    assert replication.load(tmp_path / "out")["claims"]
    with pytest.raises(ValueError, match="empty: no reproduction.json there"):
        (tmp_path / "empty").mkdir()
        replication.load(tmp_path / "empty")
    (tmp_path / "other.json").write_text(json.dumps({"points": []}))
    with pytest.raises(ValueError, match="other.json is not a study's reproduction.json"):
        replication.load(tmp_path / "other.json")


def test_compare_studies_command_writes_markdown_and_json_and_refuses_a_missing_study(tmp_path, capsys):
    assert cli.main(["compare-studies", str(COMMITTED), str(COMMITTED.parent), "--output", str(tmp_path / "r")]) == 0
    assert "# Replication: two runs of the study" in capsys.readouterr().out
    written = json.loads((tmp_path / "r" / "replication.json").read_text())
    assert written["summary"]["claims_replicated"] == written["summary"]["claims"]
    assert (tmp_path / "r" / "replication.md").read_text().startswith("# Replication")
    code = cli.main(["compare-studies", str(COMMITTED), str(tmp_path / "nowhere"), "--output", str(tmp_path / "s")])
    assert code == 2 and "nowhere: no reproduction.json there" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
