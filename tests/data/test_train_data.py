"""`data.train_data`'s console notes: the streaming advice is given once per process."""

from __future__ import annotations

import numpy as np
import pytest

from gqa_t5x.data import train_data
from training_utils import dataset_config, register_synthetic_task


@pytest.fixture
def fresh_process(monkeypatch):
    """No advice given yet, as in a new process."""
    monkeypatch.setattr(train_data, "_advised", set())


def test_advice_is_given_once_per_key_then_the_reminder(fresh_process):
    assert train_data.advise_once("stream", "long advice", "short") == "long advice"
    assert train_data.advise_once("stream", "long advice", "short") == "short"
    assert train_data.advise_once("stream", "long advice") is None
    assert train_data.advise_once("other", "other advice", "x") == "other advice"


def test_a_process_streaming_many_runs_prints_the_cache_advice_once(fresh_process):
    # What a sweep or the study does: one training run after another in one process.
    register_synthetic_task()
    notes = []
    for start_row in (0, 0, 16):
        data = train_data.open_train_data(dataset_config(), start_row=start_row, host_rows=np.arange(8))
        notes.append(data.notes)
        data.close()
    first, second, resumed = notes
    assert len(first) == 1 and "DATA_CACHE_DIR is not set" in first[0] and "gqa-t5x cache" in first[0]
    assert second == ["[data] streaming gqa_test_synthetic from seqio (no DATA_CACHE_DIR)."]
    assert resumed == ["[data] streaming gqa_test_synthetic from seqio (no DATA_CACHE_DIR); "
                       "re-reading the 16 rows consumed before."]
    assert all("gqa-t5x cache" not in line for line in second + resumed)
