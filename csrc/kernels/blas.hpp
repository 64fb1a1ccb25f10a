// BLAS entry points used by the kernels, as plain function pointers.
//
// Why pointers: pycompress does not link a BLAS of its own. The bindings fetch
// the routines of the BLAS that SciPy already ships (scipy.linalg.cython_blas),
// so the kernels run at the machine's BLAS rate with nothing extra to install,
// and this header stays free of Python. Fortran calling convention (all by
// pointer, column-major, LP64 ints).
#pragma once

namespace pycompress {

using ssyrk_t = void (*)(const char* uplo, const char* trans, const int* n, const int* k,
                         const float* alpha, const float* a, const int* lda,
                         const float* beta, float* c, const int* ldc);
using dsyrk_t = void (*)(const char* uplo, const char* trans, const int* n, const int* k,
                         const double* alpha, const double* a, const int* lda,
                         const double* beta, double* c, const int* ldc);
using dgemm_t = void (*)(const char* transa, const char* transb, const int* m, const int* n,
                         const int* k, const double* alpha, const double* a, const int* lda,
                         const double* b, const int* ldb, const double* beta, double* c,
                         const int* ldc);
using dtrsm_t = void (*)(const char* side, const char* uplo, const char* transa,
                         const char* diag, const int* m, const int* n, const double* alpha,
                         const double* a, const int* lda, double* b, const int* ldb);
using dtrmm_t = void (*)(const char* side, const char* uplo, const char* transa,
                         const char* diag, const int* m, const int* n, const double* alpha,
                         const double* a, const int* lda, double* b, const int* ldb);

// OpenBLAS's global thread count (null when the BLAS is not OpenBLAS or the
// symbols were not found): kernels that run their own OpenMP threads set it
// to 1 around their BLAS calls (see BlasThreadsGuard).
using blas_set_threads_t = void (*)(int);
using blas_get_threads_t = int (*)();

struct Blas {
    ssyrk_t ssyrk = nullptr;
    dsyrk_t dsyrk = nullptr;
    dgemm_t dgemm = nullptr;
    dtrsm_t dtrsm = nullptr;
    dtrmm_t dtrmm = nullptr;
    blas_set_threads_t set_num_threads = nullptr;
    blas_get_threads_t get_num_threads = nullptr;
};

// Set once by the bindings at import; the kernels read it.
Blas& blas();

// Runs BLAS single-threaded for its lifetime (when the thread count can be
// set), so that OpenMP threads can each call BLAS on their own block: two
// thread pools spinning on the same cores slow each other down.
class BlasThreadsGuard {
public:
    // threads <= 0: leave the BLAS as it is.
    explicit BlasThreadsGuard(int threads) {
        const Blas& b = blas();
        if (threads > 0 && b.set_num_threads && b.get_num_threads) {
            saved_ = b.get_num_threads();
            if (saved_ != threads) b.set_num_threads(threads);
            active_ = true;
        }
    }
    ~BlasThreadsGuard() {
        const Blas& b = blas();
        if (active_ && b.get_num_threads() != saved_) b.set_num_threads(saved_);
    }
    bool active() const { return active_; }
    BlasThreadsGuard(const BlasThreadsGuard&) = delete;
    BlasThreadsGuard& operator=(const BlasThreadsGuard&) = delete;

private:
    int saved_ = 0;
    bool active_ = false;
};

}  // namespace pycompress
