#include "gp_acquisition.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

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

// k(x_i, c) for all i: Matern 5/2 on pre-scaled coordinates. trainT is d x n
// (scaled by 1/lengthscale) so the inner loop runs over contiguous i.
__attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
void matern_column(const double* __restrict trainT, int64_t n, int64_t d, const double* __restrict c,
                   double outputscale, double* __restrict out) {
    for (int64_t i = 0; i < n; ++i) out[i] = 0.0;
    for (int64_t k = 0; k < d; ++k) {
        const double ck = c[k];
        const double* __restrict row = trainT + k * n;
        for (int64_t i = 0; i < n; ++i) {
            const double diff = ck - row[i];
            out[i] += diff * diff;
        }
    }
    for (int64_t i = 0; i < n; ++i) {
        const double a = kSqrt5 * std::sqrt(out[i]);
        out[i] = outputscale * (1.0 + a + a * a * (1.0 / 3.0)) * exp_nonpositive(-a);
    }
}

double matern_pair(const double* a, const double* b, int64_t d, double outputscale) {
    double r2 = 0.0;
    for (int64_t k = 0; k < d; ++k) r2 += (a[k] - b[k]) * (a[k] - b[k]);
    const double s = kSqrt5 * std::sqrt(r2);
    return outputscale * (1.0 + s + s * s / 3.0) * std::exp(-s);
}

__attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
void three_dots(const double* __restrict v, const double* __restrict beta, const double* __restrict w,
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

// L x = b in place (L row-major lower), for the single incumbent column.
void forward_substitution(const double* chol, int64_t n, double* x) {
    for (int64_t i = 0; i < n; ++i) {
        double s = x[i];
        const double* row = chol + i * n;
        for (int64_t j = 0; j < i; ++j) s -= row[j] * x[j];
        x[i] = s / row[i];
    }
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
    // Measured on 2 cores (tools/bench_acquisition.py): OpenMP over blocks
    // with single-threaded BLAS inside beats one BLAS-threaded solve over all
    // candidates once there are a few blocks, because the Matern sweep and
    // the reductions are parallel too and no two thread pools spin at once.
    const bool can_pin_blas = b.set_num_threads && b.get_num_threads;
    const bool parallel_blocks = nthreads > 1 && nblocks > 1 && can_pin_blas && !std::getenv("PYC_GP_SEQ");
    BlasThreadsGuard single_blas(parallel_blocks || threads == 1 ? 1 : 0);

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

    auto run_block = [&](int64_t blk, std::vector<double>& kc, std::vector<double>& cs) {
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
        if (use_inverse)
            b.dtrmm("L", "L", "N", "N", &ni, &ci, &one, chol_inv.data(), &ni, kc.data(), &ni);
        else
            b.dtrsm("L", "U", "T", "N", &ni, &ci, &one, gp.chol, &ni, kc.data(), &ni);
        for (int64_t j = 0; j < cols; ++j) {
            double vb, vv, vw;
            three_dots(kc.data() + j * n, gp.beta, w.data(), n, &vb, &vv, &vw);
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
            std::vector<double> kc, cs(static_cast<size_t>(d));
#pragma omp for schedule(dynamic, 1)
            for (int64_t blk = 0; blk < nblocks; ++blk) run_block(blk, kc, cs);
        }
#endif
    } else {
        std::vector<double> kc, cs(static_cast<size_t>(d));
        for (int64_t blk = 0; blk < nblocks; ++blk) run_block(blk, kc, cs);
    }
}

}  // namespace pycompress
