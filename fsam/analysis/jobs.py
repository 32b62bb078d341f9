"""Measuring many runs: one after the other here, in a few processes here, or as jobs (submitit's local executor,
or SLURM on a cluster), each run's lines coming back to the caller.

    from fsam.analysis.jobs import Resources, measure_runs
    from fsam.analysis.record import Options
    for result in measure_runs(folders, Options(images=512), launcher="slurm",
                               resources=Resources(partition="gpu", gpus_per_job=1)):
        print("\\n".join(result.lines))

Every folder is checked before anything is measured or submitted (:func:`fsam.analysis.record.finished_run`), so a
damaged or unfinished run is named at once rather than in a job's log an hour later. A job measures one run and
writes its ``analysis/sharpness.json`` itself (the record's writes are atomic); the caller only reports.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fsam.analysis.record import Options, RefusedRun, finished_run, measure_run
from fsam.errors import FsamError

__all__ = ["LAUNCHERS", "Resources", "RunResult", "headline", "measure_one", "measure_runs", "measurement_device"]

LAUNCHERS = ("here", "local", "slurm")


@dataclass(frozen=True)
class Resources:
    """What each job asks the scheduler for (``slurm``; ``local`` uses the GPUs, the time limit and the log
    folder). Logs: ``<log_dir>/<job id>_0_log.out`` and ``.err``."""

    partition: str | None = None
    account: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int = 4
    mem_gb: int = 16
    timeout_min: int = 60
    log_dir: Path = Path("logs/sharpness")


@dataclass
class RunResult:
    """One run's outcome: ``status`` is measured (or read back), refused (its records say it cannot be measured)
    or failed (an error, or a job that died: ``log`` says where to look); ``lines`` are what to print."""

    run_dir: Path
    status: str
    lines: list[str] = field(default_factory=list)
    log: str | None = None


def measurement_device(preference: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; FsamError for a device not here."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise FsamError(f"--device {preference} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FsamError(f"--device {preference} but no CUDA device is visible: use --device cpu (or auto)")
    return device


def measure_one(run_dir: Path, options: Options, device: str = "auto", threads: int | None = None,
                progress: bool = True) -> RunResult:
    """Measure one run (in this process, a worker or a job) and say what happened, as lines to print.
    ``threads``: torch's intra-op threads (a job on a cluster takes SLURM_CPUS_PER_TASK when not given)."""
    threads = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or None
    if threads:
        torch.set_num_threads(threads)
    try:
        outcome = measure_run(run_dir, options, device=measurement_device(device), progress=progress)
    except RefusedRun as refusal:
        return RunResult(Path(run_dir), "refused", [f"refused: {run_dir}: {refusal}"])
    except FsamError as error:
        return RunResult(Path(run_dir), "failed", [f"error: {run_dir}: {error}"])
    lines = [f"{run_dir}: {quantity} measured again, options changed: {'; '.join(changes)}"
             for quantity, changes in outcome.changed.items()]
    if outcome.read_back:
        lines.append(f"{run_dir}: read back {', '.join(outcome.read_back)} (measured before with the same options)")
    if outcome.measured:
        seconds = sum(outcome.record["measurements"][q]["seconds"] for q in outcome.measured)
        lines.append(f"{run_dir}: measured {', '.join(outcome.measured)} in {seconds:.1f} s, written to "
                     "analysis/sharpness.json")
    lines.append(f"{run_dir}: {headline(outcome.record['measurements'], options.what)}")
    return RunResult(Path(run_dir), "measured", lines)


def measure_runs(folders: Sequence[Path], options: Options, *, device: str = "auto", launcher: str = "here",
                 parallel: int = 1, resources: Resources | None = None) -> Iterator[RunResult]:
    """Measure every folder, yielding each run's result as it ends. Folders that cannot be measured (damaged,
    unfinished) are yielded first as refused, and nothing of theirs is submitted.

    ``launcher``: ``here`` (``parallel`` processes of one thread each when above 1), ``local`` (submitit jobs on
    this machine, ``parallel`` at a time) or ``slurm`` (one job per run, all submitted at once; ``resources``).

    Raises:
        FsamError: an unknown launcher, ``parallel`` below 1, no SLURM here, a device that is not here.
    """
    if launcher not in LAUNCHERS:
        raise FsamError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if parallel < 1:
        raise FsamError(f"parallel={parallel} is not allowed: give how many runs are measured at once, 1 or more")
    if launcher == "here":
        measurement_device(device)  # a device that is not here: said before anything starts
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise FsamError("--launcher slurm but there is no sbatch on PATH: run this on a SLURM login node, or use "
                        "--launcher here (or local)")
    ready = []
    for folder in folders:
        try:
            finished_run(folder)
        except RefusedRun as refusal:
            yield RunResult(Path(folder), "refused", [f"refused: {folder}: {refusal}"])
            continue
        ready.append(Path(folder))
    if launcher == "here" and parallel == 1:
        for folder in ready:
            yield measure_one(folder, options, device)
    elif launcher == "here":
        yield from _in_processes(ready, options, device, parallel)
    else:
        yield from _as_jobs(ready, options, device, launcher, parallel, resources or Resources())


def _one_thread() -> None:
    torch.set_num_threads(1)


def _in_processes(folders: list[Path], options: Options, device: str, parallel: int) -> Iterator[RunResult]:
    """``parallel`` fresh processes (spawned: no copy of this one's threads), one thread each, no progress bars."""
    with ProcessPoolExecutor(parallel, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
        futures = {pool.submit(measure_one, folder, options, device, 1, False): folder for folder in folders}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as error:  # a worker that died: the run is not measured, the others go on
                yield RunResult(futures[future], "failed", [f"error: {futures[future]}: the worker failed: {error}"])


def _as_jobs(folders: list[Path], options: Options, device: str, launcher: str, parallel: int,
             resources: Resources) -> Iterator[RunResult]:
    """One submitit job per run. ``local``: ``parallel`` jobs at a time on this machine; ``slurm``: all at once
    as one array (the scheduler decides how many run)."""
    import submitit

    if launcher == "slurm":
        from fsam.cluster import use_squeue_without_accounting

        use_squeue_without_accounting()
    executor = submitit.AutoExecutor(folder=resources.log_dir, cluster=launcher)
    parameters = {"timeout_min": resources.timeout_min, "gpus_per_node": resources.gpus_per_job,
                  "cpus_per_task": resources.cpus_per_job, "mem_gb": resources.mem_gb, "name": "fsam-sharpness"}
    if launcher == "slurm":
        parameters.update({"slurm_partition": resources.partition, "slurm_account": resources.account})
        parameters = {key: value for key, value in parameters.items() if value is not None}
    executor.update_parameters(**parameters)
    threads = None if launcher == "slurm" else 1
    batches = [folders] if launcher == "slurm" else [folders[i:i + parallel] for i in range(0, len(folders), parallel)]
    for batch in batches:
        try:
            jobs = executor.map_array(measure_one, batch, [options] * len(batch), [device] * len(batch),
                                      [threads] * len(batch), [False] * len(batch))
        except Exception as error:  # the scheduler refused the submission (a partition it lacks, ...)
            raise FsamError(f"the {launcher} executor refused the jobs: {' '.join(str(error).split())[:300]}") from None
        for job in jobs:
            print(f"submitted job {job.job_id}: log {job.paths.stdout}", file=sys.stderr, flush=True)
        for folder, job in zip(batch, jobs):
            try:
                result = job.result()
            except Exception as error:  # the job died (killed, out of memory, timed out, ...)
                cause = _exception_line(str(error)) or type(error).__name__
                yield RunResult(folder, "failed", [f"error: {folder}: job {job.job_id} failed ({cause}): see "
                                                   f"{job.paths.stderr}"], str(job.paths.stderr))
                continue
            result.log = str(job.paths.stdout)
            yield result


def _exception_line(text: str) -> str | None:
    """The ``SomeError: message`` line of a job's trace as submitit words its failure (the last one there)."""
    found = re.findall(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b.*)$", text, re.MULTILINE)
    return found[-1].strip() if found else None


def headline(measurements: dict, what: tuple[str, ...]) -> str:
    """The main numbers of the quantities asked for, on one line."""
    parts = []
    for quantity in what:
        result = measurements[quantity]["result"]
        if quantity == "eigen":
            parts.append("λ " + ", ".join(f"{value:.4g}" for value in result["eigenvalues"]))
        elif quantity == "trace":
            parts.append(f"trace {result['trace']:.4g} ± {result['standard_error']:.2g}")
        elif quantity == "rho":
            for geometry, entries in result.items():
                parts += [f"{geometry} ρ={entry['rho']:g} worst {entry['worst_case']:.4g} average "
                          f"{entry['average_case']:.4g}" for entry in entries]
        elif quantity == "line":
            parts.append(f"line: loss {result['losses'][0]:.4g} -> max {max(result['losses']):.4g} -> "
                         f"{result['losses'][-1]:.4g}")
        elif quantity == "slice2d":
            parts.append(f"slice2d: {len(result['alphas'])}×{len(result['betas'])} points")
        else:
            parts.append(f"slice1d: {len(result['alphas'])} points")
    return "; ".join(parts)
