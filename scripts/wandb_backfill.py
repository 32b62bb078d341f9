"""Send finished run folders to Weights & Biases from their records, without training again.

    python scripts/wandb_backfill.py runs/                         # every finished run under runs/
    python scripts/wandb_backfill.py runs/cifar100-resnet18-fsam-49c7758d8fc4/seed1 --mode offline

Each run is logged as a live run would have been (config and identity, every epoch at its step, the summary;
named <setting>-seed<N>, grouped by setting), under the wandb id the run had, so a run that was mirrored live is
continued rather than duplicated. Offline (no login or no network) it is written to <run folder>/wandb/ and
uploaded later with `wandb sync <run folder>/wandb/offline-run-*`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fsam.report.wandb_upload import backfill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="a run folder, or a folder searched recursively for run folders")
    parser.add_argument("--project", default="fsam")
    parser.add_argument("--entity", default=None)
    parser.add_argument("--mode", default="auto", choices=["auto", "online", "offline"])
    args = parser.parse_args()
    if not args.runs.is_dir():
        print(f"error: no run folder at {args.runs}: pass a run folder or the folder holding them (FSAM_RUNS, "
              "default runs/)", file=sys.stderr)
        return 2
    folders = sorted({path.parent for path in args.runs.rglob("summary.json")})
    if not folders:
        print(f"error: no finished run (with summary.json) under {args.runs}", file=sys.stderr)
        return 2
    logged = backfill(folders, project=args.project, entity=args.entity, mode=args.mode)
    for folder in logged:
        print(f"logged: {folder}")
    print(f"{len(logged)} of {len(folders)} finished runs sent to wandb project {args.project}")
    return 0 if logged else 2


if __name__ == "__main__":
    sys.exit(main())
