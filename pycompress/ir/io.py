"""Load and save ONNX models safely.

Loading validates before anything else touches the model: the file parses,
external data stays inside the model's folder, the onnx checker passes, and
shapes are inferred. Saving is atomic (temp file + rename) and never
overwrites the input unless asked.
"""

from __future__ import annotations

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
        total += int(info.get("length", target.stat().st_size))
    return total


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
    external = check_external_data(proto, path)
    if check:
        try:
            # By path: works for models above the 2 GB protobuf limit too.
            onnx.checker.check_model(str(path))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PycompressError(f"{path}: ONNX checker failed: {first}") from exc
    del proto
    model = ir.load(path)
    if simplify:
        simplify_model(model, where=str(path))
    if infer_shapes:
        infer_model_shapes(model, where=str(path))
    model.meta["pycompress.source_path"] = str(path.resolve())
    model.meta["pycompress.external_bytes"] = external
    return model


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


def infer_model_shapes(model: ir.Model, *, where: str = "model") -> None:
    """Run ONNX shape inference on the model in place (data propagation on)."""
    try:
        # strict_mode off: an op onnx cannot infer leaves its outputs unknown
        # rather than failing the whole load.
        ShapeInferencePass(check_type=True, strict_mode=False, data_prop=True)(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PycompressError(f"{where}: shape inference failed: {first}") from exc


def model_nbytes(model: ir.Model) -> int:
    """Bytes of all initializer data (what dominates the file size)."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


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
