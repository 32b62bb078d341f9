"""A study as a user launches it: every spelling of a method is one setting, a sweep checks every job before the
first starts, reports how each job ended, and exits with status 2 unless every job finished; --dry-run shows each
job's real run folder without training or writing anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fsam.config import load_config, to_plain
from fsam.config.run_folder import NOT_KNOWN_HERE, register_resolver, run_folder
from fsam.errors import ConfigError
from fsam.names import METHOD_REGISTRY, METHODS
from fsam.runfolder import RunFolder, default_run_dir, digest, setting
from hydra_plugins.fsam_launchers.jobs import check_method_choice

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXPERIMENTS = CONFIGS / "experiment"
register_resolver()


def composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)


def checked(*overrides: str) -> dict:
    plain = composed(*overrides)
    return to_plain(load_config({**plain, "run_dir": "x"}))


# ------------------------------------------------------------------------------- one setting per method


def test_the_optimizer_options_differ_only_in_the_method_they_name():
    """Each option adds its name to what they all share, so a method's other values never depend on which option
    (or which experiment's option) was chosen first."""
    for method in METHODS:
        option = yaml.safe_load((CONFIGS / "optimizer" / f"{method}.yaml").read_text())
        assert option == {"defaults": ["_common", "_self_"], "name": method}
    assert "name" not in yaml.safe_load((CONFIGS / "optimizer" / "_common.yaml").read_text())


def test_no_experiment_file_names_the_method_in_its_body():
    """A body's optimizer.name would be applied after a command line's optimizer=<method> and silently win; the
    method is chosen in the defaults list (override /optimizer: ...), which the command line overrides."""
    for path in sorted(EXPERIMENTS.rglob("*.yaml")):
        body = yaml.safe_load(path.read_text()) or {}
        assert "name" not in (body.get("optimizer") or {}), path.name


@pytest.mark.parametrize("experiment", [None, "quickstart", "paper_cifar100_resnet18", "paper_cifar10_resnet18_sam",
                                        "figure1_digits", "paper_cifar100_deit_small_adamw"])
def test_optimizer_and_optimizer_name_are_one_setting_with_or_without_an_experiment(experiment):
    base = [f"experiment={experiment}"] if experiment else []
    for method in ("sgd", "sam", "fsam"):
        by_group, by_name = checked(*base, f"optimizer={method}"), checked(*base, f"optimizer.name={method}")
        assert by_group["optimizer"]["name"] == method
        assert by_group == by_name, (experiment, method)


def test_a_method_left_without_a_radius_gets_its_own_from_the_registry():
    for method in ("sam", "asam", "fsam", "fasam"):
        assert checked("experiment=quickstart", f"optimizer={method}")["optimizer"]["rho"] == METHOD_REGISTRY[method].rho
    assert checked("experiment=quickstart", "optimizer=sam", "optimizer.rho=0.3")["optimizer"]["rho"] == 0.3
    assert load_config({"optimizer": {"name": "sam"}}).optimizer.rho == 0.1  # the library path: the same default
    assert checked("experiment=paper_cifar100_resnet18", "optimizer=sam")["optimizer"]["rho"] == 0.2  # the recipe's



def test_the_library_gives_each_method_the_radius_the_configs_give_it():
    import torch

    from fsam.optim import FSAM, SAM, create_optimizer

    def radius(optimizer):
        return optimizer.param_groups[0]["rho"]

    weights = [torch.nn.Parameter(torch.ones(2))]
    built = {"sam": SAM(weights, torch.optim.SGD, lr=0.1), "asam": SAM(weights, torch.optim.SGD, lr=0.1, adaptive=True),
             "fsam": FSAM(weights, torch.optim.SGD, lr=0.1), "fasam": FSAM(weights, torch.optim.SGD, lr=0.1, adaptive=True)}
    for method, optimizer in built.items():
        assert radius(optimizer) == radius(create_optimizer(weights, method)) == METHOD_REGISTRY[method].rho


def test_existing_runs_keep_their_folders():
    """The digests of the shipped defaults did not move when the method's radius moved into the registry."""
    def folder(*overrides):
        return default_run_dir(composed(*overrides), 1).parent.name

    assert folder("experiment=quickstart") == "digits-pyramidnet8-fsam-d9923828717e"
    assert folder("experiment=quickstart", "optimizer=sam") == "digits-pyramidnet8-sam-d1c56e003a61"
    assert folder("experiment=quickstart", "optimizer=sgd") == "digits-pyramidnet8-sgd-9e603b604ca0"
    assert folder("experiment=paper_cifar100_resnet18") == "cifar100-resnet18-fsam-49c7758d8fc4"
    assert folder("experiment=paper_cifar100_resnet18", "optimizer.name=sam") == "cifar100-resnet18-sam-aa537466ae68"
    # a run once launched as optimizer.name=sam without an experiment (then at F-SAM's radius) is found again with it
    assert folder("optimizer.name=sam", "optimizer.rho=0.2") == "cifar100-resnet18-sam-26e5890b3dfe"


def write_option(root: Path, group: str, name: str, text: str) -> None:
    (root / group).mkdir(parents=True, exist_ok=True)
    (root / group / f"{name}.yaml").write_text(text)


def test_a_config_file_that_overrides_a_chosen_optimizer_is_refused_by_name(tmp_path):
    write_option(tmp_path, "optimizer", "mine", "name: fsam\nlr: 0.1\n")
    sources = [{"schema": "pkg", "path": "hydra.conf"}, {"schema": "file", "path": str(tmp_path)}]
    check_method_choice(["optimizer=mine"], {"optimizer": {"name": "fsam"}}, sources)  # an option of another name
    check_method_choice(["optimizer.name=sam"], {"optimizer": {"name": "sam"}}, sources)
    with pytest.raises(ConfigError, match=r"optimizer=mine is overridden by a config file that sets optimizer.name=sam "
                                          r"\(.*\): write optimizer.name=fsam, or"):
        check_method_choice(["optimizer=mine"], {"optimizer": {"name": "sam"}}, sources)


# ------------------------------------------------------------------------------- identity details


def test_values_that_differ_only_in_tiny_digits_are_different_settings():
    """A learning rate or weight decay of 1e-13 is a value, not a rounding error of 0."""
    def key(**optimizer):
        return digest(setting({"run_dir": "x", "optimizer": {"name": "sgd", **optimizer}}))

    assert key(lr=1e-13) != key(lr=2e-13)
    assert key(weight_decay=1e-13) != key(weight_decay=0.0)
    assert key(lr=0.15000000000000002) == key(lr=0.15)  # a swept float's last bit is not a new setting


def test_imagenet_ignores_the_augmentation_switches_so_they_do_not_split_its_runs():
    imagenet = {"run_dir": "x", "dataset": {"name": "imagenet"}}
    cutout_off = {"run_dir": "x", "dataset": {"name": "imagenet", "augment": {"cutout": False, "flip": False}}}
    assert digest(setting(imagenet)) == digest(setting(cutout_off))
    cifar = {"run_dir": "x", "dataset": {"name": "cifar10", "augment": {"cutout": False}}}
    assert digest(setting(cifar)) != digest(setting({"run_dir": "x", "dataset": {"name": "cifar10"}}))


def test_the_hydra_view_of_a_config_does_not_show_a_run_folder_it_cannot_know():
    """``--cfg hydra`` resolves Hydra's settings without the job's keys: a folder computed from the defaults
    would be another run's."""
    only_hydra = OmegaConf.create({"hydra": {"run": {"dir": "x"}}})
    assert run_folder(_root_=only_hydra) == NOT_KNOWN_HERE
    job = OmegaConf.create({"hydra": {}, **composed("experiment=quickstart")})
    assert Path(run_folder(_root_=job)).parent.name == "digits-pyramidnet8-fsam-d9923828717e"


# ------------------------------------------------------------------------------- through train.py


def held(folder: Path) -> RunFolder:
    """The run folder held by this process, as another launch training it would."""
    run = RunFolder(folder)
    run.hold()
    return run


def folder_of(*overrides: str, runs: Path) -> Path:
    return runs / default_run_dir(composed(*overrides), 1).relative_to(Path(os.environ["FSAM_RUNS"]))


def test_a_sweep_with_bad_values_names_every_bad_job_and_starts_none(train_py, isolated_records):
    result = train_py("-m", "experiment=quickstart", "optimizer.name=sgd", "optimizer.lr=0.05,-1,0.2,0",
                      "trainer.device=cpu")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: 2 of 4 jobs of this sweep cannot run, so none was started: ")
    assert "job #1 (experiment=quickstart optimizer.name=sgd optimizer.lr=-1 trainer.device=cpu): optimizer.lr=-1.0 " \
           "is not allowed: must be > 0" in line and "job #3 (" in line and "job #2" not in line
    assert not list(isolated_records.rglob("config.yaml"))  # nothing trained, nothing written


def test_a_sweep_reports_each_jobs_outcome_and_fails_when_one_did_not_finish(train_py, tiny_cli, isolated_records):
    """SGD at two radii is one run (trained once); a run held by another process is refused, never 'finished'."""
    holder = held(folder_of(*tiny_cli, "optimizer=fsam", "optimizer.rho=0.2", runs=isolated_records))
    try:
        result = train_py("-m", "optimizer=sgd,fsam", "optimizer.rho=0.1,0.2", *tiny_cli)
    finally:
        holder.release()
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("job #", "note:"))]
    assert lines[0].startswith("note: job #1 (optimizer=sgd optimizer.rho=0.2 ") and \
        "is the same run as job #0 (optimizer.rho cannot change what it computes): it trains once" in lines[0]
    outcomes = [line.split(") ", 1)[1].split(";")[0].split(":")[0] for line in lines[1:]]
    assert outcomes == ["finished", "skipped", "finished", "refused"]
    assert "the same run as job #0; sweep: 2 of 4 jobs done (1 finished, 1 skipped)" in lines[2]
    assert "is in use by pid" in lines[4] and lines[4].endswith("sweep: 4 of 4 jobs done (2 finished, 1 refused, "
                                                                "1 skipped), " + lines[4].rsplit(", ", 1)[1])
    (error,) = result.stderr.strip().splitlines()[-1:]
    assert error.startswith("error: 1 of 4 jobs of this sweep did not finish: job #3 (optimizer=fsam "
                            "optimizer.rho=0.2 ") and "refused: the run folder" in error
    assert len(list(isolated_records.rglob("summary.json"))) == 2


def test_a_stop_signal_ends_the_whole_sweep_with_its_exit_status(tiny_cli, isolated_records):
    command = [sys.executable, str(REPO / "tests" / "inject.py"), "stop_at", "-m", "optimizer=sgd,fsam", *tiny_cli,
               "trainer.checkpoint_every_steps=1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 143, result.stderr
    assert "job #0 (optimizer=sgd " in result.stdout and " stopped: " in result.stdout
    assert "job #1" not in result.stdout  # the second job never started
    (folder,) = [path.parent for path in isolated_records.rglob("config.yaml")]
    assert "-sgd-" in str(folder) and (folder / "checkpoints" / "last.pt").exists()


def test_dry_run_shows_each_jobs_real_folder_and_state_and_writes_nothing(train_py, isolated_records):
    finished = default_run_dir(composed("experiment=quickstart", "optimizer=sgd"), 1)
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text(json.dumps({"status": "finished"}))
    before = sorted(isolated_records.rglob("*"))
    result = train_py("-m", "experiment=quickstart", "optimizer=sgd,fsam", "optimizer.rho=0.1,0.3", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == [
        f"job #0 (experiment=quickstart optimizer=sgd optimizer.rho=0.1): {finished}: finished: skipped",
        f"job #1 (experiment=quickstart optimizer=sgd optimizer.rho=0.3): {finished}: the same run as job #0",
        f"job #2 (experiment=quickstart optimizer=fsam optimizer.rho=0.1): "
        f"{default_run_dir(composed('experiment=quickstart', 'optimizer.rho=0.1'), 1)}: new: trains from the start",
        f"job #3 (experiment=quickstart optimizer=fsam optimizer.rho=0.3): "
        f"{default_run_dir(composed('experiment=quickstart', 'optimizer.rho=0.3'), 1)}: new: trains from the start",
        "4 jobs, 3 runs: nothing was started (--dry-run)",
    ]
    assert sorted(isolated_records.rglob("*")) == before  # no sweep folder, no run folder
    single = train_py("experiment=quickstart", "--dry-run")
    assert single.stdout.splitlines()[0] == (f"job #0 (experiment=quickstart): {isolated_records}/"
                                             "digits-pyramidnet8-fsam-d9923828717e/seed1: new: trains from the start")
    bad = train_py("-m", "experiment=quickstart", "optimizer.lr=0.1,-1", "--dry-run")
    assert bad.returncode == 2 and "job #1 (experiment=quickstart optimizer.lr=-1): -: error: optimizer.lr=-1.0" \
        in bad.stdout and bad.stderr.strip() == "error: 1 of 2 jobs cannot run: job #1"
