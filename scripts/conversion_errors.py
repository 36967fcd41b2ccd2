"""Prints the method-comparison table of docs/conversion.md.

Relative logit error ||logits_GQA - logits_MHA|| / ||logits_MHA|| of our
network right after conversion (no uptraining), and the data-free per-head map
errors (`conversion.attention_error`) of decoder layer 0 self-attention, on
(a) a random T5X-initialised model and (b) a model whose heads are random
rotations of one head plus 5% noise.

    python scripts/conversion_errors.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conversion_utils import (  # noqa: E402
    flat,
    random_params,
    relative_logit_error,
    rotated_heads_params,
    tiny_config,
    tokens,
)

from gqa_t5x import conversion  # noqa: E402


def main() -> int:
    print("| model | G | method | rel. logit error | qk map error | ov map error |")
    print("|---|---|---|---|---|---|")
    cases = [
        ("random T5X init (H=8, d=16, emb=64)",
         tiny_config(num_heads=8, head_dim=16, emb_dim=64, mlp_dim=96), lambda c: random_params(c, 11)),
        ("heads = rotations of one head + 5% noise (H=4, d=8)", tiny_config(), rotated_heads_params),
    ]
    for label, config, make in cases:
        params = make(config)
        batch = tokens(3, config.vocab_size, batch=4, enc_len=16, dec_len=12)
        layer = "decoder/layers_0/self_attention"
        source = {x: flat(params)[f"{layer}/{x}/kernel"] for x in ("query", "key", "value", "out")}
        for groups in [g for g in (1, 2, 4) if g < config.num_heads]:
            for method in conversion.METHODS:
                logit_error = relative_logit_error(config, params, groups, method, batch)
                converted = dict(source)
                converted.update(conversion.convert_attention(
                    source, num_heads=config.num_heads, head_dim=config.head_dim,
                    target_kv_heads=groups, method=method))
                maps = conversion.attention_error(source, converted, num_heads=config.num_heads, head_dim=config.head_dim)
                print(f"| {label} | {groups} | {method} | {logit_error:.4f} | {maps['qk']:.4f} | {maps['ov']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
