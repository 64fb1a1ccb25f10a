// 1-D k-means for weight sharing (ALGORITHMS.md 1.5, Deep Compression).
//
// K centroids, linearly initialised between min and max (c_k = lo + (hi - lo) k / (K - 1)),
// then Lloyd iterations until the partition stops changing. In 1-D every cluster
// is a contiguous run of the sorted values, so the values are sorted once and each
// iteration finds the K run boundaries by binary search (value i goes to cluster k
// when mid_{k-1} < v_i <= mid_k, mid_k = (c_k + c_{k+1}) / 2) and the K means from
// float64 prefix sums: O(K log n) per iteration after the O(n log n) sort.
// During Lloyd an empty cluster keeps its centroid (it stays between its
// neighbours, so the centroids remain sorted). Once Lloyd has converged, empty
// clusters are re-seeded: each moves to the farthest member of one of the
// clusters with the largest squared error, and Lloyd runs again (repeated while
// clusters are empty and some cluster holds two distinct values).
#pragma once
#include <cstdint>
#include <vector>

namespace pycompress {

struct KMeans1D {
    std::vector<float> codebook;    // K centroids, ascending
    std::vector<uint8_t> indices;   // per value, in the input order
    int64_t iterations = 0;         // centroid updates done (at most max_iter)
    bool converged = false;
};

// values: n finite floats (n >= 1); clusters: 1..256; max_iter >= 1.
// Throws std::invalid_argument on bad arguments or non-finite values.
KMeans1D kmeans1d(const float* values, int64_t n, int clusters, int64_t max_iter);

}  // namespace pycompress
