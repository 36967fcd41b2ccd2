"""The reduced study that several study tests read (run once per session)."""

from __future__ import annotations

import pytest

from gqa_t5x import cli


@pytest.fixture(scope="session")
def reduced_study(tmp_path_factory, shared_dir):
    """OUTPUT of `gqa-t5x reproduce --reduced --seeds 0,1` (tests only read it or copy it)."""
    out = tmp_path_factory.mktemp("study")
    code = cli.main(["reproduce", "--output", str(out / "run"), "--reduced", "--seeds", "0,1",
                     "--shared_dir", str(shared_dir)])
    assert code == 0
    return out / "run"
