"""Subsampled U-statistic fidelity estimates against direct computations."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from pycompress.errors import PycompressError
from pycompress.fidelity import (
    FidelityEstimator,
    cross_entropy_losses,
    function_norm_losses,
    mean_and_variance,
    top1_error_losses,
)

# y = x W + b: a 4 -> 3 linear "classifier" written in ONNX text.
_LINEAR = """
<ir_version: 8, opset_import: ["" : 17]>
linear (float[N, 4] x) => (float[N, 3] logits) {{
    w = Constant <value = float[4, 3] {w}> ()
    b = Constant <value = float[3] {b}> ()
    xw = MatMul (x, w)
    logits = Add (xw, b)
}}
"""


def _linear_model(w: np.ndarray, b: np.ndarray) -> ir.Model:
    text = _LINEAR.format(w="{" + ", ".join(f"{v:.6f}" for v in w.ravel()) + "}",
                          b="{" + ", ".join(f"{v:.6f}" for v in b) + "}")
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    w = np.round(rng.normal(size=(4, 3)), 6).astype(np.float32)
    b = np.round(rng.normal(size=3), 6).astype(np.float32)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    labels = np.argmax(x @ w + b, axis=1)
    flip = rng.random(300) < 0.2                # the teacher is right on ~80%
    labels[flip] = (labels[flip] + 1) % 3
    return w, b, x, labels


def test_mean_and_variance_and_the_binary_floor():
    losses = np.array([0.5, 1.5, 2.0, 4.0])
    mean, var = mean_and_variance(losses)
    assert mean == pytest.approx(2.0) and var == pytest.approx(np.var(losses, ddof=1) / 4)
    # All-zero 0/1 losses: sample variance 0, floored at (p(1-p) + 1/m)/m.
    mean, var = mean_and_variance(np.zeros(50), binary=True)
    assert mean == 0.0 and var == pytest.approx((0 + 1 / 50) / 50)
    losses = (np.arange(50) < 20).astype(float)
    assert mean_and_variance(losses, binary=True)[1] == pytest.approx((0.4 * 0.6 + 1 / 50) / 50)
    with pytest.raises(PycompressError, match="2 samples"):
        mean_and_variance(np.ones(1))


def test_loss_functions_match_direct_formulas():
    rng = np.random.default_rng(1)
    s1, t1 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    s2, t2 = rng.normal(size=(5, 2, 2)), rng.normal(size=(5, 2, 2))
    expected = ((s1 - t1) ** 2).sum(1) + ((s2 - t2) ** 2).reshape(5, -1).sum(1)
    np.testing.assert_allclose(function_norm_losses([s1, s2], [t1, t2]), expected)
    labels = np.array([0, 2, 1, 1, 0])
    np.testing.assert_array_equal(top1_error_losses(s1, labels), (s1.argmax(1) != labels).astype(float))
    import torch

    ce = torch.nn.functional.cross_entropy(torch.from_numpy(s1 * 30), torch.from_numpy(labels), reduction="none")
    np.testing.assert_allclose(cross_entropy_losses(s1 * 30, labels), ce.numpy(), rtol=1e-12)


def test_subsamples_are_fresh_seeded_and_distinct(setup):
    w, b, x, labels = setup
    est = FidelityEstimator(_linear_model(w, b), {"x": x}, samples=50, seed=7)
    a, again, other = est.subsample(3), est.subsample(3), est.subsample(4)
    np.testing.assert_array_equal(a, again)
    assert len(np.unique(a)) == 50 and not np.array_equal(a, other)
    assert not np.array_equal(a, FidelityEstimator(_linear_model(w, b), {"x": x}, samples=50, seed=8).subsample(3))


def test_function_norm_estimate_and_teacher_cache(setup):
    w, b, x, labels = setup
    teacher = _linear_model(w, b)
    est = FidelityEstimator(teacher, {"x": x}, samples=50, seed=1)
    runs = []
    real_run = est._teacher.run
    est._teacher.run = lambda names, feeds: runs.append(len(feeds["x"])) or real_run(names, feeds)

    w2 = (w + 0.05 * np.random.default_rng(2).normal(size=w.shape)).astype(np.float32)
    student = _linear_model(w2, b)
    e0 = est.evaluate(student, 0)
    idx = est.subsample(0)
    losses = (((x[idx] @ w2 + b) - (x[idx] @ w + b)) ** 2).sum(1)
    assert e0.mean == pytest.approx(losses.mean(), rel=1e-4)
    # The estimand is the pool's mean loss: drawn without replacement, finite-population factor.
    assert e0.variance == pytest.approx(losses.var(ddof=1) / 50 * (1 - 50 / est.pool), rel=1e-3)
    assert e0.samples == 50 and 0.0 <= e0.extras["agreement"] <= 1.0

    # Teacher outputs are computed once per sample: re-evaluating reuses them.
    est.evaluate(student, 0)
    e1 = est.evaluate(student, 1)
    overlap = len(np.intersect1d(est.subsample(0), est.subsample(1)))
    assert sum(runs) == 100 - overlap
    assert e1.mean != e0.mean
    # The teacher against itself: zero loss.
    assert est.evaluate(teacher, 2).mean == pytest.approx(0.0, abs=1e-10)


def test_target_se_grows_the_subsample_along_its_order_up_to_the_pool(setup):
    w, b, x, labels = setup
    teacher = _linear_model(w, b)
    est = FidelityEstimator(teacher, {"x": x}, samples=20, seed=4)
    w2 = (w + 0.3 * np.random.default_rng(3).normal(size=w.shape)).astype(np.float32)
    student = _linear_model(w2, b)
    base = est.evaluate(student, 7)
    assert base.samples == 20
    target = base.std_error / 3
    grown = est.evaluate(student, 7, target_se=target)
    assert 20 < grown.samples < est.pool and grown.std_error <= target
    # The first 20 samples are those of the plain evaluation: one order per evaluation index.
    idx = np.sort(est.order(7)[:grown.samples])
    losses = (((x[idx] @ w2 + b) - (x[idx] @ w + b)) ** 2).sum(1)
    assert grown.mean == pytest.approx(losses.mean(), rel=1e-4)
    assert set(est.subsample(7)) <= set(idx)
    # Asking for an exact estimate uses the whole pool, whose variance is 0 (the pool mean is known).
    exact = est.evaluate(student, 7, target_se=0.0)
    assert exact.samples == est.pool and exact.variance == 0.0
    assert exact.mean == pytest.approx(est.evaluate_on(student, np.arange(est.pool)).mean, rel=1e-9)


def test_error_and_cross_entropy_estimates_with_labels(setup):
    w, b, x, labels = setup
    teacher = _linear_model(w, b)
    err = FidelityEstimator(teacher, {"x": x}, labels=labels, loss="error", samples=60, seed=3)
    e = err.evaluate(teacher, 5)
    idx = err.subsample(5)
    wrong = (np.argmax(x[idx] @ w + b, 1) != labels[idx]).astype(float)
    assert e.mean == pytest.approx(wrong.mean())
    p = wrong.mean()
    assert e.variance == pytest.approx(max(wrong.var(ddof=1) / 60, (p * (1 - p) + 1 / 60) / 60)
                                       * (1 - 60 / err.pool))
    assert e.extras["accuracy"] == pytest.approx(1 - wrong.mean())

    ce = FidelityEstimator(teacher, {"x": x}, labels=labels, loss="cross_entropy", samples=60, seed=3)
    c = ce.evaluate(teacher, 5)
    assert c.mean == pytest.approx(cross_entropy_losses(x[idx] @ w + b, labels[idx]).mean(), rel=1e-5)


def test_estimator_errors_name_the_problem(setup):
    w, b, x, labels = setup
    teacher = _linear_model(w, b)
    with pytest.raises(PycompressError, match="needs labels"):
        FidelityEstimator(teacher, {"x": x}, loss="error")
    with pytest.raises(PycompressError, match="larger than the calibration pool"):
        FidelityEstimator(teacher, {"x": x}, samples=301)
    with pytest.raises(PycompressError, match="not outputs of the model"):
        FidelityEstimator(teacher, {"x": x}, outputs=["nope"])
    with pytest.raises(PycompressError, match="unknown fidelity loss"):
        FidelityEstimator(teacher, {"x": x}, loss="kl")
