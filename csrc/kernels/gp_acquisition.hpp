// PAC acquisition of many candidates at once from a fitted GP (ALGORITHMS.md 3.2).
//
// For M candidates C against n observations Theta and the incumbent t^:
//   k(a, b)  = s (1 + sqrt5 r + 5/3 r^2) exp(-sqrt5 r),  r = ||(a - b) / lengthscale||  (Matern 5/2, ARD)
//   V        = L^-1 k(Theta, C)            one triangular solve (dtrsm), L L^T = A = K + Sigma_n
//   mu(c)    = m + V_c . beta              beta = L^-1 (y - m)
//   var(c)   = s - V_c . V_c
//   cov(c)   = k(c, t^) - V_c . w          w = L^-1 k(Theta, t^)
//   z(c)     = (mu(c) - mu(t^) - delta) / sqrt(max(var(c) + var(t^) - 2 cov(c), var_floor))
// The latent (noiseless) posterior, never a joint over the candidates: the
// cost is n^2 M for the solve plus O(n M d) for the covariances.
#pragma once
#include <cstdint>

namespace pycompress {

struct GpPosteriorData {
    int64_t n = 0;                 // observations
    int64_t d = 0;                 // dimensions
    const double* train = nullptr;        // n x d, row-major
    const double* lengthscales = nullptr; // d
    double outputscale = 1.0;             // s
    double mean_constant = 0.0;           // m
    const double* chol = nullptr;         // n x n, row-major, lower triangle used
    const double* beta = nullptr;         // n
};

struct PacScores {
    double* z;
    double* mu;
    double* var;
    double* cov;
};

// Scores M candidates (row-major M x d) against ``incumbent`` (d). Writes M
// values to each output; returns mu(t^) and var(t^) through the pointers.
// threads <= 0: all cores (OpenMP over candidate strips; BLAS, used only for
// L^-1 or the per-block solve, single-threaded when the BLAS allows it).
// With m >= n on AVX-512 / AVX2: candidates in vector lanes, see
// gp_acquisition_lanes.inc; PYCOMPRESS_GP_PATH=columns|avx2 picks the
// per-candidate path / the AVX2 lanes (comparison and tests).
void gp_pac_scores(const GpPosteriorData& gp, const double* candidates, int64_t m,
                   const double* incumbent, double delta, double var_floor, PacScores out,
                   double* mu_incumbent, double* var_incumbent, int threads);

}  // namespace pycompress
