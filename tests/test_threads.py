"""The thread setting: set_num_threads / get_num_threads, PAGETABLE_NUM_THREADS, results."""

import os
import subprocess
import sys

import numpy as np
import pytest

import pagetable
from pagetable.cli.workloads import TableWorkload, token_batch

from conftest import child_env


@pytest.fixture
def restore_threads():
    before = pagetable.get_num_threads()
    yield
    pagetable.set_num_threads(before)


def test_default_is_a_positive_count_within_the_cpus():
    assert 1 <= pagetable.get_num_threads() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("bad", [1.0, "2", None, True, False, [2]])
def test_set_num_threads_refuses_non_integers(bad, restore_threads):
    before = pagetable.get_num_threads()
    with pytest.raises(TypeError, match="n must be a positive integer"):
        pagetable.set_num_threads(bad)
    assert pagetable.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, -(2**70)])
def test_set_num_threads_refuses_non_positive(bad, restore_threads):
    before = pagetable.get_num_threads()
    with pytest.raises(ValueError, match="n must be a positive integer"):
        pagetable.set_num_threads(bad)
    assert pagetable.get_num_threads() == before


def test_set_num_threads_caps_at_the_cpus(restore_threads):
    pagetable.set_num_threads(1)
    assert pagetable.get_num_threads() == 1
    pagetable.set_num_threads(np.int64(10**6))
    assert 1 <= pagetable.get_num_threads() <= len(os.sched_getaffinity(0))


def _threads_in_subprocess(value, tmp_path):
    env = child_env()
    env.pop("OMP_NUM_THREADS", None)
    env["PAGETABLE_NUM_THREADS"] = value
    code = "import warnings, pagetable; print(pagetable.get_num_threads())"
    # Outside the source tree: an uncompiled checkout there would shadow the build.
    result = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, cwd=tmp_path,
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip()), result.stderr


def test_environment_variable_sets_the_count(tmp_path):
    assert _threads_in_subprocess("1", tmp_path) == (1, "")
    count, _ = _threads_in_subprocess(" 1000 ", tmp_path)
    assert 1 <= count <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("bad", ["zero", "0", "-3", "1.5"])
def test_bad_environment_variable_warns_and_keeps_the_default(bad, tmp_path):
    count, stderr = _threads_in_subprocess(bad, tmp_path)
    assert "PAGETABLE_NUM_THREADS" in stderr and "RuntimeWarning" in stderr
    assert 1 <= count <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("block_size", [16, 24])
def test_results_do_not_depend_on_the_thread_count(interleaved, block_size, restore_threads):
    workload = TableWorkload.slot_mapping_table(block_size)
    table = workload.build_pagetable(pagetable.PageTable)
    batch = token_batch(workload, 1 << 18, interleaved=interleaved)
    positions = batch.positions.copy()
    positions[::1000] += 10**6          # some unmapped entries
    results = []
    for threads in [1, 2, 1, 2, 2, 2]:   # the default may run a call either way
        pagetable.set_num_threads(threads)
        results.append(table.slot_mapping(batch.seq_ids, positions))
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])
    assert (results[0][::1000] == pagetable.PAD_SLOT_ID).all()
