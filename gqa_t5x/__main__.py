"""`python -m gqa_t5x ...` runs the `gqa-t5x` command line."""

from gqa_t5x import cli

if __name__ == "__main__":
    cli.entry()
