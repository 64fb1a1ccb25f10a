// Small helpers shared by the CUDA kernels: error checks that throw, device
// buffers that free themselves, and cuBLAS loaded at run time.
//
// Why cuBLAS is loaded with dlopen and not linked: the build machines have
// nvcc and the CUDA runtime but no cuBLAS, and a GPU machine gets cuBLAS from
// wherever its torch came from (the nvidia-cublas wheel, or the toolkit). The
// module then compiles and links with the runtime alone, and the four
// routines it needs have had the same C ABI since CUDA 6.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

namespace pycompress::cuda {

inline void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Number of visible devices; 0 (and the reason in *why) when there is none or
// the driver cannot run this build.
int device_count(std::string* why);

// A device allocation that only grows (cudaMalloc is slow: callers keep these
// across calls instead of allocating per call).
template <typename T>
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() {
        if (ptr_) cudaFree(ptr_);
    }
    T* reserve(size_t count) {
        if (count > capacity_) {
            if (ptr_) check(cudaFree(ptr_), "cudaFree");
            ptr_ = nullptr;
            capacity_ = 0;
            check(cudaMalloc(reinterpret_cast<void**>(&ptr_), count * sizeof(T)), "cudaMalloc");
            capacity_ = count;
        }
        return ptr_;
    }
    T* get() const { return ptr_; }

private:
    T* ptr_ = nullptr;
    size_t capacity_ = 0;
};

// The cuBLAS routines used, by pointer (cuBLAS v2 API, column-major).
struct Cublas {
    using handle_t = void*;
    using create_t = int (*)(handle_t*);
    using destroy_t = int (*)(handle_t);
    using ssyrk_t = int (*)(handle_t, int uplo, int trans, int n, int k, const float* alpha, const float* a,
                            int lda, const float* beta, float* c, int ldc);
    using dsyrk_t = int (*)(handle_t, int uplo, int trans, int n, int k, const double* alpha, const double* a,
                            int lda, const double* beta, double* c, int ldc);
    static constexpr int kFillUpper = 1;  // CUBLAS_FILL_MODE_UPPER
    static constexpr int kOpN = 0;        // CUBLAS_OP_N

    create_t create = nullptr;
    destroy_t destroy = nullptr;
    ssyrk_t ssyrk = nullptr;
    dsyrk_t dsyrk = nullptr;
    handle_t handle = nullptr;
    std::string library;  // the path that was loaded
};

// Tries each name or path in turn (dlopen); returns "" on success, else why
// none could be used. Loaded once per process; later calls return the state.
std::string load_cublas(const std::vector<std::string>& candidates);
// The loaded routines with a handle; throws when load_cublas did not succeed.
Cublas& cublas();

}  // namespace pycompress::cuda
