"""What the source distribution and the wheel carry, and one version for both.

The sdist rules are checked without building anything: MANIFEST.in is applied, with
setuptools' own template reader, to a copy of the checkout's file names (empty files)
plus the build outputs an in-place build leaves and files of subpackages still to come.
Building a real sdist takes about 30 s (cythonize runs, and an isolated build fetches
its requirements); CI builds and installs one, and ``PAGETABLE_TEST_SDIST=1`` runs the
same checks here on a real ``python -m build --sdist``.
"""

import fnmatch
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

import pagetable

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "MANIFEST.in"
PYPROJECT = ROOT / "pyproject.toml"

# Not part of the checkout's sources: version control, virtualenvs, caches and the
# outputs of the builds themselves.
SKIP_TOP = {"build", "dist", "dist-ci"}

# Files an in-place build or a future layout puts in the tree: each must go where its
# suffix says, in the top package and in subpackages alike.
GENERATED = [
    "pagetable/_core.c",
    "pagetable/_core.html",
    "pagetable/_core.cpython-311-x86_64-linux-gnu.so",
    "pagetable/__pycache__/__init__.cpython-311.pyc",
    "pagetable/gpu/_device.c",
    "pagetable/gpu/_device.cpython-311-x86_64-linux-gnu.so",
    "pagetable/cli/__pycache__/simulate.cpython-311.pyc",
    "tests/__pycache__/conftest.cpython-311-pytest-8.0.pyc",
]
FUTURE_SOURCES = [
    "pagetable/gpu/__init__.py",
    "pagetable/gpu/_device.pyx",
    "pagetable/gpu/_device.pxd",
    "pagetable/gpu/_device.pyi",
    "pagetable/gpu/kernels/pagetable_kernels.cu",
    "pagetable/cli/__init__.py",
    "pagetable/cli/simulate.py",
    "pagetable/_table_kernels.pxi",
]


def checkout_files():
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = pathlib.Path(dirpath).relative_to(ROOT)
        if rel == pathlib.Path("."):
            dirnames[:] = [d for d in dirnames
                           if not d.startswith(".") and d not in SKIP_TOP
                           and not d.endswith(".egg-info")]
        files.extend((rel / name).as_posix() for name in filenames)
    return files


def manifest_files(tree, names):
    """The files MANIFEST.in selects from ``names``, laid out as empty files in ``tree``."""
    egg_info = pytest.importorskip("setuptools.command.egg_info")
    for name in names:
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    selected = egg_info.FileList()
    cwd = os.getcwd()
    os.chdir(tree)
    try:
        for line in MANIFEST.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                selected.process_template_line(line)
    finally:
        os.chdir(cwd)
    return {pathlib.PurePath(f).as_posix() for f in selected.files}


def check_sdist_contents(files, checkout):
    """Assert the sdist rules on the set of paths ``files`` (relative to its root)."""
    for name in ["README.md", "CHANGELOG.md", "LICENSE", "asv.conf.json", "tests/conftest.py"]:
        assert name in files, name
    wanted = [f for f in checkout
              if f.split("/")[0] in ("tests", "examples", "benchmarks", "docs", "tools")
              or (f.startswith("pagetable/")
                  and f.endswith((".py", ".pyx", ".pxd", ".pxi", ".pyi", ".cu", "py.typed")))]
    wanted = [f for f in wanted if "__pycache__" not in f and not f.endswith((".pyc", ".so"))]
    missing = sorted(set(wanted) - files)
    assert not missing, f"sdist lacks {missing}"
    for suffix in (".pyx", ".pxd", ".pyi", ".cu"):
        assert any(f.startswith("pagetable/") and f.endswith(suffix) for f in files), suffix
    assert any(f.startswith("tests/fuzz/corpus/") for f in files), "the fuzz seed corpus"
    assert any(f.startswith("benchmarks/c_models/") and f.endswith(".c") for f in files)
    built = sorted(f for f in files
                   if (f.startswith("pagetable/") and f.endswith((".c", ".cpp", ".html")))
                   or f.endswith((".so", ".pyd", ".pyc")))
    assert not built, f"sdist carries build outputs {built}"


@pytest.mark.skipif(not MANIFEST.exists(), reason="not a source checkout")
def test_manifest_rules(tmp_path):
    checkout = [f for f in checkout_files() if f not in GENERATED]
    names = checkout + GENERATED + FUTURE_SOURCES
    files = manifest_files(tmp_path, names)
    check_sdist_contents(files, checkout + FUTURE_SOURCES)
    for name in FUTURE_SOURCES:
        assert name in files, name
    for name in GENERATED:
        assert name not in files, name


def load_pyproject():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)


@pytest.mark.skipif(not PYPROJECT.exists(), reason="not a source checkout")
def test_wheel_excludes_build_intermediates():
    config = load_pyproject()["tool"]["setuptools"]
    patterns = config["exclude-package-data"]["*"]
    for name in ["_core.c", "_core.pyx", "_core.html", "_device.c"]:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
    for name in ["_core.pxd", "_core.pyi", "py.typed", "pagetable_kernels.cu", "__init__.py",
                 "_core.cpython-311-x86_64-linux-gnu.so"]:
        assert not any(fnmatch.fnmatch(name, p) for p in patterns), name


@pytest.mark.skipif(not PYPROJECT.exists(), reason="not a source checkout")
def test_license_and_single_version_source():
    project = load_pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "version" not in project and "version" in project["dynamic"]
    attr = load_pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "pagetable._version.__version__"


def test_version_matches_distribution_metadata():
    from pagetable import _version

    assert pagetable.__version__ == _version.__version__
    try:
        installed = importlib.metadata.version("pagetable")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pagetable's distribution metadata is not installed (in-place build)")
    assert pagetable.__version__ == installed


@pytest.mark.skipif(os.environ.get("PAGETABLE_TEST_SDIST", "0") in ("", "0"),
                    reason="builds a real sdist (about 30 s); set PAGETABLE_TEST_SDIST=1")
@pytest.mark.skipif(not MANIFEST.exists(), reason="not a source checkout")
def test_real_sdist(tmp_path):
    pytest.importorskip("build")
    # Built from a copy: building in place would leave a pagetable.egg-info in the
    # checkout, whose metadata importlib.metadata would then find.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".asv"))
    subprocess.run([sys.executable, "-m", "build", "--sdist", "-o", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=600)
    (archive,) = tmp_path.glob("pagetable-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = names[0].split("/")[0]
    files = {n[len(top) + 1:] for n in names}
    checkout = [f for f in checkout_files()
                if not f.startswith("pagetable/") or not f.endswith((".c", ".html"))]
    check_sdist_contents(files, checkout)
