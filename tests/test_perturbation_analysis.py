"""The paper's Figure-1 analysis: SAM perturbed along the minibatch gradient, the full-batch gradient alone, or the
minibatch gradient's part orthogonal to it; the exact full gradient; F-SAM's EMA measured against it.

The directions are checked on least squares with six examples, whose full gradient is known in closed form:
L(w) = mean_i (x_i·w - y_i)², so ∇L(w) = (2/N) Xᵀ(Xw - y).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from fsam.config import load_config
from fsam.engine import run
from fsam.errors import ConfigError
from fsam.optim import FSAM, SAM, agreement, create_optimizer, full_gradient
from fsam.report.figures import ema_agreement
from fsam.report.runs import load_runs
from fsam.runfolder import FREE_KEYS, setting, setting_name

from conftest import metrics_of, stop_at_call, without_times

REPO = Path(__file__).resolve().parents[1]
RHO = 0.5


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs.squeeze(-1) - targets) ** 2).mean()


@pytest.fixture
def regression():
    """Six examples in three dimensions, a bias-free linear model in float64, and its exact full gradient."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(6, generator=generator, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64))
    weights = model.weight.detach().flatten().clone()
    exact = 2.0 / len(inputs) * inputs.T @ (inputs @ weights - targets)
    return model, inputs, targets, exact


def perturbation(model: nn.Module, inputs, targets, full: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The step ``first_step`` takes (w + e - w) from the minibatch of the first two examples."""
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=RHO, perturbation=kind)
    if full is not None:
        optimizer.set_full_gradient([full.view(1, 3)])
    before = model.weight.detach().flatten().clone()
    squared_error(model(inputs[:2]), targets[:2]).backward()
    optimizer.first_step()
    moved = model.weight.detach().flatten() - before
    optimizer.restore()
    return moved


def minibatch_gradient(inputs, targets, weights) -> torch.Tensor:
    return 2.0 / 2 * inputs[:2].T @ (inputs[:2] @ weights - targets[:2])


# --------------------------------------------------------------------------------------- the full gradient


def test_the_full_gradient_is_the_exact_gradient_whatever_the_batching(regression):
    model, inputs, targets, exact = regression
    for sizes in ((6,), (4, 2), (1, 2, 3)):
        batches = list(zip(inputs.split(list(sizes)), targets.split(list(sizes))))
        (computed,) = full_gradient(model, batches, squared_error)
        torch.testing.assert_close(computed.flatten(), exact, rtol=1e-12, atol=1e-12)


def test_the_full_gradient_is_the_mean_of_the_per_example_gradients(regression):
    model, inputs, targets, _ = regression
    per_example = []
    for x, y in zip(inputs, targets):
        model.zero_grad()
        squared_error(model(x[None]), y[None]).backward()
        per_example.append(model.weight.grad.clone())
    model.zero_grad(set_to_none=True)
    (computed,) = full_gradient(model, [(inputs[:5], targets[:5]), (inputs[5:], targets[5:])], squared_error)
    torch.testing.assert_close(computed, torch.stack(per_example).mean(0), rtol=1e-12, atol=1e-12)


def test_the_full_gradient_leaves_gradients_batchnorm_statistics_mode_and_random_state_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.eval()
    model(torch.randn(5, 4)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    random_state = torch.get_rng_state()
    full_gradient(model, batches, nn.CrossEntropyLoss())
    assert not model.training
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in statistics.items())
    assert torch.equal(torch.get_rng_state(), random_state)


# ------------------------------------------------------------------------------------------ the directions


def test_minibatch_perturbation_is_ordinary_sam(regression):
    model, inputs, targets, exact = regression
    g = minibatch_gradient(inputs, targets, model.weight.detach().flatten())
    moved = perturbation(model, inputs, targets, exact, "minibatch")
    torch.testing.assert_close(moved, RHO * g / g.norm())


def test_full_perturbation_is_rho_times_the_normalised_full_gradient(regression):
    model, inputs, targets, exact = regression
    moved = perturbation(model, inputs, targets, exact, "full")
    torch.testing.assert_close(moved, RHO * exact / exact.norm())


def test_noise_perturbation_is_the_normalised_residual_orthogonal_to_the_full_gradient(regression):
    model, inputs, targets, exact = regression
    g = minibatch_gradient(inputs, targets, model.weight.detach().flatten())
    unit = exact / exact.norm()
    residual = g - (g @ unit) * unit
    moved = perturbation(model, inputs, targets, exact, "noise")
    assert abs(float(moved @ exact)) < 1e-12 * float(exact.norm())
    torch.testing.assert_close(moved, RHO * residual / residual.norm())


def test_the_analysis_directions_refuse_to_step_without_a_full_gradient(regression):
    model, inputs, targets, _ = regression
    with pytest.raises(RuntimeError, match="set_full_gradient"):
        perturbation(model, inputs, targets, None, "noise")


def test_an_unknown_perturbation_is_refused_by_the_optimizer():
    with pytest.raises(ValueError, match="perturbation='sideways' is not allowed"):
        SAM([nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=0.1, perturbation="sideways")


def test_the_full_gradient_is_part_of_the_optimizer_state(regression):
    model, inputs, targets, exact = regression
    optimizer = create_optimizer(model, "sam", perturbation="full", rho=RHO)
    optimizer.set_full_gradient([exact.view(1, 3)])
    state = optimizer.state_dict()
    resumed = create_optimizer(model, "sam", perturbation="full", rho=RHO)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.state[model.weight]["full_gradient"], exact.view(1, 3))


# --------------------------------------------------------------------------------- the EMA against it


def test_the_agreement_is_the_hand_computed_cosine_and_relative_error(regression):
    model, inputs, targets, exact = regression
    optimizer = FSAM(model.parameters(), torch.optim.SGD, lr=0.05, rho=0.1, lmbda=0.6)
    for start in (0, 2, 4):
        optimizer.zero_grad()
        squared_error(model(inputs[start:start + 2]), targets[start:start + 2]).backward()
        optimizer.first_step()
        squared_error(model(inputs[start:start + 2]), targets[start:start + 2]).backward()
        optimizer.second_step()
    (full,) = full_gradient(model, [(inputs, targets)], squared_error)
    ema = optimizer.ema_estimate()[0].flatten()
    f = full.flatten()
    measured = agreement(optimizer.ema_estimate(), [full])
    assert -1.0 <= measured["cosine"] <= 1.0
    assert measured["cosine"] == pytest.approx(float(ema @ f / (ema.norm() * f.norm())), rel=1e-12)
    assert measured["relative_error"] == pytest.approx(float((ema - f).norm() / f.norm()), rel=1e-12)


def test_agreement_of_a_vector_with_itself_and_its_opposite():
    f = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    assert agreement(f, f) == {"cosine": pytest.approx(1.0), "relative_error": pytest.approx(0.0)}
    opposite = agreement([-t for t in f], f)
    assert opposite["cosine"] == pytest.approx(-1.0) and opposite["relative_error"] == pytest.approx(2.0)


def checkpoint_weights(run_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_measuring_the_ema_changes_no_weight_and_records_cosine_and_relative_error(tiny_config, tmp_path):
    plain = run(tiny_config(run_dir=str(tmp_path / "plain")))
    measured = run(tiny_config(run_dir=str(tmp_path / "measured"), trainer={"full_grad_analysis_every": 1}))
    before, after = checkpoint_weights(plain["run_dir"]), checkpoint_weights(measured["run_dir"])
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert plain["final_top1"] == measured["final_top1"] and plain["setting"] == measured["setting"]
    rows = [json.loads(line) for line in (Path(measured["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    records = [record for row in rows for record in row["analysis"]]
    assert [record["step"] for record in records] == list(range(1, measured["global_steps"]))
    assert all(-1.0 <= record["ema_cosine"] <= 1.0 and record["ema_relative_error"] >= 0 for record in records)
    assert ema_agreement(load_runs(tmp_path / "plain"), tmp_path / "figures") == []
    drawn = ema_agreement(load_runs(tmp_path / "measured"), tmp_path / "figures")
    assert [path.suffix for path in drawn] == [".png", ".pdf"] and all(path.stat().st_size for path in drawn)


def test_sam_with_an_analysis_direction_trains_and_states_the_cost_of_its_full_gradient(tiny_config, tmp_path):
    summary = run(tiny_config(optimizer={"name": "sam", "perturbation": "noise", "full_grad_every": 2}))
    assert summary["status"] == "finished"
    # 64 training images in batches of 16: 4 batches per full gradient, every 2 steps
    assert summary["full_gradient_passes_per_step"] == 2.0
    (row,) = load_runs(Path(summary["run_dir"]).parent).to_dict("records")
    assert row["optimizer"] == "sam-noise-only"


@pytest.mark.parametrize("changes", [
    {"optimizer": {"name": "sam", "perturbation": "noise", "full_grad_every": 4}},
    {"optimizer": {"name": "fsam"}, "trainer": {"full_grad_analysis_every": 1}},
], ids=["sam-noise", "fsam-measured"])
def test_a_run_killed_mid_epoch_resumes_with_its_full_gradient_and_measurements(tiny_config, tmp_path, monkeypatch,
                                                                                  changes):
    changes = {**changes, "trainer": {**changes.get("trainer", {}), "checkpoint_every_steps": 2}}
    run(tiny_config(run_dir=str(tmp_path / "reference"), **changes))
    interrupted = tiny_config(run_dir=str(tmp_path / "interrupted"), **changes)
    # the last checkpoint is after step 6, in epoch 2: SAM's full gradient is the one of step 4, F-SAM's
    # measurements of steps 4 and 5 are waiting for the end of the epoch
    stop_at_call(monkeypatch, 7, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run(interrupted)
    monkeypatch.undo()
    run(interrupted)
    assert without_times(metrics_of(tmp_path / "interrupted")) == without_times(metrics_of(tmp_path / "reference"))
    resumed, straight = checkpoint_weights(tmp_path / "interrupted"), checkpoint_weights(tmp_path / "reference")
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


# ---------------------------------------------------------------------------------- config and identity


@pytest.mark.parametrize(("changes", "message"), [
    ({"optimizer": {"name": "sam", "full_grad_every": 0}},
     "optimizer.full_grad_every=0 is not allowed: must be >= 1"),
    ({"optimizer": {"name": "sam", "perturbation": "sideways"}},
     "optimizer.perturbation='sideways' is not allowed: use one of minibatch, full, noise"),
    ({"optimizer": {"name": "fsam", "perturbation": "noise"}},
     "optimizer.perturbation='noise' is not allowed with optimizer.name='fsam'"),
    ({"trainer": {"full_grad_analysis_every": -1}},
     "trainer.full_grad_analysis_every=-1 is not allowed: must be >= 0"),
    ({"dataset": {"name": "imagenet"}, "optimizer": {"name": "sam", "perturbation": "full"}},
     "optimizer.perturbation='full' is not allowed with dataset.name='imagenet'"),
])
def test_bad_analysis_settings_are_refused_in_one_line(changes, message):
    with pytest.raises(ConfigError) as caught:
        load_config({"run_dir": "x", **changes})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def folder(optimizer: dict, trainer: dict | None = None) -> str:
    config = {"run_dir": "x", "optimizer": optimizer, "trainer": trainer or {}}
    return setting_name(setting(config))


def test_the_direction_names_its_own_folder_and_the_ema_measurement_does_not():
    sam = folder({"name": "sam"})
    full, noise = folder({"name": "sam", "perturbation": "full"}), folder({"name": "sam", "perturbation": "noise"})
    assert len({sam, full, noise}) == 3
    assert "-sam_full-" in full and "-sam_noise-" in noise
    assert folder({"name": "sam", "perturbation": "full", "full_grad_every": 10}) != full
    assert folder({"name": "sam", "full_grad_every": 10}) == sam  # SAM itself never reads K
    assert folder({"name": "fsam"}, {"full_grad_analysis_every": 5}) == folder({"name": "fsam"})
    assert "trainer.full_grad_analysis_every" in FREE_KEYS


def test_existing_sam_runs_keep_their_folders():
    recorded = REPO / "results" / "reproduction" / "digits" / "runs"
    paths = sorted(recorded.glob("*-sam-*/seed1/config.yaml"))
    assert paths
    for config_path in paths:
        config = yaml.safe_load(config_path.read_text())
        config.pop("identity")
        assert setting_name(setting(config)) == config_path.parent.parent.name
