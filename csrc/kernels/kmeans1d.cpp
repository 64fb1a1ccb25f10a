#include "kmeans1d.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <utility>

namespace pycompress {

KMeans1D kmeans1d(const float* values, int64_t n, int clusters, int64_t max_iter) {
    if (n < 1) throw std::invalid_argument("kmeans1d needs at least one value");
    if (clusters < 1 || clusters > 256) throw std::invalid_argument("kmeans1d: clusters must be in 1..256");
    if (max_iter < 1) throw std::invalid_argument("kmeans1d: max_iter must be >= 1");
    for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(values[i])) throw std::invalid_argument("kmeans1d: values must be finite");

    // Sort once: (value, position) pairs keep the permutation to scatter labels back.
    std::vector<std::pair<float, int64_t>> sorted(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) sorted[i] = {values[i], i};
    std::sort(sorted.begin(), sorted.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<double> s(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) s[i] = sorted[i].first;

    // prefix[i] = sum of the i smallest values, float64, summed in order (the
    // reference uses np.cumsum, which also sums sequentially: identical bits).
    std::vector<double> prefix(static_cast<size_t>(n) + 1, 0.0);
    for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + s[i];

    const int K = clusters;
    const double lo = s.front(), hi = s.back();
    std::vector<double> c(K);
    if (K == 1) {
        c[0] = lo;
    } else {
        for (int k = 0; k < K; ++k) c[k] = lo + (hi - lo) * k / (K - 1);
    }

    // end[k]: one past the last sorted position of cluster k, for the current centroids.
    std::vector<int64_t> end(K, -1), previous(K, -1);
    // Deviation from "O(n) assignment sweeps" (issue 7): the run boundaries are
    // found by binary search, O(K log n) per iteration, the same partition as a
    // sweep. 1-D Lloyd from a linear init takes thousands of iterations on large
    // layers, and the O(n) sweep made a 1.28M-weight layer take 6.6 s instead of ms.
    auto assign = [&]() {
        auto first = s.begin();
        for (int k = 0; k + 1 < K; ++k) {
            const double mid = (c[k] + c[k + 1]) / 2;
            first = std::upper_bound(first, s.end(), mid);
            end[k] = first - s.begin();
        }
        end[K - 1] = n;
    };
    KMeans1D out;
    for (;;) {
        assign();
        if (end == previous) {  // the partition is a fixed point: Lloyd has converged
            out.converged = true;
            break;
        }
        if (out.iterations == max_iter) break;
        int64_t start = 0;
        for (int k = 0; k < K; ++k) {
            const int64_t count = end[k] - start;
            if (count > 0) {
                const double mean = (prefix[end[k]] - prefix[start]) / static_cast<double>(count);
                // Rounding in the prefix difference must not move a mean outside
                // its run (that would unsort the centroids).
                c[k] = std::min(std::max(mean, s[start]), s[end[k] - 1]);
            }
            start = end[k];
        }
        previous = end;
        ++out.iterations;
    }
    // Either way `end` is the nearest-centroid partition for the final codebook.
    out.codebook.resize(K);
    for (int k = 0; k < K; ++k) out.codebook[k] = static_cast<float>(c[k]);
    out.indices.resize(static_cast<size_t>(n));
    int64_t start = 0;
    for (int k = 0; k < K; ++k) {
        for (int64_t i = start; i < end[k]; ++i) out.indices[sorted[i].second] = static_cast<uint8_t>(k);
        start = end[k];
    }
    return out;
}

}  // namespace pycompress
