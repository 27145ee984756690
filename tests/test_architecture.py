"""The layout of docs/architecture.md holds: each stage imports only the stages below it, files stay small, and the
package keeps few entries at its top."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "perceiver_ar_jax"
# bottom to top: a stage may import itself and the stages before it in this list
STAGES = ("errors", "backend", "model", "tokenizer", "checkpoints", "convert", "data", "sampling", "training",
          "evaluation", "demo")


def stage_of(module: str) -> str | None:
    """`perceiver_ar_jax.model.attention.dense` -> "model"; None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every perceiver_ar_jax module imported anywhere in the file (lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("perceiver_ar_jax"):
            if node.module == "perceiver_ar_jax":  # from perceiver_ar_jax import backend, training, ...
                found += [(node.lineno, f"perceiver_ar_jax.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("perceiver_ar_jax.")]
    return found


def source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_top_level_entry_is_a_known_stage():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert len(entries) <= 12, entries
    assert {Path(e).stem for e in entries} - {"__init__"} <= set(STAGES)


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_point_down(path):
    own = stage_of(".".join(path.relative_to(REPO).with_suffix("").parts))
    if own is None or own == "__init__":
        return
    for line, module in imports_of(path):
        target = stage_of(module)
        assert target in STAGES, f"{path}:{line} imports {module}, which is in no stage"
        assert STAGES.index(target) <= STAGES.index(own), \
            f"{path}:{line}: stage {own!r} imports {module} of stage {target!r}, which sits above it"


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in source_files() if (n := len(p.read_text().splitlines())) > 400}
    assert not long
