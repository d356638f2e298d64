"""tools/gpu_check.py: on a machine without a GPU it says so and exits 0; its measurements run on the CPU."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_without_a_gpu_it_says_so_and_exits_0():
    result = subprocess.run([sys.executable, "-m", "tools.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gpu-check: no CUDA GPU here" in result.stdout and "nothing to check" in result.stdout


@pytest.mark.slow
def test_its_measurements_run_on_the_cpu_with_tiny_models():
    result = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--cpu", "--tiny", "--texts", "256",
                             "--images", "64", "--steps", "2", "--batch-size", "32"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("exercise_")]
    assert [line.split()[0] for line in lines] == ["exercise_1", "exercise_2", "exercise_3"]
    for line in lines:
        assert "precision no" in line and "model waited on input:" in line and "peak GPU memory" in line
