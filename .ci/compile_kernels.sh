#!/usr/bin/env bash
# Compile pagetable's one GPU kernel source for every toolchain CI can reach, without a GPU:
#   1. hiprtc through ctypes, exactly as CuPy does on ROCm (no includes added), one process
#      per target (Debian's hiprtc 5.2 crashes on a second program in one process and on
#      gfx940), failing on any error or warning in the program log: gfx908 gfx90a gfx1030;
#   2. Debian's hipcc (HIP_PLATFORM=amd, hip_runtime.h force-included, -Werror):
#      gfx908 gfx90a gfx940 gfx1030;
#   3. nvcc to PTX with warnings as errors, where nvcc exists.
# Installs Debian's hipcc when it is missing (set PAGETABLE_NO_APT=1 to skip that; the
# AMD steps are then skipped with a message).  Idempotent; quick once hipcc is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=pagetable/gpu/pagetable_kernels.cu
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
failures=0

if ! command -v hipcc >/dev/null 2>&1 && [ "${PAGETABLE_NO_APT:-0}" = "0" ] \
        && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "== installing Debian's hipcc (brings libamdhip64 with hiprtc)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q hipcc >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q hipcc >/dev/null; }
fi

if command -v hipcc >/dev/null 2>&1; then
    for target in gfx908 gfx90a gfx1030; do
        if ! "$PYTHON" .ci/hiprtc_compile.py "$SOURCE" "$target"; then
            failures=$((failures + 1))
        fi
    done
    for target in gfx908 gfx90a gfx940 gfx1030; do
        # hipcc picks the NVIDIA platform when nvcc is on PATH; the AMD one is what we test.
        if HIP_PLATFORM=amd hipcc --offload-arch="$target" -include hip/hip_runtime.h \
                -Werror -Wall -c -x hip "$SOURCE" -o "$WORK/kernels_$target.o" \
                >"$WORK/hipcc_$target.log" 2>&1; then
            echo "hipcc $target: ok"
        else
            echo "hipcc $target: FAILED"; cat "$WORK/hipcc_$target.log"
            failures=$((failures + 1))
        fi
    done
else
    echo "hipcc/hiprtc: SKIPPED (not installed; apt-get install -y hipcc)"
fi

if command -v nvcc >/dev/null 2>&1; then
    if nvcc -ptx -Werror all-warnings "$SOURCE" -o "$WORK/kernels.ptx" >"$WORK/nvcc.log" 2>&1; then
        echo "nvcc ptx: ok ($(grep -c '^.visible .entry' "$WORK/kernels.ptx") kernels)"
    else
        echo "nvcc ptx: FAILED"; cat "$WORK/nvcc.log"
        failures=$((failures + 1))
    fi
else
    echo "nvcc: SKIPPED (not on PATH)"
fi

if [ "$failures" -ne 0 ]; then
    echo "compile_kernels: $failures failure(s)"
    exit 1
fi
echo "compile_kernels: all ok"
