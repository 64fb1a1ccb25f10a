"""Integer quantization through ``onnxruntime.quantization`` (ALGORITHMS.md 1.6:
not hand-rolled).

- int8 static: ``quant_pre_process`` (shape inference + graph optimization, as
  onnxruntime recommends), then ``quantize_static`` in QDQ format, per-channel
  int8 weights, uint8 activations (U8S8, the fast combination on CPUs), MinMax
  ranges from a calibration reader over the given samples.
- int8 dynamic: ``quantize_dynamic``, per-channel int8 weights; activations are
  quantized at run time.
- int4 weight-only: ``MatMulNBitsQuantizer`` (block-wise symmetric int4,
  ``MatMulNBits``). It only handles MatMul, so Gemm layers with a constant
  weight are first rewritten as MatMul (+ Add); Conv layers stay float.

Each takes ``embedding_group``: when not None, the embedding lookups are first
made 4-bit (``pycompress.export.embedding``, groups of that many columns, 0 =
per row) and the quantizer is told to leave those nodes alone.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.export._quiet import quiet
from pycompress.ir import (add_initializer, as_matrix, attr_float, attr_int, constant_array, load_model, save_model,
                           unique_name)


def _fail(source: Path, what: str, exc: Exception) -> PycompressError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return PycompressError(f"{source}: {what} failed: {first}")


class _scratch_cwd:
    """Run a block inside a fresh temporary working folder, removed afterwards.

    onnxruntime's quantization tools write ``<uuid>.data`` and
    ``sym_shape_infer_temp.onnx`` into the *current* folder and leave them there
    when they fail; run in a scratch folder, nothing of theirs is left behind.
    Paths given to them must be absolute (see ``_absolute``).
    """

    def __init__(self, near: Path):
        self.near = near

    def __enter__(self):
        import os

        self.tmp = tempfile.TemporaryDirectory(dir=self.near if self.near.is_dir() else None,
                                               prefix=".pycompress-scratch-")
        self.previous = os.getcwd()
        os.chdir(self.tmp.name)
        return self

    def __exit__(self, *exc):
        import os

        os.chdir(self.previous)
        self.tmp.cleanup()


def _absolute(path: Path) -> Path:
    return Path(path).resolve()


def calibration_batch_size(model: ir.Model, default: int = 16) -> int:
    sizes = {v.shape[0] for v in model.graph.inputs if v.shape is not None and len(v.shape)
             and isinstance(v.shape[0], int)}
    return sizes.pop() if len(sizes) == 1 else default


def _packed_embeddings(source: Path, folder: Path, group: int | None) -> tuple[Path, list[str], dict[str, Any]]:
    """The model to quantize (``source``, or a copy in ``folder`` with 4-bit embedding lookups), the
    nodes the quantizer must leave alone, and what was packed (report details)."""
    if group is None:
        return source, [], {}
    from pycompress.export.embedding import pack_embedding_lookups

    # No shape inference: the lookup rewrite needs none, and the quantizer sees the graph as the source has
    # it. (Inferred intermediate shapes would not reach the file either: save_model leaves them out, see
    # pycompress.ir.io.intermediate_shapes_hidden.)
    model = load_model(source, simplify=False, infer_shapes=False)
    lookups, added = pack_embedding_lookups(model, group=group)
    if not lookups:
        raise PycompressError(f"{source}: --embedding-bits 4: no embedding lookup found (a Gather from a constant "
                              "2-D float table of at least 1024 rows and even width that nothing else reads, "
                              "indexed by a graph input)")
    packed = Path(folder) / "embeddings4.onnx"
    save_model(model, packed)
    details = {"embedding_tables": [f"{t.table} {t.rows}x{t.dim} -> 4-bit, groups of {t.group}, "
                                    f"{t.bytes_after:,} bytes (relative error {t.relative_error:.3f})"
                                    for t in lookups]}
    return packed, added, details


def to_int8_static(source: Path, output: Path, calibration: Mapping[str, np.ndarray],
                   embedding_group: int | None = None) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = load_model(source, simplify=False)
    names = [v.name for v in model.graph.inputs]
    if set(names) - set(calibration):
        raise PycompressError(f"{source}: calibration data lacks input(s) {sorted(set(names) - set(calibration))}")
    size = calibration_batch_size(model)
    count = len(next(iter(calibration.values())))
    usable = count - count % size
    if usable == 0:
        raise PycompressError(f"{source}: int8 calibration needs at least {size} samples, got {count}")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{k: np.ascontiguousarray(calibration[k][i:i + size]) for k in names}
                                  for i in range(0, usable, size)])

        def get_next(self):
            return next(self._batches, None)

    source, output = _absolute(source), _absolute(output)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".pycompress-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quantizable, excluded, packed = _packed_embeddings(source, Path(tmp), embedding_group)
        try:
            with quiet(), _scratch_cwd(output.parent):
                symbolic = _pre_process(quant_pre_process, quantizable, prepared)
                quantize_static(str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=excluded)
        except PycompressError:
            raise
        except Exception as exc:
            raise _fail(source, "onnxruntime static quantization", exc) from exc
    return {"mode": "static", "format": "QDQ", "weights": "int8 per-channel", "activations": "uint8",
            "calibration_samples": usable, "symbolic_shape_inference": symbolic, **packed}


def _pre_process(quant_pre_process, source: Path, prepared: Path) -> bool:
    """ORT's quantization pre-processing; returns whether its symbolic shape inference ran.

    That inference gives up on graphs whose shapes are computed from a
    symbolic sequence length (transformer encoders: "Incomplete symbolic shape
    inference"); the graph then goes through ONNX shape inference and the
    optimizer only, which is what static QDQ quantization needs (the
    sequence length stays free in the quantized model).
    """
    try:
        quant_pre_process(str(source), str(prepared))
        return True
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises a bare Exception here
        if "symbolic shape" not in str(exc).lower():
            raise
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    return False


def to_int8_dynamic(source: Path, output: Path, embedding_group: int | None = None) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    load_model(source, simplify=False)  # validates the input with a clear error
    source, output = _absolute(source), _absolute(output)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".pycompress-") as tmp:
        quantizable, excluded, packed = _packed_embeddings(source, Path(tmp), embedding_group)
        try:
            with quiet(), _scratch_cwd(output.parent):
                quantize_dynamic(str(quantizable), str(output), per_channel=True, weight_type=QuantType.QInt8,
                                 nodes_to_exclude=excluded)
        except Exception as exc:
            raise _fail(source, "onnxruntime dynamic quantization", exc) from exc
    return {"mode": "dynamic", "weights": "int8 per-channel", "activations": "quantized at run time", **packed}


def gemm_to_matmul(model: ir.Model) -> int:
    """Rewrite ``Gemm(A, B const, C)`` (transA = 0) as ``MatMul(A, alpha B') [+ beta C]`` in place.

    ``B' = B^T`` when transB. Returns the number of rewritten nodes.
    """
    count = 0
    for node in list(model.graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or attr_int(node, "transA", 0):
            continue
        weight = constant_array(node.inputs[1])
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
        bias_array = constant_array(bias) if bias is not None and beta != 1.0 else None
        if weight is None or weight.ndim != 2 or (bias is not None and beta != 1.0 and bias_array is None):
            continue
        weight = as_matrix(node, weight)  # op(B): in x out, as MatMul reads it
        matmul = ir.node("MatMul", [node.inputs[0], _constant(model, f"{node.inputs[1].name}_matmul",
                                                               weight * weight.dtype.type(alpha))],
                         name=unique_name(model, f"{node.name}_matmul"))
        new_nodes, result = [matmul], matmul.outputs[0]
        if bias is not None:
            if bias_array is not None:
                bias = _constant(model, f"{bias.name}_scaled", bias_array * bias_array.dtype.type(beta))
            add = ir.node("Add", [result, bias], name=unique_name(model, f"{node.name}_bias"))
            new_nodes.append(add)
            result = add.outputs[0]
        old = node.outputs[0]
        name = old.name
        model.graph.insert_before(node, new_nodes)
        old.replace_all_uses_with(result, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        result.name = name  # graph outputs and readers keep the tensor name
        count += 1
    for name, value in list(model.graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del model.graph.initializers[name]
    return count


def to_int4(source: Path, output: Path, block_size: int = 32, embedding_group: int | None = None) -> dict[str, Any]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = load_model(source, simplify=False)
    packed: dict[str, Any] = {}
    if embedding_group is not None:  # MatMulNBits touches MatMul only: the lookup nodes are safe as they are
        with tempfile.TemporaryDirectory(dir=_absolute(output).parent, prefix=".pycompress-") as tmp:
            quantizable, _, packed = _packed_embeddings(_absolute(source), Path(tmp), embedding_group)
            model = load_model(quantizable, simplify=False)
    converted = gemm_to_matmul(model)
    candidates = [n for n in model.graph if n.op_type == "MatMul" and constant_array(n.inputs[1]) is not None
                  and constant_array(n.inputs[1]).ndim == 2]
    if not candidates:
        raise PycompressError(f"{source}: no MatMul/Gemm layer with a constant 2-D weight: int4 weight-only "
                              "quantization (onnxruntime MatMulNBits) covers fully-connected layers only")
    weights = sum(int(constant_array(n.inputs[1]).size) for n in candidates)
    output = _absolute(output)
    try:
        with quiet(), _scratch_cwd(output.parent):
            quantizer = MatMulNBitsQuantizer(ir.to_proto(model), bits=4, block_size=block_size, is_symmetric=True)
            quantizer.process()
            quantizer.model.save_model_to_file(str(output), use_external_data_format=False)
    except Exception as exc:
        raise _fail(source, "onnxruntime int4 weight-only quantization", exc) from exc
    return {"mode": "weight-only", "weights": f"int4 blocks of {block_size} (MatMulNBits)",
            "layers_quantized": len(candidates), "gemm_rewritten_as_matmul": converted,
            "weights_quantized": weights, **packed}


def _constant(model: ir.Model, base: str, array: np.ndarray) -> ir.Value:
    # ascontiguousarray, as before add_initializer existed: a 0-d C is stored as shape (1,).
    return add_initializer(model, base, np.ascontiguousarray(array))
