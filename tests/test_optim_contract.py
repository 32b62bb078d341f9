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
    assert {k: sam.param_groups[0][k] for k in ("rho", "adaptive", "eta")} == {"rho": 0.1, "adaptive": False,
                                                                              "eta": 0.0}  # the configs' SAM radius
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
    (lambda: FSAM(params((2,)), torch.optim.SGD, lr=0.1, perturbation="full"), ValueError,
     "perturbation='full' is not allowed: FSAM perturbs along its own direction, g - sigma * EMA "
     "(perturbation='minibatch'); the analysis directions 'full' and 'noise' belong to SAM"),
    (lambda: FSAM(params((2,)), torch.optim.SGD, lr=0.1, perturbation="sideways"), ValueError,
     "perturbation='sideways' is not allowed: FSAM perturbs along its own direction, g - sigma * EMA "
     "(perturbation='minibatch'); the analysis directions 'full' and 'noise' belong to SAM"),
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
    fresh = FSAM(params((3,), (2,), (4,)), torch.optim.SGD, lr=0.1)  # never stepped: no EMA anywhere yet
    fresh.load_state_dict(saved)
    assert "ema" not in fresh.state[fresh._ordered_params()[0]]


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


# --------------------------------------------------------------------------------------- create_optimizer


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def base_settings(optimizer: torch.optim.Optimizer, *keys: str) -> dict:
    base = getattr(optimizer, "base_optimizer", optimizer)
    return {key: base.param_groups[0][key] for key in keys}


def test_create_optimizer_defaults_are_the_released_recipe():
    from fsam.optim import create_optimizer

    optimizer = create_optimizer(tiny_model())
    assert type(optimizer) is FSAM and not optimizer.param_groups[0]["adaptive"]
    assert base_settings(optimizer, "lr", "momentum", "nesterov", "weight_decay") == {
        "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-3}
    assert {k: optimizer.param_groups[0][k] for k in ("rho", "sigma", "lmbda", "eta", "ema_order")} == {
        "rho": 0.2, "sigma": 1.0, "lmbda": 0.6, "eta": 0.0, "ema_order": "code"}


@pytest.mark.parametrize("name, kind, adaptive", [
    ("sgd", torch.optim.SGD, None), ("sam", SAM, False), ("asam", SAM, True), ("fsam", FSAM, False),
    ("fasam", FSAM, True),
])
def test_create_optimizer_passes_every_setting_to_the_method_and_its_base(name, kind, adaptive):
    from fsam.optim import create_optimizer

    optimizer = create_optimizer(tiny_model(), name, lr=0.3, momentum=0.5, nesterov=True, weight_decay=0.02,
                                 rho=0.7, sigma=0.4, lmbda=0.8, eta=0.01, ema_order="paper")
    assert type(optimizer) is kind
    assert base_settings(optimizer, "lr", "momentum", "nesterov", "weight_decay") == {
        "lr": 0.3, "momentum": 0.5, "nesterov": True, "weight_decay": 0.02}
    if adaptive is None:
        return
    group = optimizer.param_groups[0]
    assert (group["rho"], group["adaptive"], group["eta"]) == (0.7, adaptive, 0.01)
    if kind is FSAM:
        assert (group["sigma"], group["lmbda"], group["ema_order"]) == (0.4, 0.8, "paper")


def test_create_optimizer_builds_adamw_with_its_own_settings():
    from fsam.optim import create_optimizer

    optimizer = create_optimizer(tiny_model(), "sam", base="adamw", lr=3e-4, betas=(0.8, 0.95), weight_decay=0.05)
    assert type(optimizer.base_optimizer) is torch.optim.AdamW
    assert base_settings(optimizer, "lr", "betas", "weight_decay") == {"lr": 3e-4, "betas": (0.8, 0.95),
                                                                      "weight_decay": 0.05}


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_a_list_of_parameters_gets_the_weight_decay_too(base):
    from fsam.optim import create_optimizer

    optimizer = create_optimizer(list(tiny_model().parameters()), "sam", base=base, weight_decay=0.07)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.07]


def test_norm_and_bias_parameters_can_go_without_weight_decay():
    from fsam.optim import create_optimizer

    model = tiny_model()
    optimizer = create_optimizer(model, "sgd", weight_decay=0.1, no_decay_norm_and_bias=True)
    groups = [(group["weight_decay"], [tuple(p.shape) for p in group["params"]]) for group in optimizer.param_groups]
    assert groups == [(0.1, [(3, 4)]), (0.0, [(3,), (3,), (3,)])]
    plain = create_optimizer(model, "sgd", weight_decay=0.1)
    assert [group["weight_decay"] for group in plain.param_groups] == [0.1]


@pytest.mark.parametrize("call, message", [
    (dict(name="adam"), "optimizer.name='adam' is not a method: choose one of sgd, sam, asam, fsam, fasam"),
    (dict(base="rmsprop"), "optimizer.base='rmsprop' is not a base optimizer: choose one of sgd, adamw"),
    (dict(no_decay_norm_and_bias=True, params=True),
     "no_decay_norm_and_bias needs the model, not a list of parameters"),
    (dict(name="fsam", lmbda=1.0), "optimizer.lmbda=1.0 is not allowed: lmbda must be in [0, 1) (the EMA decay)"),
    (dict(name="sam", perturbation="sideways"),
     "optimizer.perturbation='sideways' is not allowed: use one of minibatch, full, noise"),
    (dict(name="fsam", perturbation="noise"),
     "optimizer.perturbation='noise' is not allowed with optimizer.name='fsam': the analysis directions belong to "
     "sam (use optimizer.name=sam, or perturbation=minibatch)"),
])
def test_create_optimizer_refusals_name_the_key(call, message):
    from fsam.errors import ConfigError
    from fsam.optim import create_optimizer

    call = dict(call)  # the parameter set is shared by reruns of this test
    target = list(tiny_model().parameters()) if call.pop("params", False) else tiny_model()
    with pytest.raises(ConfigError) as raised:
        create_optimizer(target, **call)
    assert str(raised.value) == message


# ------------------------------------------------------------------------------------------------ train_step


def test_a_parameter_the_loss_never_reaches_is_left_alone_by_every_step():
    """Its gradient is None (not zero) after every step, whatever the caller left in it, so weight decay and
    momentum never move it: a frozen head, a branch this batch did not take."""
    from fsam.optim import create_optimizer

    for name in ("sgd", "sam", "fsam"):
        model = nn.Sequential(nn.Linear(4, 3))
        unused = nn.Parameter(torch.ones(5))
        model.register_parameter("unused", unused)
        optimizer = create_optimizer(model, name, weight_decay=0.1, lr=0.5)
        for _ in range(3):
            unused.grad = torch.full((5,), 0.5)  # left over from the caller's own backward pass
            out = train_step(model, torch.randn(8, 4), torch.randint(0, 3, (8,)), nn.functional.cross_entropy,
                             optimizer, precision=Precision())
            assert out.skipped is False
        assert torch.equal(unused.detach(), torch.ones(5)) and unused.grad is None, name


def test_a_plain_optimizer_step_through_train_step_moves_the_weights():
    model = nn.Linear(4, 3)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = train_step(model, torch.randn(8, 4), torch.randint(0, 3, (8,)), nn.functional.cross_entropy, optimizer,
                     precision=Precision())
    assert out.skipped is False and not torch.equal(model.weight.detach(), before)


def test_each_micro_batch_needs_an_example():
    model = nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = torch.randn(4, 6), torch.randint(0, 3, (4,))  # 4 examples of 6 features
    train_step(model, inputs, targets, nn.functional.cross_entropy, optimizer, precision=Precision(), micro_batches=4)
    with pytest.raises(ValueError) as raised:
        train_step(model, inputs, targets, nn.functional.cross_entropy, optimizer, precision=Precision(),
                   micro_batches=5)
    assert str(raised.value) == ("micro_batches=5 is larger than the batch (4 examples): use at most one "
                                 "micro-batch per example")
    with pytest.raises(ValueError) as raised:
        train_step(model, inputs, targets, nn.functional.cross_entropy, optimizer, precision=Precision(),
                   micro_batches=0)
    assert str(raised.value) == "micro_batches=0 is not allowed: it must be >= 1"


def test_train_step_defaults_to_each_replica_perturbing_along_its_own_gradient():
    import inspect

    assert inspect.signature(train_step).parameters["sync_clean_pass"].default is False


def test_precision_modes_autocast_to_their_dtype():
    assert Precision().mode == "off" and Precision().dtype is None and Precision().scaler is None
    layer = nn.Linear(4, 4)
    for mode, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("off", torch.float32)):
        precision = Precision(mode, "cpu")
        with precision.autocast():
            assert layer(torch.randn(2, 4)).dtype == dtype, mode
        assert (precision.scaler is not None) == (mode == "fp16")


def test_the_gradient_norm_of_float32_gradients_is_float32():
    sam = SAM(with_gradients(params((3,), (2,))), torch.optim.SGD, lr=0.1)
    sam.first_step()
    assert sam.last_grad_norm.dtype == torch.float32
    expected = torch.cat([p.grad.flatten() for p in with_gradients(params((3,), (2,)))]).norm()
    assert torch.allclose(sam.last_grad_norm, expected)


# ------------------------------------------------------------------------------------------- full_gradient


def test_full_gradient_covers_unused_parameters_single_examples_and_a_given_subset():
    from fsam.optim import full_gradient

    model = nn.Linear(3, 2)
    model.register_parameter("unused", nn.Parameter(torch.ones(4)))
    inputs, targets = torch.randn(5, 3), torch.randint(0, 2, (5,))
    batches = [(inputs[:1], targets[:1])]  # one example is enough
    weight, bias, unused = full_gradient(model, batches, nn.functional.cross_entropy)
    assert torch.equal(unused, torch.zeros(4))  # the loss does not reach it: zeros, not an error
    assert weight.dtype == torch.float32 and weight.shape == (2, 3)
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs[:1]), targets[:1]).backward()
    assert torch.allclose(weight, model.weight.grad) and torch.allclose(bias, model.bias.grad)
    (only,) = full_gradient(model, batches, nn.functional.cross_entropy, params=[model.bias])
    assert torch.equal(only, bias)
    with pytest.raises(ValueError) as raised:
        full_gradient(model, [], nn.functional.cross_entropy)
    assert str(raised.value) == "full_gradient() got no example: the batches were empty"


def test_an_analysis_direction_without_a_full_gradient_says_how_many_parameters_lack_one():
    parameters = with_gradients(params((3,), (2,)))
    sam = SAM(parameters, torch.optim.SGD, lr=0.1, perturbation="noise")
    sam.set_full_gradient([torch.ones(3), torch.ones(2)])
    sam.state[parameters[1]].pop("full_gradient")
    with pytest.raises(RuntimeError) as raised:
        sam.first_step()
    assert str(raised.value) == ("perturbation='noise' needs the full-batch gradient, and 1 of 2 parameters have "
                                 "none: call set_full_gradient() before first_step()")


def test_the_analysis_directions_keep_their_full_gradient_in_the_saved_state_and_check_it_on_loading():
    parameters = params((3,), (2,))
    minibatch = SAM(parameters, torch.optim.SGD, lr=0.1)
    assert minibatch.state_dict()["method_state"] == {}  # ordinary SAM saves nothing of its own
    full = SAM(params((3,), (2,)), torch.optim.SGD, lr=0.1, perturbation="full")
    assert full.state_dict()["method_state"] == {"full_gradient": [None, None]}  # none computed yet
    full.set_full_gradient([torch.ones(3), torch.ones(2)])
    saved = full.state_dict()
    other = SAM(params((3,)), torch.optim.SGD, lr=0.1, perturbation="full")
    with pytest.raises(CheckpointError) as raised:
        other._load_method_state(saved["method_state"])
    assert str(raised.value) == ("the SAM state holds a full-batch gradient for 2 parameter tensors, this model has "
                                 "1: the checkpoint is from a different model")
    wrong = SAM(params((3,), (4,)), torch.optim.SGD, lr=0.1, perturbation="full")
    with pytest.raises(CheckpointError) as raised:
        wrong._load_method_state(saved["method_state"])
    assert str(raised.value).startswith("the saved full-batch gradient does not fit this model: ")
    with pytest.raises(ValueError) as raised:
        SAM(params((2,)), torch.optim.SGD, lr=0.1, perturbation="sideways")
    assert str(raised.value) == ("perturbation='sideways' is not allowed: perturbation must be one of minibatch, "
                                 "full, noise")


def test_a_skipped_fp16_step_leaves_the_weights_and_no_gradients_behind():
    from fsam.optim import create_optimizer

    model = nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = create_optimizer(model, "fsam")
    out = train_step(model, torch.randn(8, 4), torch.randint(0, 3, (8,)),
                     lambda logits, targets: nn.functional.cross_entropy(logits, targets) * float("inf"), optimizer,
                     precision=Precision("fp16", "cpu"))
    assert out.skipped is True
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
