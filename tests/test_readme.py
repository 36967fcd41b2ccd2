"""The README's new-user block runs as written, from a fresh directory, offline."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from paths import REPO

HEADING = "## From a checkpoint to HuggingFace, uptraining, eval and infer"


def _block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(HEADING):]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


def test_the_block_uses_only_documented_set_up():
    block = _block()
    assert "export GQA_T5X_SHARED=/path/to/shared" in block
    assert "cd " in block and "../shared" not in block  # nothing relative to the checkout


@pytest.mark.slow
def test_the_new_user_block_runs_as_written_from_a_fresh_directory(shared_dir, tmp_path):
    block = _block().replace("/path/to/shared", str(shared_dir))
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)  # The installed package, as a user has it.
    done = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "Wrote HuggingFace T5ForConditionalGeneration and its T5 tokenizer" in out
    assert "Evaluation of uptrain/checkpoint_1020 (step 1020)" in out and "(percent, 0-100)" in out
    assert "[infer] 1 input -> inputs-predictions.jsonl" in out
    try_dir = tmp_path / "gqa-try"
    assert (try_dir / "gqa2_hf" / "spiece.model").exists()
    assert (try_dir / "uptrain" / "checkpoint_1020").is_dir() and (try_dir / "eval" / "metrics.json").exists()
    assert (try_dir / "inputs-predictions.jsonl").read_text().count("\n") == 1
    assert not REPO.joinpath("gqa-try").exists()
