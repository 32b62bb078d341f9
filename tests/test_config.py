"""The real configs compose with Hydra and pass the schema; bad values are refused with one clear line."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from fsam.config import RunConfig, load_config, to_plain
from fsam.config.run_folder import register_resolver
from fsam.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("model", "dataset", "optimizer", "schedule", "logger", "experiment")
register_resolver()  # train.py registers it the same way


def options(group: str) -> list[str]:
    """The options of a group; a file named with a leading underscore is a part the options share, not one."""
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml") if not path.stem.startswith("_"))


def compose_run(*overrides: str) -> tuple[dict, dict]:
    """The task config as train.py's job gets it (a plain dict, run_dir filled in), and Hydra's own settings
    (run_dir, sweep_dir, sweep_subdir resolved; chdir; the launcher node unresolved)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    hydra_settings = {
        "run_dir": os.path.normpath(str(cfg.hydra.run.dir)),
        "sweep_dir": str(cfg.hydra.sweep.dir),
        "sweep_subdir": str(cfg.hydra.sweep.subdir),
        "chdir": cfg.hydra.job.chdir,
        "launcher": OmegaConf.to_container(cfg.hydra.launcher, resolve=False),
    }
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = hydra_settings["run_dir"]
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    plain = OmegaConf.to_container(cfg, resolve=True)
    if plain["run_dir"] is None:  # as train.py's job does
        plain["run_dir"] = hydra_settings["run_dir"]
    return plain, hydra_settings


def run_dir_of(*overrides: str) -> str:
    return compose_run(*overrides)[0]["run_dir"]


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_of_every_group_composes_and_passes_the_schema(group, option):
    plain, _ = compose_run(f"{group}={option}")
    config = load_config(plain)
    assert isinstance(config, RunConfig)
    if group in ("model", "dataset", "optimizer", "schedule"):
        option_file = OmegaConf.load(CONFIGS / group / f"{option}.yaml")
        assert getattr(config, group).name == option_file.name


def test_every_group_has_its_options():
    assert {"sgd", "sam", "asam", "fsam", "fasam"} <= set(options("optimizer"))
    assert {"cosine", "multistep"} <= set(options("schedule"))
    assert {"none", "wandb"} <= set(options("logger"))
    assert {"quickstart", "paper_cifar100_resnet18"} <= set(options("experiment"))


def test_the_defaults_are_fsam_on_cifar100_with_resnet18_and_a_cosine_schedule():
    config = load_config(compose_run()[0])
    assert (config.model.name, config.dataset.name, config.optimizer.name) == ("resnet18", "cifar100", "fsam")
    assert config.schedule.name == "cosine" and config.logger.backend == "none"
    assert config.experiment_name == "default"


def test_the_paper_experiment_is_the_released_recipe():
    config = load_config(compose_run("experiment=paper_cifar100_resnet18")[0])
    assert config.model.name == "resnet18" and config.model.kwargs == {}
    assert config.dataset.name == "cifar100" and config.dataset.noise.kind == "none"
    augment = config.dataset.augment
    assert (augment.crop, augment.padding, augment.flip, augment.normalize) == (True, 4, True, True)
    assert (augment.cutout, augment.cutout_size, augment.cutout_prob) == (True, 16, 0.5)
    opt = config.optimizer
    assert (opt.name, opt.base, opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == (
        "fsam", "sgd", 0.05, 0.9, False, 1e-3
    )
    assert (opt.rho, opt.sigma, opt.lmbda, opt.ema_order, opt.no_decay_norm_and_bias) == (0.2, 1.0, 0.6, "code", False)
    assert config.schedule.name == "cosine" and config.schedule.warmup_epochs == 0
    trainer = config.trainer
    assert (trainer.epochs, trainer.batch_size, trainer.micro_batches, trainer.seed) == (200, 128, 1, 1)
    assert trainer.label_smoothing == 0.0 and trainer.amp == "off"


def test_the_quickstart_is_digits_with_a_small_network_and_its_own_run_folder(isolated_records):
    plain, _ = compose_run("experiment=quickstart")
    config = load_config(plain)
    assert config.dataset.name == "digits" and config.optimizer.name == "fsam"
    assert config.model.name == "pyramidnet110" and config.model.kwargs["depth"] == 8
    assert config.trainer.amp == "off"
    assert Path(config.run_dir).parent.parent == isolated_records
    assert Path(config.run_dir).parent.name.startswith("digits-pyramidnet8-fsam-")
    assert Path(config.run_dir).name == "seed1"


def test_the_launchers_compose_with_submitit():
    slurm = compose_run("hydra/launcher=slurm")[1]["launcher"]
    assert slurm["_target_"].endswith("SlurmLauncher")
    for key in ("partition", "gpus_per_node", "timeout_min", "mem_gb", "cpus_per_task", "account", "nodes",
                "tasks_per_node", "signal_delay_s"):
        assert key in slurm
    assert slurm["max_num_timeout"] > 0  # requeue on timeout, which resumes from the checkpoint
    assert compose_run("hydra/launcher=local")[1]["launcher"]["_target_"].endswith("LocalLauncher")
    assert compose_run()[1]["launcher"]["_target_"].endswith("BasicLauncher")


def test_the_run_folder_is_a_function_of_the_setting_however_it_is_typed(isolated_records):
    base = run_dir_of("optimizer=sam", "optimizer.lr=0.1")
    assert run_dir_of("optimizer.lr=0.1", "optimizer=sam") == base  # order does not matter
    assert run_dir_of("optimizer=sam", "optimizer.lr=1e-1") == base  # nor how a number is written
    assert Path(base).parent.name.startswith("cifar100-resnet18-sam-")
    assert run_dir_of("optimizer=sam", "optimizer.lr=0.2") != base
    assert Path(run_dir_of("optimizer=sam", "optimizer.lr=0.1", "trainer.seed=3")) == Path(base).parent / "seed3"
    # where the data lives, the device and logging do not change the results, so they do not change the folder
    same = run_dir_of("optimizer=sam", "optimizer.lr=0.1", "dataset.root=/elsewhere", "trainer.device=cpu",
                      "logger=wandb", "logger.mode=offline", "trainer.checkpoint_every_steps=100",
                      "experiment_name=other")
    assert same == base
    # a value equal to the default is the default, whether it comes from a group option or is typed out
    assert run_dir_of("optimizer=sam", "optimizer.lr=0.1", "optimizer.momentum=0.9") == base
    assert run_dir_of("model=pyramidnet110") == run_dir_of("model=pyramidnet110", "+model.kwargs.depth=110",
                                                           "+model.kwargs.alpha=270.0")


def test_an_experiment_file_and_the_same_settings_typed_out_share_one_folder(isolated_records):
    typed = run_dir_of(
        "dataset=digits", "model=pyramidnet110", "+model.kwargs.depth=8", "+model.kwargs.alpha=16",
        "+model.kwargs.bottleneck=false", "optimizer.lr=0.1", "optimizer.weight_decay=0.0005", "trainer.epochs=10",
        "trainer.batch_size=64", "trainer.amp=off",
    )
    assert run_dir_of("experiment=quickstart") == typed


def test_an_edited_default_and_the_same_value_on_the_command_line_share_one_folder(tmp_path, isolated_records):
    edited = tmp_path / "configs"
    shutil.copytree(CONFIGS, edited)
    option = edited / "optimizer" / "_common.yaml"  # what every method's file starts from
    option.write_text(option.read_text().replace("lr: 0.05", "lr: 0.1"))
    assert "lr: 0.1" in option.read_text()
    with initialize_config_dir(config_dir=str(edited), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert os.path.normpath(str(cfg.hydra.run.dir)) == run_dir_of("optimizer.lr=0.1")
    assert run_dir_of("optimizer.lr=0.1") != run_dir_of()


def test_a_sweep_job_finds_the_same_folder_as_the_single_run(isolated_records):
    plain, hydra_settings = compose_run("optimizer=sgd", "trainer.seed=2")
    swept = os.path.normpath(os.path.join(hydra_settings["sweep_dir"], hydra_settings["sweep_subdir"]))
    assert swept == plain["run_dir"]
    assert hydra_settings["chdir"] is False


def test_config_round_trips_through_plain_data():
    config = load_config(compose_run("experiment=quickstart")[0])
    assert load_config(to_plain(config)) == config
    assert isinstance(load_config(to_plain(config)).optimizer.betas, tuple)


BAD_VALUES = [
    ("optimizer.rho", 0.0, "> 0"),
    ("optimizer.rho", -1.0, "> 0"),
    ("optimizer.lmbda", 1.0, "[0, 1)"),
    ("optimizer.lmbda", -0.1, "[0, 1)"),
    ("optimizer.sigma", -0.5, ">= 0"),
    ("optimizer.lr", 0.0, "> 0"),
    ("optimizer.momentum", 1.0, "[0, 1)"),
    ("optimizer.weight_decay", -1e-4, ">= 0"),
    ("optimizer.name", "adam", "sgd, sam, asam, fsam, fasam"),
    ("optimizer.base", "rmsprop", "sgd, adamw"),
    ("optimizer.ema_order", "random", "code, paper"),
    ("trainer.batch_size", 0, ">= 1"),
    ("trainer.epochs", 0, ">= 1"),
    ("trainer.epochs", "ten", "whole number"),
    ("trainer.epochs", 2.5, "whole number"),
    ("trainer.amp", "fp32", "bf16, fp16, off"),
    ("trainer.amp", False, 'quote them, "off"'),
    ("trainer.device", "gpu", "auto, cpu, cuda or cuda:N"),
    ("trainer.channels_last", "yes", "true or false"),
    ("trainer.label_smoothing", 1.0, "[0, 1)"),
    ("trainer.micro_batches", 0, ">= 1"),
    ("dataset.noise.ratio", 1.5, "[0, 1]"),
    ("dataset.noise.kind", "pairflip", "none, symmetric, asymmetric"),
    ("dataset.name", "mnist", "cifar10, cifar100, digits, imagenet"),
    ("dataset.augment.cutout_prob", 2.0, "[0, 1]"),
    ("schedule.name", "linear", "cosine, multistep"),
    ("schedule.warmup_epochs", -1.0, ">= 0"),
    ("logger.mode", "sometimes", "auto, online, offline"),
]


def with_value(plain: dict, dotted_key: str, value) -> dict:
    node = plain
    *parents, last = dotted_key.split(".")
    for parent in parents:
        node = node[parent]
    node[last] = value
    return plain


@pytest.mark.parametrize("key, value, allowed", BAD_VALUES)
def test_a_bad_value_is_refused_with_key_value_and_what_is_allowed(key, value, allowed):
    plain = with_value(compose_run()[0], key, value)
    with pytest.raises(ConfigError) as caught:
        load_config(plain)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{key}=")
    assert (repr(value) if isinstance(value, str) else str(value)) in message
    assert allowed in message


def test_an_unknown_model_lists_the_models():
    with pytest.raises(ConfigError, match=r"model.name='lenet' is not a model: choose one of .*resnet18.*timm:"):
        load_config(with_value(compose_run()[0], "model.name", "lenet"))


def test_any_timm_model_name_passes_the_schema():
    assert load_config(with_value(compose_run()[0], "model.name", "timm:convnext_tiny")).model.name == "timm:convnext_tiny"


def test_an_unknown_key_is_refused_and_the_allowed_keys_are_listed():
    plain = compose_run()[0]
    plain["trainer"]["epoch"] = 3
    with pytest.raises(ConfigError, match=r"trainer.epoch is not a known key: .*epochs, batch_size"):
        load_config(plain)


def config_error_of(*overrides: str) -> str:
    """The ConfigError message that composing these overrides raises: Hydra resolves the run folder from the
    checked config, so a bad value stops the composition (train.py prints the ConfigError alone)."""
    with pytest.raises(Exception) as raised:
        compose_run(*overrides)
    error: BaseException | None = raised.value
    while error is not None and not isinstance(error, ConfigError):
        error = error.__cause__ or error.__context__
    assert error is not None, f"no ConfigError behind {raised.value!r}"
    return str(error)


def test_keys_that_must_agree_are_checked_together():
    assert re.search(r"trainer.micro_batches=8 .* trainer.batch_size=4",
                     config_error_of("trainer.batch_size=4", "trainer.micro_batches=8"))
    assert re.search(r"schedule.warmup_epochs=2 .* trainer.epochs=2",
                     config_error_of("trainer.epochs=2", "schedule.warmup_epochs=2"))


def test_missing_keys_take_the_schema_defaults_and_a_plain_dict_is_enough():
    config = load_config({"run_dir": "somewhere", "trainer": {"epochs": 3}})
    assert config.trainer.epochs == 3 and config.trainer.batch_size == 128
    assert config.optimizer.rho == 0.2 and config.optimizer.lmbda == 0.6
    assert load_config({}).run_dir is None  # the engine then picks runs/<setting>/seed<seed>
    with pytest.raises(ConfigError, match="run_dir='' is not allowed: must not be empty"):
        load_config({"run_dir": ""})


def slurm_example_overrides(script: Path) -> list[list[str]]:
    """The train.py overrides of each command in an example script (line continuations joined, shell variables
    given sample values, sweeps reduced to their first value)."""
    text = script.read_text().replace("\\\n", " ")
    text = text.replace('"$PARTITION"', "gpu").replace('${ACCOUNT:+hydra.launcher.account="$ACCOUNT"}', "")
    commands = []
    for line in text.splitlines():
        if "train.py" not in line or line.lstrip().startswith("#"):
            continue
        words = line.split("train.py", 1)[1].split()
        overrides = [w.split(",")[0] for w in words if "=" in w and not w.startswith("hydra.") and w != '"$@"']
        launcher = [w for w in words if w.startswith("hydra/launcher=")]
        commands.append(overrides + [w for w in launcher if w not in overrides])
    return commands


@pytest.mark.parametrize("script", ["sweep.sh", "single_gpu.sbatch", "multi_node.sbatch"])
def test_the_slurm_examples_compose_and_pass_the_schema(script):
    path = CONFIGS.parent / "scripts" / "slurm" / script
    commands = slurm_example_overrides(path)
    assert commands, f"{script} has no train.py command"
    for overrides in commands:
        config = load_config(compose_run(*overrides)[0])
        assert config.trainer.checkpoint_every_steps > 0  # a requeued job loses little work
    if script.endswith(".sbatch"):
        text = path.read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=USR1@" in text
        assert "scontrol requeue" in text and "138" in text  # 128 + SIGUSR1: the run checkpointed and stopped


@pytest.mark.parametrize("key, given_by", [("image_size", "dataset.image_size"), ("pretrained", "model.pretrained"),
                                           ("pretrained_path", "model.pretrained_path")])
def test_a_model_kwarg_that_another_key_gives_is_refused_by_name(key, given_by):
    with pytest.raises(ConfigError, match=f"model.kwargs.{key} is not allowed: it is given by {given_by}; set that"):
        load_config({"model": {"name": "mlp", "kwargs": {key: 8}}})
