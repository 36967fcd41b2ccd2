"""`python -m gqa_t5x.main`: T5X's launcher command line (see `gqa_t5x.launcher`).

Flags (T5X names): `--gin_file` (repeatable; model gin, then run gin, then
experiment gins), `--gin.MACRO=value` / `--gin_bindings=...` (last wins),
`--gin_search_paths`, `--tfds_data_dir`, `--run_mode=train|eval|infer|convert`,
multi-host start-up (`--multi_host` and optionally `--coordinator_address`,
`--process_count`, `--process_index`), `--debug` (tracebacks).
"""

from gqa_t5x import cli

if __name__ == "__main__":
    cli.exit_process(cli.launcher_main())
