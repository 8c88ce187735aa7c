#!/usr/bin/env bash
# Compile pagetable's one GPU kernel source for every toolchain CI can reach, without a GPU:
#   1. hiprtc through ctypes, exactly as CuPy does on ROCm (no includes added), one process
#      per target (Debian's hiprtc 5.2 crashes on a second program in one process and on
#      gfx940), failing on any error or warning in the program log: gfx908 gfx90a gfx1030;
#   2. Debian's hipcc (HIP_PLATFORM=amd, hip_runtime.h force-included, -Werror):
#      gfx908 gfx90a gfx940 gfx1030;
#   3. ROCm 7's hiprtc mode for the GPUs Debian's ROCm 5.2 does not know (gfx942: MI300X/
#      MI325X; gfx1100-gfx1102: RDNA3; gfx1200, gfx1201: RDNA4) and for MI200 (gfx90a)
#      as a ROCm 7 user compiles for it: Debian's clang-19 with ROCm 7.2's
#      hiprtc_runtime.h prepended, __HIPCC_RTC__ defined, no include paths, Debian's
#      rocm-device-libs linked, -Werror -Wall -Wextra; each code object must hold every
#      extern "C" __global__ kernel of the source and none may spill or use scratch
#      (.ci/rtc7_compile.py).  Three deliberately broken sources must fail the same check;
#   4. nvcc to PTX with warnings as errors, where nvcc exists.
# Installs Debian's hipcc, clang-19, lld-19, llvm-19 and rocm-device-libs when missing, and
# fetches the header from PyPI each run (set PAGETABLE_NO_APT=1 to skip the installs; the
# steps whose tools are missing are then skipped with a message).  PAGETABLE_RTC7_JSON=DIR
# keeps each target's per-kernel figures as DIR/rtc7_TARGET.json.
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=pagetable/gpu/pagetable_kernels.cu
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
failures=0

. .ci/toolchains.sh
if ! have_kernel_tools && [ "${PAGETABLE_NO_APT:-0}" = "0" ] \
        && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "== installing Debian's $KERNEL_PACKAGES (hipcc brings libamdhip64 with hiprtc)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q $KERNEL_PACKAGES >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q $KERNEL_PACKAGES >/dev/null; }
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

if have_rtc7_tools; then
    header="$WORK/hiprtc_runtime.h"
    if PYTHON="$PYTHON" bash .ci/fetch_hiprtc_runtime.sh "$header"; then
        for target in gfx942 gfx90a gfx1100 gfx1101 gfx1102 gfx1200 gfx1201; do
            json=()
            if [ -n "${PAGETABLE_RTC7_JSON:-}" ]; then
                mkdir -p "$PAGETABLE_RTC7_JSON"
                json=(--json "$PAGETABLE_RTC7_JSON/rtc7_$target.json")
            fi
            if ! "$PYTHON" .ci/rtc7_compile.py "$SOURCE" "$target" --header "$header" \
                    "${json[@]}"; then
                failures=$((failures + 1))
            fi
        done
        # The check is only worth having if it fails: a warning, a kernel that the
        # hiprtc mode drops, and a kernel that uses scratch must each fail it.
        printf '__device__ int maybe(int a) { if (a) return 1; }\nextern "C" __global__ void k(int* x) { x[0] = maybe(x[1]); }\n' >"$WORK/warns.cu"
        printf 'extern "C" __global__ void k(int* x) { x[0] = 1; }\n#ifndef __HIPCC_RTC__\nextern "C" __global__ void k_dropped(int* x) { x[0] = 2; }\n#endif\n' >"$WORK/missing.cu"
        printf 'extern "C" __global__ void k(int* x) { int a[64]; for (int i = 0; i < 64; ++i) a[i] = x[i]; x[0] = a[x[64] & 63]; }\n' >"$WORK/scratch.cu"
        for broken in warns missing scratch; do
            if "$PYTHON" .ci/rtc7_compile.py "$WORK/$broken.cu" gfx942 --header "$header" \
                    >"$WORK/$broken.log" 2>&1; then
                echo "hiprtc-7 mode self-check: the $broken source PASSED but must fail"
                cat "$WORK/$broken.log"; failures=$((failures + 1))
            else
                echo "hiprtc-7 mode self-check: the $broken source fails, as it must"
            fi
        done
    else
        echo "hiprtc-7 mode: FAILED to fetch ROCm 7.2's hiprtc_runtime.h from PyPI"
        failures=$((failures + 1))
    fi
else
    echo "hiprtc-7 mode: SKIPPED (apt-get install -y $RTC7_PACKAGES)"
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
