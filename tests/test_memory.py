"""Resident memory per mapped block, measured in a fresh process (Linux only)."""

import json
import subprocess
import sys

import pytest

from conftest import child_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


@pytest.mark.parametrize("mode", ["per-sequence", "round-robin"])
def test_under_ten_bytes_per_block(mode, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pagetable._memory", "--mode", mode],
        capture_output=True, text=True, check=True, timeout=300,
        cwd=tmp_path, env=child_env(),
    )
    figures = json.loads(result.stdout)
    assert figures["total_blocks"] > 400_000
    # Peak resident growth while building, transients included.
    assert figures["peak_bytes_per_block"] < 10.0, figures


def test_dict_of_lists_baseline_is_far_heavier(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pagetable._memory", "--mode", "dict"],
        capture_output=True, text=True, check=True, timeout=300,
        cwd=tmp_path, env=child_env(),
    )
    assert json.loads(result.stdout)["bytes_per_block"] > 30.0
