"""Stop cleanly when the cluster or the user asks: SIGTERM, SIGUSR1, SIGUSR2 and Ctrl-C (SIGINT) become a
checkpoint at the next step boundary; a second Ctrl-C stops at once (KeyboardInterrupt), keeping the last checkpoint.

SLURM sends SIGTERM before killing a preempted or cancelled job, and the signal chosen with ``--signal`` (USR1
or USR2) some time before the time limit; submitit asks for SIGUSR2. A handler that wrote a checkpoint inside
the signal would catch the model halfway through a step, so the handler only records the signal; the loop looks
at the record after each step, writes an ordinary atomic checkpoint and raises :class:`Interrupted`.

When something else had a handler for that signal before the run started, the loop hands the signal on with
:meth:`StopSignals.forward` once the checkpoint is safe, instead of stopping. Under submitit that handler
requeues the job on SIGUSR2 (through the launcher's ``checkpoint`` hook) and exits: the requeued job relaunches
the same command, finds the same run folder and continues from that checkpoint. Submitit's SIGTERM handler only
logs (SLURM's SIGUSR2 decides), so training goes on after the extra checkpoint.

Under DDP every process must stop at the same step (saving is collective), so the processes agree on the
record with an all-reduce, every ``every`` steps (one host synchronisation then, none in between).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Callable

import torch

from fsam.engine import distributed
from fsam.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
__all__ = ["Interrupted", "STOP_SIGNALS", "StopSignals", "signal_name"]


class StopSignals:
    """Records the first of SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT while active (a context manager); main thread
    only."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal.signal refuses other threads
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # kept in _previous: forward() may still need it

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the step to end

    def clear(self) -> None:
        self.received = None

    def agreed(self, device: torch.device) -> int | None:
        """The signal any process received (the largest number if they differ), the same on every process."""
        if not distributed.is_active():
            return self.received
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        received = int(distributed.all_reduce_max(flag).item())
        return received or None

    def previous_handler(self, signum: int) -> Callable[[int, FrameType | None], Any] | None:
        """The handler installed before ours, when it is a function (not the default action or ignore)."""
        previous = self._previous.get(signum)
        if previous is signal.default_int_handler:
            return None  # Python's own Ctrl-C handler (it raises KeyboardInterrupt): nothing to hand the signal to
        return previous if callable(previous) else None

    def forward(self, signum: int) -> None:
        """Give ``signum`` to the handler that was there before (it may requeue the job and exit)."""
        previous = self.previous_handler(signum)
        if previous is not None:
            previous(signum, None)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
