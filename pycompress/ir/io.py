"""Load and save ONNX models safely.

Loading validates before anything else touches the model: the file parses,
external data stays inside the model's folder, the onnx checker passes, and
shapes are inferred. Saving is atomic (temp file + rename) and never
overwrites the input unless asked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from pycompress.errors import PycompressError
from pycompress.files import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)

# Protobuf cannot serialize more than 2 GB: bigger models keep weights outside.
PROTO_LIMIT_BYTES = 2**31 - 1
# Weights above this size go to external data when saving a large model.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024


def _iter_tensors(graph: onnx.GraphProto):
    """Every TensorProto in a graph, its subgraphs and Constant attributes."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensors(sub)


def check_external_data(proto: onnx.ModelProto, model_path: Path) -> int:
    """Refuse external data that escapes the model's folder; return its total size.

    Untrusted files are data: a location that is absolute, goes through
    ``..``, or resolves (via symlinks) outside the folder could read any file
    on the machine.
    """
    folder = model_path.parent.resolve()
    total = 0
    for tensor in _iter_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{model_path}: initializer '{tensor.name}'"
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise PycompressError(
                f"{where}: external data location {location!r} is outside the model's folder; refused"
            )
        target = (folder / location).resolve()
        if folder not in target.parents:
            raise PycompressError(
                f"{where}: external data location {location!r} resolves outside the model's folder; refused"
            )
        if not target.is_file():
            raise PycompressError(f"{where}: external data file {location!r} not found next to the model")
        size = target.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", size - offset))
        except ValueError:
            raise PycompressError(f"{where}: external data offset/length are not integers") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise PycompressError(f"{where}: external data offset {offset} + length {length} lies beyond the "
                                  f"end of {location!r} ({size} bytes); refused")
        expected = _expected_bytes(tensor)
        if expected is not None and "length" in info and length != expected:
            raise PycompressError(f"{where}: external data length {length} does not match its shape and type "
                                  f"({expected} bytes)")
        if expected is not None and offset + expected > size:
            raise PycompressError(f"{where}: external data needs {expected} bytes from offset {offset}, "
                                  f"'{location}' holds {size}; refused")
        total += length
    return total


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor of this shape and fixed-size type holds (None: strings, sub-byte types)."""
    import numpy as np

    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except Exception:
        return None
    if dtype.kind in "OUS" or tensor.data_type in _SUB_BYTE_TYPES:
        return None
    count = 1
    for d in tensor.dims:
        count *= int(d)
    return count * dtype.itemsize


_SUB_BYTE_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def input_files(path: str | os.PathLike) -> list[Path]:
    """The model file and the external data files it reads (the files an output must never replace)."""
    path = Path(path)
    files = [path]
    if not path.is_file():
        return files
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return files  # load_model reports the bad file
    folder = path.parent
    for tensor in _iter_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if location and not os.path.isabs(location) and (folder / location) not in files:
                files.append(folder / location)
    return files


def load_model(path: str | os.PathLike, *, check: bool = True, simplify: bool = True,
               infer_shapes: bool = True) -> ir.Model:
    """Load, validate, simplify and shape-infer an ONNX model; keep its ir_version and opsets.

    ``simplify`` folds constant subgraphs (see ``simplify_model``): exporters
    compute paddings and flatten shapes with Shape/Slice/Concat chains that
    hide the static shapes that accounting and channel analysis need.

    Raises PycompressError with a one-line message naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise PycompressError(f"{path}: no such file")
    if not path.is_file():
        raise PycompressError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, or others on garbage
        raise PycompressError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from exc
    if not proto.graph.node and not proto.graph.output:
        raise PycompressError(f"{path}: not a valid ONNX model (empty graph)")
    check_tensor_io(proto, where=str(path))
    external = check_external_data(proto, path)
    check_opsets(proto, where=str(path))
    if check:
        try:
            # By path: works for models above the 2 GB protobuf limit too.
            onnx.checker.check_model(str(path))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PycompressError(f"{path}: ONNX checker failed: {first}") from exc
    if check and infer_shapes and proto.ByteSize() < PROTO_LIMIT_BYTES:
        # Strict inference: the pass below runs non-strict (an op onnx cannot
        # infer must not fail the load) and so would let a model whose shapes
        # or types contradict each other (it cannot run) through as valid.
        error = _strict_inference_error(proto)
        if error:
            raise PycompressError(f"{path}: shape inference failed: {error}")
    del proto
    try:
        model = ir.load(path)
    except Exception as exc:  # onnx_ir's SerdeError on types or data it cannot represent
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PycompressError(f"{path}: cannot read the model ({type(exc).__name__}: {first})") from None
    check_finite_weights(model, where=str(path))
    if simplify:
        simplify_model(model, where=str(path))
    if infer_shapes:
        infer_model_shapes(model, where=str(path))
    model.meta["pycompress.source_path"] = str(path.resolve())
    model.meta["pycompress.external_bytes"] = external
    return model


def _strict_inference_error(proto: onnx.ModelProto) -> str | None:
    """The first error of strict ONNX shape/type inference, or None.

    A declared output/value_info shape that disagrees with the inferred one is
    only an annotation (onnxruntime warns and runs): not an error here.
    """
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        errors = [line for line in lines if not line.endswith("Inference error(s):")
                  and "existing shape differ" not in line and "Can't merge shape info" not in line]
        if errors or not lines:
            first = (errors or [type(exc).__name__])[0]
            return first.replace("[ShapeInferenceError] Inference error(s): ", "")
    return None


def check_tensor_io(proto: onnx.ModelProto, *, where: str = "model") -> None:
    """Refuse graph inputs/outputs that are not tensors (scikit-learn's ZipMap: a sequence of maps).

    onnx_ir cannot represent map types, and every measurement compares tensors.
    """
    for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for value in values:
            which = value.type.WhichOneof("value")
            if which not in (None, "tensor_type"):
                hint = (" (scikit-learn's ZipMap: convert with options={'zipmap': False} to get a probability "
                        "tensor)" if which in ("sequence_type", "map_type") else "")
                raise PycompressError(f"{where}: graph {kind} '{value.name}' is a {which.replace('_type', '')}, "
                                      f"not a tensor; pycompress compresses tensor models{hint}")


def check_opsets(proto: onnx.ModelProto, *, where: str = "model") -> None:
    """Refuse a default-domain opset newer than this onnx knows (nothing could check or run it)."""
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= newest:
            raise PycompressError(f"{where}: opset {opset.version} is not supported (this onnx knows opsets "
                                  f"1..{newest})")


def check_finite_weights(model: ir.Model, *, where: str = "model") -> None:
    """Refuse a float initializer holding NaN or Inf (it would poison every SVD, fit and measurement)."""
    import numpy as np

    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or value.dtype is None or not value.dtype.is_floating_point():
            continue
        try:
            array = tensor.numpy()
        except Exception as exc:
            raise PycompressError(f"{where}: initializer '{name}' cannot be read ({type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise PycompressError(f"{where}: initializer '{name}' holds {bad} NaN/Inf value(s); refused")


def simplify_model(model: ir.Model, *, where: str = "model") -> None:
    """Fold constant subgraphs in place with onnxscript's optimizer.

    ConstantOfShape is folded too (onnxscript keeps it by default): the legacy
    torch exporter builds every "same" padding from one, and folding it lets
    the optimizer turn Pad + Conv into a Conv with pads. Shared weights
    (``Gather(codebook, Cast(uint8 indices))``) and int8 weights
    (``DequantizeLinear``) are kept: folding them would silently turn a shared
    or quantized model back into float weights.
    """
    import onnxscript.optimizer

    from pycompress.ir.graph import is_codebook_lookup

    def should_fold(node: ir.Node) -> bool | None:
        if node.op_type == "ConstantOfShape":
            return True
        if is_codebook_lookup(node) or node.op_type == "DequantizeLinear":
            # Folding DequantizeLinear(int8 weight) would turn an int8 model back into float.
            return False
        return None

    try:
        onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)
    except Exception as exc:  # a failed optimization must not lose the model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PycompressError(f"{where}: constant folding failed: {first} (retry with simplify off)") from exc
    _materialize_constant_of_shape(model)


# The largest ConstantOfShape output turned into an initializer (elements).
MAX_MATERIALIZED_ELEMENTS = 1 << 28


def _materialize_constant_of_shape(model: ir.Model) -> None:
    """Turn what onnxscript leaves unfolded (outputs above its size limit) into initializers.

    Model-zoo graphs build some weights as ``ConstantOfShape`` outputs: left as
    nodes they count as 0 parameters and no rewrite sees them as weights.
    """
    import numpy as np

    for node in list(model.graph):
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            continue
        shape_value = node.inputs[0] if node.inputs else None
        shape = None if shape_value is None or shape_value.const_value is None else shape_value.const_value.numpy()
        if shape is None or shape.ndim != 1 or (shape < 0).any() or int(np.prod(shape)) > MAX_MATERIALIZED_ELEMENTS:
            continue
        fill = node.attributes.get("value")
        fill_array = fill.as_tensor().numpy().reshape(-1)[:1] if fill is not None else np.zeros(1, np.float32)
        array = np.full(tuple(int(d) for d in shape), fill_array[0], dtype=fill_array.dtype)
        output = node.outputs[0]
        name = output.name
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        output.replace_all_uses_with(value)
        if output in model.graph.outputs:
            model.graph.outputs[list(model.graph.outputs).index(output)] = value
        model.graph.remove(node, safe=True)
        output.name = None
        value.name = name
        model.graph.register_initializer(value)


def infer_model_shapes(model: ir.Model, *, where: str = "model") -> None:
    """Run ONNX shape inference on the model in place (data propagation on)."""
    import logging

    # onnx_ir logs a failed inference (with its traceback) and keeps going with
    # the model unchanged: a type-mismatched model would load as if valid. The
    # failure is caught from its log record instead and refused.
    failures: list[logging.LogRecord] = []

    class _Catch(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            failures.append(record)
            return False

    logger = logging.getLogger("onnx_ir.passes.common.shape_inference")
    catch = _Catch()
    logger.addFilter(catch)
    try:
        # strict_mode off: an op onnx cannot infer leaves its outputs unknown
        # rather than failing the whole load.
        ShapeInferencePass(check_type=True, strict_mode=False, data_prop=True)(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PycompressError(f"{where}: shape inference failed: {first}") from exc
    finally:
        logger.removeFilter(catch)
    for record in failures:
        if record.levelno >= logging.WARNING and record.exc_info:
            exc = record.exc_info[1]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PycompressError(f"{where}: shape inference failed: {first}")


def model_nbytes(model: ir.Model) -> int:
    """Bytes of all initializer data (what dominates the file size)."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


@contextlib.contextmanager
def intermediate_shapes_hidden(model: ir.Model):
    """Serialize ``model`` without the inferred types and shapes of its intermediate values.

    Those ``value_info`` entries are derived data: pycompress re-infers them on
    load, and onnxruntime infers its own. Written out they change what
    onnxruntime fuses: with every shape known it fuses ``Add +
    LayerNormalization`` into ``SkipLayerNormalization``, which is 6x slower
    on CPU (onnxruntime 1.32, MiniLM: 103 against 16 us a call; the pruned int8
    encoder 3.48 against 2.31 ms, docs/transformers.md). Graph inputs and
    outputs keep their declared types and shapes.
    """
    outputs = {id(v) for v in model.graph.outputs}
    hidden = [(v, v.type, v.shape) for node in model.graph.all_nodes() for v in node.outputs
              if id(v) not in outputs and (v.type is not None or v.shape is not None)]
    for value, _, _ in hidden:
        value.type, value.shape = None, None
    try:
        yield model
    finally:
        for value, type_, shape in hidden:
            value.type, value.shape = type_, shape


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    overwrite_input: bool = False,
    external_data: bool | None = None,
) -> Path:
    """Write the model atomically; external data (``<name>.data``) when large.

    ``external_data=None`` chooses by size (above the 2 GB protobuf limit).
    Refuses to overwrite the file the model was loaded from unless
    ``overwrite_input``.
    """
    path = Path(path)
    source = model.meta.get("pycompress.source_path")
    if source and Path(source) == path.resolve() and not overwrite_input:
        raise PycompressError(f"{path}: refusing to overwrite the input model; choose another output path")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise PycompressError(f"{path}: output folder {folder} does not exist")
    if external_data is None:
        external_data = model_nbytes(model) > PROTO_LIMIT_BYTES // 2
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pycompress-") as tmp:
        tmp_model = Path(tmp) / path.name
        try:
            with intermediate_shapes_hidden(model):
                if external_data:
                    ir.save(model, tmp_model, external_data=data_name,
                            size_threshold_bytes=EXTERNAL_DATA_THRESHOLD_BYTES)
                else:
                    ir.save(model, tmp_model)
        except Exception as exc:
            raise PycompressError(f"{path}: could not write model: {exc}") from exc
        # Data first, then the model: a reader never sees a model whose data
        # file is missing.
        if external_data and (Path(tmp) / data_name).exists():
            os.replace(Path(tmp) / data_name, folder / data_name)
        os.replace(tmp_model, path)
    return path


def check_model(model: ir.Model, *, where: str = "rewritten model") -> None:
    """Run the onnx checker on an in-memory model (raises PycompressError)."""
    try:
        proto = ir.to_proto(model)
        if proto.ByteSize() < PROTO_LIMIT_BYTES:
            onnx.checker.check_model(proto)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PycompressError(f"{where}: ONNX checker failed: {first}") from exc
