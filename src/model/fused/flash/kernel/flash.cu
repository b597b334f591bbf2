// Causal attention in O(T) memory on CUDA: the flash-attention algorithm of
// src/model/fused/flash/mod.rs (the CPU kernel), forward and backward, for f32, bf16 and f16
// inputs with f32 arithmetic.
//
// Shapes (all contiguous): q, o, dout (B, nh, T, hs); k, v, dk, dv (B, nkv, S, hs);
// lse, dsum (B, nh, T) f32; docs (B·T) u32 when has_docs. Query head h reads key/value
// head h / (nh / nkv) (GQA/MQA without copies). Query i of batch row b (absolute position
// q_start + i) sees keys j (absolute k_start + j) in one interval lo..hi: causal, within
// the sliding window when window > 0, not before its document's first token.
//
//   forward   per (b, h, 32 queries), over tiles of 32 visible keys:
//               s = scale·q kᵀ, online softmax (running max m, normaliser l in f64),
//               o = o·e^(m−m') + e^(s−m') v;  o /= l;  lse = m + log l
//   dsum      per (b, h, 32 queries): dsum = rowsum(dO ⊙ O), one f32 per query row
//   dq        per (b, h, 32 queries), over key tiles: p = e^(s − lse),
//               ds = p ⊙ (dO vᵀ − dsum), dq += scale · ds k       (dsum = rowsum(dO ⊙ O))
//   dk, dv    per (b, kv head, 32 keys), over the g query heads in order and the query
//               tiles that can see the keys: dv += pᵀ dO, dk += scale · dsᵀ q
//
// Every output element is written by one thread, which adds its terms in a fixed order:
// no atomics, results do not depend on scheduling. Blocks are 64 threads (two warps); a
// thread holds a 4 × 4 tile of scores (rows 4·ty + r, keys tx + 8c; ty = t / 8,
// tx = t % 8) and 4 rows × (hs / 8) columns of its output. Tiles live in shared memory
// as f32, rows padded to hs + 1 floats so that the threads of a warp read distinct banks.
//
// Without __CUDACC__ this file compiles as C++ against emulate.h, which runs each block's
// threads one at a time in two orders whose results must agree bit for bit: the tests
// check this exact source against the plain attention (src/model/fused/flash/cuda_tests.rs).

#ifdef __CUDACC__
#define LC_DEVICE __device__ __forceinline__
#define LC_KERNEL extern "C" __global__ void __launch_bounds__(64)
extern __shared__ float lc_smem_[];
#define LC_SMEM lc_smem_
#else
#include "emulate.h"
#define LC_DEVICE inline
#define LC_KERNEL extern "C" void
#define LC_SMEM lc_emu_smem
#endif

#define LC_BQ 32      // queries per tile
#define LC_BK 32      // keys per tile
#define LC_THREADS 64 // threads per block
#define LC_HS_MAX 128 // largest head size
#define LC_CPT (LC_HS_MAX / 8) // output columns per thread: tx + 8c, c < LC_CPT

struct LcParams {
    int b, nh, nkv, t, s, hs;
    int q_start, k_start, window, has_docs;
    float scale;
};

struct lc_bf16 { unsigned short x; };
struct lc_f16 { unsigned short x; };

LC_DEVICE float lc_load(float v) { return v; }
LC_DEVICE float lc_load(lc_bf16 v) { return __uint_as_float(((unsigned)v.x) << 16); }
LC_DEVICE void lc_store(float* p, float v) { *p = v; }
LC_DEVICE void lc_store(lc_bf16* p, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p->x = 0x7fc0; // NaN
    } else {
        u += 0x7fffu + ((u >> 16) & 1u); // round to nearest, ties to even
        p->x = (unsigned short)(u >> 16);
    }
}
#ifdef __CUDACC__
LC_DEVICE float lc_load(lc_f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
    return f;
}
LC_DEVICE void lc_store(lc_f16* p, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p->x = h;
}
#else
LC_DEVICE float lc_load(lc_f16 v) { return lc_emu_f16_to_f32(v.x); }
LC_DEVICE void lc_store(lc_f16* p, float v) { p->x = lc_emu_f32_to_f16(v); }
#endif

// The keys lo..hi visible to query i of batch row bi (the CPU kernel's visible_ranges).
LC_DEVICE void lc_visible(const LcParams& p, const unsigned* docs, int bi, int i, int* lo, int* hi) {
    int q = p.q_start + i;
    int h = q + 1 - p.k_start;
    h = h < 0 ? 0 : (h > p.s ? p.s : h);
    int first = 0;
    if (p.window > 0) {
        first = q + 1 - p.window;
        first = first < 0 ? 0 : first;
    }
    if (p.has_docs) {
        int d = (int)docs[bi * p.t + i];
        first = d > first ? d : first;
    }
    int l = first - p.k_start;
    l = l < 0 ? 0 : (l > h ? h : l);
    *lo = l;
    *hi = h;
}

// Rows 0..rows of a (·, hs) row-major matrix into a tile of LC_BQ (= LC_BK) rows, `ld`
// floats apart; rows past `rows` become zeros.
template <typename T>
LC_DEVICE void lc_load_tile(float* dst, const T* src, int rows, int hs, int ld) {
    for (int e = threadIdx.x; e < LC_BQ * hs; e += LC_THREADS) {
        int r = e / hs, c = e % hs;
        dst[r * ld + c] = r < rows ? lc_load(src[(size_t)r * hs + c]) : 0.0f;
    }
}

// Sum (or max) over the 8 threads of a row group (lanes 8·k .. 8·k + 7), in a fixed order.
LC_DEVICE float lc_row_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v;
}
LC_DEVICE float lc_row_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return v;
}

// acc[r][c] = Σ_d a[4·ty + r][d] · b[tx + 8c][d]: a 4 × 4 tile of a · bᵀ.
LC_DEVICE void lc_tile_abt(float acc[4][4], const float* a, const float* b, int hs, int ld, int ty, int tx) {
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = 0.0f;
    for (int d = 0; d < hs; d++) {
        float av[4], bv[4];
        for (int r = 0; r < 4; r++) av[r] = a[(4 * ty + r) * ld + d];
        for (int c = 0; c < 4; c++) bv[c] = b[(tx + 8 * c) * ld + d];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) acc[r][c] += av[r] * bv[c];
    }
}

// acc[r][c] += Σ_j w[j · wrs + (4·ty + r) · wcs] · m[j][tx + 8c] over j < n: four rows of
// wᵀ·m (wcs = 1: rows of w are keys; wrs = 1: w transposed).
LC_DEVICE void lc_tile_acc(float acc[4][LC_CPT], const float* w, int wrs, int wcs, const float* m, int n, int hs, int ld,
                           int ty, int tx) {
    for (int j = 0; j < n; j++) {
        float wv[4];
        for (int r = 0; r < 4; r++) wv[r] = w[j * wrs + (4 * ty + r) * wcs];
        for (int c = 0; c < LC_CPT; c++) {
            int d = tx + 8 * c;
            if (d < hs) {
                float mv = m[j * ld + d];
                for (int r = 0; r < 4; r++) acc[r][c] += wv[r] * mv;
            }
        }
    }
}

// The union lo..hi of the visible ranges of queries i0 .. i0 + LC_BQ (computed by every
// thread alike).
LC_DEVICE void lc_block_span(const LcParams& p, const unsigned* docs, int bi, int i0, int* blo, int* bhi) {
    int lo_all = p.s, hi_all = 0;
    for (int r = 0; r < LC_BQ && i0 + r < p.t; r++) {
        int lo, hi;
        lc_visible(p, docs, bi, i0 + r, &lo, &hi);
        if (lo < hi) {
            lo_all = lo < lo_all ? lo : lo_all;
            hi_all = hi > hi_all ? hi : hi_all;
        }
    }
    *blo = lo_all < hi_all ? lo_all : 0;
    *bhi = lo_all < hi_all ? hi_all : 0;
}

// The place of a block of the forward and dq kernels: queries i0 .. i0 + nq of head
// blockIdx.y in batch row bi (their first row of q is qrow), and the key and value rows
// of the kv head that head reads.
template <typename T>
struct LcQueryBlock {
    int i0, bi, nq;
    size_t qrow;
    const T* kp;
    const T* vp;
};

template <typename T>
LC_DEVICE LcQueryBlock<T> lc_query_block(const T* k, const T* v, const LcParams& p) {
    LcQueryBlock<T> at;
    const int h = blockIdx.y, hk = h / (p.nh / p.nkv);
    at.i0 = blockIdx.x * LC_BQ;
    at.bi = blockIdx.z;
    at.nq = p.t - at.i0 < LC_BQ ? p.t - at.i0 : LC_BQ;
    at.qrow = ((size_t)at.bi * p.nh + h) * p.t + at.i0;
    const size_t kv0 = ((size_t)at.bi * p.nkv + hk) * p.s * p.hs;
    at.kp = k + kv0;
    at.vp = v + kv0;
    return at;
}

// Shared memory: q (LC_BQ × ld), k then v (LC_BK × ld), p (LC_BQ × (LC_BK + 1)).
template <typename T>
LC_DEVICE void lc_fwd(const T* q, const T* k, const T* v, T* o, float* lse, const unsigned* docs, LcParams p) {
    const int hs = p.hs, ld = hs + 1, pld = LC_BK + 1;
    float* qs = LC_SMEM;
    float* kv = qs + LC_BQ * ld;
    float* ps = kv + LC_BK * ld;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    const LcQueryBlock<T> at = lc_query_block(k, v, p);
    lc_load_tile(qs, q + at.qrow * hs, at.nq, hs, ld);

    int lo[4], hi[4];
    for (int r = 0; r < 4; r++) {
        lo[r] = hi[r] = 0;
        if (4 * ty + r < at.nq) lc_visible(p, docs, at.bi, at.i0 + 4 * ty + r, &lo[r], &hi[r]);
    }
    int blo, bhi;
    lc_block_span(p, docs, at.bi, at.i0, &blo, &bhi);

    float m[4], acc[4][LC_CPT];
    double l[4];
    for (int r = 0; r < 4; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0;
        for (int c = 0; c < LC_CPT; c++) acc[r][c] = 0.0f;
    }
    for (int j0 = (blo / LC_BK) * LC_BK; j0 < bhi; j0 += LC_BK) {
        const int nk = p.s - j0 < LC_BK ? p.s - j0 : LC_BK;
        __syncthreads(); // the last tile's reads of kv are done
        lc_load_tile(kv, at.kp + (size_t)j0 * hs, nk, hs, ld);
        __syncthreads();
        float s[4][4];
        lc_tile_abt(s, qs, kv, hs, ld, ty, tx);
        for (int r = 0; r < 4; r++) {
            float mx = -INFINITY;
            for (int c = 0; c < 4; c++) {
                int j = j0 + tx + 8 * c;
                s[r][c] = (j >= lo[r] && j < hi[r]) ? s[r][c] * p.scale : -INFINITY;
                mx = fmaxf(mx, s[r][c]);
            }
            mx = lc_row_max(mx);
            const float mn = fmaxf(m[r], mx);
            float alpha = 1.0f, sum = 0.0f;
            for (int c = 0; c < 4; c++) {
                float e = (mn == -INFINITY || s[r][c] == -INFINITY) ? 0.0f : expf(s[r][c] - mn);
                ps[(4 * ty + r) * pld + tx + 8 * c] = e;
                sum += e;
            }
            if (mn != -INFINITY) alpha = m[r] == -INFINITY ? 0.0f : expf(m[r] - mn);
            sum = lc_row_sum(sum);
            l[r] = l[r] * alpha + sum;
            m[r] = mn;
            for (int c = 0; c < LC_CPT; c++) acc[r][c] *= alpha;
        }
        __syncthreads(); // p written, k read
        lc_load_tile(kv, at.vp + (size_t)j0 * hs, nk, hs, ld);
        __syncthreads();
        lc_tile_acc(acc, ps, 1, pld, kv, LC_BK, hs, ld, ty, tx);
    }
    for (int r = 0; r < 4; r++) {
        const int i = 4 * ty + r;
        if (i >= at.nq) continue;
        const float inv = l[r] > 0.0 ? (float)(1.0 / l[r]) : 0.0f;
        for (int c = 0; c < LC_CPT; c++) {
            int d = tx + 8 * c;
            if (d < hs) lc_store(&o[(at.qrow + i) * hs + d], acc[r][c] * inv);
        }
        if (tx == 0) lse[at.qrow + i] = l[r] > 0.0 ? m[r] + (float)log(l[r]) : INFINITY;
    }
}

// Shared memory: q, dout (LC_BQ × ld each), v then k (LC_BK × ld), ds (LC_BQ × (LC_BK + 1)).
template <typename T>
LC_DEVICE void lc_bwd_dq(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dsum, T* dq,
                         const unsigned* docs, LcParams p) {
    const int hs = p.hs, ld = hs + 1, pld = LC_BK + 1;
    float* qs = LC_SMEM;
    float* dos = qs + LC_BQ * ld;
    float* kv = dos + LC_BQ * ld;
    float* dss = kv + LC_BK * ld;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    const LcQueryBlock<T> at = lc_query_block(k, v, p);
    lc_load_tile(qs, q + at.qrow * hs, at.nq, hs, ld);
    lc_load_tile(dos, dout + at.qrow * hs, at.nq, hs, ld);

    int lo[4], hi[4];
    float rl[4], rd[4];
    for (int r = 0; r < 4; r++) {
        lo[r] = hi[r] = 0;
        rl[r] = INFINITY;
        rd[r] = 0.0f;
        if (4 * ty + r < at.nq) {
            lc_visible(p, docs, at.bi, at.i0 + 4 * ty + r, &lo[r], &hi[r]);
            rl[r] = lse[at.qrow + 4 * ty + r];
            rd[r] = dsum[at.qrow + 4 * ty + r];
        }
    }
    int blo, bhi;
    lc_block_span(p, docs, at.bi, at.i0, &blo, &bhi);

    float acc[4][LC_CPT];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < LC_CPT; c++) acc[r][c] = 0.0f;
    for (int j0 = (blo / LC_BK) * LC_BK; j0 < bhi; j0 += LC_BK) {
        const int nk = p.s - j0 < LC_BK ? p.s - j0 : LC_BK;
        __syncthreads(); // the last tile's reads of kv and ds are done
        lc_load_tile(kv, at.vp + (size_t)j0 * hs, nk, hs, ld);
        __syncthreads();
        float dp[4][4], s[4][4];
        lc_tile_abt(dp, dos, kv, hs, ld, ty, tx);
        __syncthreads(); // v read
        lc_load_tile(kv, at.kp + (size_t)j0 * hs, nk, hs, ld);
        __syncthreads();
        lc_tile_abt(s, qs, kv, hs, ld, ty, tx);
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) {
                int j = j0 + tx + 8 * c;
                float pr = (j >= lo[r] && j < hi[r]) ? expf(s[r][c] * p.scale - rl[r]) : 0.0f;
                dss[(4 * ty + r) * pld + tx + 8 * c] = pr * (dp[r][c] - rd[r]);
            }
        __syncthreads();
        lc_tile_acc(acc, dss, 1, pld, kv, LC_BK, hs, ld, ty, tx);
    }
    for (int r = 0; r < 4; r++) {
        const int i = 4 * ty + r;
        if (i >= at.nq) continue;
        for (int c = 0; c < LC_CPT; c++) {
            int d = tx + 8 * c;
            if (d < hs) lc_store(&dq[(at.qrow + i) * hs + d], acc[r][c] * p.scale);
        }
    }
}

// Shared memory: k, v (LC_BK × ld each), q, dout (LC_BQ × ld each), p and ds
// (LC_BQ × (LC_BK + 1) each), lse and dsum (LC_BQ each).
template <typename T>
LC_DEVICE void lc_bwd_dkv(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dsum, T* dk,
                          T* dv, const unsigned* docs, LcParams p) {
    const int hs = p.hs, ld = hs + 1, pld = LC_BK + 1;
    float* ks = LC_SMEM;
    float* vs = ks + LC_BK * ld;
    float* qs = vs + LC_BK * ld;
    float* dos = qs + LC_BQ * ld;
    float* pss = dos + LC_BQ * ld;
    float* dss = pss + LC_BQ * pld;
    float* ls = dss + LC_BQ * pld;
    float* dsm = ls + LC_BQ;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    const int j0 = blockIdx.x * LC_BK, hk = blockIdx.y, bi = blockIdx.z;
    const int g = p.nh / p.nkv;
    const int nk = p.s - j0 < LC_BK ? p.s - j0 : LC_BK;
    const size_t krow = ((size_t)bi * p.nkv + hk) * p.s + j0;
    lc_load_tile(ks, k + krow * hs, nk, hs, ld);
    lc_load_tile(vs, v + krow * hs, nk, hs, ld);

    // Queries that can see a key of this tile: i ≥ the first key's position (causal) and,
    // with a window, i < the last key's position + window. Documents only narrow this.
    int imin = p.k_start + j0 - p.q_start;
    imin = imin < 0 ? 0 : imin;
    int imax = p.t;
    if (p.window > 0) {
        int w = p.k_start + j0 + nk - 1 + p.window - p.q_start;
        imax = w < imax ? w : imax;
    }

    float ak[4][LC_CPT], av[4][LC_CPT];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < LC_CPT; c++) ak[r][c] = av[r][c] = 0.0f;
    for (int gi = 0; gi < g; gi++) {
        const int h = hk * g + gi;
        for (int i0 = (imin / LC_BQ) * LC_BQ; i0 < imax; i0 += LC_BQ) {
            const int nq = p.t - i0 < LC_BQ ? p.t - i0 : LC_BQ;
            const size_t qrow = ((size_t)bi * p.nh + h) * p.t + i0;
            __syncthreads(); // the last tile's reads are done
            lc_load_tile(qs, q + qrow * hs, nq, hs, ld);
            lc_load_tile(dos, dout + qrow * hs, nq, hs, ld);
            for (int r = threadIdx.x; r < LC_BQ; r += LC_THREADS) {
                ls[r] = r < nq ? lse[qrow + r] : INFINITY;
                dsm[r] = r < nq ? dsum[qrow + r] : 0.0f;
            }
            __syncthreads();
            float s[4][4], dp[4][4];
            lc_tile_abt(s, qs, ks, hs, ld, ty, tx);
            lc_tile_abt(dp, dos, vs, hs, ld, ty, tx);
            for (int r = 0; r < 4; r++) {
                const int row = 4 * ty + r;
                int lo = 0, hi = 0;
                if (row < nq) lc_visible(p, docs, bi, i0 + row, &lo, &hi);
                for (int c = 0; c < 4; c++) {
                    int j = j0 + tx + 8 * c;
                    float pr = (j >= lo && j < hi) ? expf(s[r][c] * p.scale - ls[row]) : 0.0f;
                    pss[row * pld + tx + 8 * c] = pr;
                    dss[row * pld + tx + 8 * c] = pr * (dp[r][c] - dsm[row]);
                }
            }
            __syncthreads();
            // keys 4·ty + r of this tile: dv += pᵀ dO, dk += dsᵀ q
            lc_tile_acc(av, pss, pld, 1, dos, LC_BQ, hs, ld, ty, tx);
            lc_tile_acc(ak, dss, pld, 1, qs, LC_BQ, hs, ld, ty, tx);
        }
    }
    for (int r = 0; r < 4; r++) {
        const int j = 4 * ty + r;
        if (j >= nk) continue;
        for (int c = 0; c < LC_CPT; c++) {
            int d = tx + 8 * c;
            if (d < hs) {
                lc_store(&dk[(krow + j) * hs + d], ak[r][c] * p.scale);
                lc_store(&dv[(krow + j) * hs + d], av[r][c]);
            }
        }
    }
}

// dsum = rowsum(dO ⊙ O) in f32, the dq and dk/dv kernels' D; launched before them, per
// (b, h, 32 queries) like the forward. The 8 threads of row group ty take rows 8·r + ty,
// each summing columns tx + 8c; lc_row_sum adds their parts in a fixed order.
template <typename T>
LC_DEVICE void lc_bwd_dsum(const T* o, const T* dout, float* dsum, LcParams p) {
    const int i0 = blockIdx.x * LC_BQ, nq = p.t - i0 < LC_BQ ? p.t - i0 : LC_BQ;
    const size_t row0 = ((size_t)blockIdx.z * p.nh + blockIdx.y) * p.t + i0;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    for (int r = 0; r < LC_BQ / 8; r++) {
        const int i = 8 * r + ty;
        float acc = 0.0f;
        if (i < nq) {
            const size_t at = (row0 + i) * p.hs;
            for (int d = tx; d < p.hs; d += 8) acc += lc_load(dout[at + d]) * lc_load(o[at + d]);
        }
        acc = lc_row_sum(acc); // every thread of the warp takes part in the shuffles
        if (i < nq && tx == 0) dsum[row0 + i] = acc;
    }
}

#define LC_KERNELS(NAME, T)                                                                                            \
    LC_KERNEL lc_flash_fwd_##NAME(const T* q, const T* k, const T* v, T* o, float* lse, const unsigned* docs,          \
                                  LcParams p) {                                                                        \
        lc_fwd<T>(q, k, v, o, lse, docs, p);                                                                           \
    }                                                                                                                  \
    LC_KERNEL lc_flash_bwd_dsum_##NAME(const T* o, const T* dout, float* dsum, LcParams p) {                           \
        lc_bwd_dsum<T>(o, dout, dsum, p);                                                                              \
    }                                                                                                                  \
    LC_KERNEL lc_flash_bwd_dq_##NAME(const T* q, const T* k, const T* v, const T* dout, const float* lse,              \
                                     const float* dsum, T* dq, const unsigned* docs, LcParams p) {                     \
        lc_bwd_dq<T>(q, k, v, dout, lse, dsum, dq, docs, p);                                                           \
    }                                                                                                                  \
    LC_KERNEL lc_flash_bwd_dkv_##NAME(const T* q, const T* k, const T* v, const T* dout, const float* lse,             \
                                      const float* dsum, T* dk, T* dv, const unsigned* docs, LcParams p) {             \
        lc_bwd_dkv<T>(q, k, v, dout, lse, dsum, dk, dv, docs, p);                                                      \
    }

LC_KERNELS(f32, float)
LC_KERNELS(bf16, lc_bf16)
LC_KERNELS(f16, lc_f16)
