"""The cluster path on a real SLURM scheduler: the one-node cluster of scripts/slurm/local_cluster.sh, started here
(root and the distribution's slurm-wlm and munge packages; skipped with the reason where it cannot start).
Run alone with ``pytest -m slurm``; .ci/run runs them as their own stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "scripts" / "slurm" / "local_cluster.sh"
# One CPU and no GPU per job, so that two jobs run at once on a 2-core machine.
SMALL_JOBS = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
              "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm() -> None:
    """The local cluster, up (started if it is not), or the reason it cannot be."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster's daemons need root")
    if not all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch")):
        pytest.skip("SLURM is not installed here (apt-get install slurm-wlm munge)")
    started = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        pytest.skip(f"the local SLURM cluster did not start: {started.stderr.strip() or started.stdout.strip()}")


def jobs_under(folder: Path) -> list[tuple[str, str]]:
    """(job id as squeue shows it, state) of the jobs whose batch script lies under ``folder`` (this test's sweeps:
    submitit writes its scripts into the sweep folder), so that another test's jobs are never touched."""
    shown = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%o"], capture_output=True,
                           text=True).stdout
    return [(job, state) for job, state, command in (line.split("|", 2) for line in shown.splitlines() if line)
            if str(folder) in command]


def cancel_jobs_under(folder: Path) -> None:
    for job, state in jobs_under(folder):
        if state in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED"):
            subprocess.run(["scancel", job], check=False)


def train_py(*arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *arguments], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


def test_a_sweep_of_two_methods_and_two_seeds_runs_every_job_on_the_scheduler(slurm, isolated_records):
    result = train_py("-m", *SMALL_JOBS, "experiment=quickstart", "trainer.epochs=1", "optimizer=sgd,sam",
                      "trainer.seed=1,2")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    folders = sorted(path.parent for path in isolated_records.glob("*/seed*/summary.json"))
    assert [(folder.parent.name.split("-")[2], folder.name) for folder in folders] == [
        ("sam", "seed1"), ("sam", "seed2"), ("sgd", "seed1"), ("sgd", "seed2")]
    for number in range(4):
        assert f"job #{number} (" in output and "_log.out" in output  # each job's log, named as it is submitted
    assert "sweep: 4 of 4 jobs done (4 finished)" in output
    assert "sacct" not in output  # no accounting on this cluster: the states come from squeue, quietly
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        assert (summary["status"], summary["epochs"]) == ("finished", 1)


def test_a_job_cancelled_without_a_result_ends_the_sweep_with_its_outcome_rather_than_a_wait(slurm, isolated_records,
                                                                                           tmp_path):
    """Without accounting, submitit alone never learns that a job which wrote no result has ended."""
    sweep = subprocess.Popen([sys.executable, str(REPO / "train.py"), "-m", *SMALL_JOBS, "experiment=quickstart",
                              "trainer.epochs=30", "optimizer=sgd"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 120
        job_id = None
        while job_id is None and time.monotonic() < deadline:
            running = [job for job, state in jobs_under(isolated_records) if state == "RUNNING"]
            job_id = running[0] if running else None
            time.sleep(1)
        assert job_id, "the job never ran"
        time.sleep(5)
        subprocess.run(["scancel", "--signal=KILL", "--full", job_id], check=True)  # no chance to write a result
        output, _ = sweep.communicate(timeout=120)
    finally:
        cancel_jobs_under(isolated_records)
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 2, output
    assert "job #0 (experiment=quickstart trainer.epochs=30 optimizer=sgd) failed" in output
    assert "Traceback" not in output


def test_sharpness_jobs_on_the_scheduler_measure_each_run(slurm, isolated_records, tmp_path):
    result = train_py("experiment=quickstart", "trainer.epochs=1", "optimizer=sgd", "trainer.device=cpu")
    assert result.returncode == 0, result.stderr
    (run_dir,) = [path.parent for path in isolated_records.glob("*/seed1/summary.json")]
    measured = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sharpness.py"), str(isolated_records), "--what", "eigen",
         "--images", "32", "--batch-size", "32", "--power-iterations", "3", "--launcher", "slurm",
         "--gpus-per-job", "0", "--cpus-per-job", "1", "--mem-gb", "2", "--timeout-min", "10",
         "--log-dir", str(tmp_path / "logs")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert measured.returncode == 0, measured.stdout + measured.stderr
    assert "submitted job" in measured.stderr and f"{run_dir}: measured eigen" in measured.stdout
    assert json.loads((run_dir / "analysis" / "sharpness.json").read_text())["measurements"]["eigen"]


def job_state(job_id: str) -> str:
    shown = subprocess.run(["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format=%T"],
                           capture_output=True, text=True)
    return shown.stdout.strip()


def test_the_single_gpu_sbatch_file_requeues_itself_after_sigusr1_and_finishes(slurm, isolated_records, tmp_path):
    """The plain-sbatch path: SIGUSR1 (what --signal=USR1@180 sends before the time limit) checkpoints and exits
    138, the script requeues the job, and the requeued job continues the same run folder to its end."""
    from datagen import write_cifar_archive

    root = tmp_path / "cifar100"
    write_cifar_archive(root, "cifar100", n_train=64, n_test=32)
    log = tmp_path / "slurm-%j.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={REPO}", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G",
         "--time=10", f"--output={log}", str(REPO / "scripts" / "slurm" / "single_gpu.sbatch"),
         f"dataset.root={root}", "dataset.download=false", "dataset.num_workers=0", "trainer.device=cpu",
         "trainer.epochs=2", "trainer.batch_size=16", "trainer.checkpoint_every_steps=1"],
        capture_output=True, text=True, check=True, env=dict(os.environ))
    job_id = submitted.stdout.strip().split(";")[0]
    metrics = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # until the run has trained an epoch
        found = list(isolated_records.glob("*/seed1/metrics.jsonl"))
        if found and found[0].read_text().count('"epoch"') >= 1:
            metrics = found[0]
            break
        time.sleep(1)
    assert metrics is not None, f"the job never trained an epoch (state {job_state(job_id)})"
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # to the job's steps, as --signal does
    deadline = time.monotonic() + 300
    while job_state(job_id) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and time.monotonic() < deadline:
        time.sleep(2)
    output = Path(str(log).replace("%j", job_id)).read_text()
    assert job_state(job_id) == "COMPLETED", output
    assert f"requeueing job {job_id}" in output
    run_dir = metrics.parent
    launches = [json.loads(line) for line in (run_dir / "launches.jsonl").read_text().splitlines()]
    assert len(launches) == 2, launches  # the first launch, stopped by the signal, and the requeued one
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["epochs"]) == ("finished", 2)


def test_the_same_sweep_submitted_while_it_runs_is_refused_naming_the_holder_and_its_slurm_job(slurm,
                                                                                              isolated_records):
    sweep = ["-m", *SMALL_JOBS, "experiment=quickstart", "trainer.epochs=30", "optimizer=sgd"]
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *sweep], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 180
        metrics = []
        while not metrics and time.monotonic() < deadline:  # the job holds its folder once it has trained an epoch
            metrics = [path for path in isolated_records.glob("*/seed1/metrics.jsonl") if path.stat().st_size]
            time.sleep(1)
        assert metrics, "the first sweep's job never trained"
        (job_id,) = [job for job, state in jobs_under(isolated_records) if state == "RUNNING"]  # as squeue names it
        before = {path: path.read_bytes() for path in metrics[0].parent.iterdir() if path.is_file()
                  and path.name in ("config.yaml", "launches.jsonl")}
        second = train_py(*sweep)
        output = second.stdout + second.stderr
        assert second.returncode == 2, output
        assert "refused" in output and f"(SLURM job {job_id})" in output, output
        assert {path: path.read_bytes() for path in before} == before  # the first's records untouched
    finally:
        cancel_jobs_under(isolated_records)
        first.kill()
        first.communicate(timeout=60)
