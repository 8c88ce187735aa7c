"""The hand-written .pyi stubs must match the compiled modules."""

import pathlib
import subprocess
import sys

import pytest

from conftest import child_env

pytest.importorskip("mypy")

PACKAGE = pathlib.Path(__import__("pagetable").__file__).parent
MODULES = sorted(f"pagetable.{p.stem}" for p in PACKAGE.glob("_*.pyi"))


def test_there_are_stubs():
    assert "pagetable._table" in MODULES
    assert (PACKAGE / "py.typed").exists()


@pytest.mark.parametrize("module", MODULES)
def test_stubtest(module, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", module, "--ignore-missing-stub"],
        capture_output=True, text=True, timeout=600,
        cwd=tmp_path, env=child_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
