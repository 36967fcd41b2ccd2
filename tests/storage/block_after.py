"""Runs a gqa-t5x command that stops at a chosen point, for a test to kill it.

    python block_after.py MODULE:FUNCTION N gqa-t5x|main ARGS...

Runs `gqa-t5x ARGS` (`cli.main`) or `python -m gqa_t5x.main ARGS`
(`cli.launcher_main`) in this process, with MODULE.FUNCTION wrapped: after
its N-th call returns, the wrapper prints `BLOCKED <FUNCTION> <N> <client>`
(the client epath used for gs://) and the calling thread waits forever
(other threads, e.g. Orbax's background commit, go on). The test then
SIGKILLs the process: a kill at a known point instead of after a guessed
delay.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading


def block_after(target: str, calls: int) -> None:
    """Wraps `module:function` so that its `calls`-th call blocks the caller.

    Args:
      target: 'package.module:function'.
      calls: the call after which to block (1 = the first).
    """
    module_name, function_name = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, function_name)
    count = 0

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal count
        result = original(*args, **kwargs)
        count += 1
        if count == calls:
            from etils import epath

            client = type(epath.Path("gs://bucket/object")._backend).__name__
            print(f"BLOCKED {function_name} {count} {client}", flush=True)
            threading.Event().wait()
        return result

    setattr(module, function_name, wrapper)


def main(argv: list[str]) -> int:
    """Installs the wrapper and runs the command line; returns its status."""
    target, calls, program, *args = argv
    block_after(target, int(calls))
    from gqa_t5x import cli

    return cli.main(args) if program == "gqa-t5x" else cli.launcher_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
