"""What keeps a training step fast on a GPU, pinned on the CPU: one compiled graph serves both passes of a
SAM-family step, and a step never reads a value back to the host (the one exception is named below).

The CUDA versions of these checks (inductor, ``torch.cuda.set_sync_debug_mode``) are in ``test_cuda.py``.
"""

from __future__ import annotations

import functools
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fsam.engine.loop as loop
import fsam.optim.sam as sam_module
from fsam.engine import run
from fsam.optim import Precision, create_optimizer, train_step
from test_optim import batches, small_bn_net

STEPS = 5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from nothing: compiled code cached by an earlier test would hide (or cause) a compile."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ compile


def conv_bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )


def compiles_per_step(method: str, precision: str = "off", device: str = "cpu", backend: str = "aot_eager") -> list[int]:
    """Frames compiled after each of STEPS steps. On the CPU the backend is aot_eager: the compiler's graph capture
    and guards without generating code, which is what decides recompilation."""
    model = conv_bn_net().to(device)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    optimizer = create_optimizer(model, method, lr=0.05, momentum=0.9, rho=0.1)
    amp = Precision(precision, device)
    generator = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(STEPS):
        inputs = torch.randn(8, 3, 8, 8, generator=generator).to(device)
        targets = torch.randint(0, 4, (8,), generator=generator).to(device)
        train_step(compiled, inputs, targets, F.cross_entropy, optimizer, precision=amp)
        counts.append(counter.frame_count)
    return counts


@pytest.mark.parametrize("method", ["sgd", "sam", "fsam"])
def test_the_clean_and_perturbed_passes_run_one_compiled_graph_that_is_never_recompiled(method):
    """One compilation for the whole run: the perturbed pass (batch-norm statistics left alone) must not change
    anything the compiled graph's guards check, or every SAM-family run compiles the model twice."""
    assert compiles_per_step(method) == [1] * STEPS


def test_an_fp16_step_compiles_the_model_once():
    assert compiles_per_step("fsam", precision="fp16") == [1] * STEPS


def test_the_loop_with_trainer_compile_compiles_the_model_once_over_epochs_and_evaluations(tiny_config, monkeypatch):
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    compiled_after_step = []
    real_step = loop.train_step

    def counted_step(*args, **kwargs):
        output = real_step(*args, **kwargs)
        compiled_after_step.append(counter.frame_count)
        return output

    monkeypatch.setattr(loop, "train_step", counted_step)
    run(tiny_config(trainer={"compile": True}))
    assert compiled_after_step == [1] * 8  # 2 epochs of 4 steps, a test-set evaluation after each


# --------------------------------------------------------------------------------------------- host syncs

# Ops whose result the host must wait for on an accelerator: a value read back (item, float, int, bool all end in
# _local_scalar_dense), or an output whose shape depends on the data.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}
# Methods that copy to host memory without going through an op on the CPU, where they cost nothing.
SYNCING_METHODS = ("cpu", "numpy", "tolist")


class _CountSyncingOps(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_host_syncs(monkeypatch) -> Iterator[Counter]:
    """Count, by name, what would make the host wait for an accelerator inside the block.

    The optimizer's accelerator path is forced (on the CPU, ``first_step`` reads its scale as a number, which
    waits for nothing here and is never taken on a GPU)."""
    counts: Counter = Counter()
    monkeypatch.setattr(sam_module, "_readable_without_sync", lambda *tensors: False)
    with monkeypatch.context() as patched:
        for name in SYNCING_METHODS:
            real = getattr(torch.Tensor, name)

            def counted(self, *args, _real=real, _name=name, **kwargs):
                counts[_name] += 1
                return _real(self, *args, **kwargs)

            patched.setattr(torch.Tensor, name, counted)
        with _CountSyncingOps(counts):
            yield counts


def syncs_per_step(monkeypatch, method: str, precision: str) -> list[Counter]:
    torch.manual_seed(0)
    model = small_bn_net()
    optimizer = create_optimizer(model, method, lr=0.05, momentum=0.9, rho=0.1)
    amp = Precision(precision, "cpu")
    per_step = []
    for inputs, targets in batches(3):
        with counting_host_syncs(monkeypatch) as counts:
            train_step(model, inputs, targets, F.cross_entropy, optimizer, precision=amp)
        per_step.append(counts)
    return per_step


@pytest.mark.parametrize("precision", ["off", "bf16"])
@pytest.mark.parametrize("method", ["sgd", "sam", "fsam", "fasam"])
def test_a_step_never_waits_for_the_device(monkeypatch, method, precision):
    assert syncs_per_step(monkeypatch, method, precision) == [Counter()] * 3


@pytest.mark.parametrize("method", ["sgd", "sam", "fsam"])
def test_an_fp16_step_reads_one_value_back_to_decide_whether_to_skip(monkeypatch, method):
    """The one needed sync: whether the gradients are finite decides, in Python, whether the step is taken or
    skipped (as ``GradScaler.step`` decides it too)."""
    assert syncs_per_step(monkeypatch, method, "fp16") == [Counter({"_local_scalar_dense": 1})] * 3


def test_the_loop_reads_nothing_back_between_steps(tiny_config, monkeypatch):
    """Between two steps of an epoch (data, step, the epoch's sums, the schedule) nothing is read back; the loss
    is read every ``log_every`` steps and at the epoch's end only."""
    counts_at_step: list[int] = []
    real_step = loop.train_step

    def counted_step(*args, **kwargs):
        counts_at_step.append(sum(counts.values()))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", counted_step)
    with counting_host_syncs(monkeypatch) as counts:
        run(tiny_config(optimizer={"name": "fsam"}, trainer={"epochs": 1, "log_every": 1000}))
    between_steps = [after - before for before, after in zip(counts_at_step, counts_at_step[1:])]
    assert between_steps == [0] * 3
