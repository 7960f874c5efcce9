#!/usr/bin/env python
"""One command for a machine with a GPU: the CUDA checks nobody could run on the CPU-only machines,
in one markdown report.

    .venv/bin/python scripts/gpu_check.py                 # writes gpu_check.md (about 5-10 minutes)
    .venv/bin/python scripts/gpu_check.py --out report.md --skip-bench

Set up with the README's commands (on a GPU machine: install the torch build you want first, then
``pip install -e ".[dev]"``); this script installs nothing. It runs, each in a subprocess with a time
limit:

1. the CUDA tests (``pytest -m cuda``): every registered optimizer on CUDA against the CPU on every
   path (default, foreach, single-tensor, fused), bf16 parameters, ``torch.compile(opt.step)`` on CUDA
   (tests/test_cuda.py, tests/test_compile.py, tests/test_lion.py);
2. the step benchmark on the device (``scripts/bench_step.py --device cuda``: CUDA-event timing,
   ``torch.cuda.max_memory_allocated``, against torch's fused AdamW and ``torch.optim.Muon``).

Without a CUDA device it still runs (the tests are collected and skipped) and the report says which
parts were skipped. Exit status: 1 if a test or the benchmark failed, else 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def environment() -> list[str]:
    lines = [f"- python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
             f"{os.cpu_count()} CPU cores"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"- cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability "
                         f"{p.major}.{p.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
        lines.append(f"- CUDA {torch.version.cuda}")
    else:
        lines.append("- no CUDA device: the CUDA parts below are skipped")
    return lines


def run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    """(exit status, combined output, seconds) of ``cmd`` run from the repository root; 124 on timeout."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n(timed out after {timeout:.0f} s)", time.perf_counter() - start


def cuda_tests(timeout: float, report_dir: Path) -> tuple[bool, list[str]]:
    """Run ``pytest -m cuda``; (ok, report lines)."""
    junit = report_dir / "gpu_check_junit.xml"
    code, out, seconds = run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                              f"--junitxml={junit}"], timeout)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skip_reasons = [], {}
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            failed = next((n for n in (case.find("failure"), case.find("error")) if n is not None), None)
            skipped = case.find("skipped")
            if failed is not None:
                counts["failed"] += 1
                message = (failed.get("message") or "").splitlines()
                failures.append(f"  - `{name}`: {message[0][:200] if message else ''}")
            elif skipped is not None:
                counts["skipped"] += 1
                reason = skipped.get("message", "")
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
            else:
                counts["passed"] += 1
    ok = code in (0, 5) and counts["failed"] == 0  # 5: nothing collected
    lines = [f"`pytest -m cuda`: exit {code}, {seconds:.0f} s: {counts['passed']} passed, {counts['failed']} failed, "
             f"{counts['skipped']} skipped"]
    lines += failures
    lines += [f"  - skipped ({n}): {reason}" for reason, n in skip_reasons.items()]
    if not junit.is_file():
        lines.append("```\n" + out[-3000:] + "\n```")
    return ok, lines


def cuda_bench(timeout: float, report_dir: Path, extra: list[str]) -> tuple[bool, list[str]]:
    """Run ``bench_step.py --device cuda``; (ok, report lines)."""
    if not torch.cuda.is_available():
        return True, ["skipped: no CUDA device (`scripts/bench_step.py --device cuda` needs one)"]
    md = report_dir / "gpu_check_bench.md"
    code, out, seconds = run([sys.executable, str(ROOT / "scripts" / "bench_step.py"), "--device", "cuda",
                              "--markdown", str(md), "--json", str(report_dir / "gpu_check_bench.json"), *extra],
                             timeout)
    lines = [f"`scripts/bench_step.py --device cuda {' '.join(extra)}`: exit {code}, {seconds:.0f} s"]
    lines.append(md.read_text() if code == 0 and md.is_file() else "```\n" + out[-3000:] + "\n```")
    return code == 0, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.md", help="the markdown report (default gpu_check.md)")
    ap.add_argument("--skip-bench", action="store_true", help="only the tests")
    ap.add_argument("--bench-args", default="--reps 5",
                    help="extra arguments for bench_step.py (default: --reps 5)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed to each part (default 300)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sections = ["# optimzoo GPU check", "", f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, commit "
                + subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(), "", "## Machine", *environment(), ""]
    tests_ok, lines = cuda_tests(args.timeout, out.parent)
    sections += ["## CUDA tests", *lines, ""]
    bench_ok = True
    if args.skip_bench:
        sections += ["## CUDA step benchmark", "skipped (--skip-bench)", ""]
    else:
        bench_ok, lines = cuda_bench(args.timeout, out.parent, args.bench_args.split())
        sections += ["## CUDA step benchmark", *lines, ""]
    skipped = [part for part, skip in (("the CUDA tests (no device: all skipped)", not torch.cuda.is_available()),
                                       ("the CUDA step benchmark", args.skip_bench or not torch.cuda.is_available()))
               if skip]
    sections += ["## Summary", f"- tests: {'ok' if tests_ok else 'FAILED'}; benchmark: "
                 f"{'ok' if bench_ok else 'FAILED'}; {time.perf_counter() - start:.0f} s in all",
                 f"- skipped: {', '.join(skipped) if skipped else 'nothing'}"]
    out.write_text("\n".join(sections) + "\n")
    print("\n".join(sections))
    print(f"\nreport: {out}")
    return 0 if tests_ok and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
