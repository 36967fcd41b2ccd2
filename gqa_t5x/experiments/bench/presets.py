"""Named settings of `gqa-t5x bench` (`--preset`) and the defaults a preset may set.

The command line leaves these flags unset (None) so that a flag given
explicitly wins over the preset, and the preset over the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULTS: dict[str, Any] = dict(
    gin_file="gin/models/t5_1_1/large.gin", num_kv_heads=None, input_length=(512,), output_length=(128,),
    batch_size=(16,), dtype="float32", param_dtype="float32", no_huggingface=False, label="",
    attention_query_chunk=None, memory_fraction=0.5)

# `--preset paper`: the paper's Table 1 / Figure 6 setting (XXL, all 24+24
# layers, input 2048, output 512, batch 32 per chip, bfloat16, MHA / GQA-8 /
# MQA), sized for an accelerator: the encoder attends in blocks of 256 queries
# (`T5Config.attention_query_chunk`) and may plan with 90% of the device's free
# memory, so batch 32 fits an 80 GB chip by the bench's estimate.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(gin_file="gin/models/t5_1_1/xxl.gin", num_kv_heads=(1, 8, 64), input_length=(2048,),
                  output_length=(512,), batch_size=(32,), dtype="bfloat16", param_dtype="bfloat16",
                  no_huggingface=True, attention_query_chunk=256, memory_fraction=0.9,
                  label="paper setting (T5.1.1-XXL, 24+24 layers, in 2048, out 512, batch 32, bfloat16)"),
}


def resolve(preset: str | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """The value of every preset-able flag: as given, else the preset's, else the default.

    Args:
      preset: A key of `PRESETS`, or None.
      given: Flag name -> value on the command line (None = not given).

    Returns:
      Flag name -> value, for every name of `DEFAULTS`.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"--preset={preset!r} is not a preset; choose one of {sorted(PRESETS)}.")
    chosen = PRESETS[preset] if preset else {}
    return {name: given[name] if given.get(name) is not None else chosen.get(name, default)
            for name, default in DEFAULTS.items()}
