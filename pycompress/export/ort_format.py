"""onnxruntime's ORT format (for mobile and minimal builds), with the
reduced-operator configuration written next to it (``<output stem>.required_operators.config``:
the operators a minimal onnxruntime build must include to run the model)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from pycompress.errors import PycompressError
from pycompress.export._quiet import quiet
from pycompress.ir import load_model


def config_path(output: Path) -> Path:
    return output.with_name(output.stem + ".required_operators.config")


def to_ort(source: Path, output: Path) -> dict[str, Any]:
    """Write ``output`` (.ort) and its operator config; returns the config path."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    load_model(source, simplify=False)  # validates the input with a clear error
    folder = output.parent if str(output.parent) else Path(".")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pycompress-") as tmp:
        staged = Path(tmp) / "model.onnx"
        staged.write_bytes(source.read_bytes())
        try:
            with quiet():
                convert_onnx_models_to_ort(staged, output_dir=Path(tmp) / "out",
                                           optimization_styles=[OptimizationStyle.Fixed])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PycompressError(f"{source}: ORT format conversion failed: {first}") from exc
        produced = Path(tmp) / "out" / "model.ort"
        configs = list((Path(tmp) / "out").glob("*.config"))
        if not produced.is_file() or len(configs) != 1:
            raise PycompressError(f"{source}: ORT format conversion wrote no model")
        os.replace(configs[0], config_path(output))
        os.replace(produced, output)
    return {"optimization": "fixed, level all", "operator_config": str(config_path(output))}
