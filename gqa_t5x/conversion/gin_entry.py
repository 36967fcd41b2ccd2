r"""Gin entry point of checkpoint conversion, T5X style.

    python -m gqa_t5x.convert_main \
      --gin_file=gin/runs/convert.gin \
      --gin.SOURCE=\"gs-or-local/t5_1_1_xxl/checkpoint_1000000\" \
      --gin.OUTPUT=\"/models/gqa8_xxl/checkpoint_1000000\" \
      --gin.NUM_KV_HEADS=8

(`gqa-t5x convert --gin_file=... --gin.SOURCE=...` does the same.) The run
gin binds `convert_main.convert` to the macros SOURCE, OUTPUT, NUM_KV_HEADS,
METHOD, CONVERT_ENCODER, OVERWRITE and RANDOM_SEED; string values need the
quotes, as in T5X.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import gin

from gqa_t5x import conversion
from gqa_t5x.model.config import T5Config


def convert(
    source: str = gin.REQUIRED,
    output: str = gin.REQUIRED,
    num_kv_heads: int = gin.REQUIRED,
    method: str = "mean",
    convert_encoder: bool = False,
    encoder_num_kv_heads: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> T5Config:
    """Gin-configurable `conversion.convert_checkpoint` (see its Args)."""
    return conversion.convert_checkpoint(
        source,
        output,
        num_kv_heads,
        method=method,
        convert_encoder=convert_encoder,
        encoder_num_kv_heads=encoder_num_kv_heads,
        overwrite=overwrite,
        progress=progress,
        seed=seed,
    )


def run_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    gin_search_paths: Sequence[str] = (),
) -> T5Config:
    """Parses gin files + bindings, then runs the bound `convert`.

    Args:
      gin_files: Gin files, e.g. ['gin/runs/convert.gin'].
      gin_bindings: 'MACRO=value' bindings (the `--gin.` prefix stripped).
      gin_search_paths: Extra search paths for the gin files.

    Returns:
      The converted checkpoint's config.

    Raises:
      ValueError: a gin file or binding does not parse, or a required macro
        (SOURCE, OUTPUT, NUM_KV_HEADS) is unbound.
    """
    from gqa_t5x import gin_config

    hint = (
        "bind SOURCE, OUTPUT and NUM_KV_HEADS, quoting strings as in T5X: "
        '--gin.SOURCE=\\"/path/to/checkpoint\\"'
    )
    search = [*gin_search_paths, *gin_config.default_search_paths()]
    resolved = []
    for name in gin_files:  # absolute paths keep gin from logging misses
        hits = [Path(base) / name for base in ("", *search) if (Path(base) / name).is_file()]
        resolved.append(str(hits[0].resolve()) if hits else name)
    try:
        gin_config.parse_gin(resolved, gin_bindings, gin_search_paths)
        configured = gin.get_configurable(convert)
        return configured()
    except SyntaxError as e:
        raise ValueError(f"Could not parse the gin config ({e}); {hint}.") from e
    except ValueError as e:
        if "gin.REQUIRED" in str(e) or "REQUIRED" in str(e):
            raise ValueError(f"{e} ({hint}).") from e
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gqa_t5x.convert_main --gin_file=... --gin.MACRO=value`."""
    from gqa_t5x import cli

    return cli.main(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
