"""Preemption: SIGTERM / SIGINT end a training run at an agreed step, saved.

TPU VMs, spot and preemptible GCE machines, Kubernetes and SLURM announce the
end of a job with SIGTERM and kill it after a grace period (30 s on Cloud
TPU and GKE by default, SLURM's `KillWait`). Without a handler the process
dies at once and loses every step since its last periodic checkpoint.

`PreemptionGuard` turns the first SIGTERM or SIGINT into a request: the
training loop finishes the step it is running, all processes agree on one
step (`stop_agreed`), a checkpoint is saved there, and the run raises
`Preempted`, which the command line turns into exit status
`errors.EXIT_PREEMPTED` (75, EX_TEMPFAIL: "temporary failure, retry"). Rerun
the same command and it resumes from that checkpoint, bit-identically (the
data position and dropout keys follow the step).

A second signal while the save is running aborts at once (exit status
128 + the signal number, as the default action): the newest *complete*
checkpoint stays the one a rerun resumes from, because a checkpoint counts
only once it is complete (a renamed temporary directory locally,
`commit_success.txt` on object storage; see `train_state`).

Agreement across processes: each process learns of its own signal, but a
multi-host step is a collective, so every process must stop after the same
step. With several processes the flags are combined by an all-gather every
`check_period` steps (the same steps on every process, so the collective
always pairs up); one preempted process stops them all at that step. With
one process the local flag is read every step, for free.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import types
from collections.abc import Sequence

import jax
import numpy as np

from gqa_t5x.errors import Preempted

__all__ = ["PreemptionGuard", "Preempted"]

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
    """Catches preemption signals for the duration of a `with` block.

    Attributes:
      signal_name: The first signal received ('SIGTERM'), or None.
      check_period: Steps between cross-process agreements (several
        processes only).
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS, *, check_period: int = 1,
                 label: str = "[train]"):
        """Creates the guard; handlers are installed by `__enter__`.

        Args:
          signals: Signals that request a stop (default SIGTERM and SIGINT).
          check_period: With several processes, agree every N steps (an
            all-gather of one integer per process). Must be positive.
          label: Prefix of the lines printed when a signal arrives.

        Raises:
          ValueError: `check_period` is not a positive integer.
        """
        if not isinstance(check_period, int) or check_period <= 0:
            raise ValueError(
                f"preemption check_period={check_period!r} must be a positive integer "
                "(steps between the processes' agreement on a preemption)."
            )
        self.signals = tuple(signals)
        self.check_period = check_period
        self.label = label
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether this process has received a stop signal."""
        return self.signal_name is not None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only.
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            _say(f"{self.label} {name} received: finishing this step, then saving a checkpoint and "
                 "stopping (send it again to abort without saving).")
            return
        _say(f"{self.label} second {name}: aborting now without saving; the newest complete "
             "checkpoint is kept (an unfinished one is ignored and removed by the next start).")
        os._exit(128 + signum)

    def stop_agreed(self, step: int) -> bool:
        """Whether every process stops after `step` (call once per step, on all).

        Args:
          step: The number of steps done (the same on every process).

        Returns:
          True when this process, or with several processes any of them,
          has received a stop signal (checked at multiples of
          `check_period` when there are several processes).
        """
        if jax.process_count() == 1:
            return self.requested
        if step % self.check_period:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.asarray(flags).any())


def _say(line: str) -> None:
    """Prints to stderr; a closed pipe (its reader got the signal too) must not stop the save."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def preempted_error(step: int, checkpoint: str, signal_name: str | None) -> Preempted:
    """The exception a preempted run ends with (the command's one line)."""
    cause = signal_name or "another process's signal"
    return Preempted(
        f"preempted by {cause} at step {step}: saved {checkpoint}; rerun the same command to "
        "resume from it."
    )
