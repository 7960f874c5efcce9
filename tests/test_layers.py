"""The layers of the house (ARCHITECTURE.md): ``ops <- distributed <- optim <- hf``, no back edges.

Checked on the source: every ``import`` / ``from ... import`` of every module, including imports
inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import optimzoo

ROOT = Path(optimzoo.__file__).parent

#: what each layer may import from the package (besides itself); a name with ``.py`` is a module
ALLOWED = {
    "ops": set(),
    "distributed": {"ops"},
    "optim": {"ops", "distributed", "param_groups", "registry"},
    "quant.py": set(),  # fake quantization: torch alone, usable by any layer above
}


def _package_imports(path: Path) -> set[str]:
    """Top-level subpackages/modules of optimzoo that ``path`` imports."""
    module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module or not node.level else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "optimzoo" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_no_back_edges_between_layers():
    bad = []
    for layer, allowed in ALLOWED.items():
        paths = [ROOT / layer] if layer.endswith(".py") else sorted((ROOT / layer).glob("*.py"))
        for path in paths:
            extra = _package_imports(path) - allowed - {layer.removesuffix(".py")}
            if extra:
                bad.append(f"{path.relative_to(ROOT)} imports optimzoo.{', optimzoo.'.join(sorted(extra))}")
    assert not bad, "layer back edges:\n" + "\n".join(bad)


def test_core_needs_torch_alone():
    """Only hf/ imports transformers, datasets or wandb."""
    heavy = {"transformers", "datasets", "wandb", "accelerate"}
    bad = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).parts[0] == "hf":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path.relative_to(ROOT)}: {m}" for m in mods if m.split(".")[0] in heavy]
    assert not bad, bad
