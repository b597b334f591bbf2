// Checks emulate.h itself, for src/model/fused/flash/cuda_tests.rs: that the emulator
// finds the mistakes flash.cu's test relies on it to find.
//
//     emulate_selftest CASE
//
// ordered   threads exchange shared memory across a __syncthreads, and warp lanes
//           through shuffles: the expected values under both schedules, exit 0
// race      the same exchange without the __syncthreads: exit 5 (the schedules differ)
// blocks    two blocks write one element: exit 5
// diverge   a __syncthreads only odd threads reach: exit 4
// shuffle   a warp shuffle only odd lanes reach: exit 4
// overflow  a write past the launch's shared memory: exit 3
#include "emulate.h"

#include <string>

static int fail(const std::string& why) {
    std::fprintf(stderr, "emulate_selftest: %s\n", why.c_str());
    return 2;
}

int main(int argc, char** argv) {
    if (argc != 2) return fail("usage: emulate_selftest CASE");
    const std::string c = argv[1];
    const unsigned n = 64;
    const lc_dim3 one{1, 1, 1};
    std::vector<float> out(n);
    auto exchange = [&](bool barrier) {
        return lc_emu_run_both({"out"}, [&] {
            std::fill(out.begin(), out.end(), std::nanf(""));
            lc_emu_launch(one, n, n * sizeof(float), [&] {
                const unsigned t = threadIdx.x;
                lc_emu_smem[t] = (float)t;
                if (barrier) __syncthreads();
                const float next = lc_emu_smem[(t + 1) % n];
                out[t] = next + 100.0f * __shfl_xor_sync(0xffffffffu, (float)t, 1);
            });
            return std::vector<std::vector<float>>{out};
        });
    };
    if (c == "ordered") {
        auto got = exchange(true)[0];
        for (unsigned t = 0; t < n; t++)
            if (got[t] != (float)((t + 1) % n) + 100.0f * (float)(t ^ 1))
                return fail("thread " + std::to_string(t) + " got " + std::to_string(got[t]));
        return 0;
    }
    if (c == "race") exchange(false);
    if (c == "blocks")
        lc_emu_run_both({"out"}, [&] {
            lc_emu_launch(lc_dim3{2, 1, 1}, n, 0, [&] {
                if (threadIdx.x == 0) out[0] = (float)blockIdx.x;
            });
            return std::vector<std::vector<float>>{out};
        });
    if (c == "diverge")
        lc_emu_launch(one, n, 0, [&] {
            if (threadIdx.x % 2) __syncthreads();
        });
    if (c == "shuffle")
        lc_emu_launch(one, n, 0, [&] {
            if (threadIdx.x % 2) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 2);
        });
    if (c == "overflow") lc_emu_launch(one, n, n * sizeof(float), [&] { lc_emu_smem[n + threadIdx.x] = 0.0f; });
    return fail("case " + c + " ended without the emulator stopping it");
}
