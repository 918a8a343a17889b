"""The package's layering (pyproject ``[tool.importlinter]``, README "Architecture") holds: lint-imports passes."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (dev extra)")
def test_no_module_imports_from_a_layer_above_it():
    proc = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"import-linter found layering violations:\n{proc.stdout}\n{proc.stderr}"
    assert "0 broken" in proc.stdout and "Layers:" in proc.stdout
