#include "gp_acquisition_cuda.hpp"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "cuda_util.hpp"

namespace pycompress::cuda {

namespace {

constexpr double kSqrt5 = 2.23606797749978969641;
constexpr int kTile = 8;  // outputs of V per register tile (n is padded to a multiple)

__host__ __device__ inline double matern52_r2(double r2, double outputscale) {
    const double a = kSqrt5 * sqrt(r2);
    return outputscale * (1.0 + a + a * a * (1.0 / 3.0)) * exp(-a);
}

// kv[i * ldk + j] = k(theta_i, c_j) for the chunk's candidates; cov_raw[j] = k(c_j, t^).
// train and inc are already divided by the lengthscales.
__global__ void matern_columns(const double* __restrict__ cand, int64_t count, int64_t d,
                               const double* __restrict__ inv_l, const double* __restrict__ train, int64_t n,
                               const double* __restrict__ inc, double outputscale, double* __restrict__ kv,
                               int64_t ldk, double* __restrict__ cov_raw) {
    const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (j >= count) return;
    const double* c = cand + j * d;
    for (int64_t i = 0; i < n; ++i) {
        double r2 = 0.0;
        for (int64_t k = 0; k < d; ++k) {
            const double diff = c[k] * __ldg(inv_l + k) - __ldg(train + i * d + k);
            r2 += diff * diff;
        }
        kv[i * ldk + j] = matern52_r2(r2, outputscale);
    }
    double r2 = 0.0;
    for (int64_t k = 0; k < d; ++k) {
        const double diff = c[k] * __ldg(inv_l + k) - __ldg(inc + k);
        r2 += diff * diff;
    }
    cov_raw[j] = matern52_r2(r2, outputscale);
}

// v = L^-1 k_j in register tiles of kTile outputs, reduced at once into the
// three dots; then the scores. linv is n_pad x n row-major, zero above the
// diagonal and in the padded rows; beta and w are padded with zeros.
__global__ void tri_dots_scores(const double* __restrict__ kv, int64_t ldk, int64_t count, int64_t n,
                                int64_t n_pad, const double* __restrict__ linv, const double* __restrict__ beta,
                                const double* __restrict__ w, const double* __restrict__ cov_raw,
                                double mean_constant, double outputscale, double mu_hat, double var_hat,
                                double delta, double var_floor, double* __restrict__ z, double* __restrict__ mu,
                                double* __restrict__ var, double* __restrict__ cov) {
    const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (j >= count) return;
    double vb = 0.0, vv = 0.0, vw = 0.0;
    for (int64_t i0 = 0; i0 < n_pad; i0 += kTile) {
        double acc[kTile];
#pragma unroll
        for (int t = 0; t < kTile; ++t) acc[t] = 0.0;
        const int64_t kmax = n < i0 + kTile ? n : i0 + kTile;
        for (int64_t k = 0; k < kmax; ++k) {
            const double x = kv[k * ldk + j];
#pragma unroll
            for (int t = 0; t < kTile; ++t) acc[t] += __ldg(linv + (i0 + t) * n + k) * x;
        }
#pragma unroll
        for (int t = 0; t < kTile; ++t) {
            vb += acc[t] * __ldg(beta + i0 + t);
            vv += acc[t] * acc[t];
            vw += acc[t] * __ldg(w + i0 + t);
        }
    }
    const double m = mean_constant + vb;
    const double v = outputscale - vv;
    const double c = cov_raw[j] - vw;
    const double spread = fmax(v + var_hat - 2.0 * c, var_floor);
    mu[j] = m;
    var[j] = v;
    cov[j] = c;
    z[j] = (m - mu_hat - delta) / sqrt(spread);
}

struct Workspace {
    std::mutex lock;
    DeviceBuffer<double> cand, inv_l, train, inc, kv, linv, beta, w, cov_raw, outputs;
};

Workspace& workspace() {
    static Workspace ws;
    return ws;
}

double matern_host(const double* a, const double* b, int64_t d, double outputscale) {
    double r2 = 0.0;
    for (int64_t k = 0; k < d; ++k) r2 += (a[k] - b[k]) * (a[k] - b[k]);
    return matern52_r2(r2, outputscale);
}

void upload(double* dst, const double* src, size_t count) {
    check(cudaMemcpy(dst, src, count * sizeof(double), cudaMemcpyHostToDevice), "cudaMemcpy (to device)");
}

}  // namespace

void gp_pac_scores_cuda(const GpPosteriorData& gp, const double* candidates, int64_t m, bool candidates_on_device,
                        const double* incumbent, double delta, double var_floor, PacScores out,
                        double* mu_incumbent, double* var_incumbent) {
    const int64_t n = gp.n, d = gp.d;
    if (n <= 0 || d <= 0) throw std::invalid_argument("the GP needs at least one observation and one dimension");
    std::vector<double> inv_l(static_cast<size_t>(d)), train(static_cast<size_t>(n * d)), inc(static_cast<size_t>(d));
    for (int64_t k = 0; k < d; ++k) {
        if (!(gp.lengthscales[k] > 0.0)) throw std::invalid_argument("lengthscales must be positive");
        inv_l[k] = 1.0 / gp.lengthscales[k];
        inc[k] = incumbent[k] * inv_l[k];
    }
    for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < d; ++k) train[i * d + k] = gp.train[i * d + k] * inv_l[k];

    // L^-1 by forward substitution, column by column (row-major, padded rows zero).
    const int64_t n_pad = (n + kTile - 1) / kTile * kTile;
    std::vector<double> linv(static_cast<size_t>(n_pad * n), 0.0);
    for (int64_t c = 0; c < n; ++c) {
        for (int64_t i = c; i < n; ++i) {
            double s = i == c ? 1.0 : 0.0;
            const double* row = gp.chol + i * n;
            for (int64_t k = c; k < i; ++k) s -= row[k] * linv[k * n + c];
            linv[i * n + c] = s / row[i];
        }
    }
    // The incumbent on the host: w = L^-1 k(Theta, t^), mu(t^), var(t^).
    std::vector<double> w(static_cast<size_t>(n_pad), 0.0), beta(static_cast<size_t>(n_pad), 0.0);
    std::copy(gp.beta, gp.beta + n, beta.begin());
    std::vector<double> k_inc(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) k_inc[i] = matern_host(train.data() + i * d, inc.data(), d, gp.outputscale);
    double mu_hat = gp.mean_constant, var_hat = gp.outputscale;
    for (int64_t i = 0; i < n; ++i) {
        double s = 0.0;
        for (int64_t k = 0; k <= i; ++k) s += linv[i * n + k] * k_inc[k];
        w[i] = s;
        mu_hat += s * gp.beta[i];
        var_hat -= s * s;
    }
    *mu_incumbent = mu_hat;
    *var_incumbent = var_hat;
    if (m <= 0) return;

    Workspace& ws = workspace();
    std::lock_guard<std::mutex> guard(ws.lock);
    upload(ws.inv_l.reserve(d), inv_l.data(), d);
    upload(ws.train.reserve(n * d), train.data(), n * d);
    upload(ws.inc.reserve(d), inc.data(), d);
    upload(ws.linv.reserve(n_pad * n), linv.data(), n_pad * n);
    upload(ws.beta.reserve(n_pad), beta.data(), n_pad);
    upload(ws.w.reserve(n_pad), w.data(), n_pad);
    // Candidates per launch: the kv scratch (n x chunk) at most 256 MB.
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(m, (int64_t{1} << 25) / n));
    double* kv = ws.kv.reserve(static_cast<size_t>(n * chunk));
    double* cov_raw = ws.cov_raw.reserve(chunk);
    double* outs = ws.outputs.reserve(static_cast<size_t>(4 * chunk));
    double* cand_dev = candidates_on_device ? nullptr : ws.cand.reserve(static_cast<size_t>(chunk * d));
    const int threads = 128;
    for (int64_t s0 = 0; s0 < m; s0 += chunk) {
        const int64_t count = std::min(chunk, m - s0);
        const double* c = candidates + s0 * d;
        if (!candidates_on_device) {
            upload(cand_dev, c, static_cast<size_t>(count * d));
            c = cand_dev;
        }
        const unsigned blocks = static_cast<unsigned>((count + threads - 1) / threads);
        matern_columns<<<blocks, threads>>>(c, count, d, ws.inv_l.get(), ws.train.get(), n, ws.inc.get(),
                                            gp.outputscale, kv, chunk, cov_raw);
        check(cudaGetLastError(), "matern_columns");
        tri_dots_scores<<<blocks, threads>>>(kv, chunk, count, n, n_pad, ws.linv.get(), ws.beta.get(), ws.w.get(),
                                             cov_raw, gp.mean_constant, gp.outputscale, mu_hat, var_hat, delta,
                                             var_floor, outs, outs + chunk, outs + 2 * chunk, outs + 3 * chunk);
        check(cudaGetLastError(), "tri_dots_scores");
        double* dst[4] = {out.z, out.mu, out.var, out.cov};
        for (int q = 0; q < 4; ++q)
            check(cudaMemcpy(dst[q] + s0, outs + q * chunk, count * sizeof(double), cudaMemcpyDeviceToHost),
                  "cudaMemcpy (scores)");
    }
}

}  // namespace pycompress::cuda
