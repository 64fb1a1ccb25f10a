"""Tiny valid inputs the fuzz suite corrupts: an MLP built with onnx.helper (no torch export: fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp_proto(seed: int = 0, hidden: int = 16) -> onnx.ModelProto:
    """x[N,8] -> Gemm(8->hidden) -> Relu -> Gemm(hidden->4): svd, prune and share all apply."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((hidden, 8)).astype(np.float32) * 0.3
    b1 = rng.standard_normal(hidden).astype(np.float32) * 0.1
    w2 = rng.standard_normal((4, hidden)).astype(np.float32) * 0.3
    b2 = rng.standard_normal(4).astype(np.float32) * 0.1
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_mlp(path: Path, **kwargs) -> Path:
    onnx.save(mlp_proto(**kwargs), str(path))
    return path


def write_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    if path.suffix == ".npz":
        np.savez(path, x=x)
    else:
        np.save(path, x)
    return path


def conv_proto(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(3->16) -> Relu -> Conv(16->4) -> GlobalAveragePool -> Flatten: takes image folders."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.2
    b = np.zeros(16, np.float32)
    w2 = rng.standard_normal((4, 16, 3, 3)).astype(np.float32) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["y"], name="flat")]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
