"""The import layers declared in pyproject.toml ([tool.importlinter]), checked by import-linter: a module imports
only the layers below its own, imports inside functions included (grimp reads every import statement)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = {
    "layers": "",
    # The models rewrite (jisu/models/) is checked here too: a violation from a file there is that rewrite's to fix.
    "models": " (a violation in jisu/models/ belongs to the models rewrite)",
    "loader": "",
    "quant": "",
}


def _lint(contract: str) -> subprocess.CompletedProcess:
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", script, "--contract", contract, "--no-cache", "--no-logo"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_every_contract_is_checked():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert sorted(c["id"] for c in declared) == sorted(CONTRACTS)


@pytest.mark.parametrize("contract", CONTRACTS)
def test_import_contract_is_kept(contract):
    pytest.importorskip("importlinter", reason="import-linter is a test dependency: pip install -e '.[test]'")
    result = _lint(contract)
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"contract {contract!r} is broken{CONTRACTS[contract]}:\n{report}"
    assert "BROKEN" not in report and "KEPT" in report
