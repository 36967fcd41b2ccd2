"""The study's stage log (`study.stages.run_stages`), with the stages themselves stubbed."""

from __future__ import annotations

import pytest

from gqa_t5x.experiments.study import quickstart
from gqa_t5x.experiments.study import stages as study_stages

pytestmark = pytest.mark.study


class _Stages:
    """Stands in for `Stages`: every stage returns a made-up checkpoint path."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: f"/fake/{name}"


class _Data:
    def __init__(self, root):
        self.root = root
        self.info = root / "info.json"


def test_a_conversion_only_run_names_the_stages_it_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(study_stages, "Stages", _Stages)
    monkeypatch.setattr(study_stages.rdata, "StudyData", _Data)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "info.json").write_text("{}")  # prepared by an earlier session
    logged = []
    settings = quickstart.reduced_settings()
    study_stages.run_stages(tmp_path, settings, (0, 1), 100, None, None, logged.append)
    stages = [line for line in logged if line.startswith("[")]
    assert stages == [
        "[1/8] data: prepared by an earlier session",
        "[2/8] pre-training",
        "[3/8] calibration statistics",
        "[4/8] conversions at alpha = 0",
        "[5/8] uptraining: skipped: conversion only (alpha = 0), as the quickstart's settings ask",
        "[6/8] fine-tuning: skipped: conversion only (alpha = 0), as the quickstart's settings ask",
        "[7/8] time per sample: skipped: conversion only (alpha = 0), as the quickstart's settings ask",
    ]
