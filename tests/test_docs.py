"""The user docs stay true: their Python examples run, and the API reference names every public name."""

import inspect
import pathlib
import re

import pytest

import pagetable

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
RUN = ["guide.md", "PREFIX_CACHING.md"]   # docs whose ```python blocks are complete programs


def python_blocks(name):
    path = DOCS / name
    if not path.exists():
        return []
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


CASES = [(name, i) for name in RUN for i in range(len(python_blocks(name)))]


@pytest.mark.skipif(not CASES, reason="docs/ not shipped with this install")
@pytest.mark.parametrize("name, index", CASES, ids=[f"{n}[{i}]" for n, i in CASES])
def test_doc_example_runs(name, index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = python_blocks(name)[index]
    exec(compile(code, f"docs/{name}[python block {index}]", "exec"), {})


def public_members():
    for name in pagetable.__all__:
        yield name
        obj = getattr(pagetable, name)
        if inspect.isclass(obj) and obj.__module__.startswith("pagetable"):
            for member in vars(obj):
                if not member.startswith("_"):
                    yield f"{name}.{member}"


@pytest.mark.skipif(not (DOCS / "API.md").exists(), reason="docs/ not shipped with this install")
def test_api_reference_is_complete():
    text = (DOCS / "API.md").read_text()
    # Named in backticks (alone or as Class.name), or opening a signature line.
    missing = [m for m in public_members()
               if not re.search(rf"(`|^|\.){re.escape(m.split('.')[-1])}\b", text, flags=re.M)]
    assert not missing, f"docs/API.md does not describe {missing}"
    for name in pagetable.__all__:
        if inspect.isclass(getattr(pagetable, name)):
            assert f"\n## {name}\n" in text, f"docs/API.md has no section for {name}"
