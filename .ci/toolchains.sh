# Sourced by .ci/run and .ci/compile_kernels.sh: the Debian packages the kernel compiles
# need, and the tests of whether they are here, so that both scripts install on the same
# condition.
RTC7_PACKAGES="clang-19 lld-19 llvm-19 rocm-device-libs"   # ROCm 7's hiprtc mode
KERNEL_PACKAGES="hipcc $RTC7_PACKAGES"                      # hipcc brings hiprtc 5.2
have_rtc7_tools() {
    command -v clang-19 >/dev/null 2>&1 && command -v llvm-readelf-19 >/dev/null 2>&1 \
        && command -v ld.lld-19 >/dev/null 2>&1 \
        && [ -f /usr/lib/x86_64-linux-gnu/amdgcn/bitcode/ockl.bc ]
}
have_kernel_tools() {
    command -v hipcc >/dev/null 2>&1 && have_rtc7_tools
}
