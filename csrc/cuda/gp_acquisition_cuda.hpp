// The PAC acquisition of csrc/kernels/gp_acquisition.hpp on the GPU: same
// inputs, same outputs (host arrays), candidates on the host or the device.
//
// Deviation from the design (cuBLAS/cuSOLVER triangular solve): the n x n
// inverse factor L^-1 is formed once on the host (n^3/3, n is at most a few
// hundred observations) and one fused kernel applies it to every candidate's
// covariance column and keeps only the three dots (v.beta, v.v, v.w), as the
// CPU kernel does: V (n x M) is never written, and no cuSOLVER is needed.
#pragma once
#include <cstdint>

#include "../kernels/gp_acquisition.hpp"

namespace pycompress::cuda {

void gp_pac_scores_cuda(const GpPosteriorData& gp, const double* candidates, int64_t m, bool candidates_on_device,
                        const double* incumbent, double delta, double var_floor, PacScores out,
                        double* mu_incumbent, double* var_incumbent);

}  // namespace pycompress::cuda
