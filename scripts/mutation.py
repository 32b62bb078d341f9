"""Mutation testing of one or more packages with mutmut: how many planted bugs the fast tests catch.

    python scripts/mutation.py fsam/optim                 # about 10 minutes on 2 cores
    python scripts/mutation.py fsam/data fsam/report      # each package with its own tests, one after the other
    python scripts/mutation.py fsam/data --recheck        # after adding tests: test the survivors again
    python scripts/mutation.py fsam/engine --only "fsam.engine.schedule.*"   # the mutants of some functions only

Each package is tested in its own work folder (``.mutation/<package>/``, ignored by git) holding a copy of the
committed tree (``git archive`` of HEAD), so uncommitted edits and the editable install never mix into the result.
mutmut changes one operator, constant or call at a time and runs the tests that cover the changed function; a
mutant is killed when one of them fails (or runs out of time). The folder keeps mutmut's verdicts: a later run
re-tests only the functions whose code changed, and ``--recheck`` re-tests every surviving mutant against the
current tests (mutmut keeps a verdict otherwise). The diff of every survivor is written to
``.mutation/<package>/survivors.diff``. Not part of CI: it takes minutes to hours per package.

Needs ``pip install mutmut`` (3.x). Two settings matter for torch code: the tests import the mutated copy
(``PYTHONPATH=.``, ahead of the editable install), and torch runs single-threaded (``OMP_NUM_THREADS=1``),
because mutmut forks its workers from a process that has imported torch and a forked OpenMP pool hangs.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The fast, in-process tests that exercise each package (tests that start train.py in a subprocess are left out:
# mutmut cannot see which functions they cover, and they would run for every mutant).
TESTS = {
    "fsam/optim": ["tests/test_optim.py", "tests/test_optim_contract.py", "tests/test_pinned_behaviour.py",
                   "tests/test_hot_path.py", "tests/test_perturbation_analysis.py"],
    # The Optuna search tests train several runs each (17 s of the 35 s that cover nearly every data function).
    "fsam/data": ["tests/test_data.py", "tests/test_data_contract.py", "tests/test_validation.py", "-k", "not optuna"],
    "fsam/report": ["tests/test_report.py", "tests/test_report_contract.py"],
    # The engine's own contract file only: its runs train a linear model in hundredths of a second and restate
    # what test_engine.py and test_pinned_behaviour.py check (each of those trains a PyramidNet or a timm ResNet,
    # 1-10 s a test, which every surviving mutant would pay). test_preemption.py is left out: its kill tests start
    # train.py in subprocesses, and its in-process signal and refusal tests are restated in the contract file.
    "fsam/engine": ["tests/test_engine_contract.py"],
}

# Run inside the work folder with mutmut's own reader of its verdict files: the verdict of every mutant, and the
# diff of each one no test caught.
VERDICTS = """
import json, sys
from mutmut.__main__ import SourceFileMutationData, walk_mutatable_files, get_diff_for_mutant
from mutmut.configuration import config
from mutmut.stats import status_by_exit_code
config()
verdicts, diffs = {}, []
for path in walk_mutatable_files():
    data = SourceFileMutationData(path=path)
    data.load()
    for name, code in data.exit_code_by_key.items():
        verdicts[name] = status = status_by_exit_code[code]
        if status in ("survived", "no tests"):
            diffs.append(f"# {name}: {status}\\n" + get_diff_for_mutant(name, path=path))
open("survivors.diff", "w").write("\\n\\n".join(diffs) + "\\n")
json.dump(verdicts, sys.stdout)
"""


def prepare(package: str, folder: Path) -> None:
    """Put HEAD's tree into ``folder``, keeping mutmut's earlier verdicts in ``folder/mutants``."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("fsam", "tests", "configs", "scripts"):  # files deleted since the last run must go too
        shutil.rmtree(folder / stale, ignore_errors=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-m", "-C", str(folder)], input=archive, check=True)  # -m: mtime now, so mutmut
    config = (                                                                          # regenerates the mutants
        "\n[tool.mutmut]\n"
        f"source_paths = [\"{package}/\"]\n"
        f"pytest_add_cli_args_test_selection = {TESTS[package]!r}\n".replace("'", '"')
        + 'also_copy = ["fsam/", "configs/", "hydra_plugins/", "train.py", "scripts/", "results/", "README.md", '
        '"docs/"]\n'
        "use_git_change_detection = false\n"
    )
    with open(folder / "pyproject.toml", "a") as pyproject:
        pyproject.write(config)


def mutmut(folder: Path, workers: int, names: list[str] = ()) -> None:
    env = {**os.environ, "PYTHONPATH": ".", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run(["mutmut", "run", "--max-children", str(workers), *names], cwd=folder, env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        sys.stderr.write(run.stdout[-3000:] + run.stderr[-3000:])
        raise SystemExit(f"error: mutmut failed in {folder} (exit {run.returncode}); its output is above")


def verdicts(folder: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": "."}
    run = subprocess.run([sys.executable, "-c", VERDICTS], cwd=folder, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(run.stdout)


def mutate(package: str, workers: int, recheck: bool, root: Path, only: list[str]) -> dict[str, int]:
    """Run mutmut over ``package`` in its work folder (the mutants matching ``only``, when given); return the
    counts of every mutant's verdict (``not checked`` for those not run yet)."""
    folder = root / package.replace("/", "_")
    prepare(package, folder)
    if not (recheck and only):  # --recheck --only GLOB: the survivors among GLOB only, not every mutant of GLOB
        mutmut(folder, workers, only)
    if recheck:
        survivors = [name for name, status in verdicts(folder).items() if status in ("survived", "no tests")
                     and (not only or any(fnmatch.fnmatch(name, pattern) for pattern in only))]
        if survivors:
            mutmut(folder, workers, survivors)
    return collections.Counter(verdicts(folder).values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+", choices=sorted(TESTS), help="packages to mutate")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    parser.add_argument("--recheck", action="store_true",
                        help="test every surviving mutant again against the current tests (with --only: only the "
                             "survivors among those mutants, skipping the ones already killed)")
    parser.add_argument("--only", nargs="+", default=[], metavar="GLOB",
                        help="mutant names to run, e.g. 'fsam.engine.schedule.*' (mutmut's names: module.x_function)")
    parser.add_argument("--folder", type=Path, default=REPO / ".mutation", help="where the work folders live")
    args = parser.parse_args()
    if shutil.which("mutmut") is None:
        raise SystemExit("error: mutmut is not installed; run `pip install mutmut` (3.x) first")
    print("| package | mutants | killed (incl. time-outs) | survived | not covered by its tests | score |")
    print("|---|---|---|---|---|---|")
    for package in args.packages:
        c = mutate(package, args.workers, args.recheck, args.folder, args.only)
        caught = c.get("killed", 0) + c.get("timeout", 0)
        tested = caught + c.get("survived", 0) + c.get("no tests", 0) + c.get("suspicious", 0)
        score = 100.0 * caught / max(tested, 1)
        print(f"| `{package}` | {sum(c.values())} | {caught} | {c.get('survived', 0)} | {c.get('no tests', 0)} | "
              f"{score:.1f} % |", flush=True)
        if c.get("not checked"):
            print(f"  not run yet: {c['not checked']} mutants", flush=True)
        print(f"  survivors' diffs: {args.folder / package.replace('/', '_') / 'survivors.diff'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
