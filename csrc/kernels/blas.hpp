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

struct Blas {
    ssyrk_t ssyrk = nullptr;
    dsyrk_t dsyrk = nullptr;
    dgemm_t dgemm = nullptr;
    dtrsm_t dtrsm = nullptr;
};

// Set once by the bindings at import; the kernels read it.
Blas& blas();

}  // namespace pycompress
