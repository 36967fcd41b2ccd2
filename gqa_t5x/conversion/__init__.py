"""Multi-head -> grouped-query conversion of T5.1.1 checkpoints."""

from gqa_t5x.conversion.converter import *  # noqa: F401,F403
from gqa_t5x.conversion.converter import (  # noqa: F401
    METHODS, ConversionPlan, convert, convert_attention, convert_checkpoint, plan_conversion,
    split_attention_path, align_rotations, attention_error, group_rotations, rotate_heads,
)
