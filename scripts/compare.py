"""The report of a comparison fixed before its runs (fsam/study.py): choices, seeds, paired differences.

    python scripts/compare.py runs/ --study digits_noise --out-dir results/reproduction/digits_noise

Reads the study's tuning, seed and heatmap runs under RUNS (the folder they were trained in, FSAM_RUNS), and
writes tables/comparison.md (every table, with how each number was chosen), tables/*.csv (numbers as numbers)
and figures/ (curves per condition, the heatmap). Runs whose records do not verify are named and left out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fsam.errors import FsamError


def main() -> int:
    from fsam.study import STUDIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="the folder the study's runs were trained in (FSAM_RUNS)")
    parser.add_argument("--study", required=True, choices=sorted(STUDIES), help="which study")
    parser.add_argument("--out-dir", type=Path, required=True, help="where tables/ and figures/ go")
    parser.add_argument("--wandb", action="store_true", help="also log the tables to a wandb report run")
    parser.add_argument("--wandb-project", default="fsam")
    parser.add_argument("--wandb-mode", default="auto", choices=["auto", "online", "offline"])
    args = parser.parse_args()
    if not args.runs.is_dir():
        print(f"error: no run folder at {args.runs}: pass the folder the study trained in (FSAM_RUNS)", file=sys.stderr)
        return 2
    os.environ["FSAM_RUNS"] = str(args.runs)  # where the study's cells compose to
    from fsam.config.compose import compose_runs
    from fsam.report.comparison import collect, comparison_tables, report_text, write_report

    try:
        collected = collect(STUDIES[args.study], compose_runs)
    except FsamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = write_report(collected, args.out_dir)
    print(report_text(collected, comparison_tables(collected)))
    print(f"written: {', '.join(str(path) for path in written)}")
    if args.wandb:
        from fsam.report.wandb_upload import log_tables

        folder = log_tables(comparison_tables(collected), {}, project=args.wandb_project, mode=args.wandb_mode,
                            folder=args.out_dir / "tables", name=f"{args.study}-comparison")
        print(f"wandb: the tables logged in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
