"""Transitional alias: HuggingFace export now lives in `checkpoints.huggingface`.

Kept only so that callers outside the checkpoints package keep working while
they are migrated (gqa_t5x/cli.py `_run_export`, gqa_t5x/experiments/
benchmark.py `_hf_model`, tests/model/test_decoding.py); import
`gqa_t5x.checkpoints.huggingface` instead. Delete this module once none of
them imports it.
"""

from gqa_t5x.checkpoints.huggingface import (  # noqa: F401
    export_huggingface,
    export_huggingface_checkpoint,
    hf_config_dict,
    repeat_kv_heads,
)
