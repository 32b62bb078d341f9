"""The whole-step benchmark runs end to end as a real command and reports every ratio it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_train.py"
RATIOS = ("SAM/SGD", "F-SAM/SAM", "device data / DataLoader", "baseline / ours (F-SAM step)")


def test_bench_train_prints_every_ratio_and_appends_its_section_to_the_record(tmp_path):
    record = tmp_path / "benchmarks.md"
    command = [
        sys.executable, str(SCRIPT), "--model", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1",
        "--rounds", "1", "--data-images", "64", "--workers", "0", "--record", str(record),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    for ratio in RATIOS:
        assert f"| {ratio} |" in result.stdout, f"{ratio} missing from:\n{result.stdout}"
    for method in ("sgd", "sam", "fsam", "baseline fsam"):
        assert f"| {method} |" in result.stdout
    assert "FLOPs per image" in result.stdout
    text = record.read_text()
    assert text.startswith("# Benchmarks") and "Not measured on a GPU yet" in text
    assert "--record" in text and "| F-SAM/SAM |" in text


def test_bench_train_measures_the_imagenet_loader_on_generated_jpegs(tmp_path):
    record = tmp_path / "benchmarks.md"
    command = [
        sys.executable, str(SCRIPT), "--data", "imagenet", "--data-images", "8", "--jpeg-size", "64",
        "--image-size", "32", "--batch-size", "4", "--rounds", "1", "--workers", "0", "--record", str(record),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "| FolderLoader, 0 workers |" in result.stdout and "8 generated JPEGs of 64 x 64 px" in result.stdout
    assert "--data imagenet" in record.read_text()
