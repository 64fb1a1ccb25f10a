#include "covariance.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>

#include "blas.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pycompress {

Blas& blas() {
    static Blas instance;
    return instance;
}

namespace {

int64_t l2_cache_bytes() {
    static const int64_t bytes = [] {
        long v = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
        v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        return v > 0 ? static_cast<int64_t>(v) : int64_t{1} << 20;
    }();
    return bytes;
}

// Row stride of the packed panel: dim values, the column of ones, padded to
// 64 bytes so every packed row starts on a cache line.
int64_t packed_ld(int64_t dim, int64_t elem_bytes) {
    const int64_t per_line = 64 / elem_bytes;
    return (dim + 1 + per_line - 1) / per_line * per_line;
}

int64_t env_rows(const char* name) {
    const char* v = std::getenv(name);
    return v ? std::max<int64_t>(1, std::atoll(v)) : 0;
}

}  // namespace

// pack_rows: the packed panel (pack_rows x ld) fills half the L2 cache, so
// the SYRK reads it from cache right after it was written (the data crosses
// memory once). At least 512 rows: each SYRK call reads and writes the
// d x d result once, d^2 bytes against pack_rows * d^2 flops, so below a few
// hundred rows that traffic shows; independent of d.
// fold_rows: rows summed in the input precision before the float64 fold.
// The fold costs one pass over the d^2/2 triangle (~10 d^2 bytes), so it
// needs thousands of rows to vanish against pack_rows * d^2 flops; float32
// partial sums over 4096 rows of shifted data stay near 1e-7 relative.
// PYCOMPRESS_COV_PACK_ROWS / PYCOMPRESS_COV_FOLD_ROWS override (for tuning).
CovarianceBlocking covariance_blocking(int64_t dim, int64_t elem_bytes) {
    const int64_t ld = packed_ld(dim, elem_bytes);
    int64_t pack = std::max<int64_t>(512, l2_cache_bytes() / 2 / (ld * elem_bytes));
    pack = std::min<int64_t>(pack, 4096);
    if (int64_t forced = env_rows("PYCOMPRESS_COV_PACK_ROWS")) pack = forced;
    int64_t fold = std::max<int64_t>(4096, 4 * pack);
    if (int64_t forced = env_rows("PYCOMPRESS_COV_FOLD_ROWS")) fold = std::max(forced, pack);
    fold = (fold + pack - 1) / pack * pack;
    return {pack, fold};
}

CovarianceAccumulator::CovarianceAccumulator(int64_t dim) : dim_(dim) {
    if (dim <= 0) throw std::invalid_argument("covariance dimension must be positive");
    mean_.assign(static_cast<size_t>(dim), 0.0);
    shift_.assign(static_cast<size_t>(dim), 0.0);
    m2_.assign(static_cast<size_t>(dim * dim), 0.0);
}

void CovarianceAccumulator::update_f32(const float* block, int64_t rows, int64_t row_stride) {
    update_impl(block, rows, row_stride);
}
void CovarianceAccumulator::update_f64(const double* block, int64_t rows, int64_t row_stride) {
    update_impl(block, rows, row_stride);
}

void CovarianceAccumulator::check_usable() const {
    if (poisoned_)
        throw std::domain_error("covariance accumulator is unusable: an earlier block held NaN or infinity");
}

namespace {

// Column means of n rows in float64 (the first chunk's, to pick the shift).
template <typename T>
__attribute__((target_clones("avx2", "default")))
void column_mean(const T* __restrict x, int64_t n, int64_t d, int64_t stride, double* __restrict m) {
    std::fill(m, m + d, 0.0);
    for (int64_t r = 0; r < n; ++r) {
        const T* __restrict row = x + r * stride;
        for (int64_t j = 0; j < d; ++j) m[j] += static_cast<double>(row[j]);
    }
    const double inv_n = 1.0 / static_cast<double>(n);
    for (int64_t j = 0; j < d; ++j) m[j] *= inv_n;
}

// out row r = [x_r - shift, 1]: the only sweep over the data besides BLAS's.
// The subtraction is in the input precision; with the shift rounded to it,
// Sterbenz's lemma makes it exact wherever x is within 2x of the shift.
template <typename T>
__attribute__((target_clones("avx2", "default")))
void pack_shifted(const T* __restrict x, int64_t n, int64_t d, int64_t stride, const T* __restrict shift,
                  T* __restrict out, int64_t ld) {
    for (int64_t r = 0; r < n; ++r) {
        const T* __restrict row = x + r * stride;
        T* __restrict o = out + r * ld;
        for (int64_t j = 0; j < d; ++j) o[j] = row[j] - shift[j];
        o[d] = T(1);
    }
}

// The fused fold over the upper triangle, columns [c0, c1):
//     m2 += (sum_t C_t - n m m^T) + w delta delta^T
// with C_t the per-thread partial scatters in the input precision (ldc) and
// m2 float64 (d).
template <typename T>
__attribute__((target_clones("avx2", "default")))
void fold_triangle(const T* const* c, int parts, int64_t ldc, int64_t d, int64_t c0, int64_t c1, double n,
                   const double* __restrict m, double w, const double* __restrict delta, double* __restrict m2) {
    for (int64_t col = c0; col < c1; ++col) {
        double* __restrict mc = m2 + col * d;
        const double nm = n * m[col], wd = w * delta[col];
        const T* __restrict c_first = c[0] + col * ldc;
        for (int64_t r = 0; r <= col; ++r) mc[r] += static_cast<double>(c_first[r]) - nm * m[r] + wd * delta[r];
        for (int t = 1; t < parts; ++t) {
            const T* __restrict ct = c[t] + col * ldc;
            for (int64_t r = 0; r <= col; ++r) mc[r] += static_cast<double>(ct[r]);
        }
    }
}

template <typename T>
void syrk(const int* n, const int* k, const T* beta, const T* a, const int* lda, T* c, const int* ldc) {
    const Blas& b = blas();
    const T one = 1;
    if constexpr (sizeof(T) == 4)
        b.ssyrk("U", "N", n, k, &one, a, lda, beta, c, ldc);
    else
        b.dsyrk("U", "N", n, k, &one, a, lda, beta, c, ldc);
}

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace

// Threading: each OpenMP thread packs and SYRKs its own share of the rows
// into its own partial scatter, with BLAS pinned to one thread; the partials
// meet only in the fold. So the packing sweep runs on every core too, and no
// two thread pools spin on the same cores (OpenMP around a multi-threaded
// BLAS call measured slower). Without OpenMP, or without a way to pin
// OpenBLAS's thread count, one thread packs and BLAS threads the SYRK.
template <typename T>
void CovarianceAccumulator::update_impl(const T* block, int64_t rows, int64_t row_stride) {
    check_usable();
    const Blas& b = blas();
    if (!b.ssyrk || !b.dsyrk) throw std::runtime_error("BLAS routines were not initialised");
    if (rows <= 0) return;
    const int64_t d = dim_;
    if (row_stride < d) throw std::invalid_argument("row stride shorter than the dimension");
    const CovarianceBlocking blk = covariance_blocking(d, sizeof(T));
    const int64_t ld = packed_ld(d, sizeof(T));
    const int n_c = static_cast<int>(d + 1), ld_i = static_cast<int>(ld);
    // Threads: only as many as have at least one full panel of rows each.
    const bool can_pin = b.set_num_threads && b.get_num_threads;
    const int threads = can_pin ? static_cast<int>(std::max<int64_t>(
                                      1, std::min<int64_t>(max_threads(), rows / blk.pack_rows)))
                                : 1;
    BlasThreadsGuard single_blas(threads > 1 ? 1 : 0);
    const int64_t fold_span = blk.fold_rows * threads;
    // Scratch per thread, uninitialised (the first SYRK of a fold has beta = 0).
    std::vector<std::unique_ptr<T[]>> panel(threads), c(threads);
    std::vector<const T*> c_ptr(threads);
    for (int t = 0; t < threads; ++t) {
        panel[t].reset(new T[static_cast<size_t>(std::min(blk.pack_rows, rows) * ld)]);
        c[t].reset(new T[static_cast<size_t>(ld * (d + 1))]);
        c_ptr[t] = c[t].get();
    }
    std::vector<T> shift_t(static_cast<size_t>(d));
    std::vector<double> m(static_cast<size_t>(d)), delta(static_cast<size_t>(d));

    // Scatter and column sums of (x - shift) over n rows into c[t] (thread t
    // takes the t-th contiguous share of the rows; parts <= n / pack_rows, so
    // no share is empty).
    auto shifted_scatter = [&](const T* x, int64_t n, int parts) {
        // The shift is kept rounded to T, so mean = shift + m holds exactly.
        for (int64_t j = 0; j < d; ++j) {
            shift_t[j] = static_cast<T>(shift_[j]);
            shift_[j] = static_cast<double>(shift_t[j]);
        }
        const int64_t share = (n + parts - 1) / parts;
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
        for (int t = 0; t < parts; ++t) {
            const int64_t r0 = std::min(n, t * share), r1 = std::min(n, r0 + share);
            for (int64_t s0 = r0; s0 < r1; s0 += blk.pack_rows) {
                const int64_t k = std::min(blk.pack_rows, r1 - s0);
                const int k_i = static_cast<int>(k);
                pack_shifted(x + s0 * row_stride, k, d, row_stride, shift_t.data(), panel[t].get(), ld);
                const T beta = s0 == r0 ? T(0) : T(1);
                syrk<T>(&n_c, &k_i, &beta, panel[t].get(), &ld_i, c[t].get(), &ld_i);
            }
        }
    };

    bool merged_any = false;
    for (int64_t start = 0; start < rows; start += fold_span) {
        const int64_t n = std::min(fold_span, rows - start);
        const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / blk.pack_rows)));
        const T* x = block + start * row_stride;
        const double nd = static_cast<double>(n);
        if (!has_shift_) {
            column_mean(x, n, d, row_stride, m.data());
            for (int64_t j = 0; j < d; ++j)
                if (!std::isfinite(m[j])) throw std::domain_error("block contains NaN or infinity");
            shift_ = m;
            has_shift_ = true;
        }
        for (int attempt = 0;; ++attempt) {
            shifted_scatter(x, n, parts);
            bool finite = true, drifted = false;
            for (int64_t j = 0; j < d; ++j) {
                double s = 0.0, raw = 0.0;  // column d holds the sums of (x - shift)
                for (int t = 0; t < parts; ++t) {
                    s += static_cast<double>(c_ptr[t][d * ld + j]);
                    raw += static_cast<double>(c_ptr[t][j * ld + j]);
                }
                finite = finite && std::isfinite(s) && std::isfinite(raw);
                m[j] = s / nd;
                // Moving the scatter from the shift to the chunk's mean
                // subtracts n m^2: when that is a sizeable part of the raw
                // diagonal it cancels digits (the data drifted away from the
                // shift), so re-shift on this chunk's own mean and redo it.
                drifted = drifted || nd * m[j] * m[j] > 0.25 * raw;
            }
            if (!finite) {
                if (merged_any) poisoned_ = true;
                throw std::domain_error("block contains NaN or infinity (or values whose squares overflow)");
            }
            if (!drifted || attempt > 0) break;
            column_mean(x, n, d, row_stride, shift_.data());
        }
        // Fold: chunk mean mu = shift + m, Chan merge with the state. Columns
        // are split by triangle area so the threads get equal work.
        const double total = static_cast<double>(count_) + nd;
        const double w = count_ == 0 ? 0.0 : static_cast<double>(count_) * nd / total;
        for (int64_t j = 0; j < d; ++j) delta[j] = count_ == 0 ? 0.0 : shift_[j] + m[j] - mean_[j];
        const int fold_threads = d >= 256 ? threads : 1;
#pragma omp parallel for num_threads(fold_threads) schedule(static, 1) if (fold_threads > 1)
        for (int t = 0; t < fold_threads; ++t) {
            const auto edge = [&](int i) {
                return static_cast<int64_t>(std::llround(static_cast<double>(d) * std::sqrt(static_cast<double>(i) / fold_threads)));
            };
            fold_triangle(c_ptr.data(), parts, ld, d, edge(t), edge(t + 1), nd, m.data(), w, delta.data(), m2_.data());
        }
        if (count_ == 0) {
            for (int64_t j = 0; j < d; ++j) mean_[j] = shift_[j] + m[j];
        } else {
            for (int64_t j = 0; j < d; ++j) mean_[j] += delta[j] * (nd / total);
        }
        count_ += n;
        merged_any = true;
    }
}

void CovarianceAccumulator::merge_summary(int64_t n, const double* mu, const double* s, int64_t ld) {
    check_usable();
    const int64_t d = dim_;
    if (n == 0) return;
    const double na = static_cast<double>(count_), nb = static_cast<double>(n);
    const double total = na + nb;
    const double w = count_ == 0 ? 0.0 : na * nb / total;
    std::vector<double> delta(static_cast<size_t>(d));
    for (int64_t j = 0; j < d; ++j) delta[j] = mu[j] - mean_[j];
    for (int64_t c = 0; c < d; ++c)
        for (int64_t r = 0; r <= c; ++r) m2_[c * d + r] += s[c * ld + r] + delta[r] * delta[c] * w;
    if (count_ == 0) {
        std::copy(mu, mu + d, mean_.begin());
    } else {
        for (int64_t j = 0; j < d; ++j) mean_[j] += delta[j] * (nb / total);
    }
    if (!has_shift_) {
        std::copy(mean_.begin(), mean_.end(), shift_.begin());
        has_shift_ = true;
    }
    count_ += n;
}

void CovarianceAccumulator::merge(const CovarianceAccumulator& other) {
    if (other.dim_ != dim_) throw std::invalid_argument("cannot merge accumulators of different dimension");
    other.check_usable();
    merge_summary(other.count_, other.mean_.data(), other.m2_.data(), dim_);
}

std::vector<double> CovarianceAccumulator::scatter() const {
    check_usable();
    const int64_t d = dim_;
    std::vector<double> out(static_cast<size_t>(d * d));
    for (int64_t c = 0; c < d; ++c)
        for (int64_t r = 0; r <= c; ++r) out[r * d + c] = out[c * d + r] = m2_[c * d + r];
    return out;
}

std::vector<double> CovarianceAccumulator::covariance() const {
    if (count_ < 2) throw std::runtime_error("covariance needs at least 2 rows");
    std::vector<double> out = scatter();
    const double inv = 1.0 / static_cast<double>(count_ - 1);
    for (double& v : out) v *= inv;
    return out;
}

std::vector<double> CovarianceAccumulator::correlation(double floor) const {
    std::vector<double> cov = covariance();
    const int64_t d = dim_;
    std::vector<double> sd(static_cast<size_t>(d));
    for (int64_t j = 0; j < d; ++j) sd[j] = std::sqrt(std::max(cov[j * d + j], 0.0));
    for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) cov[i * d + j] /= std::max(sd[i] * sd[j], floor);
    return cov;
}

}  // namespace pycompress
