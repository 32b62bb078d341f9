"""Plot learning curves (test top-1 and train loss per epoch) of run folders into one PNG.

    python scripts/plot.py runs/some_run runs/other_run --out results/curves.png
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fsam.report import load_metrics  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/curves.png"))
    args = parser.parse_args()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    plotted = 0
    common = Path(os.path.commonpath([str(run.resolve()) for run in args.runs]))
    for run in args.runs:
        metrics = load_metrics(run)
        if metrics.empty or "epoch" not in metrics:
            print(f"warning: {run} has no metrics.jsonl records; skipped", file=sys.stderr)
            continue
        label = str(run.resolve().relative_to(common)) if len(args.runs) > 1 else run.name
        if "test_top1" in metrics:
            acc_ax.plot(metrics["epoch"], metrics["test_top1"], label=label)
        if "train_loss" in metrics:
            loss_ax.plot(metrics["epoch"], metrics["train_loss"], label=label)
        plotted += 1
    if not plotted:
        print("error: none of the given folders holds metrics.jsonl", file=sys.stderr)
        return 2
    acc_ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    loss_ax.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_name(f".{args.out.stem}.tmp{args.out.suffix}")
    fig.savefig(temporary, dpi=120)
    os.replace(temporary, args.out)  # an old figure is replaced only by a complete one
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
