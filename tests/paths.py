"""Locations the tests use: the repository, the tests folder, ../shared."""

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED = Path(os.environ.get("GQA_T5X_SHARED", REPO.parent / "shared"))
