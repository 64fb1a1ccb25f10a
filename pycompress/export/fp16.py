"""float16 weights and compute via onnxruntime's converter; inputs and outputs
stay float32 (``keep_io_types``) so the model is a drop-in replacement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.export._quiet import quiet
from pycompress.ir import check_model, intermediate_shapes_hidden, load_model


def to_fp16(source: Path, output: Path) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    load_model(source, simplify=False)  # validates the input with a clear error
    try:
        with quiet():
            converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        # The converter appends its input Casts after the nodes that read them:
        # onnxruntime accepts that, the onnx checker (and other runtimes) do not.
        model = ir.from_proto(converted)
        model.graph.sort()
        check_model(model, where=f"{output} (float16)")
        with intermediate_shapes_hidden(model):      # as pycompress.ir.save_model writes models
            ir.save(model, output)
    except PycompressError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PycompressError(f"{source}: float16 conversion failed: {first}") from exc
    return {"weights": "float16", "io": "float32"}
