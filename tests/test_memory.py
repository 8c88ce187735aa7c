"""Resident memory per mapped block, measured in a fresh process (Linux only).

The workload and the measurement are those of ``pagetable bench`` and the asv suites
(``pagetable.cli.workloads.lognormal_lengths``, ``pagetable.cli._memory``).
"""

import sys

import pytest

from conftest import child_env

from pagetable.cli import _memory, workloads

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


@pytest.fixture(autouse=True)
def _child_imports_this_build(monkeypatch, tmp_path):
    # The measuring child runs outside the source tree and must import this build.
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("build", ["grow", "prefill"])
def test_under_ten_bytes_per_block(build):
    figures = _memory.measure_memory("pagetable", build)
    assert figures["blocks"] == int(workloads.lognormal_lengths().sum()) > 400_000
    # Peak resident growth while building, transients included.
    assert figures["peak_rss_per_block"] < 10.0, figures


def test_dict_of_lists_baseline_is_far_heavier():
    assert _memory.measure_memory("dict_of_lists", "bulk")["rss_per_block"] > 30.0
