"""onnxruntime sessions on model files (.onnx / .ort) for a named execution
provider, and the inputs to feed them.

A provider is only "used" if the session says so: ``onnxruntime-gpu`` lists
CUDA in ``get_available_providers()`` on machines where it cannot load (no
driver, wrong CUDA), and a session then silently falls back to CPU. So the
session is created and ``get_providers()`` is read (ARCHITECTURE.md).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pycompress.errors import PycompressError
from pycompress.ir.accounting import SEQUENCE_LENGTH

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}


class ProviderUnavailable(PycompressError):
    """The requested execution provider did not load for this model."""


def resolve_provider(name: str) -> str:
    """'cpu' / 'cuda' / ... or a full onnxruntime name ('CUDAExecutionProvider')."""
    key = name.strip()
    if key.lower() in PROVIDERS:
        return PROVIDERS[key.lower()]
    if key.endswith("ExecutionProvider"):
        return key
    raise PycompressError(f"--provider {name}: unknown execution provider; use one of "
                          f"{', '.join(PROVIDERS)} or a full onnxruntime name")


def open_session(model: str | os.PathLike | bytes, provider: str = "cpu", threads: int | None = None,
                 *, where: str | None = None):
    """An InferenceSession on ``provider``; ProviderUnavailable if it did not load.

    ``threads``: intra-op threads (None or 0 = onnxruntime's default).
    """
    import onnxruntime as ort

    wanted = resolve_provider(provider)
    label = where or (str(model) if not isinstance(model, bytes) else "model")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    providers = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
    source = model if isinstance(model, bytes) else str(Path(model))
    try:
        with warnings.catch_warnings():
            # "Specified provider ... is not in available provider names": we report it ourselves.
            warnings.simplefilter("ignore", UserWarning)
            session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if wanted != "CPUExecutionProvider" and wanted.replace("ExecutionProvider", "") in first:
            raise ProviderUnavailable(f"{label}: {wanted} could not be loaded ({first})") from exc
        raise PycompressError(f"{label}: onnxruntime cannot load the model: {first}") from exc
    loaded = session.get_providers()
    if wanted not in loaded:
        raise ProviderUnavailable(f"{label}: {wanted} could not be loaded (the session fell back to "
                                  f"{', '.join(loaded)})")
    return session


def _dims(shape: Sequence, batch: int) -> list[int]:
    dims = []
    for i, d in enumerate(shape):
        dims.append(d if isinstance(d, int) and d > 0 else (batch if i == 0 else 1))
    return dims


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
                "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def static_batch(session) -> int | None:
    """The fixed first dimension shared by the inputs, or None when it is free."""
    fixed = {i.shape[0] for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    return fixed.pop() if len(fixed) == 1 else None


def random_inputs(session, count: int, seed: int = 0,
                  vocabulary: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """``count`` samples per input: N(0, 1) for float inputs; for integer ones (a token
    model, see ``pycompress.data.synthetic``) ones for ``*mask*``, ids uniform in
    ``vocabulary[name]`` when given, else zeros; symbolic dimensions besides the
    batch are ``SEQUENCE_LENGTH`` when the model has integer inputs (a sequence), else 1."""
    rng = np.random.default_rng(seed)
    out = {}
    tokens = any(_NUMPY_TYPES.get(i.type, np.float32) in (np.int64, np.int32) for i in session.get_inputs())
    for info in session.get_inputs():
        dtype = _NUMPY_TYPES.get(info.type)
        if dtype is None:
            raise PycompressError(f"input '{info.name}' has type {info.type}: give sample inputs with --data")
        dims = _dims(info.shape, count)
        if tokens:
            dims = [SEQUENCE_LENGTH if i > 0 and not (isinstance(d, int) and d > 0) else n
                    for i, (d, n) in enumerate(zip(info.shape, dims))]
        if info.shape and isinstance(info.shape[0], int) and info.shape[0] > 0:
            dims[0] = count  # several fixed-size batches, split by `batches`
        vocab = (vocabulary or {}).get(info.name)
        if np.dtype(dtype).kind == "f":
            out[info.name] = rng.normal(size=dims).astype(dtype)
        elif "mask" in info.name.lower():
            out[info.name] = np.ones(dims, dtype)
        elif vocab and "type" not in info.name.lower():
            out[info.name] = rng.integers(0, vocab, size=dims).astype(dtype)
        else:
            out[info.name] = np.zeros(dims, dtype)
    return out


def token_vocabulary(path) -> dict[str, int]:
    """Input name -> rows of the embedding table it indexes (token models; empty otherwise)."""
    from pycompress.ir import embedding_vocabulary, load_model

    try:
        model = load_model(path, simplify=False)
    except Exception:  # noqa: BLE001 - a format the ONNX loader does not read (.ort): no vocabulary
        return {}
    return {v.name: n for v in model.graph.inputs if (n := embedding_vocabulary(v))}


def batches(inputs: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(inputs.values())))
    return [{k: v[start:start + size] for k, v in inputs.items()} for start in range(0, n, size)]


def run_all(session, inputs: Mapping[str, np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
    """Every output of the session on all samples (batched to the model's fixed batch if it has one)."""
    names = {i.name for i in session.get_inputs()}
    missing = names - set(inputs)
    if missing:
        raise PycompressError(f"sample inputs lack the model input(s) {sorted(missing)}")
    size = static_batch(session) or batch_size
    feeds = {k: v for k, v in inputs.items() if k in names}
    n = len(next(iter(feeds.values())))
    if n % size and static_batch(session):
        raise PycompressError(f"the model's batch is fixed at {size}: give a multiple of {size} samples")
    parts = [session.run(None, feed) for feed in batches(feeds, size)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
