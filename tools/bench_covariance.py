"""Streaming covariance kernel vs the machine's BLAS, np.cov, and a float64 reference.

For each dimension d, N is sized so one kernel pass takes about a second.
Prints, measured in one run (the machine is shared and noisy: compare ratios):
the kernel's effective rate N*d^2/s, numpy's rate for float32 X.T @ X on the
same rows (SYRK), their ratio, the speedup over np.cov, and the kernel's
relative error against a float64 reference on large-mean data.

    python tools/bench_covariance.py [--dims 64 256 1024 4096] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import pycompress.kernels as kernels


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    print(f"kernels backend: {kernels.BACKEND}")
    rng = np.random.default_rng(0)
    header = f"{'d':>5} {'N':>8} {'kernel N*d^2/s':>15} {'numpy X.T@X':>13} {'ratio':>6} {'vs np.cov':>9} {'rel.err':>9}"
    print(header)
    for d in args.dims:
        probe = (1000.0 + 0.01 * rng.standard_normal((2048, d))).astype(np.float32)
        acc = kernels.CovarianceAccumulator(d)
        t = best_of(lambda: acc.update(probe), 2)
        n = int(min(max(2048, args.seconds / t * 2048), 4e8 / d))  # cap memory at ~1.6 GB
        x = (1000.0 + 0.01 * rng.standard_normal((n, d))).astype(np.float32)

        def run_kernel():
            a = kernels.CovarianceAccumulator(d)
            a.update(x)
            return a

        t_kernel = best_of(run_kernel)
        t_numpy = best_of(lambda: x.T @ x)
        t_cov = best_of(lambda: np.cov(x, rowvar=False), 1)
        ref = np.cov(x.astype(np.float64), rowvar=False)
        err = np.abs(run_kernel().cov - ref).max() / np.abs(ref).max()
        rate = n * d * d / t_kernel
        print(f"{d:>5} {n:>8} {rate:>15.3e} {n * d * d / t_numpy:>13.3e} {t_numpy / t_kernel:>6.2f} "
              f"{t_cov / t_kernel:>8.1f}x {err:>9.1e}")


if __name__ == "__main__":
    main()
