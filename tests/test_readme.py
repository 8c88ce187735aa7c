"""The README's Python examples run, and its stated results hold."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    if not README.exists():
        return []
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.skipif(not README.exists(), reason="README.md not shipped with this install")
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)        # examples that save files write them here
    namespace = {}
    exec(compile(python_blocks()[index], f"README.md[python block {index}]", "exec"), namespace)


def test_batched_example_values():
    from pagetable import PageTable

    pt = PageTable(16)
    pt.append_blocks(seq_ids=[7, 7, 9], block_ids=[3, 8, 5])
    assert pt.slot_mapping([7, 7, 9], [0, 17, 40]).tolist() == [48, 129, -1]
    blocks, offsets = pt.lookup([7, 9], [17, 3])
    assert blocks.tolist() == [8, 5] and offsets.tolist() == [1, 3]
    table, num_blocks = pt.block_table([7, 9])
    assert table.tolist() == [[3, 8], [5, -1]] and num_blocks.tolist() == [2, 1]
    indptr, indices = pt.to_csr([7, 9])
    assert indptr.tolist() == [0, 2, 3] and indices.tolist() == [3, 8, 5]
    np.testing.assert_array_equal(pt.get_sequence_blocks(7), [3, 8])
