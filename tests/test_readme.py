"""The README's claims that code can check: the optimizer table, the CI command, the set-up commands."""

import re
from pathlib import Path

import optimzoo

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_optimizer_table_is_the_registry():
    m = re.search(r"<!-- optimizer-table[^\n]*-->\n(.*?)<!-- end optimizer-table -->", README, re.S)
    assert m, "README has no optimizer-table markers"
    assert m.group(1).strip() == optimzoo.list_optimizers().markdown().strip(), (
        "README optimizer table is stale: regenerate with optimzoo.list_optimizers().markdown()")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci
    cmd = README.split("<!-- test-command -->", 1)[1].split("```")[1].splitlines()[1]
    assert "pip install torch==2.13.0" in cmd and "pytest" in cmd


def test_main_command_runs_the_sweep():
    cmd = README.split("<!-- main-command -->", 1)[1].split("```")[1].splitlines()[1]
    assert cmd.startswith("python3 -m venv .venv") and "scripts/sweep.py" in cmd
    assert (ROOT / "scripts" / "sweep.py").exists()


def test_every_command_runs_from_the_venv_as_written():
    """After the set-up command, a bare ``python``/``torchrun``/``pip`` is not the venv's (``No module named
    'torch'``): every command names ``.venv/bin/...`` (the set-up line itself starts with ``python3 -m venv``)."""
    bare = re.compile(r"(?<![\w./-])(python3?|torchrun|pip3?|pytest)\s+(-m\s+\w+|-\S+|\S+\.py|install\b)")
    found = [m.group(0) for m in bare.finditer(README) if not m.group(0).startswith("python3 -m venv")]
    assert not found, f"commands that need the venv's programs (.venv/bin/...): {found}"
    assert ".venv/bin/torchrun" in README and ".venv/bin/python recipes/pretrain_llama.py" in README
