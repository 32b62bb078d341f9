"""scripts/gpu_check.sh: without a GPU it says so at once, and its CPU dry run takes every part through to one
summary, so the script a GPU machine runs first is itself tested here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
PARTS = 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the script would run the whole check")
def test_without_a_gpu_the_check_says_so_and_exits_non_zero():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "no CUDA GPU" in result.stderr and "--cpu-dry-run" in result.stderr
    assert "pass" not in result.stdout  # nothing ran


@pytest.mark.slow
def test_the_cpu_dry_run_passes_every_part_and_ends_with_one_summary(tmp_path):
    result = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-dry-run"], capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "GPU_CHECK_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.split("gpu_check on CPU dry run")[1]
    assert summary.count("  pass  ") == PARTS and "FAIL" not in summary, summary
    assert (tmp_path / "run" / "summary.json").exists()
    recorded = (tmp_path / "benchmarks.md").read_text()
    assert "| F-SAM/SAM |" in recorded and "| FolderLoader, 0 workers |" in recorded
