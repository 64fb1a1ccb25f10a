"""Numpy reference implementations of the compiled kernels.

Same names and signatures as ``pycompress._kernels``; used when the compiled
module is missing and, always, as the oracle in the tests.
"""

from __future__ import annotations

import numpy as np


class CovarianceAccumulator:
    """Streaming mean / covariance of row blocks (ALGORITHMS.md 3.3).

    Each block is centred on its own mean and merged with Chan et al.'s
    update, in float64, so memory is O(dim^2) whatever the number of rows.
    """

    def __init__(self, dim: int):
        if dim <= 0:
            raise ValueError("covariance dimension must be positive")
        self.dim = int(dim)
        self.count = 0
        self._mean = np.zeros(self.dim)
        self._m2 = np.zeros((self.dim, self.dim))

    def update(self, block: np.ndarray) -> None:
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValueError(f"block must have shape (rows, {self.dim}), got {block.shape}")
        if block.shape[0] == 0:
            return
        x = block.astype(np.float64)
        if not np.isfinite(x).all():
            raise ValueError("block contains NaN or infinity")
        mu = x.mean(axis=0)
        centred = x - mu
        self._merge(x.shape[0], mu, centred.T @ centred)

    def merge(self, other: CovarianceAccumulator) -> None:
        if other.dim != self.dim:
            raise ValueError("cannot merge accumulators of different dimension")
        self._merge(other.count, other._mean, other._m2)

    def _merge(self, n: int, mu: np.ndarray, m2: np.ndarray) -> None:
        if n == 0:
            return
        if self.count == 0:
            self.count, self._mean, self._m2 = n, mu.copy(), m2.copy()
            return
        total = self.count + n
        delta = mu - self._mean
        self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self.count * n / total)
        self._mean = self._mean + delta * (n / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def scatter(self) -> np.ndarray:
        return self._m2.copy()

    @property
    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError("covariance needs at least 2 rows")
        return self._m2 / (self.count - 1)

    def correlation(self, floor: float = 1e-8) -> np.ndarray:
        if self.count < 2:
            raise ValueError("correlation needs at least 2 rows")
        cov = self.cov
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        return cov / np.maximum(np.outer(sd, sd), floor)


# Relative tolerance under which two L1 norms (or coefficients) tie; the same
# constant as csrc/kernels/pfa_select.hpp.
PFA_TIE_RTOL = 1e-9


def l1max_removal_order(corr: np.ndarray, n_remove: int) -> np.ndarray:
    """PFA "L1 max" filter selection (ALGORITHMS.md 3.3): removed filters, in order.

    ``corr`` is a (C, C) correlation matrix; signs and the diagonal are
    ignored. Each step removes the filter whose column L1 norm over the
    remaining filters is largest; ties (within ``PFA_TIE_RTOL``) go to the
    larger single coefficient, then to the lowest index. Removing filter ``r``
    only subtracts ``|corr[r, :]|`` from the running column norms: O(C^2) total.
    Returns ``n_remove`` int64 indices (0 <= n_remove <= C).
    """
    a = np.asarray(corr, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"corr must be a square 2-D array, got shape {a.shape}")
    c = a.shape[0]
    n_remove = int(n_remove)
    if not 0 <= n_remove <= c:
        raise ValueError(f"n_remove must be in [0, {c}], got {n_remove}")
    if not np.all(np.isfinite(a)):
        raise ValueError("correlation matrix has a non-finite entry")
    a = np.abs(a)
    np.fill_diagonal(a, 0.0)
    norms = a.sum(axis=0)
    alive = np.ones(c, dtype=bool)
    order = np.empty(n_remove, dtype=np.int64)

    def ties(values: np.ndarray, best: float) -> np.ndarray:
        return values >= best - PFA_TIE_RTOL * max(1.0, abs(best))

    for step in range(n_remove):
        live = np.flatnonzero(alive)
        live_norms = norms[live]
        candidates = live[ties(live_norms, float(live_norms.max()))]
        chosen = candidates[0]
        if len(candidates) > 1:
            # Peak coefficient of each candidate over the remaining filters
            # (the diagonal is already 0, and |corr| >= 0).
            peaks = (a[:, candidates] * alive[:, None]).max(axis=0)
            chosen = candidates[ties(peaks, float(peaks.max()))][0]
        order[step] = chosen
        alive[chosen] = False
        norms -= a[chosen]
    return order
def matern52(a: np.ndarray, b: np.ndarray, lengthscales: np.ndarray, outputscale: float) -> np.ndarray:
    """Matern 5/2 ARD covariance, (p, d) x (q, d) -> (p, q):
    ``s (1 + sqrt5 r + 5/3 r^2) exp(-sqrt5 r)`` with ``r = ||(a - b) / lengthscales||``."""
    a = np.asarray(a, np.float64) / lengthscales
    b = np.asarray(b, np.float64) / lengthscales
    r = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))
    s = np.sqrt(5.0) * r
    return outputscale * (1.0 + s + s * s / 3.0) * np.exp(-s)


def gp_acquisition(candidates, train_x, lengthscales, outputscale: float, mean_constant: float, chol, beta,
                   incumbent, delta: float, var_floor: float = 1e-12, threads: int = 0):
    """PAC scores of M candidates against the incumbent ``t^`` (ALGORITHMS.md 3.2).

    Shapes: candidates (M, d), train_x Theta (n, d), lengthscales (d,),
    chol L (n, n) lower with ``L L^T = A = K(Theta, Theta) + Sigma_n``,
    beta = ``L^-1 (y - m)`` (n,), incumbent (d,). Latent posterior:
    ``V = L^-1 k(Theta, C)``, ``mu = m + V^T beta``, ``var = s - sum(V^2)``,
    ``cov = k(C, t^) - V^T L^-1 k(Theta, t^)``, and
    ``z = (mu - mu(t^) - delta) / sqrt(max(var + var(t^) - 2 cov, var_floor))``.
    Returns (z, mu, var, cov), each (M,). ``threads`` is ignored here.
    """
    from scipy.linalg import solve_triangular

    c = np.asarray(candidates, np.float64)
    x = np.asarray(train_x, np.float64)
    ls = np.asarray(lengthscales, np.float64)
    t = np.asarray(incumbent, np.float64)[None, :]
    chol = np.asarray(chol, np.float64)
    beta = np.asarray(beta, np.float64)
    v = solve_triangular(chol, matern52(x, c, ls, outputscale), lower=True)
    w = solve_triangular(chol, matern52(x, t, ls, outputscale), lower=True)[:, 0]
    mu = mean_constant + v.T @ beta
    var = outputscale - (v * v).sum(0)
    cov = matern52(c, t, ls, outputscale)[:, 0] - v.T @ w
    mu_hat = mean_constant + w @ beta
    var_hat = outputscale - w @ w
    z = (mu - mu_hat - delta) / np.sqrt(np.maximum(var + var_hat - 2.0 * cov, var_floor))
    return z, mu, var, cov


def kmeans1d(values: np.ndarray, clusters: int, max_iter: int = 10000):
    """1-D k-means (ALGORITHMS.md 1.5): ``(codebook[K] float32, indices uint8 like values, iterations, converged)``.

    Centroids start at ``c_k = lo + (hi - lo) k / (K - 1)`` and follow Lloyd's
    updates until the partition is a fixed point (``converged``) or
    ``max_iter`` updates were done in total. Values are sorted once; value
    ``v`` joins cluster ``#{k : mid_k < v}``, ``mid_k = (c_k + c_{k+1}) / 2``;
    means come from float64 prefix sums and are clamped to their run; an empty
    cluster keeps its centroid. After convergence, empty clusters are
    re-seeded at the farthest member of the clusters with the largest squared
    error and Lloyd runs again (see csrc/kernels/kmeans1d.hpp). Same
    arithmetic as the C++ kernel, so the same bits.
    """
    array = np.asarray(values)
    x = np.ascontiguousarray(array, dtype=np.float32).ravel()
    if x.size < 1:
        raise ValueError("kmeans1d needs at least one value")
    if not 1 <= int(clusters) <= 256:
        raise ValueError("kmeans1d: clusters must be in 1..256")
    if max_iter < 1:
        raise ValueError("kmeans1d: max_iter must be >= 1")
    if not np.all(np.isfinite(x)):
        raise ValueError("kmeans1d: values must be finite")
    k_count = int(clusters)
    order = np.argsort(x, kind="stable")
    s = x[order].astype(np.float64)
    prefix = np.concatenate([[0.0], np.cumsum(s)])
    square_prefix = np.concatenate([[0.0], np.cumsum(s * s)])
    lo, hi = s[0], s[-1]
    c = np.array([lo]) if k_count == 1 else lo + (hi - lo) * np.arange(k_count) / (k_count - 1)
    iterations = 0

    def assign() -> np.ndarray:
        mid = (c[:-1] + c[1:]) / 2
        # Same as the sweep: the running position never moves back.
        return np.concatenate([np.maximum.accumulate(np.searchsorted(s, mid, side="right")), [s.size]])

    def lloyd() -> tuple[bool, np.ndarray]:
        nonlocal c, iterations
        previous = None
        while True:
            end = assign()
            if previous is not None and np.array_equal(end, previous):
                return True, end
            if iterations == max_iter:
                return False, end
            start = np.concatenate([[0], end[:-1]])
            count = end - start
            full = count > 0
            mean = (prefix[end[full]] - prefix[start[full]]) / count[full]
            c = c.copy()
            c[full] = np.minimum(np.maximum(mean, s[start[full]]), s[end[full] - 1])
            previous = end
            iterations += 1

    converged, end = lloyd()
    for _ in range(k_count):
        if not converged:
            break
        start = np.concatenate([[0], end[:-1]])
        count = end - start
        empty = np.flatnonzero(count == 0)
        full = count > 0
        total = np.zeros(k_count)
        total[full] = prefix[end[full]] - prefix[start[full]]
        sse = np.zeros(k_count)
        sse[full] = (square_prefix[end[full]] - square_prefix[start[full]]) - total[full] * total[full] / count[full]
        splittable = [k for k in range(k_count) if full[k] and s[end[k] - 1] > s[start[k]]]
        if empty.size == 0 or not splittable:
            break
        splittable.sort(key=lambda k: -sse[k])  # stable: ties keep the lower index first
        c = c.copy()
        for e, k in zip(empty, splittable):
            first, last = start[k], end[k] - 1
            c[e] = s[first] if c[k] - s[first] >= s[last] - c[k] else s[last]
        c = np.sort(c)
        converged, end = lloyd()
    labels = np.repeat(np.arange(k_count), np.diff(np.concatenate([[0], end])))
    indices = np.empty(x.size, np.uint8)
    indices[order] = labels
    return c.astype(np.float32), indices.reshape(array.shape), iterations, converged


# Huffman coding (ALGORITHMS.md 1.5): see csrc/kernels/huffman.hpp for the
# conventions, which these functions follow bit for bit.
HUFFMAN_MAX_LENGTH = 57


def huffman_code_lengths(counts: np.ndarray) -> np.ndarray:
    """uint8[256] code lengths from counts[256]: two-queue Huffman, leaves by (count, symbol) first on ties."""
    counts = np.asarray(counts)
    if counts.shape != (256,):
        raise ValueError("huffman: counts must be 256 values")
    counts = counts.astype(np.uint64)
    lengths = np.zeros(256, np.uint8)
    leaves = [int(s) for s in np.argsort(counts, kind="stable") if counts[s] > 0]
    if not leaves:
        return lengths
    if len(leaves) == 1:
        lengths[leaves[0]] = 1
        return lengths
    m = len(leaves)
    weight = [int(counts[s]) for s in leaves] + [0] * (m - 1)
    parent = [-1] * (2 * m - 1)
    next_leaf, next_merged, created = 0, m, m

    def take() -> int:
        nonlocal next_leaf, next_merged
        if next_leaf < m and (next_merged == created or weight[next_leaf] <= weight[next_merged]):
            next_leaf += 1
            return next_leaf - 1
        next_merged += 1
        return next_merged - 1

    while created < 2 * m - 1:
        a = take()
        b = take()
        weight[created] = weight[a] + weight[b]
        parent[a] = parent[b] = created
        created += 1
    depth = [0] * (2 * m - 1)
    for i in range(2 * m - 2, -1, -1):
        if parent[i] >= 0:
            depth[i] = depth[parent[i]] + 1
    for i, s in enumerate(leaves):
        if depth[i] > HUFFMAN_MAX_LENGTH:
            raise ValueError(f"huffman: code longer than {HUFFMAN_MAX_LENGTH} bits")
        lengths[s] = depth[i]
    return lengths


def _canonical(lengths: np.ndarray):
    """(count per length, symbols sorted by (length, symbol), code per symbol); checks Kraft."""
    lengths = np.asarray(lengths)
    if lengths.shape != (256,):
        raise ValueError("huffman: lengths must be 256 uint8 values")
    lengths = lengths.astype(np.int64)
    if lengths.min() < 0 or lengths.max() > HUFFMAN_MAX_LENGTH:
        raise ValueError(f"huffman: code length {int(lengths.max())} exceeds {HUFFMAN_MAX_LENGTH}")
    max_length = int(lengths.max())
    count = np.bincount(lengths, minlength=HUFFMAN_MAX_LENGTH + 2)
    count[0] = 0
    room = 1
    for length in range(1, max_length + 1):
        room <<= 1
        if int(count[length]) > room:
            raise ValueError("huffman: code lengths over-subscribe the code space")
        room -= int(count[length])
    symbols = [s for length in range(1, max_length + 1) for s in range(256) if lengths[s] == length]
    codes = np.zeros(256, np.uint64)
    code, current = 0, 0
    for s in symbols:
        while current < lengths[s]:
            code <<= 1
            current += 1
        codes[s] = code
        code += 1
    return count, symbols, codes, max_length


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """Canonical Huffman code of a uint8 array, packed MSB first (last byte zero-padded)."""
    symbols = np.asarray(symbols)
    if symbols.dtype != np.uint8:
        raise ValueError("huffman: symbols must be uint8")
    _, _, codes, max_length = _canonical(lengths)
    lengths = np.asarray(lengths).astype(np.int64)
    flat = symbols.ravel()
    if flat.size == 0:
        return b""
    if np.any(lengths[flat] == 0):
        bad = int(flat[lengths[flat] == 0][0])
        raise ValueError(f"huffman: symbol {bad} has no code")
    # Every code as a row of max_length bits, right-aligned; keep the last len bits.
    sym_len = lengths[flat]
    shifts = np.arange(max_length - 1, -1, -1, dtype=np.uint64)
    bits = ((codes[flat][:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
    keep = np.arange(max_length)[None, :] >= (max_length - sym_len)[:, None]
    return np.packbits(bits[keep]).tobytes()


def huffman_decode(payload: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """Decode ``count`` symbols; ValueError on invalid codes or a short payload."""
    code_count, symbols, _, max_length = _canonical(lengths)
    count = int(count)
    data = np.frombuffer(bytes(payload), np.uint8)
    if count < 0:
        raise ValueError("huffman: negative size")
    if count == 0:
        return np.zeros(0, np.uint8)
    if not symbols:
        raise ValueError("huffman: empty code table")
    if count > data.size * 8:
        raise ValueError("huffman: payload truncated")
    bits = np.unpackbits(data).astype(np.uint64)
    total = bits.size
    padded = np.concatenate([bits, np.zeros(max_length, np.uint64)])
    # For every bit position: the symbol and length a codeword starting there would have.
    sym_at = np.zeros(total, np.int64)
    len_at = np.zeros(total, np.int64)
    code = np.zeros(total, np.uint64)
    first, index = 0, 0
    for length in range(1, max_length + 1):
        code = (code << np.uint64(1)) | padded[length - 1:length - 1 + total]
        n_len = int(code_count[length])
        hit = (len_at == 0) & (code >= np.uint64(first)) & (code < np.uint64(first + n_len))
        if hit.any():
            sym_at[hit] = np.asarray(symbols, np.int64)[index + (code[hit] - np.uint64(first)).astype(np.int64)]
            len_at[hit] = length
        index += n_len
        first = (first + n_len) << 1
    out = np.empty(count, np.uint8)
    lens, syms = len_at.tolist(), sym_at.tolist()
    pos = 0
    for i in range(count):
        if pos >= total:
            raise ValueError("huffman: payload truncated")
        length = lens[pos]
        if length == 0 or pos + length > total:
            # No codeword fits in the remaining bits: the stream ended early,
            # or the bits are no codeword at all.
            raise ValueError("huffman: payload truncated" if pos + max_length > total else
                             "huffman: invalid codeword in payload")
        out[i] = syms[pos]
        pos += length
    return out
