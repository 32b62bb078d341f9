"""Tables and plots from real run folders: runs trained by the engine, then read by fsam.report and scripts/."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fsam.engine import run
from fsam.report import load_metrics, load_runs, paper_table, reference_table, summarise

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, cifar_root):
    """Two methods x two seeds, finished; SGD at another learning rate, one seed; one unfinished run (config and
    metrics, no summary)."""
    from conftest import TINY_MODEL

    root = tmp_path_factory.mktemp("runs")
    for folder, method, lr, seeds in (("sgd", "sgd", 0.05, (1, 2)), ("fsam", "fsam", 0.05, (1, 2)),
                                      ("sgd_lr0.1", "sgd", 0.1, (1,))):
        for seed in seeds:
            run({
                "run_dir": str(root / folder / f"seed{seed}"),
                "dataset": {"name": "cifar10", "root": str(cifar_root), "download": False, "num_workers": 0},
                "model": TINY_MODEL,
                "optimizer": {"name": method, "lr": lr},
                "trainer": {"epochs": 2, "batch_size": 16, "device": "cpu", "amp": "off", "seed": seed},
            })
    unfinished = root / "sam" / "seed1"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text((root / "fsam" / "seed1" / "config.yaml").read_text().replace("fsam", "sam"))
    first_epoch = (root / "fsam" / "seed1" / "metrics.jsonl").read_text().splitlines()[0]
    (unfinished / "metrics.jsonl").write_text(first_epoch + '\n{"epoch": 2, "train_lo')  # killed mid-line
    return root


def summaries(root: Path) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for path in root.rglob("summary.json"):
        record = json.loads(path.read_text())
        found.setdefault(record["setting"], []).append(record["best_top1"])
    return found


def test_runs_are_read_with_their_settings_and_status(runs_root):
    runs = load_runs(runs_root)
    assert len(runs) == 6
    assert sorted(runs["status"]) == ["finished"] * 5 + ["unfinished"]
    finished = runs[runs["status"] == "finished"]
    assert sorted(zip(finished["optimizer"], finished["seed"])) == [
        ("fsam", 1), ("fsam", 2), ("sgd", 1), ("sgd", 1), ("sgd", 2)
    ]
    # the network as built, with its size: a depth-8 PyramidNet is not PyramidNet-110
    assert set(finished["dataset"]) == {"cifar10"} and set(finished["model"]) == {"pyramidnet8"}
    assert finished["model_parameters"].nunique() == 1
    assert 1_000 < finished["model_parameters"].iloc[0] < 100_000


def test_seeds_are_aggregated_into_mean_std_and_count(runs_root):
    table = summarise(load_runs(runs_root), "best_top1")
    # one row per setting: the two SGD learning rates are never averaged as if they were seeds
    assert sorted(zip(table["optimizer"], table["lr"])) == [("fsam", 0.05), ("sgd", 0.05), ("sgd", 0.1)]
    for setting, values in summaries(runs_root).items():
        row = table[table["setting"] == setting].iloc[0]
        mean = sum(values) / len(values)
        assert row["seeds"] == len(values) and row["mean"] == pytest.approx(mean)
        if len(values) == 2:
            assert row["std"] == pytest.approx((sum((v - mean) ** 2 for v in values) / 1) ** 0.5)
        else:
            assert math.isnan(row["std"])  # one seed has no spread
    wide = paper_table(table)
    assert list(wide.columns) == ["sgd", "fsam"]  # the paper's method order
    assert wide.loc[("cifar10", "pyramidnet8"), "fsam"].endswith("(2)")


def test_a_metrics_line_cut_by_a_kill_is_skipped(runs_root):
    metrics = load_metrics(runs_root / "sam" / "seed1")
    assert list(metrics["epoch"]) == [1]


def test_the_reference_table_keeps_sources_and_marks_unavailable_cells():
    reference = reference_table(REPO / "results" / "known-results.csv")
    assert (reference["source"] != "").all()
    unavailable = reference[reference["value"] == "not available"]
    assert len(unavailable) == 18 and (unavailable["note"].str.contains("never filled by hand")).all()


def test_make_tables_writes_the_table_and_refuses_a_missing_folder(runs_root, tmp_path):
    out = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tables.py"), str(runs_root), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "## Paper layout" in text and "'finished': 5" in text and "'unfinished': 1" in text
    missing = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tables.py"), str(tmp_path / "nowhere"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: no run folder")
    assert out.read_text() == text  # the good table is untouched


def test_plot_writes_a_png_of_the_curves(runs_root, tmp_path):
    out = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot.py"), str(runs_root / "sgd" / "seed1"),
         str(runs_root / "fsam" / "seed1"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
