"""`python -m gqa_t5x.main` for the multi-process tests, optionally slowed.

Runs the launcher with the command line it is given (the flags a TPU pod
worker gets: gin files, --gin.X=Y, --multi_host --coordinator_address=...
--process_count=... --process_index=...). When `GQA_TEST_SLOW_BATCH_S` is
set, every batch read from the data cache takes that much longer, so a test
can kill a process mid-run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: training_utils


def main() -> None:
    from gqa_t5x import cli

    if os.environ.get("GQA_TEST_SLOW_BATCH_S"):
        from training_utils import slow_down_cache_batches

        slow_down_cache_batches(float(os.environ["GQA_TEST_SLOW_BATCH_S"]))
    cli.exit_process(cli.launcher_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
