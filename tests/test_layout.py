"""The package's layout keeps its promise: dependencies point one way, from the paper's model and the examples to
the plug-ins, never back."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_lnsgd"
PLUG_INS = ("callbacks", "strategies", "metrics", "nn", "compat.py", "protocol.py", "rng.py", "checks.py", "stats.py")


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the ``lightning_lnsgd`` modules that ``path`` imports (relative imports resolved)."""
    here = ["lightning_lnsgd", *path.relative_to(PACKAGE).with_suffix("").parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
                names.update(f"{module}.{a.name}" for a in node.names)
                names.add(module)
            elif node.module:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("lightning_lnsgd")}


def test_the_plug_ins_import_neither_the_paper_model_nor_the_examples():
    offenders = []
    for entry in PLUG_INS:
        for path in [PACKAGE / entry] if entry.endswith(".py") else sorted((PACKAGE / entry).rglob("*.py")):
            for name in _imported_modules(path):
                if name.startswith(("lightning_lnsgd.twolayer", "lightning_lnsgd.examples")):
                    offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, offenders


def test_the_resolver_sees_relative_imports():
    # The check above would pass vacuously if relative imports were not resolved.
    imported = _imported_modules(PACKAGE / "twolayer" / "model.py")
    assert "lightning_lnsgd.protocol" in imported and "lightning_lnsgd.compat" in imported
