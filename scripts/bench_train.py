"""Benchmark whole training steps and the data path, end to end, against the release's way in the same run.

Measures, for one model, batch size, device, precision, memory format and compile setting:

* images/s of whole steps (forward, backward, optimizer) for SGD, SAM and F-SAM through ``fsam.optim.train_step``
  with ``fsam.optim.create_optimizer``, and for the baseline (``_baselines.py``: F-SAM with per-parameter loops,
  ``p.data`` swaps, a ``loss.item()`` sync per step, float32); the methods run interleaved, ``--steps`` steps per
  method per round, and each figure is the fastest of ``--rounds`` rounds;
* images/s of the data path alone: ``fsam.data``'s DeviceLoader (crop, flip, Cutout, normalise in batch on the
  device) over a generated uint8 CIFAR-like tensor, against a torch DataLoader with per-image PIL transforms at
  each of ``--workers``;
* peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per method; on the CPU there is no allocator
  counter, so it gives the bytes of parameters + gradients + optimizer state per method (counted from the tensors)
  and the process's peak resident set size (``ru_maxrss``, all methods together);
* model FLOPs per image from ``torch.utils.flop_counter.FlopCounterMode`` (a float32 forward + backward), and on
  CUDA the share of the GPU's peak dense bf16 throughput that the steps reach;
* with ``--data imagenet``, instead of all the above: images/s of the ImageNet path (``fsam.data``'s
  FolderLoader: JPEG decoding and timm's training transform in worker processes, batches moved to the device) over
  a generated ImageFolder of JPEGs, at each of ``--workers``.

Prints SAM/SGD and F-SAM/SAM time per step, device data path / DataLoader (the fastest worker count) and the
baseline / ours time per step against the targets, and appends a dated section to ``--record``.

    python scripts/bench_train.py                                  # CPU, ResNet-18, 100 classes, batch 128
    python scripts/bench_train.py --device cuda --precision bf16 --channels-last --batch-size 256
    python scripts/bench_train.py --data imagenet --workers 0 2     # the ImageNet loader on this machine's cores

The CUDA path is written but has not been run yet (no GPU so far); ``results/benchmarks.md`` says which figures
have been measured where.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from _baselines import LoopFSAM, PilCifar, loop_train_step  # scripts/ is on sys.path when a script here runs
from fsam.data import build_data
from fsam.data.loaders import DeviceLoader
from fsam.data.specs import AugmentSpec
from fsam.models import create_model
from fsam.optim import create_optimizer, train_step
from fsam.optim.step import Precision

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, rho=0.2, sigma=1.0, lmbda=0.6)
METHODS = ("sgd", "sam", "fsam")
BASELINE = "baseline fsam"
# Dense bf16 tensor-core peak in TFLOP/s, without sparsity, first match by name wins. Sources: NVIDIA's data sheets
# (H100 and H200 SXM: "989 TFLOPS" is half the 1979 quoted with sparsity; H100 PCIe 756 likewise; A100: 312)
# and the L4 / L40S data sheets (121 and 362, half the sparse figures).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)
CPU_TARGETS = {"SAM/SGD": ("<=", 2.05), "F-SAM/SAM": ("<=", 1.02), "device data / DataLoader": (">=", 10.0)}
DEFAULT_RECORD = Path(__file__).resolve().parent.parent / "results" / "benchmarks.md"
RECORD_HEADER = """# Benchmarks

Figures from `scripts/bench_train.py` (whole training steps and the data path), each section appended by one run
with its date, device, torch version and exact command.

Not measured on a GPU yet: every CUDA figure. That is whole-step throughput with bf16/fp16, channels_last and
torch.compile, the share of peak bf16 throughput, CUDA peak memory, the optimizer step on the GPU
(`bench_optim.py --device cuda`), the ImageNet loader feeding a GPU, and decoding JPEGs on the GPU
(`torchvision.io.decode_jpeg(device="cuda")`, not implemented). The sections below are CPU runs unless their
device says otherwise. To measure the GPU figures, run `bash scripts/gpu_check.sh` on the GPU machine (about
5 minutes on one GPU): it runs the CUDA tests, one epoch of the paper's CIFAR-100 setting, and the benchmarks,
appends their sections here and writes `results/bench_optim_cuda.json`; commit them.
"""


def epoch_images_per_s(loader, device: torch.device, rounds: int, batch_size: int) -> float:
    """Images per second of a loader's fastest whole epoch out of ``rounds`` (after one warm-up epoch)."""
    best = float("inf")
    for epoch in range(rounds + 1):
        synchronize(device)
        start = time.perf_counter()
        for _ in loader.iterate(epoch):
            pass
        synchronize(device)
        if epoch > 0:
            best = min(best, time.perf_counter() - start)
    return len(loader) * batch_size / best


def generated_imagefolder(root: Path, num_images: int, size: int, classes: int = 4) -> float:
    """Write ``num_images`` training JPEGs of ``size`` x ``size`` pixels (quality 90) in the ImageFolder layout,
    and one per class in ``val``; return their mean size in KiB. Each image is upsampled 16 x 16 noise: smooth, so
    its JPEG is closer to a photograph's than pure noise would be (which is larger and slower to decode)."""
    rng = np.random.default_rng(0)
    total_bytes = 0
    for index in range(num_images + classes):
        split, label = ("train", index % classes) if index < num_images else ("val", index - num_images)
        folder = root / split / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        path = folder / f"image_{index}.JPEG"
        coarse.resize((size, size), Image.BICUBIC).save(path, format="JPEG", quality=90)
        total_bytes += path.stat().st_size if split == "train" else 0
    return total_bytes / num_images / 1024


def bench_imagefolder(root: Path, args, device: torch.device, workers: int) -> float:
    """Images/s of one training epoch of the ImageNet loader (fastest round; the first epoch starts the workers)."""
    loader = build_data(
        "imagenet", str(root), batch_size=args.batch_size, device=device, image_size=args.image_size,
        num_workers=workers, seed=0, channels_last=args.channels_last,
    ).train
    return epoch_images_per_s(loader, device, args.rounds, args.batch_size)


def imagenet_report(args, device: torch.device, mean_kib: float, rates: dict[int, float]) -> list[str]:
    """The ImageNet loader's figures (images/s per worker count) as Markdown lines."""
    return [
        f"- ImageNet loader: fsam.data's FolderLoader with timm's training transform at {args.image_size} px "
        f"(random resized crop, flip, colour jitter, normalise), batch {args.batch_size}, batches moved to {device}, "
        f"{args.rounds} rounds (fastest round), {torch.get_num_threads()} CPU threads, {os.cpu_count()} cores",
        f"- data: {args.data_images} generated JPEGs of {args.jpeg_size} x {args.jpeg_size} px, mean {mean_kib:.0f} KiB "
        "(smooth random images, quality 90)",
        "",
        "| loader | images / s |",
        "|---|---|",
        *[f"| FolderLoader, {workers} workers | {rate:.0f} |" for workers, rate in rates.items()],
        "",
        "Not measured (GPU only): decoding the JPEGs on the GPU (torchvision.io.decode_jpeg(device='cuda')) and doing "
        "the crop and flip there in batch, which would move the decode off the CPU cores that bound this loader.",
    ]


def tiny_model(num_classes: int) -> nn.Module:
    """A two-convolution network for the smoke test: the script's whole path in a fraction of a second."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, num_classes),
    )


def build_model(name: str, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return tiny_model(num_classes) if name == "tiny" else create_model(name, num_classes)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generated_cifar(num_images: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images [N, 3, 32, 32] and int64 labels [N]: the shapes and dtypes of CIFAR."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (num_images, 3, 32, 32), dtype=np.uint8), rng.integers(0, num_classes, num_images)


class StepRunner:
    """One method's model, optimizer and batches; ``run(steps)`` returns seconds for that many whole steps."""

    def __init__(self, method: str, base_model: nn.Module, batches: list, args, device: torch.device) -> None:
        self.method, self.device = method, device
        self.model = copy.deepcopy(base_model).to(device).train()
        self.baseline = method == BASELINE
        if self.baseline:
            self.optimizer = LoopFSAM(self.model.parameters(), fsam=True, **HYPER)
            self.batches = [(x.to(device), y.to(device)) for x, y in batches]
            self.step = lambda x, y: loop_train_step(self.model, x, y, self.optimizer)
            return
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=memory_format)
        self.batches = [(x.to(device).contiguous(memory_format=memory_format), y.to(device)) for x, y in batches]
        self.optimizer = create_optimizer(self.model, method, **HYPER)
        self.precision = Precision(args.precision, device)
        forward = torch.compile(self.model) if args.compile else self.model
        self.step = lambda x, y: train_step(
            forward, x, y, nn.functional.cross_entropy, self.optimizer, precision=self.precision
        )

    def run(self, steps: int) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for number in range(steps):
            self.step(*self.batches[number % len(self.batches)])
        synchronize(self.device)
        return time.perf_counter() - start

    def state_bytes(self) -> int:
        """Bytes of parameters, gradients and every tensor in the optimizer's (and its base optimizer's) state."""
        params = [p for p in self.model.parameters()]
        total = sum(2 * p.numel() * p.element_size() for p in params)
        optimizers = [self.optimizer, getattr(self.optimizer, "base_optimizer", None)]
        seen = set()
        for optimizer in filter(None, optimizers):
            for state in optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value) and id(value) not in seen:
                        seen.add(id(value))
                        total += value.numel() * value.element_size()
        return total


def bench_steps(args, device: torch.device, batches: list) -> dict:
    """Seconds per step (fastest round), peak memory per method, and the process's peak RSS."""
    base_model = build_model(args.model, args.num_classes)
    names = [*METHODS, BASELINE]
    runners = {name: StepRunner(name, base_model, batches, args, device) for name in names}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_cuda = {}
    for name, runner in runners.items():  # warm-up (and compilation) outside the timed rounds
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runner.run(args.warmup)
        if device.type == "cuda":
            peak_cuda[name] = torch.cuda.max_memory_allocated(device)
    best = {name: float("inf") for name in names}
    for _ in range(args.rounds):  # interleaved, so drifting load on a shared machine hits every method alike
        for name, runner in runners.items():
            best[name] = min(best[name], runner.run(args.steps) / args.steps)
    return {
        "seconds_per_step": best,
        "peak_cuda_bytes": peak_cuda,
        "state_bytes": {name: runner.state_bytes() for name, runner in runners.items()},
        "rss_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before,
        "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def count_flops(args, device: torch.device, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """FLOPs per image of one float32 forward and of one forward + backward, from torch's FLOP counter."""
    model = build_model(args.model, args.num_classes).to(device).train()
    inputs, targets = batch[0].to(device), batch[1].to(device)
    with FlopCounterMode(display=False) as forward_counter, torch.no_grad():
        model(inputs)
    with FlopCounterMode(display=False) as total_counter:
        nn.functional.cross_entropy(model(inputs), targets).backward()
    return forward_counter.get_total_flops() / len(inputs), total_counter.get_total_flops() / len(inputs)


def bench_device_data(images: np.ndarray, labels: np.ndarray, args, device: torch.device) -> float:
    """Images/s of one epoch of the device-resident path (fastest of the rounds)."""
    loader = DeviceLoader(
        torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device), batch_size=args.batch_size,
        augment_spec=AugmentSpec(), mean=CIFAR100_MEAN, std=CIFAR100_STD, seed=0, train=True,
        channels_last=args.channels_last,
    )
    return epoch_images_per_s(loader, device, args.rounds, args.batch_size)


def bench_dataloader(images: np.ndarray, labels: np.ndarray, args, device: torch.device, workers: int) -> float:
    """Images/s of one epoch of a DataLoader with PIL transforms, batches moved to the device (fastest round)."""
    loader = torch.utils.data.DataLoader(
        PilCifar(images, labels, CIFAR100_MEAN, CIFAR100_STD), batch_size=args.batch_size, shuffle=True,
        drop_last=True, num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
    )
    best = float("inf")
    for epoch in range(args.rounds + 1):  # the first epoch starts the workers
        synchronize(device)
        start = time.perf_counter()
        for inputs, targets in loader:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        synchronize(device)
        if epoch > 0:
            best = min(best, time.perf_counter() - start)
    return len(loader) * args.batch_size / best


def peak_bf16_tflops(device: torch.device) -> tuple[str, float | None]:
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def verdict(name: str, value: float) -> str:
    if name not in CPU_TARGETS:
        return "no target"
    sense, target = CPU_TARGETS[name]
    met = value <= target if sense == "<=" else value >= target
    margin = abs(value - target) / target * 100
    return f"target {sense} {target:g}: {'met' if met else 'MISSED'} by {margin:.1f} %"


def report(args, device: torch.device, steps: dict, flops: tuple[float, float], data: dict) -> list[str]:
    """The figures as Markdown lines (printed and recorded)."""
    per_step = steps["seconds_per_step"]
    forward_flops, train_flops = flops
    passes = {"sgd": 1, "sam": 2, "fsam": 2, BASELINE: 2}
    lines = [
        f"- model {args.model} ({args.num_classes} classes), batch {args.batch_size}, precision {args.precision}, "
        f"channels_last {args.channels_last}, compile {args.compile}, {args.steps} steps x {args.rounds} rounds "
        f"(fastest round), {torch.get_num_threads()} CPU threads",
        f"- FLOPs per image (FlopCounterMode, float32): forward {forward_flops / 1e9:.4g} GFLOP, "
        f"forward + backward {train_flops / 1e9:.4g} GFLOP",
        "",
        "| method | ms / step | images / s | achieved TFLOP/s | memory |",
        "|---|---|---|---|---|",
    ]
    gpu_peak = peak_bf16_tflops(device) if device.type == "cuda" else None
    for name, seconds in per_step.items():
        achieved = passes[name] * train_flops * args.batch_size / seconds / 1e12
        if device.type == "cuda":
            memory = f"peak allocated {steps['peak_cuda_bytes'][name] / 2**20:.0f} MiB"
        else:
            memory = f"params + grads + optimizer state {steps['state_bytes'][name] / 2**20:.1f} MiB"
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {args.batch_size / seconds:.0f} | {achieved:.3f} | {memory} |")
    if device.type == "cpu":
        lines.append(
            f"\nCPU peak resident set size of the whole process: {steps['rss_peak_kib'] / 1024:.0f} MiB "
            f"(grew {steps['rss_growth_kib'] / 1024:.0f} MiB during the step benchmark, all methods together)."
        )
    else:
        gpu_name, peak = gpu_peak
        if peak is None:
            lines.append(f"\nGPU {gpu_name}: peak unknown (not in PEAK_BF16_TFLOPS), so no share of peak.")
        else:
            shares = ", ".join(
                f"{name} {passes[name] * train_flops * args.batch_size / seconds / 1e12 / peak * 100:.1f} %"
                for name, seconds in per_step.items()
            )
            lines.append(f"\nGPU {gpu_name}, peak dense bf16 {peak:g} TFLOP/s; share reached: {shares}.")
    lines += ["", "| data path | images / s |", "|---|---|"]
    lines += [f"| {name} | {rate:.0f} |" for name, rate in data.items()]
    dataloader_best = max(rate for name, rate in data.items() if name.startswith("DataLoader"))
    ratios = {
        "SAM/SGD": per_step["sam"] / per_step["sgd"],
        "F-SAM/SAM": per_step["fsam"] / per_step["sam"],
        "device data / DataLoader": data["device-resident"] / dataloader_best,
        "baseline / ours (F-SAM step)": per_step[BASELINE] / per_step["fsam"],
    }
    lines += ["", "| ratio | value | against the target |", "|---|---|---|"]
    suffix = "" if device.type == "cpu" else " (the targets are the CPU ones)"
    lines += [f"| {name} | {value:.3f} | {verdict(name, value)}{suffix} |" for name, value in ratios.items()]
    return lines


def record(path: Path, device: torch.device, lines: list[str]) -> None:
    """Append a section: date, device, torch version, the exact command, then ``lines``."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU {platform.processor() or platform.machine()}"
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    section = [
        f"## {datetime.date.today().isoformat()}: {where}, torch {torch.__version__}",
        "",
        "```bash",
        command,
        "```",
        "",
        *lines,
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else RECORD_HEADER
    path.write_text(text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n")


def bench_cifar(args, device: torch.device) -> list[str]:
    """Whole steps of every method, FLOPs and the CIFAR data path, as report lines."""
    images, labels = generated_cifar(args.data_images, args.num_classes)
    pil_batches = torch.utils.data.DataLoader(
        PilCifar(images, labels, CIFAR100_MEAN, CIFAR100_STD), batch_size=args.batch_size, drop_last=True
    )
    batches = [batch for batch, _ in zip(pil_batches, range(2))]
    steps = bench_steps(args, device, batches)
    flops = count_flops(args, device, batches[0])
    data = {"device-resident": bench_device_data(images, labels, args, device)}
    for workers in args.workers:
        data[f"DataLoader + PIL, {workers} workers"] = bench_dataloader(images, labels, args, device, workers)
    return report(args, device, steps, flops, data)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="cifar", choices=("cifar", "imagenet"),
                        help="cifar: whole steps and the CIFAR data path; imagenet: the ImageNet loader only")
    parser.add_argument("--model", default="resnet18", help="a fsam.models name, or 'tiny' (smoke test)")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="off", choices=("off", "bf16", "fp16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (ours only)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method before the rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-images", type=int, default=None,
                        help="images in the generated data set (default: 10000 CIFAR images, 512 JPEGs)")
    parser.add_argument("--jpeg-size", type=int, default=256, help="--data imagenet: side of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="--data imagenet: side of the training crops")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--record", type=Path, default=DEFAULT_RECORD, help="Markdown file the section is appended to")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.data == "imagenet":
        args.data_images = args.data_images or 512
        with tempfile.TemporaryDirectory() as folder:
            mean_kib = generated_imagefolder(Path(folder), args.data_images, args.jpeg_size)
            rates = {workers: bench_imagefolder(Path(folder), args, device, workers) for workers in args.workers}
        lines = imagenet_report(args, device, mean_kib, rates)
    else:
        args.data_images = args.data_images or 10_000
        lines = bench_cifar(args, device)
    print("\n".join(lines))
    record(args.record, device, lines)
    print(f"\nappended to {args.record}")


if __name__ == "__main__":
    main()
