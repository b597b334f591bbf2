// Just enough of CUDA to run flash.cu on a CPU, for its tests: each block's threads are
// CPU threads (one block at a time), __syncthreads is a barrier of the block, a warp
// shuffle is an exchange through memory between two barriers of the warp, and shared
// memory is one buffer filled with NaN before each block (a read of a value no thread
// wrote shows up in the results). C++20 (std::barrier).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct lc_dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local lc_dim3 threadIdx, blockIdx;
inline lc_dim3 blockDim, gridDim;
inline float* lc_emu_smem = nullptr;
inline std::barrier<>* lc_emu_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> lc_emu_warp_barriers;
inline std::vector<double> lc_emu_exchange;

#define __syncthreads() lc_emu_block_barrier->arrive_and_wait()

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int lane_mask) {
    const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
    lc_emu_exchange[t] = (double)v;
    lc_emu_warp_barriers[warp]->arrive_and_wait();
    V r = (V)lc_emu_exchange[warp * 32 + (lane ^ (unsigned)lane_mask)];
    lc_emu_warp_barriers[warp]->arrive_and_wait();
    return r;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float lc_emu_f16_to_f32(unsigned short h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}

inline unsigned short lc_emu_f32_to_f16(float f) {
    _Float16 x = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &x, 2);
    return h;
}

#include <math.h> // expf, fmaxf, log in the global namespace, as CUDA has them

// Floats after the shared memory a launch asked for, kept NaN: a kernel that reads past
// its shared memory reads NaN, one that writes there is stopped after its block.
constexpr size_t LC_EMU_GUARD = 4096;

// Run `kernel()` for every block of `grid`, `threads` threads each (whole warps), with
// `smem_bytes` of shared memory. Exits with status 3 when a block wrote past it.
template <typename F>
inline void lc_emu_launch(lc_dim3 grid, unsigned threads, size_t smem_bytes, F kernel) {
    gridDim = grid;
    blockDim = lc_dim3{threads, 1, 1};
    const size_t asked = smem_bytes / sizeof(float);
    std::vector<float> smem(asked + LC_EMU_GUARD);
    const float nan = std::nanf("");
    unsigned nan_bits;
    std::memcpy(&nan_bits, &nan, 4);
    lc_emu_exchange.assign(threads, 0.0);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                std::fill(smem.begin(), smem.end(), nan);
                lc_emu_smem = smem.data();
                std::barrier<> block(threads);
                lc_emu_block_barrier = &block;
                lc_emu_warp_barriers.clear();
                for (unsigned w = 0; w < threads / 32; w++)
                    lc_emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; t++)
                    pool.emplace_back([&, t] {
                        blockIdx = lc_dim3{x, y, z};
                        threadIdx = lc_dim3{t, 0, 0};
                        kernel();
                    });
                for (auto& th : pool) th.join();
                for (size_t i = asked; i < smem.size(); i++) {
                    unsigned bits;
                    std::memcpy(&bits, &smem[i], 4);
                    if (bits != nan_bits) {
                        std::fprintf(stderr, "emulate: block (%u, %u, %u) wrote past its %zu bytes of shared memory\n",
                                     x, y, z, smem_bytes);
                        std::exit(3);
                    }
                }
            }
}
