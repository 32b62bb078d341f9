"""The optimizer library's promises to code outside this project: its defaults, the edges of what it accepts,
the exact words of its errors, the format of its saved state, and what loading restores.

These were written against mutation testing (scripts/mutation.py fsam/optim): each test fails when one operator,
constant or message of fsam/optim is changed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fsam.errors import CheckpointError
from fsam.optim import FSAM, SAM, Precision, train_step
from fsam.optim.step import _all_finite


def params(*shapes: tuple[int, ...]) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(*shape, generator=generator)) for shape in shapes]


def with_gradients(parameters: list[nn.Parameter], scale: float = 1.0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(1)
    for p in parameters:
        p.grad = scale * torch.randn(p.shape, generator=generator)
    return parameters


def test_the_defaults_are_the_ones_documented():
    sam = SAM(params((2,)), torch.optim.SGD, lr=0.1)
    assert {k: sam.param_groups[0][k] for k in ("rho", "adaptive", "eta")} == {"rho": 0.05, "adaptive": False,
                                                                              "eta": 0.0}
    fsam = FSAM(params((2,)), torch.optim.SGD, lr=0.1)
    assert {k: fsam.param_groups[0][k] for k in ("rho", "sigma", "lmbda", "ema_order")} == {
        "rho": 0.2, "sigma": 1.0, "lmbda": 0.6, "ema_order": "code"}
    assert sam.last_grad_norm is None and sam.steps_taken == 0


@pytest.mark.parametrize("make, error, message", [
    (lambda: SAM(params((2,)), torch.optim.SGD, lr=0.1, rho=-0.1), ValueError,
     "rho=-0.1 is not allowed: rho must be >= 0 (the perturbation radius)"),
    (lambda: SAM(params((2,)), torch.optim.SGD, lr=0.1, eta=-1.0), ValueError,
     "eta=-1.0 is not allowed: eta must be >= 0 (the ASAM offset added to |w|)"),
    (lambda: FSAM(params((2,)), torch.optim.SGD, lr=0.1, sigma=-0.5), ValueError,
     "sigma=-0.5 is not allowed: sigma must be >= 0 (the share of the EMA removed from the gradient)"),
    (lambda: FSAM(params((2,)), torch.optim.SGD, lr=0.1, lmbda=1.0), ValueError,
     "lmbda=1.0 is not allowed: lmbda must be in [0, 1) (the EMA decay)"),
    (lambda: FSAM(params((2,)), torch.optim.SGD, lr=0.1, ema_order="later"), ValueError,
     "ema_order='later' is not allowed: ema_order must be 'code' or 'paper'"),
    (lambda: SAM(None, torch.optim.SGD, lr=0.1), ValueError,
     "params is required when base_optimizer is an optimizer class"),
    (lambda: SAM(None, torch.optim.SGD(params((2,)), lr=0.1), lr=0.2), ValueError,
     "base_optimizer is already built: pass params=None and no base optimizer keyword arguments"),
    (lambda: SAM(params((2,)), torch.optim.SGD(params((2,)), lr=0.1)), ValueError,
     "base_optimizer is already built: pass params=None and no base optimizer keyword arguments"),
    (lambda: SAM(params((2,)), "sgd"), TypeError,
     "base_optimizer must be a torch.optim.Optimizer class or instance, got 'sgd'"),
    (lambda: SAM(params((2,)), dict), TypeError,
     "base_optimizer must be a torch.optim.Optimizer class or instance, got <class 'dict'>"),
    (lambda: FSAM(params((2,)), torch.optim.SGD, lr=0.1).step(), ValueError,
     "FSAM.step() needs a closure that runs forward and backward again, because a SAM-family step evaluates the "
     "loss twice. Pass step(closure), or call first_step() and second_step() around your second backward pass."),
    (lambda: SAM(params((2,)), torch.optim.SGD, lr=0.1).load_state_dict({"method": "SAM"}), CheckpointError,
     "this optimizer state was not saved by a SAM optimizer (it has no 'base'/'method' entries): was it saved "
     "with the same optimizer setting?"),
    (lambda: SAM(params((2,)), torch.optim.SGD, lr=0.1).load_state_dict({"base": {}}), CheckpointError,
     "this optimizer state was not saved by a SAM optimizer (it has no 'base'/'method' entries): was it saved "
     "with the same optimizer setting?"),
    (lambda: Precision("fp32"), ValueError, "precision mode 'fp32' is not allowed: use one of bf16, fp16, off"),
])
def test_each_refusal_says_exactly_what_is_wrong(make, error, message):
    with pytest.raises(error) as raised:
        make()
    assert str(raised.value) == message


def test_state_dict_in_the_middle_of_a_step_is_refused_with_the_reason():
    sam = SAM(with_gradients(params((3,))), torch.optim.SGD, lr=0.1)
    sam.first_step()
    with pytest.raises(RuntimeError) as raised:
        sam.state_dict()
    assert str(raised.value) == "state_dict() in the middle of a step (the weights are perturbed): save between steps"


def test_a_loaded_fsam_ema_of_another_model_is_refused_with_the_reason():
    source = FSAM(with_gradients(params((3,), (2,))), torch.optim.SGD, lr=0.1)
    source.first_step()
    source.second_step()
    saved = source.state_dict()
    fewer = FSAM(params((3,)), torch.optim.SGD, lr=0.1)
    with pytest.raises(CheckpointError) as raised:
        fewer._load_method_state(saved["method_state"])
    assert str(raised.value) == ("the F-SAM state holds an EMA for 2 parameter tensors, this model has 1: the "
                                 "checkpoint is from a different model")
    other = FSAM(params((3,), (4,)), torch.optim.SGD, lr=0.1)
    with pytest.raises(CheckpointError) as raised:
        other._load_method_state(saved["method_state"])
    assert str(raised.value) == ("the F-SAM EMA of parameter 1 has shape (2,), the model's parameter has (4,): the "
                                 "checkpoint is from a different model")


def test_rho_zero_sigma_zero_and_lambda_zero_are_allowed_and_mean_what_they_say():
    # rho = 0: no perturbation, the step is the base optimizer's step at the clean gradient.
    sam, plain = params((3,)), params((3,))
    optimizer = SAM(with_gradients(sam), torch.optim.SGD, lr=0.1, rho=0.0)
    optimizer.first_step(zero_grad=False)
    assert torch.equal(sam[0].detach(), plain[0].detach())
    # sigma = 0 is SAM; lambda = 0 keeps only the last gradient.
    FSAM(params((2,)), torch.optim.SGD, lr=0.1, sigma=0.0, lmbda=0.0)
    SAM(params((2,)), torch.optim.SGD, lr=0.1, eta=0.0, adaptive=True)


def test_the_saved_state_has_a_stable_format():
    fsam = FSAM(with_gradients(params((3,))), torch.optim.SGD, lr=0.1, momentum=0.9)
    fsam.first_step()
    fsam.second_step()
    state = fsam.state_dict()
    assert set(state) == {"version", "method", "base", "steps_taken", "method_state"}
    assert state["version"] == 1 and state["method"] == "FSAM" and state["steps_taken"] == 1
    assert set(state["method_state"]) == {"ema"}


def test_loading_an_fsam_state_restores_every_ema_and_forgets_the_ones_saved_empty():
    source_params = with_gradients(params((3,), (2,), (4,)), scale=2.0)
    source_params[0].grad = None  # no gradient in the first step: no EMA for the first tensor
    source = FSAM(source_params, torch.optim.SGD, lr=0.1)
    source.first_step()
    source.second_step()
    saved = source.state_dict()
    assert saved["method_state"]["ema"][0] is None

    target_params = params((3,), (2,), (4,))
    target = FSAM(with_gradients(target_params), torch.optim.SGD, lr=0.1)
    target.first_step()
    target.second_step()  # every tensor now has an EMA, the first included
    for p in target_params:
        p.data = p.data.double()
    target.load_state_dict(saved)
    assert "ema" not in target.state[target_params[0]]  # saved empty: forgotten, not kept
    for p, ema in zip(target_params[1:], saved["method_state"]["ema"][1:]):  # the ones after it still load
        assert target.state[p]["ema"].dtype == torch.float64 and torch.equal(target.state[p]["ema"].float(), ema)


def test_precision_state_saves_and_restores_the_loss_scale():
    model = nn.Linear(4, 3)
    precision = Precision("fp16", "cpu")
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, inputs, targets, nn.functional.cross_entropy, optimizer, precision=precision)
    state = precision.state_dict()
    assert set(state) == {"mode", "scaler"} and state["mode"] == "fp16" and state["scaler"]["scale"] > 0
    state["scaler"]["scale"] = 1024.0
    restored = Precision("fp16", "cpu")
    restored.load_state_dict(state)
    assert restored.scaler.get_scale() == 1024.0
    assert Precision("off").state_dict() == {"mode": "off", "scaler": None}
    Precision("off").load_state_dict(state)  # a float32 run ignores a saved scale rather than failing


def test_no_gradient_norms_at_all_count_as_finite():
    assert _all_finite([]) and _all_finite([None])
    assert not _all_finite([torch.tensor(1.0), torch.tensor(float("inf"))])
