"""Benchmark the optimizer's own work: first_step + second_step, without forward or backward passes.

Compares fsam.optim against a per-parameter-loop implementation written the way public SAM and F-SAM
code does it (a Python loop over parameters, fresh temporaries each step, a for-loop base SGD; in
``_baselines.py``, shared with ``bench_train.py``), on the parameter set of the CIFAR ResNet-18, in the same
process. Prints:

* the time ratio baseline / ours (target: >= 1.5 on CPU, 2 stretch),
* dispatched aten ops per step, base optimizer included (proxy for GPU kernel launches; target <= 40 and
  independent of the number of parameter tensors),
* optimizer buffer bytes / parameter bytes, base optimizer state excluded (target <= 1 SAM, <= 2 F-SAM).

    python scripts/bench_optim.py [--device cpu] [--steps 30] [--model resnet18] [--json results/bench_optim.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _baselines import LoopFSAM  # scripts/ is on sys.path when a script here runs
from fsam.models import create_model
from fsam.optim import FSAM, SAM
from fsam.optim.factory import _fused_or_foreach


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def make_params(model_name: str, device: torch.device) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=100).to(device)
    return [p for p in model.parameters()]


def timed_steps(opt, params, grads_clean, grads_perturbed, steps: int, device) -> list[float]:
    times = []
    for _ in range(steps + 3):
        for p, g in zip(params, grads_clean):
            p.grad = g.clone()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.first_step()
        for p, g in zip(params, grads_perturbed):
            p.grad = g
        opt.second_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[3:]


def count_ops(opt, params, grads_clean, grads_perturbed) -> int:
    for p, g in zip(params, grads_clean):
        p.grad = g.clone()
    with CountOps() as counter:
        opt.first_step()
        for p, g in zip(params, grads_perturbed):
            p.grad = g
        opt.second_step()
    return sum(counter.ops.values())


def buffer_ratio(opt, params, exclude) -> float:
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    base_state = {id(t) for s in exclude.state.values() for t in s.values() if torch.is_tensor(t)}
    buffer_bytes = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and id(value) not in base_state and value.numel() > 1:
                buffer_bytes += value.numel() * value.element_size()
    return buffer_bytes / param_bytes


def bench(method: str, model_name: str, steps: int, device: torch.device) -> dict:
    params = make_params(model_name, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    grads_clean = [torch.randn(p.shape, generator=g).to(device) for p in params]
    grads_perturbed = [torch.randn(p.shape, generator=g).to(device) for p in params]
    base = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    hyper = dict(rho=0.2, sigma=1.0, lmbda=0.6)
    ours_cls = FSAM if method == "fsam" else SAM
    ours_kwargs = hyper if method == "fsam" else dict(rho=hyper["rho"])
    # the base SGD as fsam.optim.create_optimizer builds it: torch's fused kernel where there is one
    ours = ours_cls(None, _fused_or_foreach(torch.optim.SGD, [{"params": params}], **base), **ours_kwargs)
    baseline_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    baseline = LoopFSAM(baseline_params, fsam=method == "fsam", **hyper, **base)

    # interleave the two so drifting machine load hits both alike
    ours_times, base_times = [], []
    for _ in range(3):
        ours_times += timed_steps(ours, params, grads_clean, grads_perturbed, steps // 3, device)
        base_times += timed_steps(baseline, baseline_params, grads_clean, grads_perturbed, steps // 3, device)
    ours_ms, base_ms = statistics.median(ours_times) * 1e3, statistics.median(base_times) * 1e3
    return {
        "method": method,
        "param_tensors": len(params),
        "params_millions": sum(p.numel() for p in params) / 1e6,
        "ours_ms": ours_ms,
        "baseline_ms": base_ms,
        "speedup": base_ms / ours_ms,
        "ours_aten_ops_per_step": count_ops(ours, params, grads_clean, grads_perturbed),
        "baseline_aten_ops_per_step": count_ops(baseline, baseline_params, grads_clean, grads_perturbed),
        "ours_buffer_ratio": buffer_ratio(ours, params, ours.base_optimizer),
        "baseline_buffer_ratio": buffer_ratio(baseline, baseline_params, baseline.base_optimizer),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [bench(m, args.model, args.steps, device) for m in ("sam", "fsam")]
    for r in rows:
        print(
            f"{r['method']:>4} on {args.model} ({r['param_tensors']} tensors, {r['params_millions']:.2f}M params, {device}): "
            f"ours {r['ours_ms']:.2f} ms, per-parameter loop {r['baseline_ms']:.2f} ms, speed-up {r['speedup']:.2f}x | "
            f"aten ops/step ours {r['ours_aten_ops_per_step']}, loop {r['baseline_aten_ops_per_step']} | "
            f"buffers/params ours {r['ours_buffer_ratio']:.2f}, loop {r['baseline_buffer_ratio']:.2f}"
        )
    if args.json:
        record = {
            "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "results": rows,
        }
        if device.type == "cuda":
            record["gpu"] = torch.cuda.get_device_name(device)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
