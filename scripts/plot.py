"""Figures from run folders: learning curves per method (mean and a band over seeds), the λ × σ heatmap of F-SAM,
accuracy against the label-noise rate, F-SAM's EMA against the full gradient, and for runs measured by
scripts/sharpness.py the loss along a random direction and accuracy against λ_max; PNG and PDF into results/figures/.

    python train.py experiment=quickstart && python scripts/plot.py runs/    # the quick start's curves
    python scripts/plot.py runs/ --metric test_top1_at_best_val --out-dir results/figures   # runs with val_split

Every figure that the runs allow is drawn; the others are named with the reason they were not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fsam.errors import FsamError
from fsam.report import summarise
from fsam.report.runs import damaged, runs_under
from fsam.report.figures import (
    accuracy_against_lambda_max, ema_agreement, lambda_sigma_heatmap, learning_curves, loss_slices, loss_surfaces,
    noise_plot,
)
from fsam.report.tables import METRICS

RESULTS = Path(__file__).resolve().parent.parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph
    parser.add_argument("runs", type=Path, help="folder holding run folders (searched recursively), or one run folder")
    parser.add_argument("--out-dir", type=Path, default=RESULTS / "figures")
    parser.add_argument("--metric", default="final_top1", choices=list(METRICS),
                        help="for the heatmap and noise plot (default: the headline, the final epoch)")
    parser.add_argument("--all-settings", action="store_true",
                        help="curves of every setting (default: per method the setting with the most seeds)")
    args = parser.parse_args()
    try:
        runs = runs_under(args.runs)
    except FsamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in damaged(runs):
        print(line)  # listed, never drawn
    runs = runs[runs["status"] != "damaged"]
    summary = summarise(runs)
    curves, notes = learning_curves(runs, args.out_dir, all_settings=args.all_settings)
    slices, slice_notes = loss_slices(runs, args.out_dir)
    surfaces, surface_notes = loss_surfaces(runs, args.out_dir)
    against_sharpness, sharpness_notes = accuracy_against_lambda_max(runs, args.out_dir)
    notes += slice_notes + surface_notes + sharpness_notes
    drawn = {
        "learning curves": curves,
        "λ × σ heatmap": lambda_sigma_heatmap(summary, args.out_dir, args.metric),
        "accuracy against label noise": noise_plot(summary, args.out_dir, args.metric),
        "F-SAM's EMA against the full gradient": ema_agreement(runs, args.out_dir),
        "loss along a random direction": slices,
        "loss over two random directions": surfaces,
        "accuracy against λ_max": against_sharpness,
    }
    why_not = {
        "learning curves": "no run has metrics yet",
        "λ × σ heatmap": "needs finished F-SAM runs at two or more values of λ or σ",
        "accuracy against label noise": "needs finished runs with dataset.noise.kind set",
        "F-SAM's EMA against the full gradient": "needs an F-SAM run trained with trainer.full_grad_analysis_every",
        "loss along a random direction": "needs finished runs measured with scripts/sharpness.py --what slice1d",
        "loss over two random directions": "needs finished runs measured with scripts/sharpness.py --what slice2d",
        "accuracy against λ_max": "needs finished runs measured with scripts/sharpness.py --what eigen",
    }
    for note in notes:
        print(note)
    for kind, paths in drawn.items():
        if paths:
            print(f"written ({kind}): " + ", ".join(str(path) for path in paths))
        else:
            print(f"not drawn ({kind}): {why_not[kind]}")
    return 0 if any(drawn.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
