"""The SAM-family semantics of docs/algorithm.md, pinned on problems small enough to compute by hand."""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fsam.errors import CheckpointError, ConfigError
from fsam.optim import FSAM, SAM, Precision, create_optimizer, disable_running_stats, train_step

# A quadratic with a per-step linear term, so each step sees a different "minibatch" gradient:
# L_t(w) = 0.5 * sum(A * w^2) + sum(B[t] * w),  grad = A * w + B[t].
A = [1.0, 3.0, 0.5]
B = [[0.3, -0.2, 0.1], [-0.4, 0.5, 0.2], [0.1, 0.1, -0.6], [0.2, -0.3, 0.4]]
W0 = [0.5, -1.0, 2.0]
LR, RHO = 0.1, 0.3


def quadratic_loss(w: torch.Tensor, t: int) -> torch.Tensor:
    a = torch.tensor(A, dtype=w.dtype)
    b = torch.tensor(B[t], dtype=w.dtype)
    return 0.5 * (a * w * w).sum() + (b * w).sum()


def grad_by_hand(w: list[float], t: int) -> list[float]:
    return [a * wi + b for a, wi, b in zip(A, w, B[t])]


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def sam_by_hand(steps: int, rho: float = RHO, adaptive: bool = False, eta: float = 0.0, direction=None) -> list[float]:
    """Plain-Python SAM / ASAM with SGD(lr) base; ``direction(t, g)`` maps g to d (F-SAM) or is identity."""
    w = list(W0)
    for t in range(steps):
        g = grad_by_hand(w, t)
        d = direction(t, g) if direction else g
        if adaptive:
            scale = [abs(wi) + eta for wi in w]
            td = [s * di for s, di in zip(scale, d)]
            e = [rho * s * s * di / (norm(td) + 1e-12) for s, di in zip(scale, d)]
        else:
            e = [rho * di / (norm(d) + 1e-12) for di in d]
        g_perturbed = grad_by_hand([wi + ei for wi, ei in zip(w, e)], t)
        w = [wi - LR * gi for wi, gi in zip(w, g_perturbed)]
    return w


def fsam_direction(sigma: float, lmbda: float, order: str, record=None):
    ema: list[float] = []

    def direction(t: int, g: list[float]) -> list[float]:
        nonlocal ema
        if t == 0:
            ema = list(g)
            d = list(g)
        elif order == "code":
            d = [gi - sigma * mi for gi, mi in zip(g, ema)]
            ema = [lmbda * mi + (1 - lmbda) * gi for mi, gi in zip(ema, g)]
        else:
            ema = [lmbda * mi + (1 - lmbda) * gi for mi, gi in zip(ema, g)]
            d = [gi - sigma * mi for gi, mi in zip(g, ema)]
        if record is not None:
            record.append(list(ema))
        return d

    return direction


def run_quadratic(optimizer_factory, steps: int, dtype=torch.float64):
    w = nn.Parameter(torch.tensor(W0, dtype=dtype))
    opt = optimizer_factory([w])
    for t in range(steps):
        quadratic_loss(w, t).backward()
        opt.first_step(zero_grad=True)
        quadratic_loss(w, t).backward()
        opt.second_step(zero_grad=True)
    return w, opt


def sgd(params, **kw):
    return torch.optim.SGD(params, lr=LR)


def test_sam_step_matches_hand_computation():
    w, _ = run_quadratic(lambda p: SAM(p, torch.optim.SGD, rho=RHO, lr=LR), steps=4)
    assert torch.allclose(w, torch.tensor(sam_by_hand(4), dtype=w.dtype), atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_asam_step_matches_hand_computation(eta):
    w, _ = run_quadratic(lambda p: SAM(p, torch.optim.SGD, rho=1.0, adaptive=True, eta=eta, lr=LR), steps=4)
    expected = sam_by_hand(4, rho=1.0, adaptive=True, eta=eta)
    assert torch.allclose(w, torch.tensor(expected, dtype=w.dtype), atol=1e-12)


@pytest.mark.parametrize("order", ["code", "paper"])
@pytest.mark.parametrize("sigma, lmbda", [(0.5, 0.6), (1.0, 0.9), (2.0, 0.0)])
def test_fsam_step_matches_hand_computation(order, sigma, lmbda):
    w, opt = run_quadratic(
        lambda p: FSAM(p, torch.optim.SGD, rho=RHO, sigma=sigma, lmbda=lmbda, ema_order=order, lr=LR), steps=4
    )
    emas: list[list[float]] = []
    expected = sam_by_hand(4, direction=fsam_direction(sigma, lmbda, order, emas))
    assert torch.allclose(w, torch.tensor(expected, dtype=w.dtype), atol=1e-12)
    assert torch.allclose(opt.state[w]["ema"], torch.tensor(emas[-1], dtype=w.dtype), atol=1e-12)


def test_fsam_adaptive_matches_hand_computation():
    w, _ = run_quadratic(lambda p: FSAM(p, torch.optim.SGD, rho=1.0, sigma=0.5, lmbda=0.6, adaptive=True, lr=LR), steps=3)
    expected = sam_by_hand(3, rho=1.0, adaptive=True, direction=fsam_direction(0.5, 0.6, "code"))
    assert torch.allclose(w, torch.tensor(expected, dtype=w.dtype), atol=1e-12)


def test_create_optimizer_fasam_is_fsam_with_the_asam_scaling():
    def factory(name):
        settings = dict(lr=LR, momentum=0.0, weight_decay=0.0, rho=1.0, sigma=0.5, lmbda=0.6)
        return lambda p: create_optimizer(p, name, **settings)

    fasam, _ = run_quadratic(factory("fasam"), steps=3)
    built_by_hand, _ = run_quadratic(
        lambda p: FSAM(p, torch.optim.SGD, rho=1.0, sigma=0.5, lmbda=0.6, adaptive=True, lr=LR), steps=3
    )
    expected = sam_by_hand(3, rho=1.0, adaptive=True, direction=fsam_direction(0.5, 0.6, "code"))
    assert torch.allclose(fasam, built_by_hand, atol=1e-12)
    assert torch.allclose(fasam, torch.tensor(expected, dtype=fasam.dtype), atol=1e-12)
    fsam, _ = run_quadratic(factory("fsam"), steps=3)
    assert not torch.allclose(fasam, fsam, atol=1e-3)


def test_fsam_first_step_is_plain_sam():
    w_fsam, _ = run_quadratic(lambda p: FSAM(p, torch.optim.SGD, rho=RHO, sigma=1.0, lmbda=0.6, lr=LR), steps=1)
    w_sam, _ = run_quadratic(lambda p: SAM(p, torch.optim.SGD, rho=RHO, lr=LR), steps=1)
    assert torch.equal(w_fsam, w_sam)
    w_fsam2, _ = run_quadratic(lambda p: FSAM(p, torch.optim.SGD, rho=RHO, sigma=1.0, lmbda=0.6, lr=LR), steps=2)
    w_sam2, _ = run_quadratic(lambda p: SAM(p, torch.optim.SGD, rho=RHO, lr=LR), steps=2)
    assert not torch.allclose(w_fsam2, w_sam2)


def test_fsam_ema_is_fed_raw_gradients_not_the_direction():
    """Regression test for the known port bug that feeds g - sigma*m into the EMA."""
    sigma, lmbda = 1.0, 0.9
    w = nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = FSAM([w], torch.optim.SGD, rho=RHO, sigma=sigma, lmbda=lmbda, lr=LR)
    raw_ema = buggy_ema = None
    for t in range(4):
        quadratic_loss(w, t).backward()
        g = w.grad.clone()
        if raw_ema is None:
            raw_ema, buggy_ema = g.clone(), g.clone()
        else:
            buggy_ema = lmbda * buggy_ema + (1 - lmbda) * (g - sigma * buggy_ema)
            raw_ema = lmbda * raw_ema + (1 - lmbda) * g
        opt.first_step()
        quadratic_loss(w, t).backward()
        opt.second_step(zero_grad=True)
    assert torch.allclose(opt.state[w]["ema"], raw_ema, atol=1e-12)
    assert not torch.allclose(opt.state[w]["ema"], buggy_ema, atol=1e-3)


def test_ema_orders_agree_when_sigma_is_one():
    def make(order):
        return lambda p: FSAM(p, torch.optim.SGD, rho=RHO, sigma=1.0, lmbda=0.6, ema_order=order, lr=LR)

    w_code, _ = run_quadratic(make("code"), steps=4)
    w_paper, _ = run_quadratic(make("paper"), steps=4)
    assert torch.allclose(w_code, w_paper, atol=1e-12)


def test_ema_orders_differ_when_sigma_is_not_one():
    def make(order):
        return lambda p: FSAM(p, torch.optim.SGD, rho=RHO, sigma=0.5, lmbda=0.6, ema_order=order, lr=LR)

    assert not torch.allclose(run_quadratic(make("code"), 3)[0], run_quadratic(make("paper"), 3)[0], atol=1e-6)


def test_param_groups_share_one_global_norm_and_their_own_settings():
    w1 = nn.Parameter(torch.tensor(W0[:2], dtype=torch.float64))
    w2 = nn.Parameter(torch.tensor(W0[2:], dtype=torch.float64))
    opt = SAM([{"params": [w1]}, {"params": [w2], "lr": 0.0}], torch.optim.SGD, rho=RHO, lr=LR)
    loss = lambda: quadratic_loss(torch.cat([w1, w2]), 0)  # noqa: E731
    loss().backward()
    g = torch.cat([w1.grad, w2.grad]).clone()
    opt.first_step()
    # the perturbation uses one norm over both groups
    assert torch.allclose(torch.cat([w1, w2]).detach(), torch.tensor(W0, dtype=torch.float64) + RHO * g / g.norm())
    loss().backward()
    opt.second_step()
    expected = sam_by_hand(1)
    assert torch.allclose(w1.detach(), torch.tensor(expected[:2], dtype=torch.float64), atol=1e-12)
    assert torch.equal(w2.detach(), torch.tensor(W0[2:], dtype=torch.float64))  # lr 0: restored exactly


def test_parameters_without_gradients_are_left_alone():
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = FSAM([used, unused], torch.optim.SGD, lr=0.1, rho=0.5)
    for _ in range(2):
        (used * used).sum().backward()
        opt.first_step()
        (used * used).sum().backward()
        opt.second_step(zero_grad=True)
    assert torch.equal(unused.detach(), torch.ones(3))
    assert "ema" not in opt.state[unused] and "saved_weights" not in opt.state[unused]


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_first_step_without_any_gradient_says_so_and_counts_nothing(method):
    model = nn.Linear(3, 2)
    opt = create_optimizer(model, method, lr=0.1)
    x = torch.randn(4, 3)
    model(x).square().mean().backward()
    opt.step(lambda: model(x).square().mean().backward())
    opt.zero_grad(set_to_none=True)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=r"no parameter with a gradient: call loss\.backward\(\) before first_step\(\)"):
        opt.first_step()
    assert opt.steps_taken == 1
    assert_identical(model.state_dict(), weights)
    assert_identical(opt.state_dict(), state)
    model(x).square().mean().backward()  # the next step runs as if the failed call never happened
    opt.first_step()
    model(x).square().mean().backward()
    opt.second_step()
    assert opt.steps_taken == 2


@pytest.mark.parametrize("usage", ["closure", "first-and-second-step"])
@pytest.mark.parametrize("attached_to", ["wrapper", "base optimizer"])
@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_a_scheduler_on_either_object_sees_the_step_and_does_not_warn(method, attached_to, usage):
    model = nn.Linear(3, 2)
    opt = create_optimizer(model, method, lr=0.1)
    x = torch.randn(4, 3)
    loss = lambda: model(x).square().mean()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "lr_scheduler.step() before optimizer.step()" would raise here
        target = opt if attached_to == "wrapper" else opt.base_optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(target, step_size=1, gamma=0.5)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss().backward()
            if usage == "closure":
                opt.step(lambda: loss().backward())
            else:
                opt.first_step()
                loss().backward()
                opt.second_step()
            scheduler.step()
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 8)  # each object sees the schedule of the other


@pytest.mark.parametrize("device_path", [False, True], ids=["host-path", "accelerator-path"])
@pytest.mark.parametrize("method", ["sam", "asam", "fsam", "fasam"])
def test_an_all_zero_gradient_leaves_the_weights_finite_and_unchanged(method, device_path, monkeypatch):
    """A dead layer or a zero loss gives a zero direction: its norm is 0, and without an epsilon 0 / 0 is NaN."""
    import fsam.optim.sam as sam_module

    if device_path:
        monkeypatch.setattr(sam_module, "_readable_without_sync", lambda *tensors: False)
    start = [0.0, 1.0, -2.0]  # a zero weight: ASAM's scale |w| is zero there too
    w = nn.Parameter(torch.tensor(start))
    opt = create_optimizer([w], method, lr=0.1, momentum=0.9, weight_decay=0.0, rho=0.5)
    for _ in range(2):  # F-SAM: the first step is plain SAM, the second uses the (zero) EMA
        (w * 0.0).sum().backward()
        opt.first_step()
        assert torch.isfinite(w).all() and torch.equal(w.detach(), torch.tensor(start))
        (w * 0.0).sum().backward()
        opt.second_step(zero_grad=True)
    assert torch.equal(w.detach(), torch.tensor(start))


def test_weights_are_restored_bitwise_into_the_same_storage():
    model = nn.Linear(50, 50)
    before = copy.deepcopy(model.state_dict())
    pointers = [p.data_ptr() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.0, rho=0.7)
    x = torch.randn(8, 50)
    model(x).square().mean().backward()
    opt.first_step()
    assert not torch.equal(model.weight, before["weight"])
    model(x).square().mean().backward()
    opt.second_step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert pointers == [p.data_ptr() for p in model.parameters()]


def test_closure_step_equals_explicit_steps():
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    model_a = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model_b = copy.deepcopy(model_a)
    opt_a = FSAM(model_a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt_b = FSAM(model_b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for _ in range(3):
        opt_a.zero_grad()
        F.cross_entropy(model_a(x), y).backward()
        opt_a.step(lambda: F.cross_entropy(model_a(x), y).backward())
        opt_b.zero_grad()
        F.cross_entropy(model_b(x), y).backward()
        opt_b.first_step()
        F.cross_entropy(model_b(x), y).backward()
        opt_b.second_step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def small_bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 6, generator=g), torch.randint(0, 4, (12,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method", ["sam", "fsam", "fasam"])
def test_state_round_trip_resumes_bitwise(method, tmp_path):
    data = batches(6)
    torch.manual_seed(0)
    reference = small_bn_net()
    initial = copy.deepcopy(reference.state_dict())
    opt = create_optimizer(reference, method, lr=0.05, momentum=0.9, weight_decay=1e-3, lmbda=0.6, rho=0.1)
    for x, y in data:
        train_step(reference, x, y, F.cross_entropy, opt)

    first = small_bn_net()
    first.load_state_dict(initial)
    opt1 = create_optimizer(first, method, lr=0.05, momentum=0.9, weight_decay=1e-3, lmbda=0.6, rho=0.1)
    for x, y in data[:3]:
        train_step(first, x, y, F.cross_entropy, opt1)
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, tmp_path / "ckpt.pt")

    resumed = small_bn_net()
    opt2 = create_optimizer(resumed, method, lr=0.05, momentum=0.9, weight_decay=1e-3, lmbda=0.6, rho=0.1)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optim"])
    assert opt2.steps_taken == 3
    for x, y in data[3:]:
        train_step(resumed, x, y, F.cross_entropy, opt2)
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_state_dict_carries_base_state_and_ema():
    model = small_bn_net()
    opt = create_optimizer(model, "fsam", momentum=0.9)
    x, y = batches(1)[0]
    train_step(model, x, y, F.cross_entropy, opt)
    state = opt.state_dict()
    assert state["steps_taken"] == 1
    assert all(e is not None for e in state["method_state"]["ema"])
    assert len(state["base"]["state"]) == len(list(model.parameters()))
    assert all("momentum_buffer" in s for s in state["base"]["state"].values())


def test_loading_state_of_another_method_or_model_names_the_mismatch():
    model = small_bn_net()
    fsam = create_optimizer(model, "fsam")
    x, y = batches(1)[0]
    train_step(model, x, y, F.cross_entropy, fsam)
    with pytest.raises(CheckpointError, match="saved by FSAM.*uses SAM"):
        create_optimizer(model, "sam").load_state_dict(fsam.state_dict())
    other = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(CheckpointError, match="different model|does not fit"):
        create_optimizer(other, "fsam").load_state_dict(fsam.state_dict())


class InfAt:
    """A loss that turns infinite on chosen calls (0: first clean pass, 1: first perturbed pass, ...)."""

    def __init__(self, calls):
        self.calls, self.count = set(calls), 0

    def __call__(self, logits, targets):
        loss = F.cross_entropy(logits, targets)
        if self.count in self.calls:
            loss = loss * float("inf")
        self.count += 1
        return loss


def assert_identical(a, b, where="state"):
    """Nested dicts, lists and tensors equal bitwise, everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def assert_same_snapshot(a, b):
    for name, value in a[0].items():
        if "running" in name or "num_batches" in name:
            continue  # the clean forward still updates BatchNorm statistics, as any skipped fp16 step does
        assert torch.equal(value, b[0][name]), name
    ema_a, ema_b = a[1]["method_state"]["ema"], b[1]["method_state"]["ema"]
    for ea, eb in zip(ema_a, ema_b):
        assert torch.equal(ea, eb)
    for key, sa in a[1]["base"]["state"].items():
        assert torch.equal(sa["momentum_buffer"], b[1]["base"]["state"][key]["momentum_buffer"])
    assert a[1]["steps_taken"] == b[1]["steps_taken"]


@pytest.mark.parametrize("bad_call", [2, 3], ids=["clean-pass", "perturbed-pass"])
def test_fp16_nonfinite_gradient_skips_the_whole_step(bad_call):
    torch.manual_seed(0)
    model = small_bn_net()
    opt = create_optimizer(model, "fsam", momentum=0.9, lr=0.05)
    precision = Precision("fp16", "cpu")
    loss_fn = InfAt({bad_call})
    data = batches(3)
    out = train_step(model, *data[0], loss_fn, opt, precision=precision)  # calls 0, 1: a good step
    assert not out.skipped
    before, scale_before = snapshot(model, opt), precision.scaler.get_scale()
    out = train_step(model, *data[1], loss_fn, opt, precision=precision)  # calls 2, 3: one of them infinite
    assert out.skipped
    assert_same_snapshot(before, snapshot(model, opt))
    assert precision.scaler.get_scale() < scale_before
    out = train_step(model, *data[2], loss_fn, opt, precision=precision)
    assert not out.skipped and opt.steps_taken == 2


def test_fp16_skip_on_first_step_leaves_no_ema():
    model = small_bn_net()
    opt = create_optimizer(model, "fsam")
    out = train_step(model, *batches(1)[0], InfAt({0}), opt, precision=Precision("fp16", "cpu"))
    assert out.skipped and opt.steps_taken == 0
    assert all(e is None for e in opt.state_dict()["method_state"]["ema"])


def test_fp16_sgd_skips_nonfinite_steps():
    model = small_bn_net()
    opt = create_optimizer(model, "sgd")
    weights = copy.deepcopy(model[0].weight.detach())
    out = train_step(model, *batches(1)[0], InfAt({0}), opt, precision=Precision("fp16", "cpu"))
    assert out.skipped and torch.equal(model[0].weight, weights)


def test_fp16_fsam_ema_holds_the_unscaled_clean_gradient():
    """The F-SAM EMA is in gradient units: the loss scale is divided out before first_step() reads p.grad."""
    torch.manual_seed(0)
    model = small_bn_net()
    float32_copy = copy.deepcopy(model)
    x, y = batches(1)[0]
    F.cross_entropy(float32_copy(x), y).backward()
    opt = create_optimizer(model, "fsam", lr=0.1, momentum=0.9, rho=0.5)
    precision = Precision("fp16", "cpu")
    assert precision.scaler.get_scale() > 1  # a scale that is not divided out would show in the EMA
    train_step(model, x, y, F.cross_entropy, opt, precision=precision)
    for parameter, reference in zip(model.parameters(), float32_copy.parameters()):
        torch.testing.assert_close(opt.state[parameter]["ema"], reference.grad, rtol=1e-2, atol=1e-3)


def fp16_fsam_weights(init_scale: float, growth_interval: int, steps: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = small_bn_net()
    opt = create_optimizer(model, "fsam", lr=0.1, momentum=0.9, rho=0.5, sigma=1.0, lmbda=0.6)
    precision = Precision("fp16", "cpu")
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    for x, y in batches(steps):
        assert not train_step(model, x, y, F.cross_entropy, opt, precision=precision).skipped
    return [parameter.detach().clone() for parameter in model.parameters()]


def test_fp16_fsam_weights_do_not_depend_on_the_loss_scale():
    """A loss scale doubling every step (2^8, 2^9, ...) and a fixed 2^16 give the same weights: powers of two
    scale fp16 exactly, so any difference is a scale that leaked into the EMA, the perturbation or the update."""
    growing = fp16_fsam_weights(init_scale=2.0**8, growth_interval=1)
    fixed = fp16_fsam_weights(init_scale=2.0**16, growth_interval=10_000)
    for a, b in zip(growing, fixed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_step_runs_without_scaler():
    model = small_bn_net()
    opt = create_optimizer(model, "fsam")
    precision = Precision("bf16", "cpu")
    assert precision.scaler is None
    out = train_step(model, *batches(1)[0], F.cross_entropy, opt, precision=precision)
    assert torch.isfinite(out.loss) and not out.skipped


@pytest.mark.parametrize("method", ["sgd", "sam", "asam", "fsam"])
def test_micro_batches_equal_one_big_batch(method):
    torch.manual_seed(0)
    whole = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    split = copy.deepcopy(whole)
    kw = dict(lr=0.1, momentum=0.9, rho=0.2)
    opt_whole, opt_split = create_optimizer(whole, method, **kw), create_optimizer(split, method, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(24, 6, generator=g), torch.randint(0, 4, (24,), generator=g)
        a = train_step(whole, x, y, F.cross_entropy, opt_whole)
        b = train_step(split, x, y, F.cross_entropy, opt_split, micro_batches=4)
        assert torch.allclose(a.loss, b.loss, atol=1e-6)
        assert torch.allclose(a.logits, b.logits, atol=1e-6)
    for pa, pb in zip(whole.parameters(), split.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_uneven_micro_batches_are_weighted_by_size():
    torch.manual_seed(0)
    whole = nn.Linear(6, 4)
    split = copy.deepcopy(whole)
    opt_whole, opt_split = create_optimizer(whole, "sam"), create_optimizer(split, "sam")
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    train_step(whole, x, y, F.cross_entropy, opt_whole)
    train_step(split, x, y, F.cross_entropy, opt_split, micro_batches=3)  # 4 + 3 + 3
    assert torch.allclose(whole.weight, split.weight, atol=1e-6)


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_batchnorm_statistics_come_from_the_clean_pass_only(method):
    torch.manual_seed(0)
    model = small_bn_net()
    clean_only = copy.deepcopy(model)
    x, y = batches(1)[0]
    train_step(model, x, y, F.cross_entropy, create_optimizer(model, method, rho=0.5))
    clean_only.train()
    with torch.no_grad():
        clean_only(x)
    bn, expected = model[1], clean_only[1]
    assert torch.equal(bn.running_mean, expected.running_mean)
    assert torch.equal(bn.running_var, expected.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_disable_running_stats_puts_the_statistics_back_after_an_error():
    model = small_bn_net()
    before = copy.deepcopy(model[1].state_dict())
    with pytest.raises(RuntimeError):
        with disable_running_stats(model):
            model(batches(1)[0][0])
            raise RuntimeError("boom")
    assert_identical(model[1].state_dict(), before)
    assert model[1].track_running_stats


class RecordsSync(nn.Module):
    """Stands in for DistributedDataParallel: records which backward passes ran under no_sync()."""

    def __init__(self, module):
        super().__init__()
        self.module, self.in_no_sync, self.log = module, False, []

    @contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False

    def forward(self, x):
        self.log.append("local" if self.in_no_sync else "synced")
        return self.module(x)


@pytest.mark.parametrize(
    "sync_clean_pass, micro_batches, expected",
    [
        (False, 1, ["local", "synced"]),
        (True, 1, ["synced", "synced"]),
        (False, 2, ["local", "local", "local", "synced"]),
        (True, 2, ["local", "synced", "local", "synced"]),
    ],
)
def test_clean_pass_synchronisation_is_an_option(sync_clean_pass, micro_batches, expected):
    model = RecordsSync(nn.Linear(6, 4))
    opt = create_optimizer(model, "fsam")
    x, y = batches(1)[0]
    train_step(model, x, y, F.cross_entropy, opt, micro_batches=micro_batches, sync_clean_pass=sync_clean_pass)
    assert model.log == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rho=-0.1), r"rho=-0.1 .* must be >= 0"),
        (dict(lmbda=1.0), r"lmbda=1.0 .* must be in \[0, 1\)"),
        (dict(lmbda=-0.2), r"lmbda=-0.2 .* must be in \[0, 1\)"),
        (dict(sigma=-1.0), r"sigma=-1.0 .* must be >= 0"),
        (dict(ema_order="later"), r"ema_order='later'"),
        (dict(eta=-1.0), r"eta=-1.0 .* must be >= 0"),
    ],
)
def test_bad_hyperparameters_name_the_argument_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_factory_turns_bad_values_into_config_errors():
    with pytest.raises(ConfigError, match="optimizer.rho=-1"):
        create_optimizer(nn.Linear(2, 2), "sam", rho=-1)
    with pytest.raises(ConfigError, match="choose one of sgd, sam, asam, fsam, fasam"):
        create_optimizer(nn.Linear(2, 2), "adam-sam")


def test_step_without_closure_explains_what_to_do():
    opt = SAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


def test_wraps_adamw_and_an_existing_optimizer_instance():
    model = nn.Linear(4, 2)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = FSAM(None, base, rho=0.1)
    assert opt.base_optimizer is base
    x = torch.randn(5, 4)
    for _ in range(2):
        train_step(model, x, torch.zeros(5, dtype=torch.long), F.cross_entropy, opt)
    assert all("exp_avg" in s for s in base.state.values())


def test_no_decay_groups_exclude_norms_and_biases():
    model = small_bn_net()
    opt = create_optimizer(model, "fsam", weight_decay=5e-4, no_decay_norm_and_bias=True)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 for p in no_decay["params"])


@pytest.mark.parametrize("method", ["sam", "asam", "fsam"])
def test_the_accelerator_path_of_first_step_matches_the_host_path_and_the_hand_computation(method, monkeypatch):
    """On the CPU the scale goes into the add as a number; on accelerators it stays a device tensor (no host
    sync). Both paths are forced here on the CPU and must agree with the hand-computed steps."""
    import fsam.optim.sam as sam_module

    def factory(params):
        if method == "fsam":
            return FSAM(params, torch.optim.SGD, rho=RHO, sigma=0.5, lmbda=0.6, lr=LR)
        return SAM(params, torch.optim.SGD, rho=RHO, adaptive=method == "asam", lr=LR)

    if method == "fsam":
        expected = sam_by_hand(4, direction=fsam_direction(0.5, 0.6, "code", []))
    else:
        expected = sam_by_hand(4, adaptive=method == "asam")
    host, _ = run_quadratic(factory, steps=4)
    monkeypatch.setattr(sam_module, "_readable_without_sync", lambda *tensors: False)
    device, _ = run_quadratic(factory, steps=4)
    for w in (host, device):
        assert torch.allclose(w, torch.tensor(expected, dtype=w.dtype), atol=1e-12)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_create_optimizer_uses_the_fused_base_optimizer_where_torch_has_one(base):
    model = nn.Linear(4, 3)
    optimizer = create_optimizer(model, "fsam", base=base, lr=0.1)
    assert optimizer.base_optimizer.defaults["fused"] is True  # torch has fused SGD and AdamW for the CPU
