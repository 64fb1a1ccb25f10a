#include "covariance_cuda.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "cuda_util.hpp"

namespace pycompress::cuda {

namespace {

// Rows per SYRK and per float64 fold. The GPU has no cache to fit: one panel
// per fold, large enough that the d^2 fold and the launch costs vanish
// against fold_rows * d^2 flops; float32 partial sums over 8192 rows of
// shifted data stay within ~2e-7 relative (the CPU kernel uses 4096 per thread).
constexpr int64_t kFoldRows = 8192;

int64_t padded_ld(int64_t dim) { return (dim + 1 + 31) / 32 * 32; }

// out row r = [x_r - shift, 1] (the ones column gives the column sums).
template <typename T>
__global__ void pack_shifted(const T* __restrict__ x, int64_t rows, int64_t d, int64_t stride,
                             const T* __restrict__ shift, T* __restrict__ out, int64_t ld) {
    const int64_t r = blockIdx.y;
    for (int64_t j = blockIdx.x * blockDim.x + threadIdx.x; j <= d; j += int64_t(gridDim.x) * blockDim.x) {
        if (r < rows) out[r * ld + j] = j < d ? x[r * stride + j] - shift[j] : T(1);
    }
}

// Column sums in float64: row group blockIdx.y sums every gridDim.y-th row.
template <typename T>
__global__ void column_sums(const T* __restrict__ x, int64_t rows, int64_t d, int64_t stride, double* __restrict__ out) {
    const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (j >= d) return;
    double acc = 0.0;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) acc += static_cast<double>(x[r * stride + j]);
    atomicAdd(out + j, acc);
}

// The sums column (c[d*ld + j]) and the diagonal (c[j*ld + j]) as float64.
template <typename T>
__global__ void gather_sums_diag(const T* __restrict__ c, int64_t d, int64_t ld, double* __restrict__ out) {
    const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (j < d) {
        out[j] = static_cast<double>(c[d * ld + j]);
        out[d + j] = static_cast<double>(c[j * ld + j]);
    }
}

// m2 += (C - n m m^T) + w delta delta^T over the upper triangle (r <= col).
// md holds m (d values) then delta (d values).
template <typename T>
__global__ void fold_triangle(const T* __restrict__ c, int64_t ldc, int64_t d, double n,
                              const double* __restrict__ md, double w, double* __restrict__ m2) {
    const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    const int64_t col = blockIdx.y * int64_t(blockDim.y) + threadIdx.y;
    if (col >= d || r > col) return;
    const double* m = md;
    const double* delta = md + d;
    m2[col * d + r] += static_cast<double>(c[col * ldc + r]) - n * m[r] * m[col] + w * delta[r] * delta[col];
}

}  // namespace

struct CudaCovariance::Device {
    DeviceBuffer<double> m2;           // d x d, upper triangle
    DeviceBuffer<unsigned char> in;    // staging copy of host rows
    DeviceBuffer<unsigned char> panel; // packed rows, fold_rows x ld
    DeviceBuffer<unsigned char> c;     // SYRK result, (d + 1) x ld
    DeviceBuffer<unsigned char> shift; // d values in the input type
    DeviceBuffer<double> small;        // 2d: m / delta, or sums / diagonal
};

CudaCovariance::CudaCovariance(int64_t dim) : dim_(dim), dev_(new Device) {
    if (dim <= 0) throw std::invalid_argument("covariance dimension must be positive");
    mean_.assign(static_cast<size_t>(dim), 0.0);
    shift_.assign(static_cast<size_t>(dim), 0.0);
    double* m2 = dev_->m2.reserve(static_cast<size_t>(dim * dim));
    check(cudaMemset(m2, 0, static_cast<size_t>(dim * dim) * sizeof(double)), "cudaMemset");
}

CudaCovariance::~CudaCovariance() = default;

void CudaCovariance::check_usable() const {
    if (poisoned_)
        throw std::domain_error("covariance accumulator is unusable: an earlier block held NaN or infinity");
}

void CudaCovariance::update_f32(const float* block, int64_t rows, int64_t row_stride, bool on_device) {
    update_impl(block, rows, row_stride, on_device);
}
void CudaCovariance::update_f64(const double* block, int64_t rows, int64_t row_stride, bool on_device) {
    update_impl(block, rows, row_stride, on_device);
}

template <typename T>
void CudaCovariance::update_impl(const T* block, int64_t rows, int64_t row_stride, bool on_device) {
    check_usable();
    if (rows <= 0) return;
    const int64_t d = dim_;
    if (row_stride < d) throw std::invalid_argument("row stride shorter than the dimension");
    Cublas& blas = cublas();
    const int64_t ld = padded_ld(d);
    const int64_t fold = std::min(kFoldRows, rows);
    T* panel = reinterpret_cast<T*>(dev_->panel.reserve(static_cast<size_t>(fold * ld) * sizeof(T)));
    T* c = reinterpret_cast<T*>(dev_->c.reserve(static_cast<size_t>((d + 1) * ld) * sizeof(T)));
    T* shift_d = reinterpret_cast<T*>(dev_->shift.reserve(static_cast<size_t>(d) * sizeof(T)));
    double* small = dev_->small.reserve(static_cast<size_t>(2 * d));
    T* staging = on_device ? nullptr
                           : reinterpret_cast<T*>(dev_->in.reserve(static_cast<size_t>(fold * d) * sizeof(T)));
    std::vector<T> shift_t(static_cast<size_t>(d));
    std::vector<double> host(static_cast<size_t>(2 * d)), m(static_cast<size_t>(d)), md(static_cast<size_t>(2 * d));

    bool merged_any = false;
    for (int64_t start = 0; start < rows; start += fold) {
        const int64_t n = std::min(fold, rows - start);
        const double nd = static_cast<double>(n);
        // The rows on the device: in place, or one 2-D copy of the host rows.
        const T* x = block + start * row_stride;
        int64_t stride = row_stride;
        if (!on_device) {
            check(cudaMemcpy2D(staging, d * sizeof(T), x, row_stride * sizeof(T), d * sizeof(T), n,
                               cudaMemcpyHostToDevice), "cudaMemcpy2D (block to device)");
            x = staging;
            stride = d;
        }
        if (!has_shift_) {
            // The first chunk's mean, in float64, is the shift from now on.
            check(cudaMemset(small, 0, d * sizeof(double)), "cudaMemset");
            const dim3 grid(static_cast<unsigned>((d + 255) / 256), static_cast<unsigned>(std::min<int64_t>(n, 64)));
            column_sums<<<grid, 256>>>(x, n, d, stride, small);
            check(cudaGetLastError(), "column_sums");
            check(cudaMemcpy(shift_.data(), small, d * sizeof(double), cudaMemcpyDeviceToHost), "cudaMemcpy (mean)");
            for (double& v : shift_) {
                v /= nd;
                if (!std::isfinite(v)) throw std::domain_error("block contains NaN or infinity");
            }
            has_shift_ = true;
        }
        for (int attempt = 0;; ++attempt) {
            for (int64_t j = 0; j < d; ++j) {
                shift_t[j] = static_cast<T>(shift_[j]);
                shift_[j] = static_cast<double>(shift_t[j]);
            }
            check(cudaMemcpy(shift_d, shift_t.data(), d * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy (shift)");
            const dim3 grid(static_cast<unsigned>(std::min<int64_t>((d + 256) / 256, 65535)), static_cast<unsigned>(n));
            pack_shifted<<<grid, 256>>>(x, n, d, stride, shift_d, panel, ld);
            check(cudaGetLastError(), "pack_shifted");
            const int n_c = static_cast<int>(d + 1), k = static_cast<int>(n), ldi = static_cast<int>(ld);
            const T one = 1, zero = 0;
            int status;
            if constexpr (sizeof(T) == 4)
                status = blas.ssyrk(blas.handle, Cublas::kFillUpper, Cublas::kOpN, n_c, k, &one, panel, ldi, &zero, c, ldi);
            else
                status = blas.dsyrk(blas.handle, Cublas::kFillUpper, Cublas::kOpN, n_c, k, &one, panel, ldi, &zero, c, ldi);
            if (status != 0) throw std::runtime_error("cuBLAS syrk failed with status " + std::to_string(status));
            gather_sums_diag<<<static_cast<unsigned>((d + 255) / 256), 256>>>(c, d, ld, small);
            check(cudaGetLastError(), "gather_sums_diag");
            check(cudaMemcpy(host.data(), small, 2 * d * sizeof(double), cudaMemcpyDeviceToHost), "cudaMemcpy (sums)");
            bool finite = true, drifted = false;
            for (int64_t j = 0; j < d; ++j) {
                const double s = host[j], raw = host[d + j];
                finite = finite && std::isfinite(s) && std::isfinite(raw);
                m[j] = s / nd;
                drifted = drifted || nd * m[j] * m[j] > 0.25 * raw;
            }
            if (!finite) {
                if (merged_any) poisoned_ = true;
                throw std::domain_error("block contains NaN or infinity (or values whose squares overflow)");
            }
            if (!drifted || attempt > 0) break;
            for (int64_t j = 0; j < d; ++j) shift_[j] += m[j];  // re-shift on this chunk's own mean
        }
        const double total = static_cast<double>(count_) + nd;
        const double w = count_ == 0 ? 0.0 : static_cast<double>(count_) * nd / total;
        for (int64_t j = 0; j < d; ++j) {
            md[j] = m[j];
            md[d + j] = count_ == 0 ? 0.0 : shift_[j] + m[j] - mean_[j];
        }
        check(cudaMemcpy(small, md.data(), 2 * d * sizeof(double), cudaMemcpyHostToDevice), "cudaMemcpy (fold)");
        const dim3 tile(32, 8);
        const dim3 grid(static_cast<unsigned>((d + 31) / 32), static_cast<unsigned>((d + 7) / 8));
        fold_triangle<<<grid, tile>>>(c, ld, d, nd, small, w, dev_->m2.get());
        check(cudaGetLastError(), "fold_triangle");
        if (count_ == 0) {
            for (int64_t j = 0; j < d; ++j) mean_[j] = shift_[j] + m[j];
        } else {
            for (int64_t j = 0; j < d; ++j) mean_[j] += md[d + j] * (nd / total);
        }
        count_ += n;
        merged_any = true;
    }
}

namespace {
// m2 += other + w delta delta^T (upper triangle), delta on the device.
__global__ void merge_triangle(const double* __restrict__ other, int64_t d, const double* __restrict__ delta,
                               double w, double* __restrict__ m2) {
    const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    const int64_t col = blockIdx.y * int64_t(blockDim.y) + threadIdx.y;
    if (col >= d || r > col) return;
    m2[col * d + r] += other[col * d + r] + w * delta[r] * delta[col];
}
}  // namespace

void CudaCovariance::merge(const CudaCovariance& other) {
    if (other.dim_ != dim_) throw std::invalid_argument("cannot merge accumulators of different dimension");
    check_usable();
    other.check_usable();
    if (other.count_ == 0) return;
    const int64_t d = dim_;
    const double na = static_cast<double>(count_), nb = static_cast<double>(other.count_);
    const double total = na + nb;
    const double w = count_ == 0 ? 0.0 : na * nb / total;
    std::vector<double> delta(static_cast<size_t>(d));
    for (int64_t j = 0; j < d; ++j) delta[j] = other.mean_[j] - mean_[j];
    double* small = dev_->small.reserve(static_cast<size_t>(2 * d));
    check(cudaMemcpy(small, delta.data(), d * sizeof(double), cudaMemcpyHostToDevice), "cudaMemcpy (delta)");
    const dim3 tile(32, 8);
    const dim3 grid(static_cast<unsigned>((d + 31) / 32), static_cast<unsigned>((d + 7) / 8));
    merge_triangle<<<grid, tile>>>(other.dev_->m2.get(), d, small, w, dev_->m2.get());
    check(cudaGetLastError(), "merge_triangle");
    if (count_ == 0) {
        mean_ = other.mean_;
    } else {
        for (int64_t j = 0; j < d; ++j) mean_[j] += delta[j] * (nb / total);
    }
    if (!has_shift_) {
        shift_ = mean_;
        has_shift_ = true;
    }
    count_ += other.count_;
}

void CudaCovariance::synchronize() const { check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

std::vector<double> CudaCovariance::scatter_upper() const {
    check_usable();
    std::vector<double> out(static_cast<size_t>(dim_ * dim_));
    check(cudaMemcpy(out.data(), dev_->m2.get(), out.size() * sizeof(double), cudaMemcpyDeviceToHost),
          "cudaMemcpy (scatter)");
    return out;
}

}  // namespace pycompress::cuda
