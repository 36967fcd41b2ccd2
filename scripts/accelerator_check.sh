#!/usr/bin/env bash
# One command for one GPU or TPU chip (within 10 minutes): parity with
# HuggingFace T5, `gqa-t5x bench --preset paper` for MHA / GQA-8 / MQA,
# HuggingFace T5 on the same device at the same shape, and our train step's
# tokens/s and MFU; each step under its own time limit, one report.
#
# Usage:
#   bash scripts/accelerator_check.sh OUT_DIR [--dry_run]
#
# On an image without gqa-t5x installed: pip install gin-config (a wheel
# carried along works offline), then run this from the checkout; the package
# is put on PYTHONPATH. TensorFlow and seqio are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python scripts/accelerator_check.py "$@"
