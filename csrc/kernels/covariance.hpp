// Streaming covariance of row blocks (ALGORITHMS.md 3.3).
//
// Rows are shifted by a fixed vector (the first chunk's mean, rounded to the
// input precision) while they are packed for BLAS, and one SYRK in the input
// precision forms the scatter of the shifted rows together with their column
// sums (a column of ones is appended to the packed panel). Every `fold_rows`
// rows that partial result is moved to the chunk's own mean and merged into
// the float64 state with Chan et al.'s update
//     n = nA + nB,  d = muB - muA,  M2 = M2A + M2B + d d^T nA nB / n,
// fused into one pass over the triangle. All state is float64 and O(d^2):
// memory does not depend on the rows seen.
#pragma once
#include <cstdint>
#include <vector>

namespace pycompress {

// Rows per SYRK call and rows per float64 fold for a given dimension and
// element size, from the L2 cache size (see covariance.cpp for the reasoning).
struct CovarianceBlocking {
    int64_t pack_rows;
    int64_t fold_rows;
};
CovarianceBlocking covariance_blocking(int64_t dim, int64_t elem_bytes);

class CovarianceAccumulator {
public:
    explicit CovarianceAccumulator(int64_t dim);

    // rows x dim, row-major with `row_stride` elements between rows (>= dim);
    // the elements of a row are contiguous. Throws std::domain_error on NaN or
    // infinity: the accumulator is then unchanged when the bad value was in
    // the first fold_rows rows of the call, else it refuses further use.
    void update_f32(const float* block, int64_t rows, int64_t row_stride);
    void update_f64(const double* block, int64_t rows, int64_t row_stride);
    void merge(const CovarianceAccumulator& other);

    int64_t dim() const { return dim_; }
    int64_t count() const { return count_; }
    const std::vector<double>& mean() const { return mean_; }
    // Full symmetric scatter matrix sum (x - mean)(x - mean)^T, dim x dim.
    std::vector<double> scatter() const;
    // Unbiased covariance (divides by count - 1); needs count >= 2.
    std::vector<double> covariance() const;
    // Pearson correlation cov_ij / max(sqrt(var_i var_j), floor).
    std::vector<double> correlation(double floor) const;

    // Merge a chunk summary computed elsewhere (n rows, mean mu, scatter s
    // column-major with leading dimension ld, upper triangle read). Used by
    // the CUDA kernel, which forms the chunk scatter on the device.
    void merge_summary(int64_t n, const double* mu, const double* s_upper_colmajor, int64_t ld);

private:
    template <typename T>
    void update_impl(const T* block, int64_t rows, int64_t row_stride);
    void check_usable() const;

    int64_t dim_;
    int64_t count_ = 0;
    bool poisoned_ = false;
    std::vector<double> mean_;
    // The fixed shift, set from the first chunk; moved only when a chunk's
    // mean has drifted so far that the shifted scatter would cancel digits.
    std::vector<double> shift_;
    bool has_shift_ = false;
    // Scatter stored column-major, upper triangle valid (BLAS "U" convention);
    // the matrix is symmetric so column-major upper == row-major lower.
    std::vector<double> m2_;
};

}  // namespace pycompress
