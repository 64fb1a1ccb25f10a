"""ir/linear.py: a layer's weight read as W (in x out) computes what onnxruntime computes, and writes back."""

from __future__ import annotations

import numpy as np
import pytest
from rewrite_testing import model_from_text, run

from pycompress.ir import (
    as_matrix,
    constant_array,
    from_matrix,
    matmul_weight_input,
    output_channel_axis,
    weight_input,
)

rng = np.random.default_rng(0)

CASES = {
    # body, x shape, w shape, y shape
    "gemm": ("Gemm(x, w)", (5, 4), (4, 3), (5, 3)),
    "gemm_transB": ("Gemm <transB = 1> (x, w)", (5, 4), (3, 4), (5, 3)),
    "matmul_right": ("MatMul(x, w)", (5, 4), (4, 3), (5, 3)),
    "matmul_left": ("MatMul(w, x)", (4, 5), (3, 4), (3, 5)),
}


def _model(tmp_path, body, x_shape, w_shape, y_shape):
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[{",".join(map(str, x_shape))}] x) => (float[{",".join(map(str, y_shape))}] y)
    <float[{",".join(map(str, w_shape))}] w> {{ y = {body} }}"""
    return model_from_text(text, tmp_path / "m.onnx", w=rng.normal(size=w_shape).astype(np.float32))


@pytest.mark.parametrize("case", sorted(CASES))
def test_matrix_view_matches_onnxruntime(tmp_path, case):
    body, x_shape, w_shape, y_shape = CASES[case]
    left = case == "matmul_left"
    model = _model(tmp_path, body, x_shape, w_shape, y_shape)
    node = next(iter(model.graph))
    index = weight_input(node)
    assert index == (0 if left else 1)
    w = constant_array(node.inputs[index])
    matrix = as_matrix(node, w, index)
    x = rng.normal(size=x_shape).astype(np.float32)
    (y,) = run(model, {"x": x})
    rows = x.T if left else x                      # features of W' @ X are on axis -2
    expected = rows @ matrix
    np.testing.assert_allclose(y.T if left else y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(from_matrix(node, matrix, w.shape, index), w)
    axis = output_channel_axis(node, index, w.ndim)
    assert w.shape[axis] == matrix.shape[1]        # the output channels


def test_conv_matrix_is_im2col_order(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,2,3,3] x) => (float[1,4,1,1] y) <float[4,2,3,3] w> { y = Conv(x, w) }"""
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    model = model_from_text(text, tmp_path / "c.onnx", w=w)
    node = next(iter(model.graph))
    x = rng.normal(size=(1, 2, 3, 3)).astype(np.float32)
    (y,) = run(model, {"x": x})
    matrix = as_matrix(node, w)
    assert matrix.shape == (18, 4)
    np.testing.assert_allclose(y.reshape(1, 4), x.reshape(1, 18) @ matrix, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(from_matrix(node, matrix, w.shape), w)
    assert output_channel_axis(node, 1, 4) == 0


def test_matmul_without_a_constant_2d_float_weight(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[5,4] x, float[4,3] v) => (float[5,3] y) { y = MatMul(x, v) }"""
    model = model_from_text(text, tmp_path / "a.onnx")
    assert matmul_weight_input(next(iter(model.graph))) is None
