"""Multi-head -> grouped-query conversion of T5.1.1 checkpoints.

    config, params = convert(config, params, num_kv_heads=8, method="mean")
    convert_checkpoint(src, dst, 8, method="align")    # streaming, any format
    register_method(ConversionMethod("name", fn, KEY_VALUE, "doc"))   # a new method
    stats = collect_statistics(config, params, batches)          # for data-aware methods
    convert_checkpoint(src, dst, 1, method="lsq", calibration=stats)
    convert_checkpoint(src, dst, 2, grouping="similarity", calibration=stats)  # groups by similarity
    convert_checkpoint(src, dst2, 2, grouping=dst)                # the same groups, from the record

Modules: `methods` (the registry and the built-in methods), `plan` (what a
conversion changes), `grouping` (which heads each group pools), `converter` (in memory and streaming), `alignment`
(align's maths), `least_squares` (lsq's maths), `calibration` (statistics of
the source model for data-aware methods). The plausibility of source values
is checked by every checkpoint reader (`checkpoints.value_limits`). See
docs/conversion.md.
"""

from gqa_t5x.conversion.alignment import (
    align_rotations,
    attention_error,
    group_rotations,
    rotate_heads,
)
from gqa_t5x.conversion.calibration import (
    collect_statistics,
    load_statistics,
    save_statistics,
)
from gqa_t5x.conversion.converter import convert, convert_checkpoint
from gqa_t5x.conversion.grouping import (
    GROUPINGS,
    Grouping,
    GroupingStrategy,
    load_record,
    pair_costs,
    partition,
    permute_heads,
)
from gqa_t5x.conversion.least_squares import least_squares_pool
from gqa_t5x.conversion.methods import (
    ALL_PROJECTIONS,
    KEY_VALUE,
    METHODS,
    AttentionLayer,
    ConversionMethod,
    convert_attention,
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
from gqa_t5x.checkpoints.value_limits import (  # Checked by every checkpoint reader.
    MAX_ABS_VALUE,
    UnusualValuesError,
    check_values,
)
from gqa_t5x.model.config import divisors

__all__ = [
    "ALL_PROJECTIONS",
    "GROUPINGS",
    "Grouping",
    "GroupingStrategy",
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
    "collect_statistics",
    "convert",
    "convert_attention",
    "convert_checkpoint",
    "divisors",
    "get_method",
    "group_heads",
    "group_rotations",
    "least_squares_pool",
    "load_record",
    "load_statistics",
    "merge_heads",
    "pair_costs",
    "partition",
    "permute_heads",
    "plan_conversion",
    "register_method",
    "registered_methods",
    "rotate_heads",
    "save_statistics",
    "split_attention_path",
]
