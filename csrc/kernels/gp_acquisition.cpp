#include "gp_acquisition.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <immintrin.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "blas.hpp"

namespace pycompress {

namespace {

constexpr double kSqrt5 = 2.23606797749978969641;

// exp(x) for x <= 0, written so that GCC vectorizes it (glibc's vector exp
// is only declared under -ffast-math, which we do not want for the rest).
// Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, Taylor degree 12
// (truncation < 2e-16 relative), 2^k built in the exponent bits. The
// round-to-nearest of x/ln2 is done by adding 1.5 * 2^52, which also leaves k
// in the low mantissa bits (no float->int64 conversion, absent in AVX2).
inline double exp_nonpositive(double x) {
    x = x < -700.0 ? -700.0 : x;
    const double shifter = 6755399441055744.0;  // 1.5 * 2^52
    const double t = x * 1.4426950408889634074 + shifter;
    const double k = t - shifter;
    const double r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
    double p = 1.0 / 479001600.0;                 // 1/12!
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uint64_t bits;
    std::memcpy(&bits, &t, sizeof bits);
    // Low 12 bits of t's mantissa hold k (two's complement); k + 1023 in [323, 1023].
    const uint64_t scale_bits = (bits + 1023u) << 52;
    double scale;
    std::memcpy(&scale, &scale_bits, sizeof scale);
    return p * scale;
}

// Squared scaled distances r2_i = sum_k (c_k - x_ik)^2. trainT is d x n
// (coordinates already divided by the lengthscales) so i runs contiguously.
inline __attribute__((always_inline))
void sqdist_portable(const double* __restrict trainT, int64_t n, int64_t d, const double* __restrict c,
                     double* __restrict out) {
    for (int64_t i = 0; i < n; ++i) {
        double acc = 0.0;
        for (int64_t k = 0; k < d; ++k) {
            const double diff = c[k] - trainT[k * n + i];
            acc += diff * diff;
        }
        out[i] = acc;
    }
}

// The AVX2 version keeps 16 partial sums in registers across the d
// coordinates (GCC's own vectorization of this loop nest was 4x slower).
__attribute__((target("avx2,fma")))
void sqdist_avx2(const double* __restrict trainT, int64_t n, int64_t d, const double* __restrict c,
                 double* __restrict out) {
    int64_t i0 = 0;
    for (; i0 + 16 <= n; i0 += 16) {
        __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < d; ++k) {
            const __m256d ck = _mm256_broadcast_sd(c + k);
            const double* row = trainT + k * n + i0;
            const __m256d d0 = _mm256_sub_pd(ck, _mm256_loadu_pd(row));
            const __m256d d1 = _mm256_sub_pd(ck, _mm256_loadu_pd(row + 4));
            const __m256d d2 = _mm256_sub_pd(ck, _mm256_loadu_pd(row + 8));
            const __m256d d3 = _mm256_sub_pd(ck, _mm256_loadu_pd(row + 12));
            a0 = _mm256_fmadd_pd(d0, d0, a0);
            a1 = _mm256_fmadd_pd(d1, d1, a1);
            a2 = _mm256_fmadd_pd(d2, d2, a2);
            a3 = _mm256_fmadd_pd(d3, d3, a3);
        }
        _mm256_storeu_pd(out + i0, a0);
        _mm256_storeu_pd(out + i0 + 4, a1);
        _mm256_storeu_pd(out + i0 + 8, a2);
        _mm256_storeu_pd(out + i0 + 12, a3);
    }
    for (; i0 + 4 <= n; i0 += 4) {
        __m256d a0 = _mm256_setzero_pd();
        for (int64_t k = 0; k < d; ++k) {
            const __m256d d0 = _mm256_sub_pd(_mm256_broadcast_sd(c + k), _mm256_loadu_pd(trainT + k * n + i0));
            a0 = _mm256_fmadd_pd(d0, d0, a0);
        }
        _mm256_storeu_pd(out + i0, a0);
    }
    for (int64_t i = i0; i < n; ++i) {
        double acc = 0.0;
        for (int64_t k = 0; k < d; ++k) {
            const double diff = c[k] - trainT[k * n + i];
            acc += diff * diff;
        }
        out[i] = acc;
    }
}

// r2 -> s (1 + a + a^2/3) exp(-a), a = sqrt5 r, in place.
inline __attribute__((always_inline))
void matern_transform(int64_t n, double outputscale, double* __restrict out) {
    for (int64_t i = 0; i < n; ++i) {
        const double a = kSqrt5 * std::sqrt(out[i]);
        out[i] = outputscale * (1.0 + a + a * a * (1.0 / 3.0)) * exp_nonpositive(-a);
    }
}

inline __attribute__((always_inline))
void three_dots_body(const double* __restrict v, const double* __restrict beta, const double* __restrict w,
                     int64_t n, double* dot_beta, double* dot_v, double* dot_w) {
    double a = 0.0, b = 0.0, c = 0.0;
#pragma omp simd reduction(+ : a, b, c)
    for (int64_t i = 0; i < n; ++i) {
        a += v[i] * beta[i];
        b += v[i] * v[i];
        c += v[i] * w[i];
    }
    *dot_beta = a;
    *dot_v = b;
    *dot_w = c;
}

// The same loops compiled for AVX2+FMA and for the baseline ISA, picked once
// by CPU features. (GCC's target_clones("arch=...") dispatches on the CPU
// model name, which virtual machines often hide: it fell back to SSE2 here.)
using MaternFn = void (*)(const double*, int64_t, int64_t, const double*, double, double*);
using DotsFn = void (*)(const double*, const double*, const double*, int64_t, double*, double*, double*);

__attribute__((target("avx2,fma")))
void matern_column_avx2(const double* __restrict trainT, int64_t n, int64_t d, const double* __restrict c,
                        double outputscale, double* __restrict out) {
    sqdist_avx2(trainT, n, d, c, out);
    matern_transform(n, outputscale, out);
}
void matern_column_base(const double* __restrict trainT, int64_t n, int64_t d, const double* __restrict c,
                        double outputscale, double* __restrict out) {
    sqdist_portable(trainT, n, d, c, out);
    matern_transform(n, outputscale, out);
}
__attribute__((target("avx2,fma")))
void three_dots_avx2(const double* __restrict v, const double* __restrict beta, const double* __restrict w,
                     int64_t n, double* a, double* b, double* c) {
    three_dots_body(v, beta, w, n, a, b, c);
}
void three_dots_base(const double* __restrict v, const double* __restrict beta, const double* __restrict w,
                     int64_t n, double* a, double* b, double* c) {
    three_dots_body(v, beta, w, n, a, b, c);
}

bool has_avx2_fma() {
    static const bool yes = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }();
    return yes;
}

void matern_column(const double* trainT, int64_t n, int64_t d, const double* c, double outputscale, double* out) {
    static const MaternFn fn = has_avx2_fma() ? matern_column_avx2 : matern_column_base;
    fn(trainT, n, d, c, outputscale, out);
}

void three_dots(const double* v, const double* beta, const double* w, int64_t n, double* a, double* b, double* c) {
    static const DotsFn fn = has_avx2_fma() ? three_dots_avx2 : three_dots_base;
    fn(v, beta, w, n, a, b, c);
}

double matern_pair(const double* a, const double* b, int64_t d, double outputscale) {
    double r2 = 0.0;
    for (int64_t k = 0; k < d; ++k) r2 += (a[k] - b[k]) * (a[k] - b[k]);
    const double s = kSqrt5 * std::sqrt(r2);
    return outputscale * (1.0 + s + s * s / 3.0) * std::exp(-s);
}

// L x = b in place (L row-major lower), for the single incumbent column.
void forward_substitution(const double* chol, int64_t n, double* x) {
    for (int64_t i = 0; i < n; ++i) {
        double s = x[i];
        const double* row = chol + i * n;
        for (int64_t j = 0; j < i; ++j) s -= row[j] * x[j];
        x[i] = s / row[i];
    }
}

// The three dots of V = L^-1 K for a block of candidates, without forming V:
// for candidate j (kc row j, n values) and each output i,
//     v_ji = sum_{k <= i} Linv_ik kc_jk,
// accumulated into vb_j = v_j . beta, vv_j = v_j . v_j, vw_j = v_j . w.
// linvT is Linv^T row-major with rows padded to np (a multiple of 8, zeros
// past n), beta_p / w_p padded likewise, so padded outputs are 0. Register
// tile: C candidates x 8 outputs (2 x C accumulators), each Linv^T row load
// shared by C candidates; k stops at the tile's diagonal, so the flops are
// the triangular n^2 per candidate. Why not dtrmm: OpenBLAS's dtrmm at
// n ~ 100 ran at ~60% of its large-dgemm rate here, and V would then be
// written and read again for the dots.
template <int C>
__attribute__((target("avx2,fma"), always_inline)) inline
void tri_dots_tile(const double* __restrict kc, int64_t n, const double* __restrict linvT, int64_t np,
                   const double* __restrict beta_p, const double* __restrict w_p, double* vb, double* vv,
                   double* vw) {
    __m256d sb[C], sv[C], sw[C];
    for (int c = 0; c < C; ++c) sb[c] = sv[c] = sw[c] = _mm256_setzero_pd();
    for (int64_t i0 = 0; i0 < np; i0 += 8) {
        __m256d lo[C], hi[C];
        for (int c = 0; c < C; ++c) lo[c] = hi[c] = _mm256_setzero_pd();
        const int64_t kmax = std::min(n, i0 + 8);
        for (int64_t k = 0; k < kmax; ++k) {
            const __m256d l0 = _mm256_loadu_pd(linvT + k * np + i0);
            const __m256d l1 = _mm256_loadu_pd(linvT + k * np + i0 + 4);
            for (int c = 0; c < C; ++c) {
                const __m256d x = _mm256_broadcast_sd(kc + c * n + k);
                lo[c] = _mm256_fmadd_pd(x, l0, lo[c]);
                hi[c] = _mm256_fmadd_pd(x, l1, hi[c]);
            }
        }
        const __m256d b0 = _mm256_loadu_pd(beta_p + i0), b1 = _mm256_loadu_pd(beta_p + i0 + 4);
        const __m256d w0 = _mm256_loadu_pd(w_p + i0), w1 = _mm256_loadu_pd(w_p + i0 + 4);
        for (int c = 0; c < C; ++c) {
            sb[c] = _mm256_fmadd_pd(lo[c], b0, _mm256_fmadd_pd(hi[c], b1, sb[c]));
            sv[c] = _mm256_fmadd_pd(lo[c], lo[c], _mm256_fmadd_pd(hi[c], hi[c], sv[c]));
            sw[c] = _mm256_fmadd_pd(lo[c], w0, _mm256_fmadd_pd(hi[c], w1, sw[c]));
        }
    }
    for (int c = 0; c < C; ++c) {
        alignas(32) double t[4];
        _mm256_store_pd(t, sb[c]);
        vb[c] = (t[0] + t[1]) + (t[2] + t[3]);
        _mm256_store_pd(t, sv[c]);
        vv[c] = (t[0] + t[1]) + (t[2] + t[3]);
        _mm256_store_pd(t, sw[c]);
        vw[c] = (t[0] + t[1]) + (t[2] + t[3]);
    }
}

__attribute__((target("avx2,fma")))
void tri_dots_avx2(const double* kc, int64_t cols, int64_t n, const double* linvT, int64_t np,
                   const double* beta_p, const double* w_p, double* vb, double* vv, double* vw) {
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4)
        tri_dots_tile<4>(kc + j * n, n, linvT, np, beta_p, w_p, vb + j, vv + j, vw + j);
    for (; j < cols; ++j) tri_dots_tile<1>(kc + j * n, n, linvT, np, beta_p, w_p, vb + j, vv + j, vw + j);
}

// What the lane kernels (gp_acquisition_lanes.inc) read; shared read-only by the threads.
struct LanesPlan {
    int64_t n = 0, d = 0, m = 0;
    // Coordinates times sqrt5 / lengthscale, so that squared distances are a^2 = 5 r^2.
    const double* xs = nullptr;                // (n + 1) x d: training points, then the incumbent
    const double* coordinate_scale = nullptr;  // d: sqrt5 / lengthscale
    const double* candidates = nullptr;   // m x d, unscaled
    const double* linv_packed = nullptr;  // L^-1 in row tiles, see pack_linv
    const int64_t* packed_offset = nullptr;
    int64_t row_blocks = 0;
    const double* beta_padded = nullptr;  // row_blocks * R, zeros past n
    const double* w_padded = nullptr;
    double outputscale = 1.0, mean_constant = 0.0, mu_hat = 0.0, var_hat = 0.0, delta = 0.0, var_floor = 0.0;
    PacScores out{};
};

// L^-1 (column-major chol_inv, chol_inv[k n + i] = Linv_ik) packed for tiles
// of R outputs: block b holds, for k < min(n, (b + 1) R), the R values
// Linv_{bR + r, k} (zero above the diagonal and past n) contiguously, so the
// tile's k loop reads one short row per step.
void pack_linv(const std::vector<double>& chol_inv, int64_t n, int rows, std::vector<double>& packed,
               std::vector<int64_t>& offset) {
    const int64_t blocks = (n + rows - 1) / rows;
    offset.assign(static_cast<size_t>(blocks), 0);
    int64_t total = 0;
    for (int64_t b = 0; b < blocks; ++b) {
        offset[b] = total;
        total += std::min(n, (b + 1) * rows) * rows;
    }
    packed.assign(static_cast<size_t>(total), 0.0);
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t kmax = std::min(n, (b + 1) * rows);
        for (int64_t k = 0; k < kmax; ++k)
            for (int r = 0; r < rows; ++r) {
                const int64_t i = b * rows + r;
                if (i < n && k <= i) packed[offset[b] + k * rows + r] = chol_inv[k * n + i];
            }
    }
}

// Distances as (c - x)^2 summed over d, not as ||c||^2 + ||x||^2 - 2 c.x
// with a GEMM: the expanded form would save one subtraction per coordinate,
// which on the machine measured (AMD Zen, separate add and FMA pipes) runs
// beside the FMA, and the distance loop is ~10% of the time (the exp and the
// triangular multiply dominate, perf on 2026-11-29). Its rounding (~1e-14 in
// r^2 at d = 16, so it must be clamped at 0 or sqrt gives NaN next to an
// observation) would have been harmless: k is smooth in r^2 there (checked
// in numpy on tests/test_gp_kernel.py's near-duplicate case: 1e-3 of its
// tolerance).
// Each ISA's copy is compiled for that ISA by a target region (GCC; clang
// spells it as an attribute region, not tried here: the build machines have
// GCC only) and picked at run time by CPU features, as above.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif
namespace lanes_avx512 {
constexpr int kVectors = 2, kRows = 8;  // 16 accumulators of the 32 zmm registers
#define LANES_W 8
#define LANES_SQRT(x) ((vd)_mm512_sqrt_pd((__m512d)(x)))
#define LANES_SET1(x) _mm512_set1_pd(x)
#define LANES_MIN(a, b) _mm512_min_pd(a, (__m512d)(b))
#include "gp_acquisition_lanes.inc"
#undef LANES_W
#undef LANES_SQRT
#undef LANES_SET1
#undef LANES_MIN
}  // namespace lanes_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace lanes_avx2 {
constexpr int kVectors = 2, kRows = 4;  // 8 accumulators of the 16 ymm registers
#define LANES_W 4
#define LANES_SQRT(x) ((vd)_mm256_sqrt_pd((__m256d)(x)))
#define LANES_SET1(x) _mm256_set1_pd(x)
#define LANES_MIN(a, b) _mm256_min_pd(a, (__m256d)(b))
#include "gp_acquisition_lanes.inc"
#undef LANES_W
#undef LANES_SQRT
#undef LANES_SET1
#undef LANES_MIN
}  // namespace lanes_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

bool has_avx512f() {
    static const bool yes = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && has_avx2_fma();
    }();
    return yes;
}

// Candidates per block: the n x B block of V stays near 1 MB (cache), and
// dtrsm still gets enough columns to run at its full rate.
int64_t block_columns(int64_t n) {
    return std::max<int64_t>(64, std::min<int64_t>(1024, (int64_t{1} << 17) / std::max<int64_t>(n, 1)));
}

}  // namespace

void gp_pac_scores(const GpPosteriorData& gp, const double* candidates, int64_t m,
                   const double* incumbent, double delta, double var_floor, PacScores out,
                   double* mu_incumbent, double* var_incumbent, int threads) {
    const Blas& b = blas();
    if (!b.dtrsm) throw std::runtime_error("BLAS routines were not initialised");
    const int64_t n = gp.n, d = gp.d;
    if (n <= 0 || d <= 0) throw std::invalid_argument("the GP needs at least one observation and one dimension");

    // Scaled coordinates: lengthscales enter only through (a - b) / l.
    std::vector<double> inv_l(static_cast<size_t>(d));
    for (int64_t k = 0; k < d; ++k) {
        if (!(gp.lengthscales[k] > 0.0)) throw std::invalid_argument("lengthscales must be positive");
        inv_l[k] = 1.0 / gp.lengthscales[k];
    }
    std::vector<double> trainT(static_cast<size_t>(n * d));
    for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < d; ++k) trainT[k * n + i] = gp.train[i * d + k] * inv_l[k];
    std::vector<double> inc(static_cast<size_t>(d));
    for (int64_t k = 0; k < d; ++k) inc[k] = incumbent[k] * inv_l[k];

    // Incumbent: w = L^-1 k(Theta, t^), mu(t^), var(t^).
    std::vector<double> w(static_cast<size_t>(n));
    matern_column(trainT.data(), n, d, inc.data(), gp.outputscale, w.data());
    forward_substitution(gp.chol, n, w.data());
    double mu_hat = gp.mean_constant, var_hat = gp.outputscale;
    for (int64_t i = 0; i < n; ++i) {
        mu_hat += w[i] * gp.beta[i];
        var_hat -= w[i] * w[i];
    }
    *mu_incumbent = mu_hat;
    *var_incumbent = var_hat;

    const int64_t bcols = block_columns(n);
    const int64_t nblocks = (m + bcols - 1) / bcols;
    const int ni = static_cast<int>(n);
    const double one = 1.0;

    int nthreads = 1;
#ifdef _OPENMP
    nthreads = threads > 0 ? threads : omp_get_max_threads();
#endif
    // OpenMP over candidate blocks, single-threaded BLAS inside each: the
    // Matern sweep and the reductions run in parallel too, and no two thread
    // pools spin on the same cores. Measured on 2 cores against sequential
    // blocks with BLAS's own threads (PYCOMPRESS_GP_BLAS_THREADED=1, kept
    // for tools/bench_acquisition.py): 2-5x faster (docs/pacbo.md).
    const bool can_pin_blas = b.set_num_threads && b.get_num_threads;
    const char* blas_threaded = std::getenv("PYCOMPRESS_GP_BLAS_THREADED");
    const bool parallel_blocks = nthreads > 1 && nblocks > 1 && can_pin_blas &&
                                 !(blas_threaded && *blas_threaded == '1');
    // The lanes path (below) calls BLAS once, for L^-1 (n^3 / 3, small):
    // single-threaded, so that no BLAS thread is left spinning beside the
    // OpenMP threads of the sweep.
    const char* path = std::getenv("PYCOMPRESS_GP_PATH");
    const bool columns_path = path && std::strcmp(path, "columns") == 0;
    const bool use_lanes = m >= n && b.dtrmm && has_avx2_fma() && !columns_path;
    BlasThreadsGuard single_blas(parallel_blocks || threads == 1 || use_lanes ? 1 : 0);

    // V = L^-1 k(Theta, C). OpenBLAS's dtrsm with many right-hand sides runs
    // at 2-15 GFLOP/s here while dtrmm runs at 20-40 (measured, 1 core,
    // n = 50..500): with more candidates than observations, solve once for
    // L^-1 (n^3, the one triangular solve) and apply it with dtrmm to every
    // block; with few candidates, dtrsm on them directly.
    const bool use_inverse = m >= n && b.dtrmm;
    std::vector<double> chol_inv;
    if (use_inverse) {
        chol_inv.assign(static_cast<size_t>(n * n), 0.0);
        for (int64_t i = 0; i < n; ++i) chol_inv[i * n + i] = 1.0;
        // Column-major identity; chol row-major lower == column-major upper of L^T.
        b.dtrsm("L", "U", "T", "N", &ni, &ni, &one, gp.chol, &ni, chol_inv.data(), &ni);
    }
    // Many candidates on AVX-512 or AVX2: candidates in vector lanes, the
    // Matern block of each strip consumed by the triangular multiply while it
    // is in L1 (gp_acquisition_lanes.inc). PYCOMPRESS_GP_PATH=columns keeps
    // the previous per-candidate path below (for comparison, as
    // tools/bench_acquisition.py does); =avx2 the AVX2 lanes where AVX-512
    // exists (so that both are tested on one machine).
    if (use_lanes) {
        const bool wide = has_avx512f() && !(path && std::strcmp(path, "avx2") == 0);
        const int rows = wide ? lanes_avx512::kRows : lanes_avx2::kRows;
        const int64_t strip = wide ? lanes_avx512::kS : lanes_avx2::kS;
        std::vector<double> packed, beta_p, w_p;
        std::vector<int64_t> offset;
        pack_linv(chol_inv, n, rows, packed, offset);
        const int64_t row_blocks = static_cast<int64_t>(offset.size());
        beta_p.assign(static_cast<size_t>(row_blocks * rows), 0.0);
        w_p.assign(static_cast<size_t>(row_blocks * rows), 0.0);
        std::copy(gp.beta, gp.beta + n, beta_p.begin());
        std::copy(w.begin(), w.end(), w_p.begin());
        // The scaled training points and, as row n, the incumbent.
        std::vector<double> scale(static_cast<size_t>(d)), xs(static_cast<size_t>((n + 1) * d));
        for (int64_t k = 0; k < d; ++k) scale[k] = kSqrt5 * inv_l[k];
        for (int64_t i = 0; i < n; ++i)
            for (int64_t k = 0; k < d; ++k) xs[i * d + k] = gp.train[i * d + k] * scale[k];
        for (int64_t k = 0; k < d; ++k) xs[n * d + k] = incumbent[k] * scale[k];
        LanesPlan plan;
        plan.n = n;
        plan.d = d;
        plan.m = m;
        plan.xs = xs.data();
        plan.coordinate_scale = scale.data();
        plan.candidates = candidates;
        plan.linv_packed = packed.data();
        plan.packed_offset = offset.data();
        plan.row_blocks = row_blocks;
        plan.beta_padded = beta_p.data();
        plan.w_padded = w_p.data();
        plan.outputscale = gp.outputscale;
        plan.mean_constant = gp.mean_constant;
        plan.mu_hat = mu_hat;
        plan.var_hat = var_hat;
        plan.delta = delta;
        plan.var_floor = var_floor;
        plan.out = out;
        const auto run = wide ? lanes_avx512::run_strips : lanes_avx2::run_strips;
        const int64_t strips = (m + strip - 1) / strip;
        const size_t scratch = static_cast<size_t>((d + n + 1) * strip);
        // No BLAS call inside: OpenMP threads over chunks of strips (dynamic,
        // so a thread slowed by other work on a shared machine takes fewer).
        constexpr int64_t kChunk = 8;
        const int64_t chunks = (strips + kChunk - 1) / kChunk;
        auto run_chunk = [&](int64_t c, std::vector<double>& buf) {
            run(plan, c * kChunk, std::min(strips, (c + 1) * kChunk), buf.data());
        };
        if (nthreads > 1 && chunks > 1) {
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(nthreads, chunks)))
            {
                std::vector<double> buf(scratch);
#pragma omp for schedule(dynamic, 1)
                for (int64_t c = 0; c < chunks; ++c) run_chunk(c, buf);
            }
#endif
        } else {
            std::vector<double> buf(scratch);
            for (int64_t c = 0; c < chunks; ++c) run_chunk(c, buf);
        }
        return;
    }
    // With AVX2: the fused triangular multiply + dots (tri_dots_avx2) instead
    // of dtrmm; PYCOMPRESS_GP_DTRMM=1 keeps dtrmm (for comparison).
    const char* force_dtrmm = std::getenv("PYCOMPRESS_GP_DTRMM");
    const bool use_fused = use_inverse && has_avx2_fma() && !(force_dtrmm && *force_dtrmm == '1');
    const int64_t np = (n + 7) / 8 * 8;
    std::vector<double> linvT, beta_p, w_p;
    if (use_fused) {
        // Row k of Linv^T is column k of the column-major chol_inv.
        linvT.assign(static_cast<size_t>(n * np), 0.0);
        for (int64_t k = 0; k < n; ++k)
            for (int64_t i = k; i < n; ++i) linvT[k * np + i] = chol_inv[k * n + i];
        beta_p.assign(static_cast<size_t>(np), 0.0);
        w_p.assign(static_cast<size_t>(np), 0.0);
        std::copy(gp.beta, gp.beta + n, beta_p.begin());
        std::copy(w.begin(), w.end(), w_p.begin());
    }

    auto run_block = [&](int64_t blk, std::vector<double>& kc, std::vector<double>& cs, std::vector<double>& dots) {
        const int64_t start = blk * bcols;
        const int64_t cols = std::min(bcols, m - start);
        kc.resize(static_cast<size_t>(n * cols));
        for (int64_t j = 0; j < cols; ++j) {
            const double* c = candidates + (start + j) * d;
            for (int64_t k = 0; k < d; ++k) cs[k] = c[k] * inv_l[k];
            matern_column(trainT.data(), n, d, cs.data(), gp.outputscale, kc.data() + j * n);
            out.cov[start + j] = matern_pair(cs.data(), inc.data(), d, gp.outputscale);
        }
        // kc is n x cols column-major; chol row-major lower == column-major
        // upper of L^T, so "U","T" solves L V = kc; chol_inv is column-major lower.
        const int ci = static_cast<int>(cols);
        if (use_fused) {
            dots.resize(static_cast<size_t>(3 * cols));
            tri_dots_avx2(kc.data(), cols, n, linvT.data(), np, beta_p.data(), w_p.data(), dots.data(),
                          dots.data() + cols, dots.data() + 2 * cols);
        } else if (use_inverse) {
            b.dtrmm("L", "L", "N", "N", &ni, &ci, &one, chol_inv.data(), &ni, kc.data(), &ni);
        } else {
            b.dtrsm("L", "U", "T", "N", &ni, &ci, &one, gp.chol, &ni, kc.data(), &ni);
        }
        for (int64_t j = 0; j < cols; ++j) {
            double vb, vv, vw;
            if (use_fused) {
                vb = dots[j];
                vv = dots[cols + j];
                vw = dots[2 * cols + j];
            } else {
                three_dots(kc.data() + j * n, gp.beta, w.data(), n, &vb, &vv, &vw);
            }
            const int64_t o = start + j;
            const double mu = gp.mean_constant + vb;
            const double var = gp.outputscale - vv;
            const double cov = out.cov[o] - vw;
            const double spread = std::max(var + var_hat - 2.0 * cov, var_floor);
            out.mu[o] = mu;
            out.var[o] = var;
            out.cov[o] = cov;
            out.z[o] = (mu - mu_hat - delta) / std::sqrt(spread);
        }
    };

    if (parallel_blocks) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
        {
            std::vector<double> kc, cs(static_cast<size_t>(d)), dots;
#pragma omp for schedule(dynamic, 1)
            for (int64_t blk = 0; blk < nblocks; ++blk) run_block(blk, kc, cs, dots);
        }
#endif
    } else {
        std::vector<double> kc, cs(static_cast<size_t>(d)), dots;
        for (int64_t blk = 0; blk < nblocks; ++blk) run_block(blk, kc, cs, dots);
    }
}

}  // namespace pycompress
