// Streaming covariance of row blocks (ALGORITHMS.md 3.3).
//
// Each block is centred on its own mean, its scatter matrix is formed by one
// SYRK, and blocks are merged with Chan et al.'s update
//     n = nA + nB,  d = muB - muA,  M2 = M2A + M2B + d d^T nA nB / n.
// All state is float64 and O(d^2): memory does not depend on the rows seen.
#pragma once
#include <cstdint>
#include <vector>

namespace pycompress {

class CovarianceAccumulator {
public:
    explicit CovarianceAccumulator(int64_t dim);

    // rows x dim, row-major (C order), contiguous.
    void update_f32(const float* block, int64_t rows);
    void update_f64(const double* block, int64_t rows);
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

private:
    template <typename T>
    void update_impl(const T* block, int64_t rows);
    // Merge a centred chunk summary (n rows, mean mu, upper-triangle scatter s).
    void merge_summary(int64_t n, const std::vector<double>& mu, const double* s_upper_colmajor);

    int64_t dim_;
    int64_t count_ = 0;
    std::vector<double> mean_;
    // Scatter stored column-major, upper triangle valid (BLAS "U" convention);
    // the matrix is symmetric so column-major upper == row-major lower.
    std::vector<double> m2_;
};

}  // namespace pycompress
