// Streaming covariance on the GPU: the CPU kernel's algorithm (see
// csrc/kernels/covariance.hpp) with the packing, the SYRK (cuBLAS) and the
// float64 fold on the device. The d x d float64 scatter stays on the device;
// count, mean and the shift live on the host (O(d) per fold crosses the bus).
// Blocks may be host memory (copied in) or device memory (read in place, e.g.
// a torch CUDA tensor).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

namespace pycompress::cuda {

class CudaCovariance {
public:
    explicit CudaCovariance(int64_t dim);
    ~CudaCovariance();
    CudaCovariance(const CudaCovariance&) = delete;
    CudaCovariance& operator=(const CudaCovariance&) = delete;

    // rows x dim, row_stride elements between rows, a row's elements
    // contiguous; on_device: the pointer is device memory. Throws
    // std::domain_error on NaN / infinity, with the CPU kernel's semantics.
    void update_f32(const float* block, int64_t rows, int64_t row_stride, bool on_device);
    void update_f64(const double* block, int64_t rows, int64_t row_stride, bool on_device);
    void merge(const CudaCovariance& other);
    void synchronize() const;

    int64_t dim() const { return dim_; }
    int64_t count() const { return count_; }
    const std::vector<double>& mean() const { return mean_; }
    // The scatter's upper triangle, column-major d x d, copied to the host.
    std::vector<double> scatter_upper() const;

private:
    template <typename T>
    void update_impl(const T* block, int64_t rows, int64_t row_stride, bool on_device);
    void check_usable() const;

    int64_t dim_;
    int64_t count_ = 0;
    bool poisoned_ = false;
    bool has_shift_ = false;
    std::vector<double> mean_, shift_;
    struct Device;  // device buffers (keeps CUDA types out of this header)
    std::unique_ptr<Device> dev_;
};

}  // namespace pycompress::cuda
