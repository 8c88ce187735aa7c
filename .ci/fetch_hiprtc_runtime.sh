#!/usr/bin/env bash
# Fetch ROCm 7.2's hiprtc_runtime.h (the header hiprtc prepends to every program) into
# DEST: pip downloads the rocm-llvm-python 7.2.2 wheel from PyPI (MIT licensed, ~62 MB)
# into a temporary folder and the one file is read out of it; nothing else is kept.  The
# header's sha256 is pinned, so a changed file fails here rather than in a compile.
# Usage: bash .ci/fetch_hiprtc_runtime.sh DEST  (PYTHON selects the interpreter with pip).
set -euo pipefail
DEST=${1:?usage: fetch_hiprtc_runtime.sh DEST}
PYTHON=${PYTHON:-python3}
WHEEL_VERSION=7.2.2.562.46
HEADER=rocm/amd_comgr/hiprtc_runtime.h
SHA256=7db330fcfbcf4dab1c0d446e7b599c3fcf5fad02c86fc8558896282c92f43107
if [ -f "$DEST" ] && echo "$SHA256  $DEST" | sha256sum -c --quiet - 2>/dev/null; then
    exit 0
fi
DOWNLOAD=$(mktemp -d)
trap 'rm -rf "$DOWNLOAD"' EXIT
# The wheel is built per CPython version; any one of them carries the same header.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --dest "$DOWNLOAD" \
    --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux_2_28_x86_64 "rocm-llvm-python==$WHEEL_VERSION"
"$PYTHON" - "$DOWNLOAD" "$HEADER" "$DEST" <<'PY'
import glob, sys, zipfile
download, member, dest = sys.argv[1:]
(wheel,) = glob.glob(f"{download}/rocm_llvm_python-*.whl")
with zipfile.ZipFile(wheel) as archive, open(dest, "wb") as out:
    out.write(archive.read(member))
PY
echo "$SHA256  $DEST" | sha256sum -c --quiet -
echo "hiprtc_runtime.h (ROCm $WHEEL_VERSION) -> $DEST"
