"""`python -m gqa_t5x.cli`: the `gqa-t5x` command."""

from gqa_t5x import cli

if __name__ == "__main__":
    cli.entry()
