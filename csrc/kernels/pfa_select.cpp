#include "pfa_select.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace pycompress {

namespace {
// a >= b - tol * max(1, |b|): "as large as b" up to the tie tolerance.
inline bool ties_or_beats(double a, double b, double rtol) {
    return a >= b - rtol * std::max(1.0, std::fabs(b));
}
}  // namespace

std::vector<int64_t> l1max_removal_order(const double* corr, int64_t c, int64_t n_remove, double tie_rtol) {
    if (c < 0) throw std::invalid_argument("correlation matrix size must be non-negative");
    if (n_remove < 0 || n_remove > c)
        throw std::invalid_argument("n_remove must be in [0, " + std::to_string(c) + "], got " +
                                    std::to_string(n_remove));
    const size_t n = static_cast<size_t>(c);
    // Column L1 norms of |corr| without the diagonal. Rows are summed in
    // index order (contiguous access); the reference does the same.
    std::vector<double> norms(n, 0.0);
    for (size_t i = 0; i < n; ++i) {
        const double* row = corr + i * n;
        for (size_t j = 0; j < n; ++j) {
            const double v = row[j];
            if (!std::isfinite(v)) throw std::invalid_argument("correlation matrix has a non-finite entry");
            if (i != j) norms[j] += std::fabs(v);
        }
    }
    std::vector<char> alive(n, 1);
    std::vector<int64_t> order;
    order.reserve(static_cast<size_t>(n_remove));
    std::vector<size_t> candidates;
    for (int64_t step = 0; step < n_remove; ++step) {
        double best = -1.0;
        for (size_t j = 0; j < n; ++j)
            if (alive[j] && norms[j] > best) best = norms[j];
        candidates.clear();
        for (size_t j = 0; j < n; ++j)
            if (alive[j] && ties_or_beats(norms[j], best, tie_rtol)) candidates.push_back(j);
        size_t chosen = candidates.front();
        if (candidates.size() > 1) {
            // Tie: the larger single coefficient over the remaining filters wins.
            std::vector<double> peak(candidates.size(), 0.0);
            double top = -1.0;
            for (size_t k = 0; k < candidates.size(); ++k) {
                const size_t j = candidates[k];
                for (size_t i = 0; i < n; ++i)
                    if (alive[i] && i != j) peak[k] = std::max(peak[k], std::fabs(corr[i * n + j]));
                top = std::max(top, peak[k]);
            }
            for (size_t k = 0; k < candidates.size(); ++k)
                if (ties_or_beats(peak[k], top, tie_rtol)) {
                    chosen = candidates[k];  // candidates are in index order: the lowest wins
                    break;
                }
        }
        alive[chosen] = 0;
        order.push_back(static_cast<int64_t>(chosen));
        const double* row = corr + chosen * n;
        for (size_t j = 0; j < n; ++j)
            if (alive[j]) norms[j] -= std::fabs(row[j]);
    }
    return order;
}

}  // namespace pycompress
