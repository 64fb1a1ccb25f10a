"""Deployment formats: the packed Huffman container, int8 / int4 (onnxruntime
quantization), float16, and onnxruntime's ORT format.

``export_model`` writes one format, loads the result back, runs it against
the input model on sample inputs, and only then moves it into place.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pycompress.errors import PycompressError

FORMATS = {
    "packed": "Huffman-coded container (.pcz) of the 8-bit streams; `pycompress unpack` restores the ONNX file",
    "int8": "int8 QDQ, static (calibrated on --data, per-channel) or --dynamic (onnxruntime.quantization)",
    "int4": "int4 weight-only for MatMul/Gemm layers (onnxruntime MatMulNBits); Conv stays float",
    "fp16": "float16 weights and compute, float32 inputs/outputs",
    "ort": "onnxruntime ORT format + <name>.required_operators.config for reduced builds",
}


@dataclass
class ExportReport:
    format: str
    source: str
    output: str
    input_bytes: int
    output_bytes: int
    files: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.output_bytes / self.input_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def export_model(source: str | os.PathLike, to: str, output: str | os.PathLike, *,
                 calibration: Mapping[str, np.ndarray] | None = None, dynamic: bool = False,
                 sample_inputs: Mapping[str, np.ndarray] | None = None, samples: int = 8,
                 embedding_bits: int | None = None, embedding_group: int = 64) -> ExportReport:
    """Export ``source`` (.onnx) to format ``to`` at ``output``, verified by onnxruntime.

    ``calibration``: inputs for int8 static; ``sample_inputs``: inputs for the
    check run (else ``samples`` random inputs). ``embedding_bits=4`` (int8,
    int4): embedding tables as 4-bit codes per group of ``embedding_group``
    columns (0: per row), see ``pycompress.export.embedding``.
    """
    from pycompress.export import fp16, ort_format, packed, quantized
    from pycompress.export.verify import verify_export

    source, output = Path(source), Path(output)
    if to not in FORMATS:
        raise PycompressError(f"--to {to}: unknown format; choose from {', '.join(FORMATS)}")
    if not source.is_file():
        raise PycompressError(f"{source}: no such file")
    if output.exists() and output.resolve() == source.resolve():
        raise PycompressError(f"{output}: refusing to overwrite the input; choose another output path")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise PycompressError(f"{output}: output folder {folder} does not exist")
    if embedding_bits is not None and (embedding_bits != 4 or to not in ("int8", "int4")):
        raise PycompressError("--embedding-bits: only 4, with --to int8 or int4")
    if embedding_group < 0:
        raise PycompressError(f"--embedding-group {embedding_group}: must be 0 (per row) or a positive width")
    group = embedding_group if embedding_bits else None
    if to == "int8" and not dynamic and calibration is None:
        raise PycompressError("--to int8: static quantization needs calibration inputs (--data), or use --dynamic")

    with tempfile.TemporaryDirectory(dir=folder, prefix=".pycompress-") as tmp:
        staged = Path(tmp) / output.name
        extra: list[Path] = []
        if to == "packed":
            report = packed.pack_file(source, staged)
            details = report.to_dict()
            details.pop("output"), details.pop("source")
            runnable: Path | bytes = packed.unpack_bytes(staged.read_bytes(), where=str(output))
        elif to == "int8":
            details = (quantized.to_int8_dynamic(source, staged, embedding_group=group) if dynamic
                       else quantized.to_int8_static(source, staged, calibration, embedding_group=group))
            runnable = staged
        elif to == "int4":
            details = quantized.to_int4(source, staged, embedding_group=group)
            runnable = staged
        elif to == "fp16":
            details = fp16.to_fp16(source, staged)
            runnable = staged
        else:
            details = ort_format.to_ort(source, staged)
            extra.append(ort_format.config_path(staged))
            details["operator_config"] = str(ort_format.config_path(output))
            runnable = staged
        if to in ("int8", "int4"):      # written by onnxruntime's quantizers
            _drop_intermediate_shapes(staged)
        verification = verify_export(source, runnable, sample_inputs, samples=samples, where=str(output))
        # Everything checked: move into place (extra files first, the model last).
        finals = []
        for path in extra:
            final = folder / path.name
            os.replace(path, final)
            finals.append(str(final))
        os.replace(staged, output)
    return ExportReport(to, str(source), str(output), source.stat().st_size, output.stat().st_size, finals,
                        details, verification)


def _drop_intermediate_shapes(path: Path) -> None:
    """Re-save an onnxruntime-written model without its intermediate ``value_info``: with them
    onnxruntime fuses Add + LayerNormalization into its slower SkipLayerNormalization on CPU
    (``pycompress.ir.io.intermediate_shapes_hidden``)."""
    from pycompress.ir import load_model, save_model

    save_model(load_model(path, check=False, simplify=False, infer_shapes=False), path, overwrite_input=True)


__all__ = ["FORMATS", "ExportReport", "export_model"]
