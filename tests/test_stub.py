"""The hand-written .pyi stubs must match the installed package, every module of it."""

import pathlib
import subprocess
import sys

import pytest

from conftest import child_env

pytest.importorskip("mypy")

PACKAGE = pathlib.Path(__import__("pagetable").__file__).parent
ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPILED = sorted(p.name.split(".")[0] for p in PACKAGE.glob("_*.so"))


def test_every_compiled_module_has_a_stub():
    assert "_table" in COMPILED and "_manager" in COMPILED
    assert (PACKAGE / "py.typed").exists()
    missing = [name for name in COMPILED if not (PACKAGE / f"{name}.pyi").exists()]
    assert not missing, f"compiled modules without a .pyi stub: {missing}"


def test_stubtest_over_the_whole_package(tmp_path):
    # The project's mypy settings ignore the optional imports (cupy, matplotlib, torch).
    # tools/stubtest-allowlist.txt names the few reports that are typeshed's, with why.
    config = ROOT / "pyproject.toml"
    allowlist = ROOT / "tools" / "stubtest-allowlist.txt"
    command = [sys.executable, "-m", "mypy.stubtest", "pagetable"]
    if config.exists():
        command += ["--mypy-config-file", str(config)]
    if allowlist.exists():
        command += ["--allowlist", str(allowlist)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            cwd=tmp_path, env=child_env())
    assert result.returncode == 0, result.stdout + result.stderr
