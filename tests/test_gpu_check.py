"""scripts/gpu_check.py runs on a CPU-only machine too: it collects the CUDA tests, finds them all
skipped, skips the device benchmark, says so in its report and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run scripts/gpu_check.py itself")
def test_gpu_check_on_cpu_lists_its_skips(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = out.read_text()
    assert "no CUDA device" in report
    tests_line = next(line for line in report.splitlines() if line.startswith("`pytest -m cuda`"))
    skipped = int(tests_line.split(" skipped")[0].rsplit(" ", 1)[1])
    assert " 0 passed, 0 failed" in tests_line and skipped >= 50, tests_line  # every CUDA case collected
    assert "skipped: the CUDA tests (no device: all skipped), the CUDA step benchmark" in report
