"""Bring a PyTorch model into ONNX: export, then check torch against onnxruntime.

SOURCE is ``path/to/file.py:callable`` (the callable returns a
``torch.nn.Module``; the file is the user's own code and is run as such) or a
``torch.export`` archive ``.pt2``. Nothing is unpickled: ``.pt``/``.pth``
pickles are refused, since loading one runs arbitrary code.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pycompress.errors import PycompressError


@dataclass
class ConversionReport:
    output: str
    exporter: str
    seconds: float
    max_abs_diff: float
    max_abs_output: float
    tolerance: float

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(1.0, self.max_abs_output)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise PycompressError(f"--input-shape {text!r}: expected comma-separated integers like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise PycompressError(f"--input-shape {text!r}: dimensions must be positive integers")
    return dims


def load_module_source(source: str):
    """Return (torch module or ExportedProgram, description) for a SOURCE string."""
    import torch

    if source.endswith(".pt2"):
        path = Path(source)
        if not path.is_file():
            raise PycompressError(f"{source}: no such file")
        try:
            with _quiet_logging():  # torch logs a traceback of its own before raising
                return torch.export.load(str(path)), "exported program"
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise PycompressError(f"{source}: not a loadable torch.export archive ({type(exc).__name__}: "
                                  f"{first})") from None
    if source.endswith((".pt", ".pth", ".pkl", ".ckpt")):
        raise PycompressError(
            f"{source}: pickled checkpoints are not loaded (unpickling runs arbitrary code); "
            "pass file.py:factory that builds the module and loads its state_dict, or a torch.export .pt2"
        )
    if ":" not in source:
        raise PycompressError(f"{source}: expected path/to/file.py:callable or a .pt2 archive")
    file_part, _, attr = source.rpartition(":")
    path = Path(file_part)
    if not path.is_file():
        raise PycompressError(f"{file_part}: no such file")
    spec = importlib.util.spec_from_file_location(f"pycompress_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise PycompressError(f"{file_part}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    # The user's code runs in this process: a sys.exit() (or any SystemExit) in
    # it must not end pycompress with its exit code, as if the export had worked.
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:
        raise PycompressError(f"{file_part}: importing it called sys.exit({exc.code!r}); refused") from None
    except Exception as exc:
        raise PycompressError(f"{file_part}: importing it failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise PycompressError(f"{file_part}: has no attribute '{attr}'")
    try:
        built = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    except SystemExit as exc:
        raise PycompressError(f"{source}: calling it called sys.exit({exc.code!r}); refused") from None
    except Exception as exc:
        raise PycompressError(f"{source}: calling it failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(built, torch.nn.Module):
        raise PycompressError(f"{source}: returned {type(built).__name__}, expected a torch.nn.Module")
    return built, "module"


class user_code:
    """Run the user's module code so that it cannot end pycompress.

    ``sys.exit()`` anywhere in it (import, factory, forward during the export)
    and ``os._exit()`` become an error naming ``where`` instead of ending the
    process with the user's exit code as if the export had worked.
    """

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        def refuse_exit(code=0):
            raise PycompressError(f"{self.where}: the module called os._exit({code!r}); refused")

        self.saved_exit = os._exit
        os._exit = refuse_exit
        return self

    def __exit__(self, kind, exc, tb):
        os._exit = self.saved_exit
        if kind is not None and issubclass(kind, SystemExit):
            raise PycompressError(f"{self.where}: the module called sys.exit({exc.code!r}); refused") from None
        return False


class _quiet_logging:
    """Silence every logger for a block (a failed load must read as one line, not a logged traceback)."""

    def __enter__(self):
        import logging

        self.previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)

    def __exit__(self, *exc):
        import logging

        logging.disable(self.previous)


def _first_output(value, where: str) -> np.ndarray:
    """The module's first output as an array; anything else is refused (not passed off as a result)."""
    import torch

    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise PycompressError(f"{where}: the module returned {type(value).__name__}, expected a tensor "
                              "(or a tuple of tensors)")
    array = value.detach().cpu().numpy()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise PycompressError(f"{where}: the module's output holds NaN/Inf on random inputs; cannot verify "
                              "the export")
    return array


def export_to_onnx(
    model,
    input_shapes: list[tuple[int, ...]],
    output: str | os.PathLike,
    *,
    exporter: str = "legacy",
    opset: int = 17,
    dynamic_batch: bool = True,
    tolerance: float = 1e-3,
    seed: int = 0,
) -> ConversionReport:
    """Export a torch module (or ExportedProgram) and verify it with onnxruntime.

    ``tolerance`` bounds max|torch - ort| / max(1, max|torch|); above it the
    export is rejected and nothing is written.
    """
    import math

    import onnxruntime as ort
    import torch

    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise PycompressError(f"--tolerance {tolerance}: must be a finite number >= 0")
    if not 7 <= int(opset) <= 25:
        raise PycompressError(f"--opset {opset}: must be in 7..25")
    output = Path(output)
    is_program = isinstance(model, torch.export.ExportedProgram)
    if is_program:
        exporter = "dynamo"
        args = tuple(a for a in model.example_inputs[0])
        input_shapes = [tuple(a.shape) for a in args]
    else:
        if not input_shapes:
            raise PycompressError("--input-shape is required for a torch.nn.Module source")
        model = model.eval()
        gen = torch.Generator().manual_seed(seed)
        args = tuple(torch.randn(*shape, generator=gen) for shape in input_shapes)
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    start = time.perf_counter()
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise PycompressError(f"{output}: output folder {folder} does not exist")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pycompress-") as tmp:
        tmp_path = Path(tmp) / output.name
        try:
            if exporter == "legacy":
                dynamic_axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
                if dynamic_axes:
                    dynamic_axes["output"] = {0: "batch"}
                torch.onnx.export(model, args, str(tmp_path), dynamo=False, opset_version=opset,
                                  input_names=names, output_names=["output"], dynamic_axes=dynamic_axes,
                                  do_constant_folding=True)
            elif exporter == "dynamo":
                program = torch.onnx.export(model, args, dynamo=True, opset_version=max(opset, 18),
                                            input_names=None if is_program else names,
                                            external_data=False)
                program.save(str(tmp_path), external_data=False)
            else:
                raise PycompressError(f"--exporter {exporter!r}: choose legacy or dynamo")
        except PycompressError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise PycompressError(f"torch.onnx export failed: {type(exc).__name__}: {first}") from exc
        seconds = time.perf_counter() - start

        # Compared on the traced inputs and on a second draw: a forward written
        # with numpy (or any Python-side value) is traced as a constant that
        # matches on the first inputs only.
        gen2 = torch.Generator().manual_seed(seed + 1)
        draws = [args, tuple(torch.randn(*a.shape, generator=gen2).to(a.dtype) if a.is_floating_point() else a
                             for a in args)]
        try:
            session = ort.InferenceSession(str(tmp_path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PycompressError(f"{output}: onnxruntime cannot load the exported model: {first}") from None
        max_diff = max_out = 0.0
        for draw in draws:
            with torch.no_grad():
                expected = _first_output(model.module()(*draw) if is_program else model(*draw), "torch")
            feeds = {inp.name: a.numpy() for inp, a in zip(session.get_inputs(), draw)}
            try:
                got = session.run(None, feeds)[0]
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise PycompressError(f"{output}: onnxruntime cannot run the exported model: {first}") from None
            if not isinstance(got, np.ndarray) or got.shape != expected.shape:
                raise PycompressError(f"exported model's output shape {getattr(got, 'shape', None)} differs "
                                      f"from torch's {expected.shape}")
            if got.size:
                diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
                max_diff = max(max_diff, diff if math.isfinite(diff) else math.inf)
                max_out = max(max_out, float(np.max(np.abs(expected))))
        report = ConversionReport(output=str(output), exporter=exporter, seconds=seconds, max_abs_diff=max_diff,
                                  max_abs_output=max_out, tolerance=tolerance)
        if not report.relative_diff <= tolerance:
            raise PycompressError(
                f"exported model differs from torch: max |diff| = {report.max_abs_diff:.3g} "
                f"(relative {report.relative_diff:.3g} > tolerance {tolerance:g}); nothing written"
            )
        os.replace(tmp_path, output)
    return report
