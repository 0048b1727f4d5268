"""The speed benchmarks still run, and their naive reference still agrees with the generated layer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_moe_layer_benchmark_quick_runs_and_naive_matches():
    # moe_layer.py checks the naive loop's output and gradients against the generated module for
    # every (config, T) and exits 1 on a mismatch
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--quick", "--no-mem", "--tokens", "32",
         "--configs", "mixtral,deepseek,moma", "--budget", "0.01"],
        check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout.split("results (ms", 1)[1].split("details:", 1)[0]
    for name in ("mixtral", "deepseek", "moma"):  # `~` marks a row timed while other load ran
        assert re.search(rf"\n{name}~? ", table), table
