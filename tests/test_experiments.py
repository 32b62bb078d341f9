"""The paper's grid as experiment files: each composes and passes the schema, each says what its name says, and the
grids of scripts/reproduce.py map every cell to a run folder of its own. Composition only: nothing is trained."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fsam.config import load_config
from fsam.runfolder import default_run_dir
from test_config import CONFIGS, compose_run
from test_reproduce import reproduce_module

EXPERIMENTS = CONFIGS / "experiment"
# Every file, bases included (base/<name>.yaml is the option base/<name>): a base must compose on its own too.
EXPERIMENT_OPTIONS = sorted(str(path.relative_to(EXPERIMENTS).with_suffix("")) for path in EXPERIMENTS.rglob("*.yaml"))
SETTINGS = [name for name in EXPERIMENT_OPTIONS if not name.startswith("base/")]
# A setting file's name says its data set, label noise, network and method: paper_cifar10_sym40_resnet18_fsam.
NAME = re.compile(r"(?:paper_)?(?P<dataset>cifar10|cifar100|imagenet)_(?:(?P<noise>a?sym)(?P<percent>\d+)_)?"
                  r"(?P<network>\w+?)_(?P<method>sgd|sam|fsam|asam|fasam|adamw)")
NOISE_KINDS = {"sym": "symmetric", "asym": "asymmetric"}
NETWORKS = {"resnet18": "resnet18", "wrn28_10": "wrn28_10_release", "pyramidnet110": "pyramidnet110",
            "vgg16_bn": "vgg16_bn_release", "resnet50": "resnet50_imagenet", "deit_small": "deit_small",
            "vit_scratch": "vit_cifar"}
PAPER_GRIDS = ("cifar10", "cifar100", "label_noise", "imagenet", "vit", "ablation_lambda_sigma", "ablation_rho")


def composed(option: str) -> dict:
    """The experiment as train.py's job validates it (Hydra's composition, the run folder filled in)."""
    return compose_run(f"experiment={option}")[0]


@pytest.mark.parametrize("option", EXPERIMENT_OPTIONS)
def test_every_experiment_file_composes_and_passes_the_schema(option):
    config = load_config(composed(option))
    assert config.run_dir


@pytest.mark.parametrize("option", [name for name in SETTINGS if name.endswith(("_sgd", "_sam", "_fsam", "_asam",
                                                                                   "_fasam", "_adamw"))])
def test_a_setting_file_is_what_its_name_says(option):
    parts = NAME.fullmatch(option)
    assert parts, f"{option} does not follow <dataset>[_<noise>]_<network>_<method>"
    config = load_config(composed(option))
    assert config.experiment_name == option
    assert config.dataset.name == parts["dataset"]
    assert config.model.name == NETWORKS[parts["network"]]
    method = parts["method"]
    assert config.optimizer.name == ("sgd" if method == "adamw" else method)
    if method == "adamw" or parts["network"] in ("deit_small", "vit_scratch"):
        assert config.optimizer.base == "adamw"
    if parts["noise"]:
        assert config.dataset.noise.kind == NOISE_KINDS[parts["noise"]]
        assert config.dataset.noise.ratio == pytest.approx(int(parts["percent"]) / 100)
        assert config.dataset.noise.seed is None  # one noisy set per training seed, as the release
    else:
        assert config.dataset.noise.kind == "none"


@pytest.mark.parametrize("option", [name for name in SETTINGS if name.startswith("paper_cifar")
                                    and "deit" not in name and name != "paper_cifar100_resnet18"])
def test_the_paper_cifar_files_use_the_release_recipe_networks_last_batch_and_float32(option):
    config = load_config(composed(option))
    assert config.model.kwargs.get("init") == "release"
    assert (config.trainer.epochs, config.trainer.batch_size, config.trainer.amp) == (200, 128, "off")
    assert (config.optimizer.base, config.optimizer.lr, config.optimizer.weight_decay) == ("sgd", 0.05, 0.001)
    assert config.schedule.name == "cosine" and config.dataset.augment.cutout
    assert not config.dataset.drop_last  # 391 steps per epoch, as the release
    expected_rho = {"sam": 0.2, "fsam": 0.2, "asam": 0.5 if "cifar10_" in option else 1.0}
    expected_rho["fasam"] = expected_rho["asam"]
    if config.optimizer.name in expected_rho:
        assert config.optimizer.rho == expected_rho[config.optimizer.name]


def test_the_grid_files_pin_rho_instead_of_taking_the_configs_default():
    for option in filter(NAME.fullmatch, SETTINGS):
        text = (EXPERIMENTS / f"{option}.yaml").read_text()
        if re.search(r"override /optimizer: (sam|asam|fsam|fasam)\b", text):
            assert re.search(r"^\s+rho: ", text, re.MULTILINE), f"{option} takes rho from configs/optimizer/"


def test_the_deit_files_fine_tune_timm_weights_with_drop_path():
    for dataset in ("cifar10", "cifar100"):
        config = load_config(composed(f"paper_{dataset}_deit_small_fsam"))
        assert config.model.pretrained and config.model.kwargs == {"drop_path_rate": 0.1}
        assert config.dataset.image_size == 224 and config.optimizer.base == "adamw"


@pytest.fixture(scope="module")
def grid_folders() -> dict[str, list[tuple[list[str], Path]]]:
    """Every cell (one seed) of every grid and the run folder it composes to."""
    module = reproduce_module()
    cells = {name: [cell for block in blocks for cell in module.expand([*block, "trainer.seed=1"])]
             for name, (_, blocks) in module.GRIDS.items() if name not in module.STUDY_GRIDS}  # a study's stages
             # are tested in tests/test_study.py and tests/test_comparison.py
    unique = sorted({tuple(cell) for grid in cells.values() for cell in grid})  # "all" repeats the paper grids
    folder = {cell: default_run_dir(config) for cell, config in zip(unique, module.compose_cells(list(map(list, unique))))}
    return {name: [(cell, folder[tuple(cell)]) for cell in grid] for name, grid in cells.items()}


def test_every_cell_of_a_grid_trains_in_a_folder_of_its_own(grid_folders):
    for name, cells in grid_folders.items():
        if name == "all":
            continue
        seen: dict[Path, list[str]] = {}
        for cell, folder in cells:
            assert folder not in seen, f"grid {name}: {cell} and {seen[folder]} are the same run ({folder})"
            seen[folder] = cell


def test_all_is_every_paper_grid_and_shares_only_the_runs_they_have_in_common(grid_folders):
    union = {folder for name in PAPER_GRIDS for _, folder in grid_folders[name]}
    assert {folder for _, folder in grid_folders["all"]} == union
    assert len(grid_folders["all"]) == sum(len(grid_folders[name]) for name in PAPER_GRIDS)
    # The ablations reuse the table's CIFAR-100 ResNet-18 runs: lambda 0.6 sigma 1 and rho 0.2 are its recipe.
    table = {folder for _, folder in grid_folders["cifar100"]}
    reused = {folder for name in ("ablation_lambda_sigma", "ablation_rho") for _, folder in grid_folders[name]} & table
    assert len(reused) == 2 and len(union) == sum(len(grid_folders[name]) for name in PAPER_GRIDS) - 3


def test_the_grids_have_the_papers_shape(grid_folders):
    sizes = {name: len(cells) for name, cells in grid_folders.items()}
    assert sizes["cifar10"] == sizes["cifar100"] == 4 * 5  # networks x methods
    assert sizes["label_noise"] == 5 * 3 and sizes["imagenet"] == 3 and sizes["vit"] == 3 * 3
    # the code order everywhere; the paper order where it differs (sigma != 1) and is F-SAM (lambda > 0)
    assert sizes["ablation_lambda_sigma"] == 6 * 4 + 5 * 3
    assert sizes["ablation_rho"] == 2 * 6


def test_the_noise_grid_has_the_kinds_and_ratios_its_files_name(grid_folders):
    noises = set()
    for cell, _ in grid_folders["label_noise"]:
        config = load_config(compose_run(*cell)[0])
        noises.add((config.dataset.noise.kind, round(config.dataset.noise.ratio, 2)))
    assert noises == {("symmetric", 0.2), ("symmetric", 0.4), ("symmetric", 0.6), ("symmetric", 0.8),
                      ("asymmetric", 0.4)}


def test_the_lambda_sigma_ablation_covers_both_orders_where_they_differ(grid_folders):
    points = set()
    for cell, _ in grid_folders["ablation_lambda_sigma"]:
        optimizer = load_config(compose_run(*cell)[0]).optimizer
        points.add((optimizer.lmbda, optimizer.sigma, optimizer.ema_order))
    lambdas, sigmas = (0, 0.3, 0.6, 0.9, 0.95, 0.99), (0.5, 1, 1.5, 2)
    expected = {(lmbda, sigma, order) for lmbda in lambdas for sigma in sigmas for order in ("code", "paper")
                if order == "code" or (sigma != 1 and lmbda > 0)}
    assert points == expected
