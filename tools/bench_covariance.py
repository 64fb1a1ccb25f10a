"""Streaming covariance kernel vs the machine's BLAS, np.cov, and a float64 reference.

For each dimension d (N rows, fed in blocks of --block rows, float32 data of
large mean: 1000 + 0.01 noise), prints, measured in one run (on a shared
machine figures are noisy: compare the ratios): the kernel's rate N*d^2/s,
numpy's rate for float32 X.T @ X on the same rows, their ratio, the speed-up
over np.cov, and the kernel's relative error against a float64 reference.
With --device cuda the kernel is the CUDA one and the rate it is held against
is torch.cuda's float32 X.T @ X on the same rows, already on the device.

Measures the installed package (run it from anywhere; --checkout puts this
source tree first on sys.path instead) and refuses to report a kernel figure
for the numpy fallback.

    python tools/bench_covariance.py [--dims 256 1024 4096] [--rows 400000 40000 3000] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

DEFAULT_ROWS = {64: 2_000_000, 256: 400_000, 1024: 40_000, 4096: 3_000}


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--rows", type=int, nargs="+", help="N per dimension (default: the issue-19 sizes)")
    parser.add_argument("--block", type=int, default=8192, help="rows per update() call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--checkout", action="store_true", help="import pycompress from this source tree")
    args = parser.parse_args()
    if args.checkout:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import pycompress
    from pycompress import kernels

    print(f"pycompress from {os.path.dirname(pycompress.__file__)}; kernels backend: {kernels.BACKEND}")
    if kernels.BACKEND == "reference":
        print(f"refusing to time the numpy fallback as the kernel ({kernels.IMPORT_ERROR or 'PYCOMPRESS_KERNELS=reference'})",
              file=sys.stderr)
        return 2
    rows = args.rows or [DEFAULT_ROWS.get(d, max(2048, int(4e9 / d / d))) for d in args.dims]
    if len(rows) != len(args.dims):
        parser.error("--rows needs one N per --dims entry")
    if args.device == "cuda":
        return bench_cuda(args, rows, kernels)
    rng = np.random.default_rng(0)
    print(f"blocks of {args.block} rows; best of {args.repeats}")
    print(f"{'d':>5} {'N':>8} {'kernel N*d^2/s':>15} {'numpy X.T@X':>13} {'ratio':>6} {'vs np.cov':>9} {'rel.err':>9}")
    for d, n in zip(args.dims, rows):
        x = (1000.0 + 0.01 * rng.standard_normal((n, d))).astype(np.float32)

        def run_kernel():
            acc = kernels.CovarianceAccumulator(d)
            for s in range(0, n, args.block):
                acc.update(x[s:s + args.block])
            return acc

        run_kernel()  # warm-up: page faults, BLAS thread start
        # Interleaved, so a load change on the shared machine hits both.
        t_kernel, t_numpy = [], []
        for _ in range(args.repeats):
            t_kernel.append(best_of(run_kernel, 1))
            t_numpy.append(best_of(lambda: x.T @ x, 1))
        t_kernel, t_numpy = min(t_kernel), min(t_numpy)
        t_cov = best_of(lambda: np.cov(x, rowvar=False), 1)
        ref = np.cov(x.astype(np.float64), rowvar=False)
        err = np.abs(run_kernel().cov - ref).max() / np.abs(ref).max()
        rate = n * d * d / t_kernel
        print(f"{d:>5} {n:>8} {rate:>15.3e} {n * d * d / t_numpy:>13.3e} {t_numpy / t_kernel:>6.2f} "
              f"{t_cov / t_kernel:>8.1f}x {err:>9.1e}", flush=True)
    return 0


def bench_cuda(args, rows, kernels) -> int:
    import torch

    if kernels.cuda is None or not torch.cuda.is_available():
        print(f"no CUDA kernels or no GPU: {kernels.CUDA_ERROR or 'torch.cuda.is_available() is False'}",
              file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}; blocks of {args.block} rows (device tensors); best of {args.repeats}")
    print(f"{'d':>5} {'N':>8} {'kernel N*d^2/s':>15} {'torch X.T@X':>13} {'ratio':>6} {'rel.err':>9}")
    for d, n in zip(args.dims, rows):
        x = (1000.0 + 0.01 * torch.randn((n, d), generator=gen, device=dev)).float()

        def run_kernel():
            acc = kernels.cuda.CovarianceAccumulator(d)
            for s in range(0, n, args.block):
                acc.update(x[s:s + args.block])
            acc.synchronize()
            return acc

        def run_torch():
            y = x.T @ x
            torch.cuda.synchronize()
            return y

        run_kernel()
        run_torch()
        t_kernel = best_of(run_kernel, args.repeats)
        t_torch = best_of(run_torch, args.repeats)
        ref = np.cov(x.cpu().numpy().astype(np.float64), rowvar=False)
        err = np.abs(run_kernel().cov - ref).max() / np.abs(ref).max()
        print(f"{d:>5} {n:>8} {n * d * d / t_kernel:>15.3e} {n * d * d / t_torch:>13.3e} "
              f"{t_torch / t_kernel:>6.2f} {err:>9.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
