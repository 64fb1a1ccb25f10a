"""What a benchmark measures: the installed pycompress (not this checkout) and its kernel backend.

Benchmarks import the installed package so that a figure describes what users
get; `--checkout` in a benchmark (or PYTHONPATH=.) measures the source tree
instead. Every benchmark prints where pycompress came from and which kernels
ran, and one that reports kernel figures refuses the numpy fallback.
"""
from __future__ import annotations

import os
import sys


def use_checkout() -> None:
    """Put this source tree first on sys.path (the benchmark's --checkout)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def describe(require_compiled: bool = False) -> int:
    """Print the package's origin and kernel backend; 2 when compiled kernels are required but absent."""
    import pycompress
    from pycompress import kernels

    print(f"pycompress from {os.path.dirname(pycompress.__file__)}; kernels backend: {kernels.BACKEND}")
    if require_compiled and kernels.BACKEND == "reference":
        print("refusing to report kernel figures for the numpy fallback "
              f"({kernels.IMPORT_ERROR or 'PYCOMPRESS_KERNELS=reference'})", file=sys.stderr)
        return 2
    return 0
