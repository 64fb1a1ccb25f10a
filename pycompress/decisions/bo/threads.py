"""Run the optimizer's small linear algebra on one thread.

The GP fit and the acquisition search call BLAS on matrices of a few hundred
rows, thousands of times. Waking a second BLAS thread for each call costs
more than the call (measured: ML-II 3x slower with 2 OpenBLAS threads; one
likelihood evaluation at n = 30 0.3 ms on one thread, 24 ms with two on a
loaded 2-core machine). The compiled acquisition kernel parallelizes over
candidate blocks itself. torch is not touched: the search does not use it
(and importing it costs seconds).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

_controller = None


def _blas_controller():
    global _controller
    if _controller is None:
        try:
            import scipy.linalg  # noqa: F401  (load the BLAS libraries before looking for them)
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
        except ImportError:  # threadpoolctl missing: leave the BLAS as it is
            _controller = False
    return _controller


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    controller = _blas_controller()
    if controller:
        with controller.limit(limits=1, user_api="blas"):
            yield
    else:
        yield
