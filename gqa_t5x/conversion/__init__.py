"""Multi-head -> grouped-query conversion of T5.1.1 checkpoints.

    config, params = convert(config, params, num_kv_heads=8, method="mean")
    convert_checkpoint(src, dst, 8, method="align")    # streaming, any format
    register_method(ConversionMethod("name", fn, KEY_VALUE, "doc"))   # a new method

Modules: `methods` (the registry and the built-in methods), `plan` (what a
conversion changes), `converter` (in memory and streaming), `alignment`
(align's maths), `value_limits` (plausibility of source values). See
docs/conversion.md.
"""

from gqa_t5x.conversion.alignment import (
    align_rotations,
    attention_error,
    group_rotations,
    rotate_heads,
)
from gqa_t5x.conversion.converter import convert, convert_checkpoint
from gqa_t5x.conversion.methods import (
    ALL_PROJECTIONS,
    KEY_VALUE,
    METHODS,
    AttentionLayer,
    ConversionMethod,
    convert_attention,
    divisors,
    get_method,
    group_heads,
    merge_heads,
    register_method,
    registered_methods,
)
from gqa_t5x.conversion.plan import (
    ConversionPlan,
    plan_conversion,
    split_attention_path,
)
from gqa_t5x.conversion.value_limits import (
    MAX_ABS_VALUE,
    UnusualValuesError,
    check_values,
)

__all__ = [
    "ALL_PROJECTIONS",
    "KEY_VALUE",
    "MAX_ABS_VALUE",
    "METHODS",
    "AttentionLayer",
    "ConversionMethod",
    "ConversionPlan",
    "UnusualValuesError",
    "align_rotations",
    "attention_error",
    "check_values",
    "convert",
    "convert_attention",
    "convert_checkpoint",
    "divisors",
    "get_method",
    "group_heads",
    "group_rotations",
    "merge_heads",
    "plan_conversion",
    "register_method",
    "registered_methods",
    "rotate_heads",
    "split_attention_path",
]
