"""The CUDA kernels against the CPU kernels on the same inputs (issue 18).

Marked ``gpu``: skipped (never passed) without a CUDA build
(``PYCOMPRESS_CUDA=ON``) or without a visible device; on a GPU machine
``tools/gpu_check.sh`` builds and runs them (``pytest -m gpu``). A visible
device whose kernels cannot run (no cuBLAS, driver too old) fails.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from pycompress import kernels
from pycompress.kernels import reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    try:
        from pycompress import _kernels_cuda as module
    except ImportError as exc:
        pytest.skip(f"CUDA kernels not built ({exc})")
    if module.device_count() == 0:
        if os.path.exists("/proc/driver/nvidia") or glob.glob("/dev/nvidia[0-9]*"):
            pytest.fail(f"an NVIDIA device is present but CUDA cannot use it: {module.device_error()}")
        pytest.skip(f"no CUDA device: {module.device_error()}")
    if kernels.cuda is None or kernels.native is None:
        pytest.fail(f"a CUDA device is visible but the kernels are unusable: {kernels.CUDA_ERROR or kernels.IMPORT_ERROR}")
    return kernels.cuda


def exact_cov(x):
    return np.cov(np.asarray(x, np.float64), rowvar=False)


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def both(d):
    return kernels.cuda.CovarianceAccumulator(d), kernels.native.CovarianceAccumulator(d)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d,n", [(1, 50), (37, 3000), (300, 8192 + 5)])
def test_covariance_matches_cpu(gpu, dtype, d, n):
    rng = np.random.default_rng(d + n)
    x = (1000.0 + 0.01 * rng.standard_normal((n, d))).astype(dtype)  # large mean: the hard case
    g, c = both(d)
    for s in range(0, n, 4000):  # N not a multiple of the block
        g.update(x[s:s + 4000])
        c.update(x[s:s + 4000])
    ref = exact_cov(x)
    tol = 1e-6 if dtype == np.float32 else 1e-11
    assert g.count == n
    assert rel_err(g.cov, ref) <= tol
    assert rel_err(g.cov, c.cov) <= 2 * tol
    np.testing.assert_allclose(g.mean, c.mean, rtol=1e-9)


def test_covariance_one_row_at_a_time_strided_and_drifting(gpu):
    rng = np.random.default_rng(1)
    wide = np.concatenate([rng.normal(loc=40.0 * i, size=(25, 12)) for i in range(4)])
    x = wide[:, 2:9]  # row stride 12 > d = 7
    g, c = both(7)
    for row in x:
        g.update(row[None, :])
    c.update(x)
    assert rel_err(g.cov, exact_cov(x)) < 1e-11
    assert rel_err(g.cov, c.cov) < 1e-11
    g2 = kernels.cuda.CovarianceAccumulator(7)
    g2.update(x[::3])
    assert rel_err(g2.cov, exact_cov(x[::3])) < 1e-11


def test_covariance_merge_and_correlation(gpu):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5000, 64)).astype(np.float32)
    a, b = kernels.cuda.CovarianceAccumulator(64), kernels.cuda.CovarianceAccumulator(64)
    a.update(x[:1234])
    b.update(x[1234:])
    a.merge(b)
    c = kernels.native.CovarianceAccumulator(64)
    c.update(x)
    assert a.count == 5000
    assert rel_err(a.cov, c.cov) < 1e-6
    np.testing.assert_allclose(a.correlation(1e-8), c.correlation(1e-8), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.scatter, c.scatter, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_covariance_rejects_non_finite(gpu, bad):
    rng = np.random.default_rng(3)
    g = kernels.cuda.CovarianceAccumulator(5)
    g.update(rng.normal(size=(40, 5)))
    before = g.cov.copy()
    block = rng.normal(size=(10, 5))
    block[4, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        g.update(block)
    assert g.count == 40
    np.testing.assert_array_equal(g.cov, before)
    fresh = kernels.cuda.CovarianceAccumulator(5)
    with pytest.raises(ValueError, match="NaN or infinity"):
        fresh.update(block)  # in the first block: the shift must not keep the NaN
    fresh.update(block[5:])
    assert fresh.count == 5


def test_covariance_reads_torch_cuda_tensors_in_place(gpu):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    x = (1000.0 + 0.01 * torch.randn(9000, 96, device="cuda")).float()
    g = kernels.cuda.CovarianceAccumulator(96)
    g.update(x[:5000])
    g.update(x[5000:, :])
    host = x.cpu().numpy()
    assert rel_err(g.cov, exact_cov(host)) < 1e-6
    with pytest.raises(ValueError, match="contiguous"):
        g.update(x.t().contiguous()[:96].t())  # column stride != 1


def _posterior(rng, n, d):
    x = rng.random((n, d))
    ls = rng.uniform(0.2, 1.5, d)
    s, m = 1.3, 0.2
    a = reference.matern52(x, x, ls, s) + np.diag(rng.uniform(1e-5, 1e-2, n))
    chol = np.linalg.cholesky(a)
    beta = np.linalg.solve(chol, rng.normal(size=n) - m)
    return x, ls, s, m, chol, beta


@pytest.mark.parametrize("n,d,m", [(1, 1, 3), (7, 3, 5), (40, 16, 1000), (100, 16, 65536), (300, 16, 200)])
def test_acquisition_matches_cpu(gpu, n, d, m):
    rng = np.random.default_rng(n * 1000 + d + m)
    x, ls, s, mean, chol, beta = _posterior(rng, n, d)
    cands = rng.random((m, d))
    cands[0] = x[0]  # a training point: var near the noise level
    args = (cands, x, ls, s, mean, chol, beta, x[min(2, n - 1)], 0.07)
    got = kernels.cuda.gp_acquisition(*args)
    want = kernels.native.gp_acquisition(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


def test_acquisition_takes_device_candidates(gpu):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(4)
    x, ls, s, mean, chol, beta = _posterior(rng, 30, 4)
    cands = rng.random((500, 4))
    args = (x, ls, s, mean, chol, beta, x[0], 0.05)
    on_device = kernels.cuda.gp_acquisition(torch.as_tensor(cands, device="cuda"), *args)
    on_host = kernels.native.gp_acquisition(cands, *args)
    for g, w in zip(on_device, on_host):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


def test_dispatch_sends_large_work_to_the_gpu(gpu):
    if kernels.BACKEND != "cuda":
        pytest.fail(f"a usable GPU but BACKEND={kernels.BACKEND}")
    assert isinstance(kernels.CovarianceAccumulator(kernels.CUDA_MIN_DIM), kernels.cuda.CovarianceAccumulator)
    assert isinstance(kernels.CovarianceAccumulator(8), kernels.native.CovarianceAccumulator)
