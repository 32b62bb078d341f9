"""The GPU path: mixed precision, channels_last, torch.compile with inductor, no host sync in a step, the device
data path and exact resume, on CUDA. Each test runs the functions the CPU tests run (``train_step``, ``run``,
``build_data``) and is skipped, with the reason, where torch sees no CUDA GPU (``conftest.py``).

    pytest -m cuda            # these tests only; scripts/gpu_check.sh runs them first
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn import functional as F

from conftest import metrics_of, stop_at_call, without_times
from datagen import write_imagefolder
from fsam.data import AugmentSpec, build_data
from fsam.engine import run
from fsam.optim import Precision, create_optimizer, train_step
from test_hot_path import STEPS, compiles_per_step, conv_bn_net
from test_optim import InfAt, assert_same_snapshot, batches, small_bn_net, snapshot

# cuBLAS is deterministic across runs only with a fixed workspace; it reads this when it first starts, which no
# test does before collection ends.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = pytest.mark.cuda
GPU = torch.device("cuda")


@pytest.fixture
def full_float32():
    """Float32 matmuls and convolutions without TF32, so the GPU's float32 result can be held to tight tolerances."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture
def deterministic():
    """Deterministic kernels, so two runs of the same steps agree bit for bit. ``warn_only``: the global average
    pool's backward is on torch's list of nondeterministic CUDA ops, but to a 1x1 output (ours) it takes the
    kernel without atomics."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
        yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def gpu_config(tiny_config, **trainer):
    return tiny_config(trainer={"device": "cuda", **trainer})


def trained_weights(method: str, precision: str, device: torch.device, steps: int = 3):
    """The small BatchNorm network's parameters after ``steps`` steps, and whether any step was skipped."""
    torch.manual_seed(0)
    model = small_bn_net().to(device)
    optimizer = create_optimizer(model, method, lr=0.05, momentum=0.9, rho=0.1)
    amp = Precision(precision, device)
    skipped = False
    for inputs, targets in batches(steps):
        out = train_step(model, inputs.to(device), targets.to(device), F.cross_entropy, optimizer, precision=amp)
        skipped |= out.skipped
    return [p.detach().float().cpu() for p in model.parameters()], skipped


# ------------------------------------------------------------------------------------------ mixed precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["sgd", "sam", "fsam"])
def test_mixed_precision_steps_follow_the_float32_steps_on_the_gpu(method, precision, full_float32):
    reference, _ = trained_weights(method, "off", GPU)
    weights, skipped = trained_weights(method, precision, GPU)
    if skipped:
        pytest.skip(f"an {precision} step overflowed at the scaler's initial scale and was skipped, so the weights "
                    "cannot be compared with float32 (test_fp16_overflow_skips_the_whole_step_on_the_gpu covers it)")
    for ours, float32 in zip(weights, reference):
        assert ours.dtype == torch.float32  # autocast computes in low precision; the weights stay float32
        assert torch.allclose(ours, float32, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("bad_call", [2, 3], ids=["clean-pass", "perturbed-pass"])
def test_fp16_overflow_skips_the_whole_step_on_the_gpu(bad_call):
    torch.manual_seed(0)
    model = small_bn_net().to(GPU)
    optimizer = create_optimizer(model, "fsam", momentum=0.9, lr=0.05)
    precision = Precision("fp16", GPU)
    loss_fn = InfAt({bad_call})
    data = [(x.to(GPU), y.to(GPU)) for x, y in batches(3)]
    assert not train_step(model, *data[0], loss_fn, optimizer, precision=precision).skipped
    before, scale_before = snapshot(model, optimizer), precision.scaler.get_scale()
    assert train_step(model, *data[1], loss_fn, optimizer, precision=precision).skipped
    assert_same_snapshot(before, snapshot(model, optimizer))
    assert precision.scaler.get_scale() < scale_before
    assert not train_step(model, *data[2], loss_fn, optimizer, precision=precision).skipped


def test_bf16_is_kept_on_a_gpu_that_has_it(tiny_config):
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")
    summary = run(gpu_config(tiny_config, epochs=1, amp="bf16"))
    assert summary["amp"] == "bf16" and math.isfinite(summary["final_train_loss"])


# ------------------------------------------------------------------------------------ channels_last, compile


@pytest.mark.parametrize("method", ["sgd", "fsam"])
def test_a_channels_last_step_equals_the_contiguous_step_on_the_gpu(method, full_float32):
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = conv_bn_net().to(GPU, memory_format=memory_format)
        optimizer = create_optimizer(model, method, lr=0.05, momentum=0.9, rho=0.1)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            inputs = torch.randn(8, 3, 8, 8, generator=generator).to(GPU).contiguous(memory_format=memory_format)
            targets = torch.randint(0, 4, (8,), generator=generator).to(GPU)
            train_step(model, inputs, targets, F.cross_entropy, optimizer)
        results.append([p.detach().cpu() for p in model.parameters()])
    for contiguous, channels_last in zip(*results):
        assert torch.allclose(contiguous, channels_last, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["off", "bf16"])
@pytest.mark.parametrize("method", ["sgd", "sam", "fsam"])
def test_inductor_compiles_the_model_once_for_both_passes_on_the_gpu(method, precision):
    torch._dynamo.reset()
    assert compiles_per_step(method, precision, device="cuda", backend="inductor") == [1] * STEPS


def test_the_loop_with_compile_bf16_and_channels_last_compiles_once_and_trains(tiny_config, monkeypatch):
    """The combination scripts/gpu_check.sh runs on CIFAR-100, on the tiny data: one compilation over two epochs."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    summary = run(gpu_config(tiny_config, compile=True, channels_last=True, amp="bf16"))
    assert counter.frame_count == 1
    assert math.isfinite(summary["final_train_loss"])


# ------------------------------------------------------------------------------------------------ host syncs


@contextmanager
def sync_debug_mode(mode: str):
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("precision", ["off", "bf16"])
@pytest.mark.parametrize("method", ["sgd", "sam", "fsam", "fasam"])
def test_a_gpu_step_never_synchronises(method, precision):
    torch.manual_seed(0)
    model = small_bn_net().to(GPU)
    optimizer = create_optimizer(model, method, lr=0.05, momentum=0.9, rho=0.1)
    amp = Precision(precision, GPU)
    data = [(x.to(GPU), y.to(GPU)) for x, y in batches(3)]
    train_step(model, *data[0], F.cross_entropy, optimizer, precision=amp)  # CUDA and cuBLAS start up outside
    with sync_debug_mode("error"):
        for inputs, targets in data[1:]:
            train_step(model, inputs, targets, F.cross_entropy, optimizer, precision=amp)
    torch.cuda.synchronize()


@pytest.mark.parametrize("method", ["sgd", "fsam"])
def test_an_fp16_gpu_step_synchronises_once_to_decide_whether_to_skip(method):
    torch.manual_seed(0)
    model = small_bn_net().to(GPU)
    optimizer = create_optimizer(model, method, lr=0.05, momentum=0.9, rho=0.1)
    amp = Precision("fp16", GPU)
    data = [(x.to(GPU), y.to(GPU)) for x, y in batches(3)]
    train_step(model, *data[0], F.cross_entropy, optimizer, precision=amp)
    with warnings.catch_warnings(record=True) as caught, sync_debug_mode("warn"):
        warnings.simplefilter("always")
        for inputs, targets in data[1:]:
            train_step(model, inputs, targets, F.cross_entropy, optimizer, precision=amp)
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 2, [str(w.message) for w in syncs]


def test_device_batches_after_the_first_never_synchronise():
    """The epoch's order and augmentation draws are copied to the GPU once, before the first batch."""
    bundle = build_data("digits", "unused", batch_size=64, device=GPU)
    epoch = bundle.train.iterate(0)
    next(epoch)
    with sync_debug_mode("error"):
        for _ in epoch:
            pass
    torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_device_data_path_on_the_gpu_equals_the_cpu_path(channels_last):
    """Same draws, same gathers: equal up to float rounding of the normalisation."""
    batches_on = {}
    for device in ("cpu", "cuda"):
        bundle = build_data("digits", "unused", batch_size=64, eval_batch_size=200, device=device, seed=3,
                            augment=AugmentSpec(cutout_size=8), channels_last=channels_last)
        batches_on[device] = [*bundle.train.iterate(1), *bundle.test.iterate(0)]
    assert len(batches_on["cpu"]) == len(batches_on["cuda"])
    for (cpu_inputs, cpu_targets), (gpu_inputs, gpu_targets) in zip(batches_on["cpu"], batches_on["cuda"]):
        assert gpu_inputs.is_cuda and gpu_inputs.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        assert torch.equal(gpu_targets.cpu(), cpu_targets)
        assert torch.allclose(gpu_inputs.cpu(), cpu_inputs, rtol=0, atol=1e-5)


def test_the_imagefolder_path_delivers_the_cpu_batches_to_the_gpu(tmp_path):
    write_imagefolder(tmp_path, classes=2, per_class=4, size=40)
    on = {device: build_data("imagenet", str(tmp_path), batch_size=4, image_size=32, num_workers=0, seed=2,
                             device=device) for device in ("cpu", "cuda")}
    for (cpu_inputs, cpu_targets), (gpu_inputs, gpu_targets) in zip(on["cpu"].train.iterate(0),
                                                                   on["cuda"].train.iterate(0)):
        assert gpu_inputs.is_cuda and torch.equal(gpu_inputs.cpu(), cpu_inputs)
        assert torch.equal(gpu_targets.cpu(), cpu_targets)


# ------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("method", ["sgd", "fsam"])
def test_a_run_killed_mid_epoch_resumes_exactly_on_the_gpu(tiny_config, tmp_path, monkeypatch, method, deterministic):
    changes = {"optimizer": {"name": method}, "trainer": {"device": "cuda", "amp": "off",
                                                          "checkpoint_every_steps": 2}}
    reference = tiny_config(run_dir=str(tmp_path / "reference"), **changes)
    run(reference)

    interrupted = tiny_config(run_dir=str(tmp_path / "interrupted"), **changes)
    stop_at_call(monkeypatch, 7, KeyboardInterrupt())  # during epoch 2; the last checkpoint is after step 6
    with pytest.raises(KeyboardInterrupt):
        run(interrupted)
    monkeypatch.undo()
    run(interrupted)

    assert without_times(metrics_of(tmp_path / "interrupted")) == without_times(metrics_of(tmp_path / "reference"))
    resumed, straight = (torch.load(Path(tmp_path / name / "checkpoints" / "last.pt"), weights_only=True)["model"]
                         for name in ("interrupted", "reference"))
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
