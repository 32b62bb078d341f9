"""Hydra's launchers with progress a person can see (Hydra loads launchers only from the ``hydra_plugins``
namespace package, so they live here, outside the library; only configs and train.py name them).

``configs/hydra/launcher/{inprocess,local,slurm,preview}.yaml`` point ``_target_`` here. Each launcher is Hydra's own (or
hydra-submitit-launcher's) and adds lines on the launching terminal:

* before the first job starts, every job is composed and checked (:mod:`.jobs`): a grid sweep with a bad job
  names every bad job and starts none; jobs that are one run train once;
* in-process sweeps (``inprocess``): after each job, its outcome (:data:`.jobs.OUTCOMES`) and
  ``sweep: k of n jobs done (...), <elapsed>, about <time> left``;
* submitit sweeps (``local``, ``slurm``): each job's log file when it is submitted, then a line with its outcome as
  each job ends, with the same count and estimate, while Hydra waits for the results;
* at the end, a sweep in which a job did not finish raises one error naming those jobs (exit status 2);
* ``preview`` (``train.py --dry-run``): each job's run folder and state, nothing trained or written.

The estimate is the mean time of the jobs that finished training so far times the jobs left (skipped and refused
jobs take seconds and are not counted), divided by how many run at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher as HydraBasicLauncher
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as SubmititLocalLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher

from fsam.errors import ConfigError, FsamError, Interrupted
from hydra_plugins.fsam_launchers.jobs import (
    SUCCESSES, JobOutcome, PlannedJob, first_line, outcome_of_error, plan, preview, refuse_bad_jobs, why_the_same,
)

POLL_SECONDS = 5.0


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


@dataclass
class SweepProgress:
    """Counts a sweep's jobs as they end, says how each ended, and estimates the time left."""

    total: int
    parallel: int = 1
    started: float = field(default_factory=time.monotonic)
    outcomes: dict[str, int] = field(default_factory=dict)
    trained_seconds: list[float] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    ended: dict[int, str] = field(default_factory=dict)  # job index -> outcome

    def job_done(self, outcome: str, seconds: float | None = None) -> str:
        """Record a job that ended (``outcome``: one of :data:`.jobs.OUTCOMES`) and return the progress line."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if seconds is not None and outcome == "finished":
            self.trained_seconds.append(seconds)
        return self.line()

    def report(self, job: PlannedJob, outcome: str, seconds: float | None, message: str = "") -> None:
        """Print how ``job`` ended with the sweep's progress; a job that did not finish is also kept for the end."""
        said = f"{job.label} {outcome}" + (f": {message}" if message else "")
        self.ended[job.index] = outcome
        if outcome not in SUCCESSES:
            self.unfinished.append(said)
        print(f"{said}; {self.job_done(outcome, seconds)}", flush=True)

    def report_same_run(self, job: PlannedJob) -> None:
        """A job that is the same run as an earlier one ends as that one did (skipped where it succeeded)."""
        outcome = self.ended.get(job.same_as, "failed")
        self.report(job, "skipped" if outcome in SUCCESSES else outcome, None, f"the same run as job #{job.same_as}")

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

    def error(self) -> SweepError | None:
        """The one error that says which jobs did not finish, or None when every job finished or was skipped."""
        if not self.unfinished:
            return None
        return SweepError(f"{len(self.unfinished)} of {self.total} jobs of this sweep did not finish: "
                          + "; ".join(self.unfinished))


class SweepError(FsamError):
    """Some jobs of a sweep did not finish or cannot run (each was reported as it ended)."""


# Jobs of an adaptive search (Optuna) that did not finish: the search goes on, and train.py exits with status 2.
UNFINISHED: list[str] = []


def is_grid(config: Any) -> bool:
    """Whether the sweep's jobs are all known in advance (Hydra's basic sweeper), not chosen as it runs."""
    return str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper")


def planned(launcher: Any, job_overrides: Sequence[Sequence[str]], first_index: int, processes: int
            ) -> list[PlannedJob]:
    """Every job checked before the first starts: a grid sweep with a bad job raises, naming each; a search's bad
    trial is reported and not started. Jobs that are one run are said to be so."""
    jobs = plan(launcher.hydra_context.config_loader, launcher.config, job_overrides, first_index, processes)
    if is_grid(launcher.config):
        refuse_bad_jobs(jobs)
    for job in jobs:
        if job.same_as is not None:
            earlier = next(other for other in jobs if other.index == job.same_as)
            print(f"note: {why_the_same(job, earlier)}", flush=True)
    return jobs


def failed_return(job: PlannedJob, error: BaseException) -> JobReturn:
    result = JobReturn(overrides=job.overrides, status=JobStatus.FAILED)
    result.return_value = error
    return result


def finish(progress: SweepProgress, config: Any) -> None:
    """At the end of a sweep: raise the one error naming the jobs that did not finish (a grid), or keep them for
    train.py's exit status (a search, which goes on past a failed trial)."""
    error = progress.error()
    if error is None:
        return
    if is_grid(config):
        raise error
    UNFINISHED[:] = progress.unfinished


def progress_of(launcher: Any, jobs: int, parallel: int) -> SweepProgress:
    """The progress of a grid sweep's ``jobs``; a search launches its trials a few at a time, so its launcher
    keeps one count over all of them."""
    if is_grid(launcher.config):
        return SweepProgress(jobs, parallel)
    if getattr(launcher, "search", None) is None:
        trials = int(launcher.config.hydra.sweeper.get("n_trials") or 0)
        launcher.search = SweepProgress(max(trials, jobs), parallel)
    return launcher.search


# The sweep the in-process launcher is running and the job it runs now; train.py reports each job's end to it.
CURRENT: SweepProgress | None = None
CURRENT_JOB: PlannedJob | None = None


class BasicLauncher(HydraBasicLauncher):
    """Hydra's in-process launcher, one job at a time; train.py calls :func:`job_ended` after each job."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from fsam.runfolder import processes_from_environment

        global CURRENT, CURRENT_JOB
        jobs = planned(self, job_overrides, initial_job_idx, processes_from_environment())
        progress = progress_of(self, len(jobs), 1)
        results: dict[int, JobReturn] = {}
        CURRENT = progress
        try:
            for job in jobs:
                if job.error is not None:  # a search's trial (a grid sweep with one was refused above)
                    progress.report(job, "refused", None, job.error)
                    results[job.index] = failed_return(job, ConfigError(job.error))
                    continue
                if job.same_as is not None:
                    results[job.index] = results[job.same_as]
                    progress.report_same_run(job)
                    continue
                CURRENT_JOB = job
                (result,) = super().launch([job.overrides], job.index)
                if result.status == JobStatus.FAILED and (isinstance(result._return_value, Interrupted)
                                                          or not isinstance(result._return_value, FsamError)):
                    raise result._return_value  # a stop signal ends the whole sweep; a bug keeps its traceback
                results[job.index] = result
        finally:
            CURRENT = CURRENT_JOB = None
        finish(progress, self.config)
        return [results[job.index] for job in jobs]


def job_ended(outcome: str, seconds: float, message: str = "") -> bool:
    """Called by train.py at the end of a job in this process: prints how it ended with the sweep's progress.
    False outside an in-process sweep (train.py then reports a failure itself)."""
    if CURRENT is None or CURRENT_JOB is None:
        return False
    CURRENT.report(CURRENT_JOB, outcome, seconds, message)
    return True


class PreviewLauncher(Launcher):
    """``train.py --dry-run``: each job's run folder and what a launch would do there; nothing is trained or
    written. A bad job is listed with its error (and the command exits with status 2)."""

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes  # per run: part of a run's identity

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not is_grid(self.config):
            raise ConfigError("--dry-run lists the jobs of a grid sweep; an adaptive search (hydra/sweeper=optuna) "
                              "chooses its trials as it runs: run it without --dry-run")
        jobs = plan(self.hydra_context.config_loader, self.config, job_overrides, initial_job_idx, self.processes)
        for job in jobs:
            if job.error is not None:
                state = f"error: {job.error}"
            elif job.same_as is not None:
                state = f"the same run as job #{job.same_as}"
            else:
                state = preview(job)
            print(f"{job.label}: {job.folder or '-'}: {state}", flush=True)
        bad = [job for job in jobs if job.error is not None]
        if bad:
            raise SweepError(f"{len(bad)} of {len(jobs)} jobs cannot run: "
                                     + ", ".join(f"job #{job.index}" for job in bad))
        trained = sum(job.error is None and job.same_as is None for job in jobs)
        print(f"{plural(len(jobs), 'job')}, {plural(trained, 'run')}: nothing was started (--dry-run)", flush=True)
        return [JobReturn(overrides=job.overrides, status=JobStatus.COMPLETED) for job in jobs]


class _SubmititProgress:
    """Mixin for hydra-submitit-launcher's launchers: checks every job first, names each job's log, then reports
    each job's outcome as it ends."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        processes = int(self.params.get("tasks_per_node") or 1) * int(self.params.get("nodes") or 1)  # type: ignore[attr-defined]
        jobs = planned(self, job_overrides, initial_job_idx, processes)
        submitted = [job for job in jobs if job.error is None and job.same_as is None]
        parallel = int(self.params.get("array_parallelism") or len(submitted))  # type: ignore[attr-defined]
        progress = progress_of(self, len(jobs), min(parallel, max(len(submitted), 1)))
        results: dict[int, JobReturn] = {}
        for job in jobs:
            if job.error is not None:
                progress.report(job, "refused", None, job.error)
                results[job.index] = failed_return(job, ConfigError(job.error))

        original = submitit.AutoExecutor.map_array
        watcher: list[threading.Thread] = []
        stop = threading.Event()

        def map_array(executor: Any, *args: Any, **kwargs: Any) -> Any:
            handles = original(executor, *args, **kwargs)
            for handle, job in zip(handles, submitted):
                print(f"{job.label}: log {handle.paths.stdout}", flush=True)
            thread = threading.Thread(target=_watch, args=(list(zip(submitted, handles)), progress, stop), daemon=True)
            thread.start()
            watcher.append(thread)
            return handles

        submitit.AutoExecutor.map_array = map_array
        try:
            returned = super().launch([job.overrides for job in submitted], initial_job_idx) if submitted else []  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a job submitit could not finish; the watcher has reported it
            returned = None
        finally:
            submitit.AutoExecutor.map_array = original
            stop.set()
            for thread in watcher:
                thread.join(timeout=2 * POLL_SECONDS)
        for job in jobs:
            if job.same_as is not None:
                progress.report_same_run(job)
        finish(progress, self.config)  # type: ignore[attr-defined]
        if returned is None:  # a search: its trials' results are lost with the job that could not finish
            raise SweepError(str(progress.error() or "a job of this sweep could not finish"))
        results.update({job.index: result for job, result in zip(submitted, returned)})
        for job in jobs:
            if job.same_as is not None:
                results[job.index] = results[job.same_as]
        return [results[job.index] for job in jobs]


def _watch(jobs: list[tuple[PlannedJob, Any]], progress: SweepProgress, stop: threading.Event) -> None:
    """Print how each job ended as it does, until all have or the launcher is done."""
    pending = dict(enumerate(jobs))
    submitted = time.monotonic()
    while pending:
        final = stop.is_set()  # the launcher has every result: one last pass reports the rest
        for position, (job, handle) in list(pending.items()):
            try:
                finished = handle.done()
            except Exception:  # noqa: BLE001 - a job whose state cannot be read yet counts as running
                finished = False
            if finished:
                del pending[position]
                outcome, message = submitted_outcome(handle)
                progress.report(job, outcome, time.monotonic() - submitted, message)
        if final:
            return
        stop.wait(POLL_SECONDS)


def submitted_outcome(handle: Any) -> tuple[str, str]:
    """How a submitit job ended: from the JobReturn it sent back (train.py's outcome, or the error it raised), or
    from the scheduler's state when the job itself did not complete (killed, out of time, out of memory)."""
    try:
        result = handle.result()
    except Exception as error:  # noqa: BLE001 - the job did not complete: say the scheduler's state
        state = str(getattr(handle, "state", "unknown")).lower()
        return "failed", f"{state}, {first_line(error)} (see its log)"
    if result.status == JobStatus.COMPLETED:
        value = result._return_value
        return (value.outcome if isinstance(value, JobOutcome) else "finished"), ""
    error = result._return_value
    return outcome_of_error(error), first_line(error)


class LocalLauncher(_SubmititProgress, SubmititLocalLauncher):
    """hydra-submitit-launcher's local executor, with checks and outcomes."""


class SlurmLauncher(_SubmititProgress, SubmititSlurmLauncher):
    """hydra-submitit-launcher's SLURM executor, with checks and outcomes; on a cluster without job accounting,
    job states come from squeue (fsam.cluster), quietly and with an end for jobs that die."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from fsam.cluster import use_squeue_without_accounting

        use_squeue_without_accounting()
        return super().launch(job_overrides, initial_job_idx)
