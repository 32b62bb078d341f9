"""Mutation testing of one or more packages with mutmut: how many planted bugs the fast tests catch.

    python scripts/mutation.py fsam/optim                 # about 10 minutes on 2 cores
    python scripts/mutation.py fsam/data fsam/report      # each package with its own tests, one after the other
    python scripts/mutation.py fsam/optim --survivors     # and the diff of every mutant no test caught

Each package is tested in a fresh copy of the committed tree (``git worktree``-free: ``git archive`` of HEAD into a
temporary folder), so uncommitted edits and the editable install never mix into the result. mutmut changes one
operator, constant or call at a time and runs the tests that cover the changed function; a mutant is killed when
one of them fails (or runs out of time). Not part of CI: it takes minutes to hours per package.

Needs ``pip install mutmut`` (3.x). Two settings matter for torch code: the tests import the mutated copy
(``PYTHONPATH=.``, ahead of the editable install), and torch runs single-threaded (``OMP_NUM_THREADS=1``),
because mutmut forks its workers from a process that has imported torch and a forked OpenMP pool hangs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The fast, in-process tests that exercise each package (tests that start train.py in a subprocess are left out:
# mutmut cannot see which functions they cover, and they would run for every mutant).
TESTS = {
    "fsam/optim": ["tests/test_optim.py", "tests/test_optim_contract.py", "tests/test_pinned_behaviour.py",
                   "tests/test_hot_path.py", "tests/test_perturbation_analysis.py"],
    "fsam/data": ["tests/test_data.py", "tests/test_validation.py"],
    "fsam/report": ["tests/test_report.py"],
    "fsam/engine": ["tests/test_engine.py", "tests/test_pinned_behaviour.py", "tests/test_preemption.py"],
}
SUMMARY = re.compile(r"(\d+)/(\d+)\s+🎉 (\d+) 🫥 (\d+)\s+⏰ (\d+)\s+🤔 (\d+)\s+🙁 (\d+)\s+🔇 (\d+)")


def mutate(package: str, workers: int, show_survivors: bool) -> dict[str, int]:
    """Run mutmut over ``package`` in a copy of HEAD; return its counts."""
    with tempfile.TemporaryDirectory(prefix="fsam-mutation-") as folder:
        copy = Path(folder)
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
        config = (
            "\n[tool.mutmut]\n"
            f"source_paths = [\"{package}/\"]\n"
            f"pytest_add_cli_args_test_selection = {TESTS[package]!r}\n".replace("'", '"')
            + 'also_copy = ["fsam/", "configs/", "hydra_plugins/", "train.py", "scripts/", "results/", "README.md", '
            '"docs/"]\n'
        )
        with open(copy / "pyproject.toml", "a") as pyproject:
            pyproject.write(config)
        env = {**os.environ, "PYTHONPATH": ".", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        run = subprocess.run(["mutmut", "run", "--max-children", str(workers)], cwd=copy, env=env,
                             capture_output=True, text=True)
        found = SUMMARY.findall(run.stdout)
        if run.returncode != 0 or not found:
            sys.stderr.write(run.stdout[-3000:] + run.stderr[-3000:])
            raise SystemExit(f"error: mutmut failed on {package} (exit {run.returncode}); its output is above")
        done, total, killed, no_tests, timeout, suspicious, survived, skipped = map(int, found[-1])
        counts = {"mutants": total, "killed": killed, "timeout": timeout, "survived": survived,
                  "no_tests": no_tests, "suspicious": suspicious, "skipped": skipped}
        if show_survivors:
            names = subprocess.run(["mutmut", "results"], cwd=copy, env=env, capture_output=True, text=True).stdout
            for line in names.splitlines():
                name = line.split(":")[0].strip()
                if name and line.strip().endswith(("survived", "no tests")):
                    shown = subprocess.run(["mutmut", "show", name], cwd=copy, env=env, capture_output=True,
                                           text=True).stdout
                    print(f"--- {line.strip()}\n{shown}")
        return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+", choices=sorted(TESTS), help="packages to mutate")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    parser.add_argument("--survivors", action="store_true", help="print the diff of every surviving mutant")
    args = parser.parse_args()
    print("| package | mutants | killed (incl. time-outs) | survived | not covered by its tests | score |")
    print("|---|---|---|---|---|---|")
    for package in args.packages:
        c = mutate(package, args.workers, args.survivors)
        caught = c["killed"] + c["timeout"]
        tested = caught + c["survived"] + c["no_tests"] + c["suspicious"]
        score = 100.0 * caught / max(tested, 1)
        print(f"| `{package}` | {c['mutants']} | {caught} | {c['survived']} | {c['no_tests']} | {score:.1f} % |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
