"""What each job of a sweep is before it starts, and how it ended: the launchers' view of train.py's jobs.

Before the first job of a grid sweep starts, every job is composed as Hydra will compose it and checked the way
train.py checks it (the schema, the model's options, the method chosen on the command line); the run folder each
one trains in is computed. Every bad job is named at once, before anything trains, and jobs that are one run (a
value its method never reads, such as SGD's rho) train once.

As each job ends, its outcome is one of :data:`OUTCOMES`, never "finished" for a job that was refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

# How a job ended: trained to the end; skipped (finished before, or the same run as an earlier job of the sweep);
# refused (a value the schema does not allow, or its folder in use: nothing trained); diverged; failed (any other
# error); stopped (a signal: it continues from its checkpoint when relaunched). A sweep succeeds when every job
# finished or was skipped.
OUTCOMES = ("finished", "skipped", "refused", "diverged", "failed", "stopped")
SUCCESSES = ("finished", "skipped")


@dataclass
class JobOutcome:
    """What ``train.py``'s job returns: its outcome, its run folder and, for a search, its objective.

    ``float(outcome)`` is the best validation top-1 that Hydra's Optuna sweeper maximises; it raises for a run
    without a validation split (train.py refuses such a search before training).
    """

    outcome: str
    run_dir: str
    objective: float | None = None

    def __float__(self) -> float:
        if self.objective is None:
            raise TypeError(f"{self.run_dir} has no validation split, so no validation top-1 to maximise")
        return float(self.objective)


def outcome_of_error(error: BaseException) -> str:
    """The outcome of a job that raised ``error``: refused (a value the schema does not allow, or its folder in use
    by another process: nothing was trained), diverged, or failed."""
    from fsam.errors import ConfigError, DivergedError
    from fsam.runfolder import RunHeldError

    if isinstance(error, (ConfigError, RunHeldError)):
        return "refused"
    if isinstance(error, DivergedError):
        return "diverged"
    return "failed"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_method_choice(overrides: Sequence[str], plain: dict[str, Any], config_sources: Sequence[Any]) -> None:
    """ConfigError when the command line chose ``optimizer=<option>`` and the composed config trains another method
    than that option's file names: a config file applied after the group (an experiment file of your own) set
    ``optimizer.name`` and would silently override the choice. ``config_sources``: Hydra's search path
    (``hydra.runtime.config_sources``), where the option's file is looked up."""
    from omegaconf import OmegaConf

    from fsam.errors import ConfigError

    chosen = [item.split("=", 1)[1] for item in overrides if item.startswith("optimizer=")]
    if not chosen:
        return
    files = [Path(source["path"]) / "optimizer" / f"{chosen[-1]}.yaml" for source in config_sources
             if source.get("schema") == "file"]
    option = next((path for path in files if path.is_file()), None)
    named = OmegaConf.load(option).get("name") if option is not None else None
    method = (plain.get("optimizer") or {}).get("name")
    if named is not None and named != method:
        raise ConfigError(
            f"optimizer={chosen[-1]} is overridden by a config file that sets optimizer.name={method} (an experiment "
            f"applied after the group): write optimizer.name={named}, or remove name from that file's optimizer "
            "block and choose the method in its defaults list (override /optimizer: ...)"
        )


@dataclass
class PlannedJob:
    """One job of a sweep as it will run: its index and overrides, and its run folder, or why it cannot run."""

    index: int
    overrides: list[str]
    folder: Path | None = None
    setting: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    error: str | None = None
    same_as: int | None = None  # the earlier job of this sweep that is the same run

    @property
    def label(self) -> str:
        return f"job #{self.index} ({' '.join(shown_overrides(self.overrides)) or 'no overrides'})"


def shown_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that say what a job is (Hydra's own hydra.* ones left out)."""
    return [item for item in overrides if not item.startswith(("hydra.", "hydra/"))]


def job_config(config_loader: Any, master_config: Any, overrides: Sequence[str]) -> dict[str, Any]:
    """The job's task config as train.py receives it (plain data, interpolations resolved, without ``hydra``)."""
    from omegaconf import OmegaConf

    from fsam.config.run_folder import register_resolver

    register_resolver()
    composed = config_loader.load_sweep_config(master_config, list(overrides))
    keys = [key for key in composed if key != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(composed, keys), resolve=True)


def plan(config_loader: Any, master_config: Any, job_overrides: Sequence[Sequence[str]], first_index: int,
         processes: int = 1) -> list[PlannedJob]:
    """Every job composed and checked, with its run folder for ``processes`` processes per run; jobs that are one
    run point at the first of them."""
    from fsam.config import load_config
    from fsam.errors import FsamError
    from fsam.runfolder import default_run_dir, setting

    jobs, by_folder = [], {}
    for offset, overrides in enumerate(job_overrides):
        job = PlannedJob(first_index + offset, list(overrides))
        jobs.append(job)
        try:
            plain = job_config(config_loader, master_config, overrides)
            check_method_choice(job.overrides, plain, master_config.hydra.runtime.config_sources)
            checked = load_config({**plain, "run_dir": plain.get("run_dir") or "(not yet known)"})
            job.setting = setting(checked, processes)
            job.folder = Path(plain["run_dir"]) if plain.get("run_dir") else default_run_dir(plain, processes)
            job.config = plain
        except FsamError as error:
            job.error = first_line(error)
            continue
        except Exception as error:  # noqa: BLE001 - Hydra's own composition errors (an unknown key, a bad value)
            job.error = _hydra_message(error)
            continue
        earlier = by_folder.setdefault(job.folder.resolve(), job)
        if earlier is not job:
            if earlier.setting != job.setting:
                job.error = (f"trains in {job.folder}, which {earlier.label} trains with another setting: give "
                             "each job its own run_dir, or leave run_dir out (each setting gets its own folder)")
            else:
                job.same_as = earlier.index
    return jobs


def _hydra_message(error: BaseException) -> str:
    parts = [first_line(error)]
    if error.__cause__ is not None:
        parts.append(first_line(error.__cause__))
    return ": ".join(parts)


def why_the_same(job: PlannedJob, earlier: PlannedJob) -> str:
    """``job`` and ``earlier`` are one run: the keys they differ in, which cannot change what it computes."""
    from fsam.runfolder import differences

    changed = [line.split(":", 1)[0] for line in differences(earlier.config or {}, job.config or {})]
    if not changed:
        return f"{job.label} is the same run as job #{earlier.index}: it trains once"
    return (f"{job.label} is the same run as job #{earlier.index} ({', '.join(changed)} cannot change what it "
            "computes): it trains once")


def refuse_bad_jobs(jobs: Sequence[PlannedJob]) -> None:
    """ConfigError naming every job that cannot run, before any starts."""
    from fsam.errors import ConfigError

    bad = [job for job in jobs if job.error is not None]
    if bad:
        listed = "; ".join(f"{job.label}: {job.error}" for job in bad)
        raise ConfigError(f"{len(bad)} of {len(jobs)} jobs of this sweep cannot run, so none was started: {listed}")


def preview(job: PlannedJob) -> str:
    """What launching ``job`` would do in its run folder, read without touching it."""
    from fsam.runfolder import RunFolder, digest, read_metrics

    folder = RunFolder(job.folder)
    if not folder.path.exists():
        return "new: trains from the start"
    if folder.summary.exists():
        return "finished: skipped"
    if folder.stopped_status() is not None:
        return "diverged in an earlier launch: refused (delete the folder to retry)"
    if folder.lock.held_by_another():
        return "in use by another process now: refused"
    recorded, identity = folder.read_config()
    if recorded is not None and (identity is None or identity["digest"] != digest(job.setting or {})):
        return "holds a run of another setting: refused"
    epochs = len(read_metrics(folder.metrics))
    if (folder.checkpoints / "last.pt").exists():
        return f"unfinished: continues from its last checkpoint ({epochs} of {job.config['trainer']['epochs']} epochs done)"
    return "unfinished, without a checkpoint: trains from the start"
