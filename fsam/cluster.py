"""SLURM job status through submitit on clusters without job accounting.

submitit asks ``sacct`` for the state of the jobs it waits on. Many small clusters (and the one-node cluster of
``scripts/slurm/local_cluster.sh``) run without accounting (``AccountingStorageType=accounting_storage/none``):
``sacct`` then fails on every poll, submitit logs "Bypassing sacct error ..., status may be inaccurate" each time,
and a job that dies without writing its result (killed, out of memory, its node lost) is never seen to end, so
the sweep waits forever. :func:`use_squeue_without_accounting` makes submitit's SLURM jobs ask ``squeue`` there
instead: squeue knows every job of the controller, ended ones included, for ``MinJobAge`` seconds after they end;
a job it no longer lists after it was seen has ended (``VANISHED``, which submitit counts as done: its result, or
its error, is read from the job's folder).

    from fsam.cluster import use_squeue_without_accounting
    use_squeue_without_accounting()       # before waiting on submitit SLURM jobs; a no-op where sacct works
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

__all__ = ["accounting_enabled", "threads_from_slurm", "use_squeue_without_accounting"]  # SqueueInfoWatcher: on access

_HEADER = "JobID|State|NodeList"


def accounting_enabled() -> bool:
    """Whether this cluster keeps job accounting (sacct answers); True where it cannot be told (no scontrol)."""
    if shutil.which("scontrol") is None:
        return True
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    for line in config.splitlines():
        if line.split("=")[0].strip() == "AccountingStorageType":
            return not line.split("=", 1)[1].strip().endswith("/none")
    return True


def _watcher_class() -> type:
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueInfoWatcher(SlurmInfoWatcher):
        """submitit's SLURM watcher, reading ``squeue --states=all`` instead of ``sacct``."""

        def __init__(self, delay_s: int = 60) -> None:
            super().__init__(delay_s=delay_s)
            self._seen: set[str] = set()

        def _make_command(self) -> list[str] | None:
            if super()._make_command() is None:  # nothing left to wait on
                return None
            return ["squeue", "--noheader", "--states=all", "--format=%i|%T|%N"]  # the columns of _HEADER

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            info = super().read_info(f"{_HEADER}\n{text}")
            waiting = self._registered - self._finished
            self._seen |= waiting & set(info)
            for job_id in waiting & self._seen - set(info):  # listed before, gone now: it ended MinJobAge ago
                info[job_id] = {"JobID": job_id, "State": "VANISHED", "NodeList": ""}
            return info

    return SqueueInfoWatcher


def __getattr__(name: str) -> Any:  # the class needs submitit, imported only when asked for
    if name == "SqueueInfoWatcher":
        return _watcher_class()
    raise AttributeError(name)


def use_squeue_without_accounting(delay_s: int = 10) -> bool:
    """Where this cluster has no job accounting, make submitit's SLURM jobs poll ``squeue`` every ``delay_s``
    seconds at most (submitit's class-level watcher is replaced, once); returns whether it did."""
    from submitit.slurm.slurm import SlurmJob

    if type(SlurmJob.watcher).__name__ == "SqueueInfoWatcher":
        return True
    if accounting_enabled():
        return False
    SlurmJob.watcher = _watcher_class()(delay_s=delay_s)
    return True


def threads_from_slurm() -> int | None:
    """In a SLURM job that set no OMP_NUM_THREADS, give torch as many threads as the job has CPUs per task
    (SLURM_CPUS_PER_TASK) rather than one per core of the node, which oversubscribes a shared node; returns the
    number set, or None where nothing was changed."""
    import torch

    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if "OMP_NUM_THREADS" in os.environ or not cpus.isdigit() or int(cpus) < 1:
        return None
    torch.set_num_threads(int(cpus))
    return int(cpus)
