// Runs the CUDA/HIP kernels of pagetable/gpu/pagetable_kernels.cu as plain C++.
//
// The launch coordinates (blockIdx, threadIdx, blockDim, gridDim) become globals, and a
// launcher calls the kernel once per (block, thread) in turn.  That is exact for kernels
// without shared memory, barriers or warp intrinsics (ours use none) as long as no two
// threads touch the same output entry; emulation_reverse_order runs blocks and threads
// in the opposite order, so a test can run both orders and catch a result that depends on
// which thread wins.
//
// Include this header, then the kernel source, then one EMULATED_LAUNCHER(kernel) line per
// kernel; each exports `launch_<kernel>`, a pointer to
//     void (unsigned grid_x, unsigned grid_y, unsigned block_x, <the kernel's parameters>)
// which ctypes can call.
#ifndef PAGETABLE_GRID_EMULATION_H
#define PAGETABLE_GRID_EMULATION_H

struct EmulatedDim3 {
    unsigned int x, y, z;
};

static EmulatedDim3 blockIdx, threadIdx, blockDim, gridDim;

extern "C" {
int emulation_reverse_order = 0;
}

#define __global__
#define __device__

template <typename Kernel>
struct EmulatedLaunch;

template <typename... Parameters>
struct EmulatedLaunch<void (*)(Parameters...)> {
    template <void (*kernel)(Parameters...)>
    static void launch(unsigned int grid_x, unsigned int grid_y, unsigned int block_x,
                       Parameters... arguments)
    {
        gridDim = EmulatedDim3{grid_x, grid_y, 1};
        blockDim = EmulatedDim3{block_x, 1, 1};
        for (unsigned int y_step = 0; y_step < grid_y; y_step++) {
            for (unsigned int x_step = 0; x_step < grid_x; x_step++) {
                for (unsigned int thread_step = 0; thread_step < block_x; thread_step++) {
                    bool reverse = emulation_reverse_order != 0;
                    blockIdx = EmulatedDim3{reverse ? grid_x - 1 - x_step : x_step,
                                            reverse ? grid_y - 1 - y_step : y_step, 0};
                    threadIdx = EmulatedDim3{reverse ? block_x - 1 - thread_step : thread_step, 0, 0};
                    kernel(arguments...);
                }
            }
        }
    }
};

#define EMULATED_LAUNCHER(kernel)                                                         \
    extern "C" {                                                                          \
    auto launch_##kernel = &EmulatedLaunch<decltype(&kernel)>::template launch<&kernel>; \
    }

#endif  // PAGETABLE_GRID_EMULATION_H
