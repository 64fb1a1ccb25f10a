// PFA filter selection, "L1 max" (ALGORITHMS.md 3.3).
//
// Given a C x C correlation matrix of a layer's responses, repeatedly remove
// the filter whose column of |correlation| (diagonal ignored) has the largest
// L1 norm over the filters still present. Removing filter r leaves every
// other coefficient unchanged, so each column norm only loses |corr(r, j)|:
// the norms are kept as running sums, O(C^2) to start and O(C) per removal,
// O(C^2) in total instead of O(C^2) per removal.
// Ties (norms equal within tie_rtol, relative) go to the filter with the
// larger single coefficient over the remaining filters, then to the lowest
// index. The tolerance makes the choice independent of summation order, so
// the compiled kernel and the numpy reference agree.
#pragma once
#include <cstdint>
#include <vector>

namespace pycompress {

// Relative tolerance under which two norms (or two coefficients) tie. Far
// above float64 summation noise on C <= 10^5, far below any real difference.
constexpr double PFA_TIE_RTOL = 1e-9;

// corr: c x c, row-major, finite. Returns the n_remove (0 <= n_remove <= c)
// removed filters in removal order.
std::vector<int64_t> l1max_removal_order(const double* corr, int64_t c, int64_t n_remove, double tie_rtol);

}  // namespace pycompress
