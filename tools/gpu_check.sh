#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (NVIDIA: Python 3.12, CuPy for CUDA 13,
# PyTorch, Triton, Cython, numpy and pytest preinstalled; no network).  From the repository
# root:
#
#     tools/gpu_check.sh            # results also go to $OUT when it is set
#
# 1. builds the extension in place (pip install --no-build-isolation -e ., falling back to
#    setup.py build_ext --inplace), offline;
# 2. runs tests/gpu (the CuPy path against the Cython PageTable);
# 3. runs benchmarks/gpu_bench.py and prints its table (slot mapping at 16M tokens against
#    copy bandwidth, CuPy expressions and Triton; sync() against full re-uploads).
# Each step has its own time limit; the whole finishes in under 6 minutes.  Exits non-zero
# when a step fails.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT:-}
LOGS=$(mktemp -d)
if [ -n "$OUT_DIR" ]; then
    mkdir -p "$OUT_DIR"
fi
failures=0

step() {
    echo
    echo "== $* ($((SECONDS - START)) s elapsed)"
}

save() {  # save FILE NAME: keep a log in $OUT when it is set
    if [ -n "$OUT_DIR" ]; then
        cp "$1" "$OUT_DIR/$2"
    fi
}

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || rocm-smi --showproductname 2>/dev/null || echo "no nvidia-smi / rocm-smi"
"$PYTHON" - <<'PY'
import platform
import numpy, Cython
print("python", platform.python_version(), "| numpy", numpy.__version__, "| Cython", Cython.__version__)
try:
    import cupy
    print("cupy", cupy.__version__, "| devices", cupy.cuda.runtime.getDeviceCount(),
          "| hip" if cupy.cuda.runtime.is_hip else "| cuda")
except Exception as error:
    print("cupy unusable:", type(error).__name__, error)
for name in ("torch", "triton"):
    try:
        module = __import__(name)
        print(name, module.__version__)
    except Exception as error:
        print(name, "unavailable:", error)
PY

step "build: pip install --no-build-isolation -e . (offline)"
if timeout 200 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . \
        >"$LOGS/build.log" 2>&1; then
    tail -1 "$LOGS/build.log"
else
    tail -15 "$LOGS/build.log"
    echo "pip failed; building in place instead"
    if ! timeout 200 "$PYTHON" setup.py build_ext --inplace -j 8 >"$LOGS/build.log" 2>&1; then
        tail -30 "$LOGS/build.log"
        save "$LOGS/build.log" build.log
        echo "gpu_check: the extension does not build"
        exit 1
    fi
fi
"$PYTHON" -c "from pagetable import gpu; print('pagetable.gpu.is_available():', gpu.is_available())"

step "tests/gpu"
# -o addopts= : the project's default options name pytest-benchmark, which may be absent here.
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts= -rs tests/gpu 2>&1 \
    | tee "$LOGS/pytest_gpu.txt"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    failures=$((failures + 1))
fi
save "$LOGS/pytest_gpu.txt" pytest_gpu.txt

step "benchmarks/gpu_bench.py"
timeout 170 "$PYTHON" benchmarks/gpu_bench.py ${OUT_DIR:+--out "$OUT_DIR"} 2>&1 | tee "$LOGS/bench.txt"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    failures=$((failures + 1))
fi
save "$LOGS/bench.txt" gpu_bench.txt

step "done: $failures failing step(s)"
rm -rf "$LOGS"
[ "$failures" -eq 0 ]
