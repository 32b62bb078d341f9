"""fsam.analysis against what is known exactly: a quadratic loss 0.5 (w − c)ᵀA(w − c) with A chosen (its Hessian
is A: eigenvalues and trace known; at its minimum the worst-case increase within a ball of radius ρ is
0.5 ρ² λ_max), least squares (Hessian (2/N) XᵀX, slices quadratic in α), a linear loss (worst case ρ‖g‖),
filter normalisation worked out by hand; then what every measurement must leave alone (weights, BatchNorm
statistics, modes, gradients, the global random state) and the same numbers for the same seed.

Everything exact runs in float64 on a handful of parameters, so each test takes milliseconds.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fsam.analysis import (
    filter_normalised_directions, hessian_trace, hessian_vector_product, loss_along_line, loss_slice, mean_loss,
    rho_sharpness, top_eigenvalues,
)

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
