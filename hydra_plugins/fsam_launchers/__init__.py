"""Hydra's launchers with progress a person can see (Hydra loads launchers only from the ``hydra_plugins``
namespace package, so they live here, outside the library; only configs and train.py name them).

``configs/hydra/launcher/{basic,local,slurm}.yaml`` point ``_target_`` here. Each launcher is Hydra's own (or
hydra-submitit-launcher's) and adds lines on the launching terminal:

* in-process sweeps (``basic``): after each job, ``sweep: k of n jobs done (...), <elapsed>, about <time> left``;
* submitit sweeps (``local``, ``slurm``): each job's log file when it is submitted, then a line as each job ends,
  with the same count and estimate, while Hydra waits for the results.

The estimate is the mean time of the jobs that trained so far times the jobs left (skipped finished runs take
seconds and are not counted), divided by how many run at once.
"""


import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher as HydraBasicLauncher
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as SubmititLocalLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher

POLL_SECONDS = 5.0


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


@dataclass
class SweepProgress:
    """Counts a sweep's jobs as they end and estimates the time left."""

    total: int
    parallel: int = 1
    started: float = field(default_factory=time.monotonic)
    outcomes: dict[str, int] = field(default_factory=dict)
    trained_seconds: list[float] = field(default_factory=list)

    def job_done(self, outcome: str, seconds: float | None = None) -> str:
        """Record a job that ended (``outcome``: finished, skipped, failed...) and return the progress line."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if seconds is not None and outcome != "skipped":
            self.trained_seconds.append(seconds)
        return self.line()

    @property
    def done(self) -> int:
        return sum(self.outcomes.values())

    def line(self) -> str:
        counts = ", ".join(f"{count} {outcome}" for outcome, count in sorted(self.outcomes.items()))
        text = f"sweep: {self.done} of {self.total} jobs done ({counts}), {duration(time.monotonic() - self.started)}"
        left = self.total - self.done
        if left and self.trained_seconds:
            per_job = sum(self.trained_seconds) / len(self.trained_seconds)
            text += f", about {duration(per_job * left / max(self.parallel, 1))} left"
        return text


# The sweep the in-process launcher is running; train.py reports each job's end to it.
CURRENT: SweepProgress | None = None


class BasicLauncher(HydraBasicLauncher):
    """Hydra's in-process launcher; train.py calls :func:`job_ended` after each job."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        global CURRENT
        CURRENT = SweepProgress(total=len(job_overrides))
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            CURRENT = None


def job_ended(outcome: str, seconds: float) -> None:
    """Called by train.py at the end of a job in this process: prints the sweep's progress line."""
    if CURRENT is not None:
        print(CURRENT.job_done(outcome, seconds), flush=True)


class _SubmititProgress:
    """Mixin for hydra-submitit-launcher's launchers: names each job's log, then reports jobs as they end."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        original = submitit.AutoExecutor.map_array
        watcher: list[threading.Thread] = []
        stop = threading.Event()
        parallel = int(self.params.get("array_parallelism") or len(job_overrides))  # type: ignore[attr-defined]

        def map_array(executor: Any, *args: Any, **kwargs: Any) -> Any:
            jobs = original(executor, *args, **kwargs)
            for index, (job, overrides) in enumerate(zip(jobs, job_overrides)):
                print(f"job #{initial_job_idx + index} ({' '.join(filter_overrides(overrides))}): log "
                      f"{job.paths.stdout}", flush=True)
            thread = threading.Thread(
                target=_watch, args=(jobs, initial_job_idx, SweepProgress(len(jobs), min(parallel, len(jobs))), stop),
                daemon=True,
            )
            thread.start()
            watcher.append(thread)
            return jobs

        submitit.AutoExecutor.map_array = map_array
        try:
            return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        finally:
            submitit.AutoExecutor.map_array = original
            stop.set()
            for thread in watcher:
                thread.join(timeout=2 * POLL_SECONDS)


def _watch(jobs: list[Any], first_index: int, progress: SweepProgress, stop: threading.Event) -> None:
    """Print a line as each job ends, until all have or the launcher is done."""
    pending = dict(enumerate(jobs))
    submitted = time.monotonic()
    while pending:
        final = stop.is_set()  # the launcher has every result: one last pass reports the rest
        for index, job in list(pending.items()):
            try:
                finished = job.done()
            except Exception:  # noqa: BLE001 - a job whose state cannot be read yet counts as running
                finished = False
            if finished:
                del pending[index]
                failed = job.state in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
                outcome = f"failed ({job.state.lower()}, see its log)" if failed else "finished"
                line = progress.job_done("failed" if failed else "finished", time.monotonic() - submitted)
                print(f"job #{first_index + index} {outcome}; {line}", flush=True)
        if final:
            return
        stop.wait(POLL_SECONDS)


class LocalLauncher(_SubmititProgress, SubmititLocalLauncher):
    """hydra-submitit-launcher's local executor, with progress."""


class SlurmLauncher(_SubmititProgress, SubmititSlurmLauncher):
    """hydra-submitit-launcher's SLURM executor, with progress."""
