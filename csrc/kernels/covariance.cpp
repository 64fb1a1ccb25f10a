#include "covariance.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "blas.hpp"

namespace pycompress {

Blas& blas() {
    static Blas instance;
    return instance;
}

namespace {
// Rows per SYRK call: large enough for BLAS to reach its peak rate and to make
// the O(dim^2) per-chunk merge negligible, small enough that the centred copy
// stays about 16 MB and float32 partial sums cover few rows before they are
// folded into the float64 state.
int64_t chunk_rows(int64_t dim) {
    const int64_t rows = (int64_t{16} << 20) / (4 * dim);
    return std::max<int64_t>(1024, std::min<int64_t>(rows, 16384));
}
}  // namespace

CovarianceAccumulator::CovarianceAccumulator(int64_t dim)
    : dim_(dim), mean_(static_cast<size_t>(dim), 0.0), m2_(static_cast<size_t>(dim * dim), 0.0) {
    if (dim <= 0) throw std::invalid_argument("covariance dimension must be positive");
}

void CovarianceAccumulator::update_f32(const float* block, int64_t rows) { update_impl(block, rows); }
void CovarianceAccumulator::update_f64(const double* block, int64_t rows) { update_impl(block, rows); }

namespace {
// The O(rows x dim) sweeps around the SYRK. Built for AVX2 and for the
// baseline ISA (GCC picks at load time), so wheels stay portable. No OpenMP:
// the BLAS call already uses every core, and two spinning thread pools on the
// same cores slow each other down (measured).
template <typename T>
__attribute__((target_clones("avx2", "default")))
void column_mean(const T* __restrict x, int64_t n, int64_t d, double* __restrict m) {
    std::fill(m, m + d, 0.0);
    for (int64_t r = 0; r < n; ++r) {
        const T* __restrict row = x + r * d;
        for (int64_t j = 0; j < d; ++j) m[j] += static_cast<double>(row[j]);
    }
    const double inv_n = 1.0 / static_cast<double>(n);
    for (int64_t j = 0; j < d; ++j) m[j] *= inv_n;
}

// out = x - shift (in float64, stored as Out); returns the column sums of it.
template <typename T, typename Out>
__attribute__((target_clones("avx2", "default")))
void shift_rows(const T* __restrict x, int64_t n, int64_t d, const double* __restrict shift,
                Out* __restrict out, double* __restrict sums) {
    std::fill(sums, sums + d, 0.0);
    for (int64_t r = 0; r < n; ++r) {
        const T* __restrict row = x + r * d;
        Out* __restrict o = out + r * d;
        for (int64_t j = 0; j < d; ++j) {
            const double v = static_cast<double>(row[j]) - shift[j];
            o[j] = static_cast<Out>(v);
            sums[j] += v;
        }
    }
}
}  // namespace

template <typename T>
void CovarianceAccumulator::update_impl(const T* block, int64_t rows) {
    const Blas& b = blas();
    if (!b.ssyrk || !b.dsyrk) throw std::runtime_error("BLAS routines were not initialised");
    const int64_t d = dim_;
    const int di = static_cast<int>(d);
    // float32 input: the product runs in float32 (the input carries no more
    // digits than that) on data centred in float64, and each chunk's result is
    // folded into the float64 state. float64 input: dsyrk throughout.
    using Work = T;
    std::vector<Work> shifted;
    std::vector<Work> s_work(static_cast<size_t>(d * d));
    std::vector<double> s_d(static_cast<size_t>(d * d));
    std::vector<double> shift(static_cast<size_t>(d)), sums(static_cast<size_t>(d)), mu(static_cast<size_t>(d));

    // Scatter of (x - shift) over n rows into s_d (upper triangle, float64),
    // column sums of (x - shift) into sums. The shifted copy is made in
    // sub-chunks small enough to stay in cache while SYRK reads it, and SYRK
    // accumulates them (beta = 1): the data crosses memory once.
    const int64_t sub = std::max<int64_t>(64, (int64_t{512} << 10) / (static_cast<int64_t>(sizeof(T)) * d));
    std::vector<double> sub_sums(static_cast<size_t>(d));
    auto shifted_scatter = [&](const T* x, int64_t n, const double* shift_ptr) {
        std::fill(sums.begin(), sums.end(), 0.0);
        shifted.resize(static_cast<size_t>(std::min(sub, n) * d));
        for (int64_t s0 = 0; s0 < n; s0 += sub) {
            const int64_t m = std::min(sub, n - s0);
            const int mi = static_cast<int>(m);
            shift_rows(x + s0 * d, m, d, shift_ptr, shifted.data(), sub_sums.data());
            for (int64_t j = 0; j < d; ++j) sums[j] += sub_sums[j];
            const Work one = 1, beta = s0 == 0 ? Work(0) : Work(1);
            if constexpr (sizeof(T) == 4)
                b.ssyrk("U", "N", &di, &mi, &one, shifted.data(), &di, &beta, s_work.data(), &di);
            else
                b.dsyrk("U", "N", &di, &mi, &one, shifted.data(), &di, &beta, s_work.data(), &di);
        }
        for (int64_t c = 0; c < d; ++c)
            for (int64_t r = 0; r <= c; ++r) s_d[c * d + r] = static_cast<double>(s_work[c * d + r]);
    };

    const int64_t chunk = chunk_rows(d);
    for (int64_t start = 0; start < rows; start += chunk) {
        const int64_t n = std::min(chunk, rows - start);
        const T* x = block + start * d;
        // One sweep: shift by the running mean (a good estimate of this
        // chunk's mean once anything has been seen), SYRK, then move the
        // scatter to the chunk's own mean: S = S_shift - n m m^T with m the
        // mean of the shifted rows. Row-major n x d is column-major d x n.
        bool exact = count_ == 0;
        if (!exact) {
            std::copy(mean_.begin(), mean_.end(), shift.begin());
            shifted_scatter(x, n, shift.data());
            for (int64_t j = 0; j < d; ++j) {
                const double m = sums[j] / static_cast<double>(n);
                // The correction cancels digits when the chunk's mean sits far
                // from the running mean (non-stationary data): then centre
                // exactly on the chunk mean instead.
                if (static_cast<double>(n) * m * m > 0.5 * s_d[j * d + j]) { exact = true; break; }
            }
            if (!exact) {
                for (int64_t j = 0; j < d; ++j) mu[j] = sums[j] / static_cast<double>(n);
                for (int64_t c = 0; c < d; ++c)
                    for (int64_t r = 0; r <= c; ++r) s_d[c * d + r] -= static_cast<double>(n) * mu[r] * mu[c];
                for (int64_t j = 0; j < d; ++j) mu[j] += shift[j];
            }
        }
        if (exact) {
            column_mean(x, n, d, mu.data());
            shifted_scatter(x, n, mu.data());
        }
        merge_summary(n, mu, s_d.data());
    }
}

void CovarianceAccumulator::merge_summary(int64_t n, const std::vector<double>& mu, const double* s) {
    const int64_t d = dim_;
    if (n == 0) return;
    if (count_ == 0) {
        count_ = n;
        mean_ = mu;
        for (int64_t c = 0; c < d; ++c)
            for (int64_t r = 0; r <= c; ++r) m2_[c * d + r] = s[c * d + r];
        return;
    }
    const double na = static_cast<double>(count_), nb = static_cast<double>(n);
    const double total = na + nb;
    const double w = na * nb / total;
    std::vector<double> delta(static_cast<size_t>(d));
    for (int64_t j = 0; j < d; ++j) delta[j] = mu[j] - mean_[j];
    for (int64_t c = 0; c < d; ++c)
        for (int64_t r = 0; r <= c; ++r) m2_[c * d + r] += s[c * d + r] + delta[r] * delta[c] * w;
    for (int64_t j = 0; j < d; ++j) mean_[j] += delta[j] * (nb / total);
    count_ += n;
}

void CovarianceAccumulator::merge(const CovarianceAccumulator& other) {
    if (other.dim_ != dim_) throw std::invalid_argument("cannot merge accumulators of different dimension");
    merge_summary(other.count_, other.mean_, other.m2_.data());
}

std::vector<double> CovarianceAccumulator::scatter() const {
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
