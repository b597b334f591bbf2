// Runs flash.cu's kernels on the CPU (emulate.h) for the tests in
// src/model/fused/flash/cuda_tests.rs, with the launch geometry the test passes (that of
// src/model/fused/flash/launch.rs, which flash/cuda.rs launches with on a GPU):
//
//     emulate IN OUT
//
// IN: i32 dtype (0 f32, 1 bf16, 2 f16), b, nh, nkv, t, s, hs, q_start, k_start, window,
//     has_docs; per kernel (forward, dsum, dq, dk/dv) i32 grid x, y, z, threads, shared bytes;
//     f32 scale; f32 q, k, v, dout; u32 docs (b·t, when has_docs).
// OUT: f32 o, lse, dsum, dq, dk, dv. Inputs are rounded to the dtype first; outputs start
//     as NaN (an element no thread writes stays NaN). The kernels run in flash/cuda.rs's
//     order: forward, then dsum from its o, then dq and dk/dv.
//
// The four kernels run twice, under each of emulate.h's two thread and block orders; the
// outputs must agree bit for bit (flash.cu promises results that do not depend on
// scheduling), else the run stops with status 5 naming the first element that differs.
#include "flash.cu"

#include <cstdio>
#include <cstdlib>

static void fail(const char* what) {
    std::fprintf(stderr, "emulate: %s\n", what);
    std::exit(2);
}

template <typename X>
static std::vector<X> read_vec(FILE* f, size_t n) {
    std::vector<X> v(n);
    if (n && std::fread(v.data(), sizeof(X), n, f) != n) fail("short input");
    return v;
}

static void write_vec(FILE* f, const std::vector<float>& v) {
    if (!v.empty() && std::fwrite(v.data(), sizeof(float), v.size(), f) != v.size()) fail("short write");
}

template <typename T>
static std::vector<T> to_t(const std::vector<float>& x) {
    std::vector<T> y(x.size());
    for (size_t i = 0; i < x.size(); i++) lc_store(&y[i], x[i]);
    return y;
}

template <typename T>
static std::vector<float> to_f32(const std::vector<T>& x) {
    std::vector<float> y(x.size());
    for (size_t i = 0; i < x.size(); i++) y[i] = lc_load(x[i]);
    return y;
}

struct Launch {
    lc_dim3 grid;
    unsigned threads;
    size_t smem;
};

template <typename T, typename Fwd, typename Dsum, typename Dq, typename Dkv>
static lc_emu_outputs run(const LcParams& p, const Launch* launch, const std::vector<float>& qf,
                          const std::vector<float>& kf, const std::vector<float>& vf, const std::vector<float>& df,
                          const std::vector<unsigned>& docs, Fwd fwd, Dsum dsum_kernel, Dq dq_kernel, Dkv dkv_kernel) {
    auto q = to_t<T>(qf), k = to_t<T>(kf), v = to_t<T>(vf), dout = to_t<T>(df);
    const float nan = std::nanf("");
    const size_t rows = (size_t)p.b * p.nh * p.t;
    auto o = to_t<T>(std::vector<float>(q.size(), nan)), dq = o;
    auto dk = to_t<T>(std::vector<float>(k.size(), nan)), dv = dk;
    std::vector<float> lse(rows, nan), dsum(rows, nan);
    const unsigned* dp = docs.data();
    lc_emu_launch(launch[0].grid, launch[0].threads, launch[0].smem,
                  [&] { fwd(q.data(), k.data(), v.data(), o.data(), lse.data(), dp, p); });
    lc_emu_launch(launch[1].grid, launch[1].threads, launch[1].smem,
                  [&] { dsum_kernel(o.data(), dout.data(), dsum.data(), p); });
    lc_emu_launch(launch[2].grid, launch[2].threads, launch[2].smem, [&] {
        dq_kernel(q.data(), k.data(), v.data(), dout.data(), lse.data(), dsum.data(), dq.data(), dp, p);
    });
    lc_emu_launch(launch[3].grid, launch[3].threads, launch[3].smem, [&] {
        dkv_kernel(q.data(), k.data(), v.data(), dout.data(), lse.data(), dsum.data(), dk.data(), dv.data(), dp, p);
    });
    return {to_f32(o), lse, dsum, to_f32(dq), to_f32(dk), to_f32(dv)};
}

int main(int argc, char** argv) {
    if (argc != 3) fail("usage: emulate IN OUT");
    FILE* in = std::fopen(argv[1], "rb");
    if (!in) fail("cannot open IN");
    auto h = read_vec<int>(in, 11);
    LcParams p{h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10], 0.0f};
    Launch launch[4];
    auto g = read_vec<int>(in, 20);
    for (int i = 0; i < 4; i++) {
        const int* l = &g[5 * i];
        if (l[0] < 1 || l[1] < 1 || l[2] < 1 || l[3] < 32 || l[3] % 32 || l[4] < 0) fail("bad launch");
        launch[i] = Launch{lc_dim3{(unsigned)l[0], (unsigned)l[1], (unsigned)l[2]}, (unsigned)l[3], (size_t)l[4]};
    }
    p.scale = read_vec<float>(in, 1)[0];
    if (p.hs > LC_HS_MAX || p.nkv == 0 || p.nh % p.nkv) fail("bad shape");
    const size_t nq = (size_t)p.b * p.nh * p.t * p.hs, nk = (size_t)p.b * p.nkv * p.s * p.hs;
    auto q = read_vec<float>(in, nq), k = read_vec<float>(in, nk), v = read_vec<float>(in, nk),
         dout = read_vec<float>(in, nq);
    auto docs = p.has_docs ? read_vec<unsigned>(in, (size_t)p.b * p.t) : std::vector<unsigned>(1, 0);
    std::fclose(in);
    const std::vector<const char*> names{"o", "lse", "dsum", "dq", "dk", "dv"};
    lc_emu_outputs got;
    switch (h[0]) {
    case 0:
        got = lc_emu_run_both(names, [&] {
            return run<float>(p, launch, q, k, v, dout, docs, lc_flash_fwd_f32, lc_flash_bwd_dsum_f32,
                              lc_flash_bwd_dq_f32, lc_flash_bwd_dkv_f32);
        });
        break;
    case 1:
        got = lc_emu_run_both(names, [&] {
            return run<lc_bf16>(p, launch, q, k, v, dout, docs, lc_flash_fwd_bf16, lc_flash_bwd_dsum_bf16,
                                lc_flash_bwd_dq_bf16, lc_flash_bwd_dkv_bf16);
        });
        break;
    case 2:
        got = lc_emu_run_both(names, [&] {
            return run<lc_f16>(p, launch, q, k, v, dout, docs, lc_flash_fwd_f16, lc_flash_bwd_dsum_f16,
                               lc_flash_bwd_dq_f16, lc_flash_bwd_dkv_f16);
        });
        break;
    default: fail("bad dtype");
    }
    FILE* out = std::fopen(argv[2], "wb");
    if (!out) fail("cannot open OUT");
    for (const auto& x : got) write_vec(out, x);
    if (std::fclose(out) != 0) fail("cannot write OUT");
    return 0;
}
