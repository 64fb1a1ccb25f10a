"""The compiled kernels for tests that compare them with the numpy reference."""

import pytest

from pycompress import kernels


def compiled():
    """The compiled CPU kernels (``pycompress._kernels``). Without them a comparison with the
    reference would compare the reference with itself: it is skipped, not passed."""
    if kernels.native is None:
        pytest.skip(f"compiled kernels not in use ({kernels.IMPORT_ERROR or 'PYCOMPRESS_KERNELS=reference'})")
    return kernels.native
