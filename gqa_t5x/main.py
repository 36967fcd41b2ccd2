"""`python -m gqa_t5x.main`: T5X's launcher command line (see `gqa_t5x.launcher`)."""

import sys

from gqa_t5x import launcher

if __name__ == "__main__":
    sys.exit(launcher.main())
