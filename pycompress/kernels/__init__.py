"""Hot kernels: the compiled ``pycompress._kernels``, its CUDA twin, or the numpy reference.

All expose the same names and signatures. ``BACKEND`` says what is in use:

* ``"native"``: the compiled CPU kernels (what CI asserts after a plain install);
* ``"cuda"``: the CUDA kernels (``pycompress._kernels_cuda``, built with
  ``-C cmake.define.PYCOMPRESS_CUDA=ON``) are usable: a GPU is visible and cuBLAS
  loaded. Then ``CovarianceAccumulator`` and ``gp_acquisition`` run on the GPU
  when the work pays for the transfer (see ``CUDA_MIN_DIM`` and
  ``CUDA_MIN_ACQUISITION_WORK``); the other kernels stay on the CPU;
* ``"reference"``: the numpy reference (no compiled module, or forced).

``PYCOMPRESS_KERNELS=cpu|cuda|reference`` forces one: ``cpu`` never touches
the GPU, ``cuda`` runs covariance and acquisition on the GPU whatever the size
(ImportError when it cannot), ``reference`` is for debugging.
``IMPORT_ERROR`` / ``CUDA_ERROR`` say why the compiled CPU / CUDA kernels are
not in use (None when they are). ``native`` and ``cuda`` are the compiled
modules themselves (or None), for tests and benchmarks that compare them.
"""

from __future__ import annotations

import glob
import os
import sys

from pycompress.kernels import _reference as reference

# Covariance of at least this many columns goes to the GPU in the automatic
# mode: the SYRK does d flops per element moved, so from a few hundred columns
# on the device wins even with the rows copied from the host.
CUDA_MIN_DIM = 256
# Acquisition: n^2 M (the triangular solve's flops) from which the GPU wins
# (n = 100: 10,000 candidates), against the host-side L^-1 and the copies.
CUDA_MIN_ACQUISITION_WORK = 100_000_000

_forced = os.environ.get("PYCOMPRESS_KERNELS", "").strip().lower()
if _forced not in ("", "cpu", "native", "cuda", "reference"):
    raise ImportError(f"PYCOMPRESS_KERNELS={_forced!r}: expected cpu, cuda or reference")
IMPORT_ERROR: str | None = None
CUDA_ERROR: str | None = "not tried (PYCOMPRESS_KERNELS)" if _forced in ("cpu", "native", "reference") else None
native = None
cuda = None

if _forced != "reference":
    try:
        from pycompress import _kernels as native  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # no compiled module: a source checkout without a build
        IMPORT_ERROR = str(exc)


def _cublas_candidates() -> list[str]:
    """cuBLAS libraries to try: pip's nvidia wheels (torch's), the toolkit, then the loader's search."""
    found: list[str] = []
    for base in sys.path:
        for pattern in ("nvidia/cublas/lib/libcublas.so*", "nvidia/*/lib/libcublas.so*"):
            found += sorted(glob.glob(os.path.join(base, pattern)), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib*", "libcublas.so*")), reverse=True)
    return found + ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]


def _load_cuda():
    """The CUDA module when a device and cuBLAS are usable, else None and CUDA_ERROR says why."""
    global CUDA_ERROR
    try:
        from pycompress import _kernels_cuda as module  # type: ignore[attr-defined]
    except ImportError as exc:
        CUDA_ERROR = f"no CUDA build ({exc})"
        return None
    if module.device_count() == 0:
        CUDA_ERROR = f"no usable CUDA device: {module.device_error()}"
        return None
    error = module.load_cublas(_cublas_candidates())
    if error:
        CUDA_ERROR = error
        return None
    CUDA_ERROR = None
    return module


if CUDA_ERROR is None:
    cuda = _load_cuda()
if _forced == "cuda" and cuda is None:
    raise ImportError(f"PYCOMPRESS_KERNELS=cuda but the CUDA kernels are not usable: {CUDA_ERROR}")

_impl = native if native is not None else reference
if _forced == "reference" or native is None:
    BACKEND = "reference"
elif cuda is not None:
    BACKEND = "cuda"
else:
    BACKEND = "native"

l1max_removal_order = _impl.l1max_removal_order
PFA_TIE_RTOL = _impl.PFA_TIE_RTOL
kmeans1d = _impl.kmeans1d
huffman_code_lengths = _impl.huffman_code_lengths
huffman_encode = _impl.huffman_encode
huffman_decode = _impl.huffman_decode

if cuda is None:
    CovarianceAccumulator = _impl.CovarianceAccumulator
    gp_acquisition = _impl.gp_acquisition
else:
    _always_gpu = _forced == "cuda"

    def CovarianceAccumulator(dim: int):
        """A streaming covariance accumulator: on the GPU from ``CUDA_MIN_DIM`` columns, else on the CPU."""
        if _always_gpu or dim >= CUDA_MIN_DIM:
            return cuda.CovarianceAccumulator(dim)
        return _impl.CovarianceAccumulator(dim)

    def gp_acquisition(candidates, train_x, lengthscales, outputscale, mean_constant, chol, beta, incumbent,
                       delta, var_floor=1e-12, threads=0):
        """PAC scores (z, mu, var, cov); on the GPU when n^2 M reaches ``CUDA_MIN_ACQUISITION_WORK``."""
        n, m = len(train_x), len(candidates)
        use_gpu = _always_gpu or n * n * m >= CUDA_MIN_ACQUISITION_WORK
        fn = cuda.gp_acquisition if use_gpu else _impl.gp_acquisition
        return fn(candidates, train_x, lengthscales, outputscale, mean_constant, chol, beta, incumbent, delta,
                  var_floor, threads)

# The covariance the compiled acquisition fuses, for the GP fit on the training points (small:
# numpy is enough there); public so that the GP does not reach into the reference module.
matern52 = reference.matern52

__all__ = [
    "BACKEND",
    "CUDA_ERROR",
    "CUDA_MIN_ACQUISITION_WORK",
    "CUDA_MIN_DIM",
    "IMPORT_ERROR",
    "PFA_TIE_RTOL",
    "CovarianceAccumulator",
    "cuda",
    "gp_acquisition",
    "matern52",
    "huffman_code_lengths",
    "huffman_decode",
    "huffman_encode",
    "kmeans1d",
    "l1max_removal_order",
    "native",
    "reference",
]
