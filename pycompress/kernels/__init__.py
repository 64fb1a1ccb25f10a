"""Hot kernels: the compiled ``pycompress._kernels`` or the numpy reference.

Both expose the same names and signatures; ``BACKEND`` says which one is in
use ("native" or "reference"). Set ``PYCOMPRESS_KERNELS=reference`` to force
the reference (for debugging); CI asserts that "native" is used.
"""

from __future__ import annotations

import os

from pycompress.kernels import _reference as reference

_forced = os.environ.get("PYCOMPRESS_KERNELS", "").strip().lower()
IMPORT_ERROR: str | None = None
if _forced == "reference":
    _impl = reference
    BACKEND = "reference"
else:
    try:
        from pycompress import _kernels as _impl  # type: ignore[attr-defined]

        BACKEND = "native"
    except ImportError as exc:  # no compiled module: a source checkout without a build
        IMPORT_ERROR = str(exc)
        _impl = reference
        BACKEND = "reference"

CovarianceAccumulator = _impl.CovarianceAccumulator
l1max_removal_order = _impl.l1max_removal_order
PFA_TIE_RTOL = _impl.PFA_TIE_RTOL
gp_acquisition = _impl.gp_acquisition
kmeans1d = _impl.kmeans1d
huffman_code_lengths = _impl.huffman_code_lengths
huffman_encode = _impl.huffman_encode
huffman_decode = _impl.huffman_decode

__all__ = ["BACKEND", "CovarianceAccumulator", "PFA_TIE_RTOL", "gp_acquisition", "huffman_code_lengths",
           "huffman_decode", "huffman_encode", "kmeans1d", "l1max_removal_order", "reference"]
