"""fsam.analysis against what is known exactly: a quadratic loss 0.5 (w − c)ᵀA(w − c) with A chosen (its Hessian
is A: eigenvalues and trace known; at its minimum the worst-case increase within a ball of radius ρ is
0.5 ρ² λ_max), least squares (Hessian (2/N) XᵀX, slices quadratic in α), a linear loss (worst case ρ‖g‖),
filter normalisation worked out by hand; then what every measurement must leave alone (weights, BatchNorm
statistics, modes, gradients, the global random state) and the same numbers for the same seed.

Everything exact runs in float64 on a handful of parameters, so each test takes milliseconds.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fsam.analysis import (
    filter_normalised_directions, hessian_trace, hessian_vector_product, loss_along_line, loss_slice, mean_loss,
    rho_sharpness, top_eigenvalues,
)
from reportgen import REPO, run_script, write_run

EIGENVALUES = [10.0, 4.0, 2.0, 1.0, 0.5]


class Shifted(nn.Module):
    """outputs = w − inputs: with :func:`quadratic_loss` each example's loss is 0.5 (w − x)ᵀA(w − x)."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(weights.clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.w - inputs


def rotated(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ for a random orthogonal Q: a symmetric matrix with those eigenvalues, not diagonal."""
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def quadratic_loss(matrix: torch.Tensor):
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.einsum("bi,ij,bj->b", outputs, matrix, outputs).mean()

    return loss


def at_minimum(centre: torch.Tensor, sizes=(3, 2)) -> tuple[Shifted, list]:
    """The model at w = centre and batches whose every example is centre: each batch's loss is at its minimum, 0."""
    batches = [(centre.expand(size, -1).clone(), torch.zeros(size)) for size in sizes]
    return Shifted(centre), batches


CENTRE = torch.tensor([0.3, -1.2, 0.8, 2.0, -0.5], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ the Hessian


def test_the_top_eigenvalues_of_a_quadratic_are_those_of_its_matrix_largest_first():
    model, batches = at_minimum(CENTRE)
    top = top_eigenvalues(model, quadratic_loss(rotated(EIGENVALUES)), batches, k=3, iterations=200,
                          tolerance=1e-12, seed=0)
    assert top.values == pytest.approx(EIGENVALUES[:3], rel=1e-9)
    assert all(top.converged) and top.hessian_vector_products == sum(top.iterations) <= 3 * 200


def test_power_iteration_stops_at_the_tolerance_or_the_iteration_limit_and_says_which():
    model, batches = at_minimum(CENTRE)
    loss = quadratic_loss(rotated(EIGENVALUES))
    loose = top_eigenvalues(model, loss, batches, iterations=200, tolerance=1e-2)
    capped = top_eigenvalues(model, loss, batches, iterations=3, tolerance=1e-12)
    assert loose.converged == [True] and loose.iterations[0] < 20 and loose.relative_changes[0] < 1e-2
    assert capped.converged == [False] and capped.iterations == [3] and capped.relative_changes[0] >= 1e-12
    assert capped.values[0] < 10.0  # three products from a random start are not there yet


def test_each_later_eigenvalue_is_measured_only_in_what_the_earlier_eigenvectors_leave_from_its_first_product():
    # Seed 1 starts with a large component along the eigenvector of λ_max = 1000, so one product finds that vector
    # to about 1e-3; the next eigenvalue, after one product of its own, can then only be what the rest of the
    # spectrum (1 and below) gives, never a share of λ_max (a start not deflated gives a few hundred).
    model, batches = at_minimum(CENTRE)
    top = top_eigenvalues(model, quadratic_loss(rotated([1000.0, 1.0, 0.5, 0.2, 0.1])), batches, k=2, iterations=1,
                          seed=1)
    assert top.iterations == [1, 1] and top.values[1] < 1.01


def test_a_hessian_vector_product_is_exact_and_weights_each_batch_by_its_size():
    # least squares, mean over N examples of (x·w − y)²: H = (2/N) XᵀX, whatever the batching
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    targets = torch.randn(5, dtype=torch.float64, generator=generator)
    model = nn.Linear(3, 1, bias=False).double()
    vector = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    exact = 2.0 / 5 * inputs.T @ inputs @ vector.flatten()
    for sizes in ((5,), (4, 1), (2, 3)):
        batches = list(zip(inputs.split(list(sizes)), targets.split(list(sizes))))
        (product,) = hessian_vector_product(model, squared_error, batches, [vector])
        torch.testing.assert_close(product.flatten(), exact, rtol=1e-12, atol=1e-12)


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs.squeeze(-1) - targets) ** 2).mean()


def test_hutchinsons_estimate_with_rademacher_probes_is_exact_for_a_diagonal_hessian():
    model, batches = at_minimum(CENTRE)
    trace = hessian_trace(model, quadratic_loss(torch.diag(torch.tensor(EIGENVALUES, dtype=torch.float64))),
                          batches, probes=5, seed=3)
    # vᵀ diag(a) v = Σ a_i v_i² = Σ a_i for every ±1 probe: no spread at all
    assert trace.value == pytest.approx(sum(EIGENVALUES), rel=1e-12) and trace.standard_error == pytest.approx(0.0)
    assert trace.probes == 5 and trace.samples == pytest.approx([sum(EIGENVALUES)] * 5, rel=1e-12)


def test_the_trace_estimate_and_its_standard_error_agree_with_the_theory_of_rademacher_probes():
    matrix = rotated(EIGENVALUES, seed=2)
    model, batches = at_minimum(CENTRE)
    probes = 400
    trace = hessian_trace(model, quadratic_loss(matrix), batches, probes=probes, seed=0)
    # Var(vᵀAv) = 2 Σ_{i≠j} A_ij² for ±1 probes; the standard error of the mean is its root over √probes
    off_diagonal = matrix - torch.diag(torch.diag(matrix))
    expected_error = float((2 * (off_diagonal ** 2).sum()) ** 0.5) / probes ** 0.5
    assert trace.standard_error == pytest.approx(expected_error, rel=0.15)
    assert abs(trace.value - sum(EIGENVALUES)) < 4 * trace.standard_error
    samples = torch.tensor(trace.samples)
    assert trace.value == pytest.approx(float(samples.mean()))
    assert trace.standard_error == pytest.approx(float(samples.std(unbiased=True)) / probes ** 0.5)


# ------------------------------------------------------------------------------------------------ ρ-sharpness


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_worst_case_increase_at_a_quadratics_minimum_is_half_rho_squared_lambda_max(adaptive):
    matrix = rotated(EIGENVALUES)
    model, batches = at_minimum(CENTRE)
    rho = 0.1
    # adaptive: δ = |w| ⊙ u with ||u|| <= ρ, so the increase is 0.5 uᵀ D A D u, D = diag(|w|)
    scale = torch.diag(CENTRE.abs()) if adaptive else torch.eye(5, dtype=torch.float64)
    geometry = scale @ matrix @ scale
    measured = rho_sharpness(model, quadratic_loss(matrix), batches, rho, adaptive=adaptive, ascent_steps=30,
                             random_directions=4, seed=0)
    assert measured.worst_case == pytest.approx(0.5 * rho ** 2 * float(torch.linalg.eigvalsh(geometry).max()), rel=1e-6)
    assert measured.worst_per_batch == pytest.approx([measured.worst_case] * 2)
    assert measured.loss_per_batch == [0.0, 0.0] and measured.batch_sizes == [3, 2]
    assert measured.adaptive is adaptive and (measured.rho, measured.ascent_steps, measured.random_directions) == (
        rho, 30, 4)


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_average_case_is_the_mean_increase_over_random_directions_on_the_sphere_of_radius_rho(adaptive):
    matrix = rotated(EIGENVALUES)
    model, batches = at_minimum(CENTRE, sizes=(2,))
    rho = 0.1
    scale = torch.diag(CENTRE.abs()) if adaptive else torch.eye(5, dtype=torch.float64)
    # for u uniform on the sphere of radius ρ in d dimensions, E[uᵀMu] = ρ² tr(M) / d
    expected = 0.5 * rho ** 2 * float(torch.trace(scale @ matrix @ scale)) / 5
    measured = rho_sharpness(model, quadratic_loss(matrix), batches, rho, adaptive=adaptive, ascent_steps=0,
                             random_directions=4000, seed=0)
    assert measured.average_case == pytest.approx(expected, rel=0.03)
    assert 0 <= measured.average_case <= measured.worst_case


def test_a_linear_loss_rises_by_rho_times_its_gradient_norm_in_the_worst_case():
    gradient = torch.tensor([3.0, -4.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    model, batches = at_minimum(CENTRE)
    measured = rho_sharpness(model, lambda outputs, targets: (outputs @ gradient).mean(), batches, 0.2,
                             ascent_steps=25, random_directions=3, seed=1)
    assert measured.worst_case == pytest.approx(0.2 * float(gradient.norm()), rel=1e-9)
    # random directions of a linear function average out to nothing: their mean is well below the worst case
    assert abs(measured.average_case) < 0.6 * measured.worst_case


def test_the_ascent_starts_from_the_best_random_direction_and_steps_rho_along_the_normalised_gradient():
    # A linear loss gᵀδ: from u at angle θ to g on the sphere, one step u + ρ ĝ projected back onto the sphere
    # lands at angle θ/2 (tan θ' = sin θ / (1 + cos θ)), where the loss has risen by ρ ||g|| cos(θ/2).
    gradient = torch.tensor([3.0, -4.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    model, batches = at_minimum(CENTRE, sizes=(2,))
    generator = torch.Generator().manual_seed(5)
    drawn = [torch.randn(5, dtype=torch.float64, generator=generator) for _ in range(6)]
    best = max(float(u @ gradient / (u.norm() * gradient.norm())) for u in drawn)  # cos θ of the best direction
    angle = torch.arccos(torch.tensor(best, dtype=torch.float64))
    measured = rho_sharpness(model, lambda outputs, targets: (outputs @ gradient).mean(), batches, 0.2,
                             ascent_steps=1, random_directions=6, seed=5)
    assert measured.worst_case == pytest.approx(0.2 * float(gradient.norm() * torch.cos(angle / 2)), rel=1e-9)


def test_the_worst_case_never_falls_below_the_average_case_on_any_batch(small_network, images):
    batches = [(images[:4], LABELS[:4]), (images[4:], LABELS[4:])]
    for adaptive in (False, True):
        measured = rho_sharpness(small_network, nn.CrossEntropyLoss(), batches, 0.5, adaptive=adaptive,
                                 ascent_steps=2, random_directions=3, seed=0)
        assert all(worst >= average for worst, average in zip(measured.worst_per_batch, measured.average_per_batch))
        assert measured.worst_case > 0


def test_rho_sharpness_refuses_a_radius_steps_or_directions_that_measure_nothing():
    model, batches = at_minimum(CENTRE)
    for arguments in ({"rho": 0.0}, {"rho": 0.1, "ascent_steps": -1}, {"rho": 0.1, "random_directions": 0}):
        with pytest.raises(ValueError, match="not allowed"):
            rho_sharpness(model, quadratic_loss(torch.eye(5, dtype=torch.float64)), batches, **arguments)


# ------------------------------------------------------------------------------------------------ slices


def test_filter_normalisation_rescales_each_output_units_slice_to_the_norm_of_its_weights_by_hand():
    layer = nn.Linear(2, 2).double()
    normed = nn.BatchNorm1d(2).double()
    model = nn.Sequential(layer, normed)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))  # filters of norm 5 and 1
    (direction,) = filter_normalised_directions(model, seed=7)
    drawn = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    by_hand = torch.stack([drawn[0] / drawn[0].norm() * 5.0, drawn[1] / drawn[1].norm() * 1.0])
    torch.testing.assert_close(direction[0], by_hand, rtol=1e-12, atol=0)
    # the bias and BatchNorm's scale and shift (1-D) get no direction
    assert [d.abs().sum().item() for d in direction[1:]] == [0.0, 0.0, 0.0]


def test_filter_normalisation_of_a_convolution_is_per_output_channel_whatever_the_scale_of_other_layers():
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[2].weight.mul_(1000.0)  # a layer 1000 times larger moves 1000 times as far; the others do not notice
    (direction,) = filter_normalised_directions(model, seed=0)
    for weight, moved in ((model[0].weight, direction[0]), (model[2].weight, direction[2])):
        for filter_weights, filter_moved in zip(weight, moved):
            assert float(filter_moved.norm()) == pytest.approx(float(filter_weights.detach().norm()), rel=1e-12)


def test_the_first_direction_is_the_same_whatever_the_number_drawn_and_a_seed_gives_its_own():
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(3, 2))
    (one,) = filter_normalised_directions(model, seed=4)
    first, second = filter_normalised_directions(model, 2, seed=4)
    (other,) = filter_normalised_directions(model, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(one, first))
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[0], other[0])


def test_a_slice_of_a_linear_model_is_its_loss_worked_out_analytically():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(7, 3, dtype=torch.float64, generator=generator)
    targets = torch.randn(7, dtype=torch.float64, generator=generator)
    model = nn.Linear(3, 1).double()
    weight, bias = model.weight.detach().flatten().clone(), float(model.bias.detach())
    batches = list(zip(inputs.split([4, 3]), targets.split([4, 3])))  # unequal: the mean is over examples
    first, second = filter_normalised_directions(model, 2, seed=0)
    alphas, betas = [-1.0, -0.25, 0.0, 0.5, 2.0], [-0.5, 0.0, 1.0]

    def analytic(alpha: float, beta: float) -> float:  # the bias has no direction: only the weights move
        moved = weight + alpha * first[0].flatten() + beta * second[0].flatten()
        return float(((inputs @ moved + bias - targets) ** 2).mean())

    line = loss_slice(model, squared_error, batches, [first], alphas)
    assert line.alphas == alphas and line.betas is None
    assert line.losses == pytest.approx([analytic(alpha, 0.0) for alpha in alphas], rel=1e-12)
    plane = loss_slice(model, squared_error, batches, [first, second], alphas, betas)
    assert plane.betas == betas
    assert plane.losses == [pytest.approx([analytic(a, b) for b in betas], rel=1e-12) for a in alphas]
    with pytest.raises(ValueError, match="give one, or two with betas"):
        loss_slice(model, squared_error, batches, [first, second], alphas)


# ------------------------------------------------------------------------------------------- a small network

LABELS = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


@pytest.fixture
def small_network(images) -> nn.Module:
    """A conv + BatchNorm network in training mode whose running statistics have seen two batches (so they differ
    from any batch's own), with gradients in .grad, as a training loop leaves it."""
    model = network(0)
    with torch.no_grad():
        model(images * 2 + 1)
        model(images - 1)
    nn.CrossEntropyLoss()(model(images), LABELS).backward()
    return model


def measurements(images: torch.Tensor, other: nn.Module):
    """Every measurement of fsam.analysis, each a function of the model."""
    batches = [(images[:5], LABELS[:5]), (images[5:], LABELS[5:])]
    loss = nn.CrossEntropyLoss()
    return {
        "hessian-vector product": lambda model: hessian_vector_product(
            model, loss, batches, [torch.ones_like(p) for p in model.parameters()]),
        "top eigenvalues": lambda model: top_eigenvalues(model, loss, batches, k=2, iterations=3, seed=0),
        "trace": lambda model: hessian_trace(model, loss, batches, probes=2, seed=0),
        "rho": lambda model: rho_sharpness(model, loss, batches, 0.5, ascent_steps=2, random_directions=2, seed=0),
        "adaptive rho": lambda model: rho_sharpness(model, loss, batches, 0.5, adaptive=True, ascent_steps=2,
                                                    random_directions=2, seed=0),
        "1-D slice": lambda model: loss_slice(model, loss, batches, filter_normalised_directions(model, seed=0),
                                              [-1.0, 0.5]),
        "2-D slice": lambda model: loss_slice(model, loss, batches, filter_normalised_directions(model, 2, seed=0),
                                              [-1.0, 0.5], [0.25]),
        "line": lambda model: loss_along_line(model, loss, batches, other.state_dict(), [0.0, 0.5, 1.0]),
    }


def test_no_measurement_changes_the_weights_batchnorm_statistics_mode_gradients_or_global_random_state(
        small_network, images):
    before = copy.deepcopy(small_network.state_dict())
    grads = [p.grad.clone() for p in small_network.parameters()]
    for name, measure in measurements(images, network(1)).items():
        random_state = torch.get_rng_state()
        measure(small_network)
        after = small_network.state_dict()
        assert all(torch.equal(before[key], after[key]) for key in before), name
        assert small_network.training and all(module.training for module in small_network.modules()), name
        assert all(torch.equal(p.grad, g) for p, g in zip(small_network.parameters(), grads)), name
        assert torch.equal(torch.get_rng_state(), random_state), name


def test_every_measurement_gives_the_same_numbers_for_the_same_seed(small_network, images):
    other = network(1)
    for name, measure in measurements(images, other).items():
        first, again = measure(small_network), measure(copy.deepcopy(small_network))
        if isinstance(first, list):
            assert all(torch.equal(a, b) for a, b in zip(first, again)), name
        else:
            assert first == again, name


def test_a_new_seed_draws_new_probes_directions_and_starting_vectors(small_network, images):
    batches = [(images, LABELS)]
    loss = nn.CrossEntropyLoss()
    for measure in (lambda seed: hessian_trace(small_network, loss, batches, probes=2, seed=seed).samples,
                    lambda seed: top_eigenvalues(small_network, loss, batches, iterations=2, seed=seed).values,
                    lambda seed: rho_sharpness(small_network, loss, batches, 0.5, ascent_steps=0,
                                               random_directions=2, seed=seed).average_case):
        assert measure(0) != measure(1)


def test_measurements_see_batchnorms_running_statistics_not_the_batchs_own(small_network, images):
    loss = nn.CrossEntropyLoss()
    (direction,) = filter_normalised_directions(small_network, seed=0)
    measured = loss_slice(small_network, loss, [(images, LABELS)], [direction], [0.0]).losses[0]
    evaluated = copy.deepcopy(small_network).eval()
    with torch.no_grad():
        assert measured == pytest.approx(float(loss(evaluated(images), LABELS)), rel=1e-6)
        assert measured != pytest.approx(float(loss(copy.deepcopy(small_network)(images), LABELS)), rel=1e-3)


def test_the_line_between_two_networks_starts_and_ends_at_each_one_with_its_own_batchnorm_statistics(
        small_network, images):
    other = network(1)
    with torch.no_grad():
        other(images * 3)  # statistics of its own
    other.eval()
    loss = nn.CrossEntropyLoss()
    batches = [(images[:3], LABELS[:3]), (images[3:], LABELS[3:])]
    line = loss_along_line(small_network, loss, batches, other.state_dict(), [0.0, 0.5, 1.0])
    evaluated = copy.deepcopy(small_network).eval()
    with torch.no_grad():
        assert line.losses[0] == mean_loss(evaluated, loss, batches)
        assert line.losses[2] == mean_loss(other, loss, batches)
    assert line.alphas == [0.0, 0.5, 1.0] and len({*line.losses}) == 3


def test_the_ends_of_the_line_are_each_networks_weights_and_statistics_to_the_bit(small_network, images):
    other = network(1)
    with torch.no_grad():
        # 1e8 + (1 − 1e8) is 0 in float32, so a line written w + t (w_other − w) would miss the other's 1.0
        small_network[0].weight[0, 0, 0, 0] = 1e8
        other[0].weight[0, 0, 0, 0] = 1.0
        other[1].running_var[0] = 1e-8
    seen = []
    small_network[1].register_forward_pre_hook(
        lambda module, inputs: seen.append((small_network[0].weight.detach().clone(), module.running_var.clone())))
    loss_along_line(small_network, nn.CrossEntropyLoss(), [(images, LABELS)], other.state_dict(), [0.0, 1.0])
    (start_weight, start_var), (end_weight, end_var) = seen[-2:]
    assert torch.equal(start_weight, small_network[0].weight.detach()) and torch.equal(start_var,
                                                                                       small_network[1].running_var)
    assert torch.equal(end_weight, other[0].weight.detach()) and torch.equal(end_var, other[1].running_var)


def test_the_line_refuses_a_network_of_another_architecture(small_network, images):
    wider = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"the other model's 0.weight is of shape \(5, 3, 3, 3\) where this model "
                                         r"has \(4, 3, 3, 3\): the line needs two models of one architecture"):
        loss_along_line(small_network, nn.CrossEntropyLoss(), [(images, LABELS)], wider.state_dict(), [0.5])
    state = network(1).state_dict()
    del state["1.running_var"]
    with pytest.raises(ValueError, match="1.running_var is missing"):
        loss_along_line(small_network, nn.CrossEntropyLoss(), [(images, LABELS)], state, [0.5])


# ------------------------------------------------------------------------------------ run folders: the script

# Every quantity at the smallest size that still measures it: 16 images in batches of 8.
TINY = ["--images", "16", "--batch-size", "8", "--power-iterations", "3", "--trace-probes", "2", "--rho", "0.05",
        "--adaptive-rho", "0.5", "--ascent-steps", "1", "--random-directions", "2", "--slice-points", "3",
        "--slice2d-points", "2", "--line-points", "3"]
EVERY_QUANTITY_BUT_THE_LINE = ["--what", "eigen,trace,rho,slice1d,slice2d"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_root) -> dict[str, Path]:
    """Finished one-epoch runs of the tiny network on the tiny CIFAR-10 archive: F-SAM and SGD of seed 1, and F-SAM
    with half of the labels replaced at random, drawn from the training seed (noise seed null)."""
    from conftest import TINY_MODEL
    from fsam.engine import run

    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, method, noise in (("fsam", "fsam", 0.0), ("sgd", "sgd", 0.0), ("noisy", "fsam", 0.5)):
        runs[name] = root / name / "seed1"
        run({
            "run_dir": str(runs[name]),
            "dataset": {"name": "cifar10", "root": str(cifar_root), "download": False, "num_workers": 0,
                        "noise": {"kind": "symmetric" if noise else "none", "ratio": noise, "seed": None}},
            "model": TINY_MODEL, "optimizer": {"name": method, "lr": 0.05},
            "trainer": {"epochs": 1, "batch_size": 16, "device": "cpu", "amp": "off", "seed": 1},
        })
    return runs


@pytest.fixture
def fresh(trained, tmp_path):
    """``fresh(name)``: a copy of a trained run folder of its own, never measured."""
    def copy_of(name: str) -> Path:
        target = tmp_path / "copies" / name / "seed1"
        shutil.copytree(trained[name], target)
        return target

    return copy_of


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def record_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "analysis" / "sharpness.json").read_text())


def loss_worked_out(run_dir: Path, positions: list[int]) -> float:
    """The mean cross-entropy of the final weights in eval mode on the training images at ``positions``, taken from
    the whole training split in order as the library's loader gives it (no augmentation, normalised)."""
    from fsam.config import load_config
    from fsam.engine.loop import run_data, run_model
    from fsam.runfolder import RunFolder

    config = load_config(RunFolder(run_dir).read_config()[0])
    data = run_data(config, torch.device("cpu"))
    images, labels = (torch.cat(parts) for parts in zip(*data.train_in_order.iterate(0)))
    model = run_model(config, data, torch.device("cpu"))
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True))
    with torch.no_grad():
        return float(nn.CrossEntropyLoss()(model.eval()(images[positions]), labels[positions]))


def test_sharpness_writes_every_number_with_its_conditions_and_changes_nothing_else_in_the_run_folder(
        fresh, monkeypatch, capsys):
    run_dir = fresh("fsam")
    before = files_of(run_dir)
    assert run_script(monkeypatch, "sharpness", run_dir, *EVERY_QUANTITY_BUT_THE_LINE, *TINY) == 0
    out = capsys.readouterr().out
    assert f"{run_dir}: measured eigen, trace, rho, slice1d, slice2d in" in out and "analysis/sharpness.json" in out
    after = files_of(run_dir)
    assert {name: data for name, data in after.items() if name != "analysis/sharpness.json"} == before
    record = record_of(run_dir)
    assert record["format"] == 1 and record["run"].endswith("/seed1")
    assert sorted(record["measurements"]) == ["eigen", "rho", "slice1d", "slice2d", "trace"]
    eigen = record["measurements"]["eigen"]
    assert eigen["options"] == {"checkpoint": "final", "images": 16, "image_seed": 0, "labels": "trained",
                                "batch_size": 8, "seed": 0, "top_k": 1, "power_iterations": 3,
                                "power_tolerance": 0.001}
    conditions = eigen["conditions"]
    assert conditions["weights"] == {"file": "checkpoints/final.pt", "epoch": 1}
    assert conditions["training_images"] == 64 and len(conditions["image_positions"]) == 16
    assert conditions["image_positions"] == sorted(set(conditions["image_positions"]))
    assert (conditions["labels"], conditions["label_noise"], conditions["wrong_labels"]) == ("trained", None, 0)
    assert conditions["model_mode"].startswith("eval: BatchNorm normalises with its running statistics")
    assert conditions["loss"] == "cross-entropy, mean over the images, label smoothing 0; weight decay left out"
    assert (conditions["precision"], conditions["device"]) == ("float32", "cpu")
    assert conditions["parameters"] == json.loads((run_dir / "summary.json").read_text())["model"]["parameters"]
    assert conditions["loss_at_weights"] == pytest.approx(loss_worked_out(run_dir, conditions["image_positions"]),
                                                          rel=1e-6)
    assert len(eigen["result"]["eigenvalues"]) == 1 and eigen["result"]["hessian_vector_products"] <= 3
    trace = record["measurements"]["trace"]["result"]
    assert trace["probes"] == 2 and trace["standard_error"] >= 0
    rho = record["measurements"]["rho"]["result"]
    assert [entry["rho"] for entry in rho["plain"]] == [0.05] and [entry["rho"] for entry in rho["adaptive"]] == [0.5]
    assert rho["plain"][0]["batch_sizes"] == [8, 8]
    assert all(entry["worst_case"] >= entry["average_case"] for entries in rho.values() for entry in entries)
    line = record["measurements"]["slice1d"]["result"]
    assert line["alphas"] == [-1.0, 0.0, 1.0]
    assert line["losses"][1] == pytest.approx(conditions["loss_at_weights"], rel=1e-6)  # α = 0: the weights
    plane = record["measurements"]["slice2d"]["result"]
    assert plane["alphas"] == plane["betas"] == [-1.0, 1.0] and [len(row) for row in plane["losses"]] == [2, 2]


def test_a_rerun_with_the_same_options_reads_back_and_changed_options_measure_again_saying_which(
        fresh, monkeypatch, capsys):
    import fsam.analysis.record as record_module

    run_dir = fresh("fsam")
    assert run_script(monkeypatch, "sharpness", run_dir, "--what", "eigen,trace", *TINY) == 0
    written = (run_dir / "analysis" / "sharpness.json").read_bytes()
    capsys.readouterr()

    def never(*args, **kwargs):
        raise AssertionError("measured again although the options were the same")

    with monkeypatch.context() as patch:
        patch.setattr(record_module, "MeasuredRun", never)
        assert run_script(monkeypatch, "sharpness", run_dir, "--what", "trace,eigen", *TINY) == 0
    out = capsys.readouterr().out
    assert f"{run_dir}: read back trace, eigen (measured before with the same options)" in out
    assert "λ " in out and "trace " in out  # the numbers, as read back
    assert (run_dir / "analysis" / "sharpness.json").read_bytes() == written

    assert run_script(monkeypatch, "sharpness", run_dir, "--what", "eigen", *TINY, "--images", "24",
                      "--power-tolerance", "0.01") == 0
    out = capsys.readouterr().out
    assert f"{run_dir}: eigen measured again, options changed: images: 16 -> 24; power_tolerance: 0.001 -> 0.01" in out
    measurements = record_of(run_dir)["measurements"]
    assert measurements["eigen"]["options"]["images"] == 24
    assert measurements["trace"] == json.loads(written)["measurements"]["trace"]  # not asked for: kept as it was


def test_a_record_copied_from_another_run_is_measured_again_never_read_back(fresh, monkeypatch, capsys):
    sgd, fsam = fresh("sgd"), fresh("fsam")
    assert run_script(monkeypatch, "sharpness", sgd, "--what", "eigen", *TINY) == 0
    shutil.copytree(sgd / "analysis", fsam / "analysis")
    capsys.readouterr()
    assert run_script(monkeypatch, "sharpness", fsam, "--what", "eigen", *TINY) == 0
    assert f"{fsam}: measured eigen in" in capsys.readouterr().out
    assert record_of(fsam)["run"] != record_of(sgd)["run"]
    assert record_of(fsam)["measurements"]["eigen"]["result"] != record_of(sgd)["measurements"]["eigen"]["result"]


def test_the_same_options_give_the_same_numbers_in_another_measurement(fresh, monkeypatch):
    first, second = fresh("fsam"), fresh("sgd").parent.parent / "again" / "seed1"
    shutil.copytree(first, second)
    for run_dir in (first, second):
        assert run_script(monkeypatch, "sharpness", run_dir, *EVERY_QUANTITY_BUT_THE_LINE, *TINY) == 0
    one, other = record_of(first)["measurements"], record_of(second)["measurements"]
    assert {q: m["result"] for q, m in one.items()} == {q: m["result"] for q, m in other.items()}


def test_the_image_seed_chooses_the_images_and_the_labels_option_the_true_or_the_trained_labels(
        fresh, monkeypatch):
    run_dir = fresh("noisy")
    conditions = {}
    for labels, seed in (("trained", 0), ("clean", 0), ("trained", 1)):
        assert run_script(monkeypatch, "sharpness", run_dir, "--what", "slice1d", *TINY, "--labels", labels,
                          "--image-seed", str(seed)) == 0
        conditions[labels, seed] = record_of(run_dir)["measurements"]["slice1d"]["conditions"]
    trained, clean, other_images = conditions["trained", 0], conditions["clean", 0], conditions["trained", 1]
    assert trained["image_positions"] == clean["image_positions"] != other_images["image_positions"]
    assert trained["label_noise"] == {"kind": "symmetric", "ratio": 0.5, "seed": 1}
    # about half of the chosen labels were replaced, a tenth of those by the true class again
    assert 3 <= trained["wrong_labels"] <= 13 and clean["wrong_labels"] == 0
    assert trained["loss_at_weights"] != clean["loss_at_weights"]


def test_a_run_from_before_final_weights_were_kept_is_measured_on_its_last_checkpoint_and_says_so(
        fresh, monkeypatch):
    with_final, without = fresh("fsam"), fresh("sgd").parent.parent / "old" / "seed1"
    shutil.copytree(with_final, without)
    (without / "checkpoints" / "final.pt").unlink()
    for run_dir in (with_final, without):
        assert run_script(monkeypatch, "sharpness", run_dir, "--what", "eigen", *TINY) == 0
    old, new = record_of(without)["measurements"]["eigen"], record_of(with_final)["measurements"]["eigen"]
    assert old["conditions"]["weights"] == {
        "file": "checkpoints/last.pt", "epoch": 1,
        "note": "the run finished before checkpoints/final.pt was written: its last checkpoint, written at the final "
                "epoch, holds the final weights"}
    assert old["result"] == new["result"]  # the same weights


def test_the_best_checkpoint_is_the_model_of_best_pt_with_its_epoch_and_test_accuracy(fresh, monkeypatch):
    run_dir = fresh("fsam")
    assert run_script(monkeypatch, "sharpness", run_dir, "--what", "slice1d", "--checkpoint", "best", *TINY) == 0
    measured = record_of(run_dir)["measurements"]["slice1d"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert measured["options"]["checkpoint"] == "best"
    assert measured["conditions"]["weights"] == {"file": "checkpoints/best.pt", "epoch": summary["best_epoch"],
                                                 "test_top1": summary["best_top1"],
                                                 "note": "the epoch of the best test top-1: chosen on the test set"}


def test_the_line_runs_from_this_runs_weights_to_the_other_runs_and_leaves_the_other_folder_alone(
        fresh, monkeypatch):
    sgd, fsam = fresh("sgd"), fresh("fsam")
    untouched = files_of(fsam)
    assert run_script(monkeypatch, "sharpness", sgd, "--what", "line,slice1d", "--line-to", fsam, *TINY) == 0
    assert run_script(monkeypatch, "sharpness", fsam, "--what", "slice1d", *TINY) == 0
    line = record_of(sgd)["measurements"]["line"]
    assert line["options"]["line_to"] == record_of(fsam)["run"]  # the other run by setting and seed
    assert line["result"]["ts"] == [0.0, 0.5, 1.0]
    assert line["result"]["to"]["weights"] == {"file": "checkpoints/final.pt", "epoch": 1}
    losses = line["result"]["losses"]
    assert losses[0] == pytest.approx(line["conditions"]["loss_at_weights"], rel=1e-6)
    other = record_of(fsam)["measurements"]["slice1d"]["conditions"]
    assert losses[2] == pytest.approx(other["loss_at_weights"], rel=1e-6)  # the same images, the other weights
    assert {name: data for name, data in files_of(fsam).items() if not name.startswith("analysis/")} == untouched


def test_damaged_and_unfinished_runs_are_refused_in_one_line_each_and_the_others_measured(fresh, tmp_path):
    good, damaged, unfinished = fresh("fsam"), fresh("sgd"), fresh("noisy")
    config = damaged / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.05", "lr: 0.07"))  # edited after the run
    (unfinished / "summary.json").unlink()
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "sharpness.py"), str(tmp_path / "copies"),
                             "--what", "eigen", *TINY], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    refusals = sorted(line for line in result.stderr.splitlines() if line.startswith("refused:"))
    assert len(refusals) == 2  # in folder order: noisy (made unfinished), then sgd (damaged)
    assert refusals[0] == (f"refused: {unfinished}: not finished (unfinished): only a finished run has the weights "
                           "to measure")
    assert refusals[1].startswith(f"refused: {damaged}: damaged (config.yaml computes setting ")
    assert refusals[1].endswith(" (edited after the run))")
    assert "Traceback" not in result.stderr
    assert "eigen" in result.stderr and "%|" in result.stderr  # the progress bar
    assert (good / "analysis" / "sharpness.json").exists()
    assert not (damaged / "analysis").exists() and not (unfinished / "analysis").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--what", "eigen,hessian"], "error: --what eigen,hessian is not allowed: name one or more of "
                                  "eigen,trace,rho,slice1d,slice2d,line"),
    (["--what", "rho", "--images", "20", "--batch-size", "8"],
     "error: --images 20 is not a multiple of --batch-size 8: ρ-sharpness averages batches of one size m, so give "
     "a multiple"),
    (["--what", "line"], "error: --what line needs the other end: give --line-to OTHER_RUN (a finished run folder)"),
    (["--trace-probes", "1"], "error: --trace-probes 1 is not allowed: give a whole number >= 2"),
    (["--rho", "0"], "error: --rho 0.0 is not allowed: each must be > 0"),
    (["--checkpoint", "last"], "error: argument --checkpoint: invalid choice: 'last' (choose from 'final', 'best') "
                               "(see --help)"),
    (["--device", "tpu"], "error: --device tpu is not a device: use auto, cpu, cuda or cuda:N"),
])
def test_options_that_cannot_be_measured_are_refused_in_one_line(trained, monkeypatch, capsys, arguments, message):
    try:
        status = run_script(monkeypatch, "sharpness", trained["fsam"], *arguments)
    except SystemExit as stop:  # argparse's own refusals end the process
        status = stop.code
    assert status == 2 and capsys.readouterr().err.strip() == message
    assert not (trained["fsam"] / "analysis").exists()


def test_the_line_to_an_unfinished_run_is_refused_naming_that_run(fresh, monkeypatch, capsys):
    sgd, unfinished = fresh("sgd"), fresh("fsam")
    (unfinished / "summary.json").unlink()
    assert run_script(monkeypatch, "sharpness", sgd, "--what", "line", "--line-to", unfinished, *TINY) == 2
    assert capsys.readouterr().err.strip() == (
        f"refused: {sgd}: the other end of the line, {unfinished}: not finished (unfinished): only a finished run "
        "has the weights to measure")


def test_measured_runs_reach_the_per_setting_table_and_the_figures(fresh, tmp_path, monkeypatch, capsys):
    import pandas as pd

    runs = [fresh("sgd"), fresh("fsam")]
    for run_dir in runs:
        assert run_script(monkeypatch, "sharpness", run_dir, "--what", "eigen,trace,rho,slice1d,slice2d", *TINY) == 0
    assert run_script(monkeypatch, "make_tables", tmp_path / "copies", "--out-dir", tmp_path / "tables") == 0
    settings = pd.read_csv(tmp_path / "tables" / "settings.csv").set_index("optimizer")
    for name, run_dir in zip(("sgd", "fsam"), runs):
        measured = record_of(run_dir)["measurements"]
        assert settings.loc[name, "lambda_max_mean"] == pytest.approx(measured["eigen"]["result"]["eigenvalues"][0])
        assert settings.loc[name, "hessian_trace_mean"] == pytest.approx(measured["trace"]["result"]["trace"])
        assert settings.loc[name, "rho_worst_plain_0.05_mean"] == pytest.approx(
            measured["rho"]["result"]["plain"][0]["worst_case"])
        assert settings.loc[name, "lambda_max_n"] == 1
    assert run_script(monkeypatch, "plot", tmp_path / "copies", "--out-dir", tmp_path / "figures") == 0
    drawn = {path.name for path in (tmp_path / "figures").iterdir()}
    assert {"slice1d_CIFAR-10_pyramidnet8.png", "slice2d_CIFAR-10_pyramidnet8.png",
            "accuracy_vs_lambda_max_CIFAR-10_pyramidnet8.png"} <= drawn


def test_the_loss_surface_figure_is_one_panel_per_method_on_shared_levels_from_the_lowest_to_the_highest_mean(
        fresh, tmp_path, monkeypatch):
    from fsam.report import figures
    from fsam.report.runs import load_runs

    runs = {"sgd": fresh("sgd"), "fsam": fresh("fsam")}
    for run_dir in runs.values():
        assert run_script(monkeypatch, "sharpness", run_dir, "--what", "slice2d", *TINY) == 0
    saved = []
    monkeypatch.setattr(figures, "_save", lambda figure, folder, stem: saved.append((figure, stem)) or [])
    figures.loss_surfaces(load_runs(tmp_path / "copies"), tmp_path)
    ((figure, stem),) = saved
    assert stem == "slice2d_CIFAR-10_pyramidnet8"
    panels = [axis for axis in figure.axes if axis.get_title()]
    assert [axis.get_title() for axis in panels] == ["SGD, n=1", "F-SAM, n=1"]  # the methods' order
    grids = [np.array(record_of(run_dir)["measurements"]["slice2d"]["result"]["losses"]) for run_dir in runs.values()]
    for axis in panels:  # one scale: every panel's levels run from the lowest loss of all to the highest
        filled = next(child for child in axis.get_children() if hasattr(child, "levels"))
        assert filled.levels[0] == pytest.approx(min(grid.min() for grid in grids))
        assert filled.levels[-1] == pytest.approx(max(grid.max() for grid in grids))


def test_the_line_to_a_run_of_another_network_is_refused_before_anything_is_measured(fresh, tmp_path, monkeypatch,
                                                                                      capsys):
    sgd = fresh("sgd")
    resnet = write_run(tmp_path / "other", "resnet/seed1", model="resnet18")  # finished, on CIFAR-10
    assert run_script(monkeypatch, "sharpness", sgd, "--what", "line,eigen", "--line-to", resnet, *TINY) == 2
    assert capsys.readouterr().err.strip() == (
        f"refused: {sgd}: the line needs two runs of one data set and network: {resnet} trains resnet18 on cifar10, "
        "this run pyramidnet110 on cifar10")
    assert not (sgd / "analysis").exists()


# ------------------------------------------------------------------------------- many runs: processes and jobs

def measured_numbers(run_dir: Path) -> dict:
    """The numbers of a record, without when and how long (which differ between two measurements)."""
    return {quantity: entry["result"] for quantity, entry in record_of(run_dir)["measurements"].items()}


def test_runs_measured_in_parallel_processes_give_the_numbers_of_one_process(trained, tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    for root in (serial, parallel):
        for name in ("sgd", "fsam"):
            shutil.copytree(trained[name], root / name / "seed1")
    for root, extra in ((serial, []), (parallel, ["--parallel", "2"])):
        result = subprocess.run([sys.executable, str(REPO / "scripts" / "sharpness.py"), str(root),
                                 "--what", "eigen,rho", *TINY, *extra], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # the workers' one thread: equal sums
        assert result.returncode == 0, result.stderr
    assert "measuring 2 runs: here, 2 at a time" in result.stdout
    for name in ("sgd", "fsam"):
        assert measured_numbers(parallel / name / "seed1") == measured_numbers(serial / name / "seed1")


def test_runs_measured_as_jobs_write_their_records_and_a_damaged_run_is_refused_before_any_job(fresh, tmp_path):
    good, damaged = fresh("fsam"), fresh("sgd")
    config = damaged / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.05", "lr: 0.07"))
    logs = tmp_path / "logs"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "sharpness.py"), str(tmp_path / "copies"),
                             "--what", "eigen", *TINY, "--launcher", "local", "--log-dir", str(logs)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert f"refused: {damaged}: damaged" in result.stderr
    assert result.stderr.count("submitted job") == 1  # the good run only
    assert "error: 1 of 2 runs not measured (1 refused, 0 failed; each named above); 1 measured" in result.stderr
    assert f"{good}: measured eigen" in result.stdout
    assert record_of(good)["measurements"]["eigen"]["result"]["eigenvalues"]
    assert not (damaged / "analysis").exists()
    assert list(logs.glob("*_log.out")), "the job's log is where the script said"


def test_a_job_that_dies_is_named_with_its_log_and_the_other_runs_are_measured(fresh, tmp_path, monkeypatch):
    from fsam.analysis import jobs
    from fsam.analysis.record import Options

    good, doomed = fresh("fsam"), fresh("sgd")
    original = jobs.measure_one

    def dies_on_sgd(run_dir, *args, **kwargs):
        if Path(run_dir).parent.name == "sgd":
            raise MemoryError("out of memory")
        return original(run_dir, *args, **kwargs)

    monkeypatch.setattr(jobs, "measure_one", dies_on_sgd)
    options = Options(what=("eigen",), images=16, batch_size=8, power_iterations=3)
    results = {result.run_dir: result for result in jobs.measure_runs(
        [good, doomed], options, device="cpu", launcher="local", parallel=2,
        resources=jobs.Resources(log_dir=tmp_path / "logs"))}
    assert results[good].status == "measured"
    assert results[doomed].status == "failed"
    assert "out of memory" in results[doomed].lines[0] and results[doomed].log.endswith("_log.err")


def test_slurm_jobs_without_slurm_are_refused_in_one_line(trained, tmp_path):
    from conftest import path_without_slurm

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "sharpness.py"), str(trained["fsam"]),
                             "--launcher", "slurm"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": path_without_slurm(tmp_path / "no-slurm")})
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --launcher slurm but there is no sbatch on PATH: run this on a SLURM "
                                     "login node, or use --launcher here (or local)")
