"""Helpers of the gs:// tests: objects on the emulator, random checkpoints,
commands stopped at a known point to be killed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gqa_t5x import checkpoints
from paths import REPO

BLOCK_AFTER = Path(__file__).parent / "storage" / "block_after.py"


def objects(emulator, url: str) -> list[str]:
    """Object names under the gs:// prefix `url`, relative to it, from the server."""
    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    return [n[len(prefix) + 1:] for n in emulator.object_names(bucket, prefix + "/")]


def save_random_checkpoint(url: str, config, *, step: int = 1000) -> None:
    """Saves small random parameters of `config` in our format at `url` (numpy:
    no model initialisation to compile); norm scales are 1, as T5 starts them."""
    from gqa_t5x.model import param_tree

    rng = np.random.default_rng(0)
    flat = {k: np.ones(s, np.float32) if k.endswith("scale") else rng.normal(0, 0.05, s).astype(np.float32)
            for k, s in param_tree.param_shapes(config).items()}
    checkpoints.save(url, config, param_tree.unflatten(flat), step=step)


@dataclasses.dataclass
class Blocked:
    """A command started by `start_blocked`: the process and its output files."""

    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def wait(self, timeout: float = 180) -> str:
        """Waits for the BLOCKED line; returns the output so far.

        Raises:
          AssertionError: the process ended or did not block in time (its
            output is in the message); it is killed.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.stdout.read_text()
            if "\nBLOCKED " in "\n" + out:
                return out
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise AssertionError(
            f"the command did not block (status {self.process.returncode});\n"
            f"stdout: {self.stdout.read_text()[-2000:]}\nstderr: {self.stderr.read_text()[-4000:]}"
        )

    def kill(self) -> None:
        """SIGKILL, as a preempted VM or an OOM kill would end it."""
        self.process.kill()
        self.process.wait()


def start_blocked(log_dir: Path, target: str, calls: int, *argv: str, env: dict[str, str] | None = None) -> Blocked:
    """Starts `gqa-t5x argv` (or `python -m gqa_t5x.main` with argv[0] 'main')
    that blocks after `calls` calls of `target` ('module:function').

    Args:
      log_dir: where its stdout.txt and stderr.txt go.
      target: the function, 'package.module:function'.
      calls: block after this many calls.
      *argv: 'gqa-t5x' or 'main', then the command line.
      env: variables set for it on top of this process's.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_backend_optimization_level=0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               **(env or {}))
    stdout, stderr = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen([sys.executable, str(BLOCK_AFTER), target, str(calls), *argv],
                                   cwd=REPO, env=env, stdout=out, stderr=err)
    return Blocked(process, stdout, stderr)
