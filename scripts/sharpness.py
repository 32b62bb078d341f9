"""Measure the sharpness and loss landscape of finished runs: the Hessian's top eigenvalues and trace,
ρ-sharpness, slices along filter-normalised directions, the line between two runs; written into each run folder
as analysis/sharpness.json.

    python scripts/sharpness.py runs/                         # every finished run under runs/: λ_max, trace, ρ
    python scripts/sharpness.py RUN --what eigen,slice1d --checkpoint best --images 1024 --batch-size 256
    python scripts/sharpness.py runs/<sgd setting>/seed1 --what line --line-to runs/<fsam setting>/seed1
    python scripts/sharpness.py runs/ --device cuda           # the paper's networks: on a GPU
    python scripts/sharpness.py runs/ --parallel 2            # two runs at once, one thread each
    python scripts/sharpness.py runs/ --launcher slurm --partition gpu   # one SLURM job per run

A rerun with the same options reads the numbers back instead of measuring again; other options measure again and
say which changed. Each number is recorded with its conditions (checkpoint, images and labels, eval mode,
float32, the loss without weight decay): see docs/sharpness.md. Damaged and unfinished runs are refused, one line
each, and the exit status is then 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fsam.analysis.jobs import LAUNCHERS, Resources, measure_runs, measurement_device
from fsam.analysis.record import CHECKPOINTS, LABELS, QUANTITIES, Options
from fsam.errors import FsamError
from fsam.report.runs import run_folders

DEFAULTS = Options()


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line ``error: ...`` and exit status 2, like every other refusal."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main() -> int:
    parser = OneLineParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or folders holding run folders")
    parser.add_argument("--what", default=",".join(DEFAULTS.what),
                        help=f"comma-separated, of {','.join(QUANTITIES)} (default: %(default)s)")
    parser.add_argument("--checkpoint", default=DEFAULTS.checkpoint, choices=CHECKPOINTS,
                        help="final weights, or the best test epoch's (a diagnostic: chosen on the test set)")
    parser.add_argument("--images", type=int, default=DEFAULTS.images, help="training images measured on")
    parser.add_argument("--image-seed", type=int, default=DEFAULTS.image_seed, help="chooses the images")
    parser.add_argument("--labels", default=DEFAULTS.labels, choices=LABELS,
                        help="the labels the run trained on (noisy ones included), or the true ones")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                        help="images per forward pass, and the m of ρ-sharpness (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="directions, probes and starting vectors")
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help="eigenvalues (default: λ_max alone)")
    parser.add_argument("--power-iterations", type=int, default=DEFAULTS.power_iterations,
                        help="Hessian-vector products per eigenvalue at most (default: %(default)s)")
    parser.add_argument("--power-tolerance", type=float, default=DEFAULTS.power_tolerance,
                        help="stop at this relative change of the eigenvalue (default: %(default)s)")
    parser.add_argument("--trace-probes", type=int, default=DEFAULTS.trace_probes,
                        help="Hutchinson probes, one Hessian-vector product each (default: %(default)s)")
    parser.add_argument("--rho", type=float, nargs="*", default=list(DEFAULTS.rho),
                        help="radii of plain ρ-sharpness (default: %(default)s; none: --rho alone); after the "
                             "run folders, or end the list with --")
    parser.add_argument("--adaptive-rho", type=float, nargs="*", default=list(DEFAULTS.adaptive_rho),
                        help="radii of adaptive ρ-sharpness, scaled by |w| (default: %(default)s)")
    parser.add_argument("--ascent-steps", type=int, default=DEFAULTS.ascent_steps,
                        help="gradient-ascent steps of the worst case, per batch (default: %(default)s)")
    parser.add_argument("--random-directions", type=int, default=DEFAULTS.random_directions,
                        help="random directions of the average case, per batch (default: %(default)s)")
    parser.add_argument("--slice-radius", type=float, default=DEFAULTS.slice_radius,
                        help="slices run from -R to R along each direction (default: %(default)s)")
    parser.add_argument("--slice-points", type=int, default=DEFAULTS.slice_points, help="points of a 1-D slice")
    parser.add_argument("--slice2d-points", type=int, default=DEFAULTS.slice2d_points,
                        help="points per side of a 2-D slice")
    parser.add_argument("--line-to", default=None, help="the run folder at the other end of the line")
    parser.add_argument("--line-points", type=int, default=DEFAULTS.line_points, help="points of the line")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    jobs = parser.add_argument_group("measuring many runs at once")
    jobs.add_argument("--launcher", default="here", choices=LAUNCHERS,
                      help="here: in this process (or --parallel processes); local: submitit jobs on this machine; "
                           "slurm: one SLURM job per run (default: %(default)s)")
    jobs.add_argument("--parallel", type=int, default=1,
                      help="here and local: runs measured at once, one thread each (default: %(default)s)")
    jobs.add_argument("--partition", default=None, help="slurm: the partition")
    jobs.add_argument("--account", default=None, help="slurm: the account")
    jobs.add_argument("--gpus-per-job", type=int, default=1, help="slurm: GPUs per job (default: %(default)s)")
    jobs.add_argument("--cpus-per-job", type=int, default=4, help="slurm: CPUs per job (default: %(default)s)")
    jobs.add_argument("--mem-gb", type=int, default=16, help="slurm: memory per job (default: %(default)s)")
    jobs.add_argument("--timeout-min", type=int, default=60,
                      help="local and slurm: time limit per job (default: %(default)s)")
    jobs.add_argument("--log-dir", type=Path, default=Path("logs/sharpness"),
                      help="local and slurm: the jobs' logs (default: %(default)s)")
    args = parser.parse_args()
    try:
        options = Options(
            what=tuple(dict.fromkeys(name.strip() for name in args.what.split(",") if name.strip())),
            checkpoint=args.checkpoint,
            images=args.images, image_seed=args.image_seed, labels=args.labels, batch_size=args.batch_size,
            seed=args.seed, top_k=args.top_k, power_iterations=args.power_iterations,
            power_tolerance=args.power_tolerance, trace_probes=args.trace_probes, rho=tuple(args.rho),
            adaptive_rho=tuple(args.adaptive_rho), ascent_steps=args.ascent_steps,
            random_directions=args.random_directions, slice_radius=args.slice_radius,
            slice_points=args.slice_points, slice2d_points=args.slice2d_points, line_to=args.line_to,
            line_points=args.line_points,
        )
        if args.launcher == "here":
            measurement_device(args.device)
        resources = Resources(partition=args.partition, account=args.account, gpus_per_job=args.gpus_per_job,
                              cpus_per_job=args.cpus_per_job, mem_gb=args.mem_gb, timeout_min=args.timeout_min,
                              log_dir=args.log_dir)
        folders = list(dict.fromkeys(folder for root in args.runs for folder in found_runs(root)))
    except FsamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.launcher != "here" or args.parallel > 1:
        print(f"measuring {len(folders)} runs: {args.launcher}, {args.parallel if args.launcher != 'slurm' else 'all'} "
              "at a time", flush=True)
    counts = {"measured": 0, "refused": 0, "failed": 0}
    try:
        for result in measure_runs(folders, options, device=args.device, launcher=args.launcher,
                                   parallel=args.parallel, resources=resources):
            counts[result.status] += 1
            stream = sys.stdout if result.status == "measured" else sys.stderr
            print("\n".join(result.lines), file=stream, flush=True)
    except FsamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if (counts["refused"] or counts["failed"]) and len(folders) > 1:
        print(f"error: {counts['refused'] + counts['failed']} of {len(folders)} runs not measured "
              f"({counts['refused']} refused, {counts['failed']} failed; each named above); {counts['measured']} "
              "measured", file=sys.stderr)
    return 2 if counts["refused"] or counts["failed"] else 0


def found_runs(root: Path) -> list[Path]:
    """The run folders at or under ``root``; FsamError when there are none."""
    if not root.is_dir():
        raise FsamError(f"no folder at {root}: pass run folders, or the folder your runs were written to (runs/)")
    found = run_folders(root)
    if not found:
        raise FsamError(f"no run folders (with config.yaml) under {root}: pass the folder your runs were written "
                        "to, or train one first (README, Quick start)")
    return found


if __name__ == "__main__":
    sys.exit(main())
