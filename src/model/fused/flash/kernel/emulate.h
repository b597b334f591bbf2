// Just enough of CUDA to run flash.cu on a CPU, for its tests. Each block's threads are
// fibers (ucontext) on one CPU thread, run one at a time by a deterministic scheduler that
// switches only at __syncthreads and warp shuffles, in one of two orders
// (lc_emu_schedule): 0 runs the lowest runnable thread first and the blocks in grid order,
// 1 the highest first and the blocks in reverse. Between two barriers every pair of
// threads thus runs in both orders across the two schedules, so a missing barrier (a
// thread reading shared memory another wrote or will overwrite in the same interval) or
// two blocks writing one element give different results under the two schedules, every
// time. A barrier some threads never reach (a __syncthreads behind a branch that
// diverges, a shuffle some lanes skip or reach as another barrier) stops the run with
// status 4. Shared memory is one buffer filled with NaN before each block (a read of a
// value no thread wrote shows in the results), with a NaN guard after it (a write past it
// stops the run with status 3). C++20.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

struct lc_dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// Set by the scheduler before it switches to a thread (all threads share one CPU thread).
inline lc_dim3 threadIdx, blockIdx;
inline lc_dim3 blockDim, gridDim;
inline float* lc_emu_smem = nullptr;
inline int lc_emu_schedule = 0;

enum lc_emu_state { LC_EMU_RUNNABLE, LC_EMU_AT_BLOCK, LC_EMU_AT_WARP, LC_EMU_DONE };

struct lc_emu_thread {
    ucontext_t ctx;
    std::vector<char> stack;
    lc_emu_state state = LC_EMU_RUNNABLE;
    unsigned shuffles = 0; // warp shuffles this thread has finished
};

inline std::vector<lc_emu_thread> lc_emu_threads;
inline ucontext_t lc_emu_scheduler;
inline unsigned lc_emu_current = 0;
inline const std::function<void()>* lc_emu_kernel = nullptr;
// Shuffle values, two generations (a lane that runs ahead to the next shuffle writes the
// other one while its warp's slower lanes still read this one).
inline std::vector<double> lc_emu_exchange[2];

// The running thread waits at a barrier: back to the scheduler until it is released.
inline void lc_emu_wait(lc_emu_state at) {
    lc_emu_threads[lc_emu_current].state = at;
    swapcontext(&lc_emu_threads[lc_emu_current].ctx, &lc_emu_scheduler);
}

#define __syncthreads() lc_emu_wait(LC_EMU_AT_BLOCK)

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int lane_mask) {
    const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
    lc_emu_thread& me = lc_emu_threads[t];
    std::vector<double>& slot = lc_emu_exchange[me.shuffles % 2];
    slot[t] = (double)v;
    lc_emu_wait(LC_EMU_AT_WARP);
    me.shuffles++;
    return (V)slot[warp * 32 + (lane ^ (unsigned)lane_mask)];
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
constexpr size_t LC_EMU_STACK = 256 * 1024;

inline void lc_emu_entry() {
    (*lc_emu_kernel)();
    lc_emu_threads[lc_emu_current].state = LC_EMU_DONE; // uc_link resumes the scheduler
}

// Release the threads waiting at a barrier that all of its threads have reached.
inline void lc_emu_release(unsigned threads) {
    unsigned at_block = 0;
    for (auto& th : lc_emu_threads) at_block += th.state == LC_EMU_AT_BLOCK;
    if (at_block == threads)
        for (auto& th : lc_emu_threads) th.state = LC_EMU_RUNNABLE;
    for (unsigned w = 0; w < threads / 32; w++) {
        bool all = true;
        for (unsigned l = 0; l < 32; l++) all = all && lc_emu_threads[w * 32 + l].state == LC_EMU_AT_WARP;
        if (all)
            for (unsigned l = 0; l < 32; l++) lc_emu_threads[w * 32 + l].state = LC_EMU_RUNNABLE;
    }
}

// `th` ready to start lc_emu_entry on its stack. getcontext only fills the struct here:
// makecontext replaces its resume point, so it never returns twice (kept out of
// lc_emu_block so that no loop variable lives across it).
[[gnu::noinline]] inline void lc_emu_prepare(lc_emu_thread* th) {
    th->state = LC_EMU_RUNNABLE;
    th->shuffles = 0;
    getcontext(&th->ctx);
    th->ctx.uc_stack.ss_sp = th->stack.data();
    th->ctx.uc_stack.ss_size = th->stack.size();
    th->ctx.uc_link = &lc_emu_scheduler;
    makecontext(&th->ctx, lc_emu_entry, 0);
}

// One block to its end under the current schedule.
inline void lc_emu_block(unsigned threads) {
    for (unsigned t = 0; t < threads; t++) lc_emu_prepare(&lc_emu_threads[t]);
    for (;;) {
        int next = -1;
        for (unsigned i = 0; i < threads; i++) {
            unsigned t = lc_emu_schedule == 0 ? i : threads - 1 - i;
            if (lc_emu_threads[t].state == LC_EMU_RUNNABLE) {
                next = (int)t;
                break;
            }
        }
        if (next < 0) {
            unsigned done = 0, at_block = 0, at_warp = 0;
            for (auto& th : lc_emu_threads) {
                done += th.state == LC_EMU_DONE;
                at_block += th.state == LC_EMU_AT_BLOCK;
                at_warp += th.state == LC_EMU_AT_WARP;
            }
            if (done == threads) return;
            std::fprintf(stderr,
                         "emulate: block (%u, %u, %u) is stuck: %u threads ended, %u wait at __syncthreads, %u at a "
                         "warp shuffle (a barrier not every thread reaches)\n",
                         blockIdx.x, blockIdx.y, blockIdx.z, done, at_block, at_warp);
            std::exit(4);
        }
        lc_emu_current = (unsigned)next;
        threadIdx = lc_dim3{(unsigned)next, 0, 0};
        swapcontext(&lc_emu_scheduler, &lc_emu_threads[next].ctx);
        lc_emu_release(threads);
    }
}

// Run `kernel()` for every block of `grid`, `threads` threads each (whole warps), with
// `smem_bytes` of shared memory, under lc_emu_schedule. Exits with status 3 when a block
// wrote past its shared memory, 4 when its threads are stuck at a barrier.
inline void lc_emu_launch(lc_dim3 grid, unsigned threads, size_t smem_bytes, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = lc_dim3{threads, 1, 1};
    const size_t asked = smem_bytes / sizeof(float);
    std::vector<float> smem(asked + LC_EMU_GUARD);
    const float nan = std::nanf("");
    unsigned nan_bits;
    std::memcpy(&nan_bits, &nan, 4);
    lc_emu_kernel = &kernel;
    lc_emu_threads.resize(threads);
    for (auto& th : lc_emu_threads) th.stack.resize(LC_EMU_STACK);
    for (auto& e : lc_emu_exchange) e.assign(threads, 0.0);
    const size_t blocks = (size_t)grid.x * grid.y * grid.z;
    for (size_t n = 0; n < blocks; n++) {
        const size_t i = lc_emu_schedule == 0 ? n : blocks - 1 - n;
        blockIdx = lc_dim3{(unsigned)(i % grid.x), (unsigned)(i / grid.x % grid.y), (unsigned)(i / grid.x / grid.y)};
        std::fill(smem.begin(), smem.end(), nan);
        lc_emu_smem = smem.data();
        lc_emu_block(threads);
        for (size_t e = asked; e < smem.size(); e++) {
            unsigned bits;
            std::memcpy(&bits, &smem[e], 4);
            if (bits != nan_bits) {
                std::fprintf(stderr, "emulate: block (%u, %u, %u) wrote past its %zu bytes of shared memory\n",
                             blockIdx.x, blockIdx.y, blockIdx.z, smem_bytes);
                std::exit(3);
            }
        }
    }
}

using lc_emu_outputs = std::vector<std::vector<float>>;

// `run()` (kernel launches, returning their outputs, one vector per name in `names`)
// under schedule 0, then 1: the outputs, which must agree bit for bit; else the run stops
// with status 5, naming the first element that differs.
inline lc_emu_outputs lc_emu_run_both(const std::vector<const char*>& names,
                                      const std::function<lc_emu_outputs()>& run) {
    lc_emu_outputs got[2];
    for (int schedule = 0; schedule < 2; schedule++) {
        lc_emu_schedule = schedule;
        got[schedule] = run();
    }
    lc_emu_schedule = 0;
    for (size_t n = 0; n < got[0].size(); n++)
        for (size_t i = 0; i < got[0][n].size(); i++)
            if (std::memcmp(&got[0][n][i], &got[1][n][i], sizeof(float)) != 0) {
                std::fprintf(stderr,
                             "emulate: %s element %zu is %g with threads and blocks in order, %g in reverse order: "
                             "a race (a missing __syncthreads, or two blocks writing one element)\n",
                             n < names.size() ? names[n] : "output", i, got[0][n][i], got[1][n][i]);
                std::exit(5);
            }
    return got[0];
}
