"""Latency, size, cost and fidelity of model files on one execution provider.

Latency: ``warmup`` untimed runs, then ``iters`` timed ``session.run`` calls
on one batch; p50/p90/p99 of those, throughput = batch / mean time. Fidelity
(with data): every model against the first one (ALGORITHMS.md 2, 5), see
``fidelity.compare``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pycompress.bench.runtime import ProviderUnavailable, batches, open_session, random_inputs, resolve_provider, \
    run_all, static_batch, token_vocabulary
from pycompress.errors import PycompressError
from pycompress.fidelity.compare import compare_outputs


@dataclass
class ModelBench:
    path: str
    name: str
    file_bytes: int
    params: int | None = None
    macs: int | None = None
    provider: str = ""
    threads: int = 0
    batch: int = 1
    latency_ms: dict[str, float] | None = None      # p50, p90, p99, mean
    throughput: float | None = None                  # samples per second
    fidelity: dict[str, Any] | None = None           # against the first model, with data
    error: str | None = None                         # why this model could not be measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_bytes(path: Path) -> int:
    """The model file plus its external data files (next to it)."""
    total = path.stat().st_size
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        locations = {entry.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                     for entry in t.external_data if entry.key == "location"}
        total += sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())
    return total


def model_accounting(path: Path) -> tuple[int | None, int | None]:
    """(stored parameters, MACs) of an .onnx file; (None, None) for .ort.

    Parameters are counted on the file as written (int8 / shared weights as
    stored); MACs need the static shapes that only appear after constant
    folding (exporters compute paddings with Shape/ConstantOfShape chains).
    """
    if path.suffix != ".onnx":
        return None, None
    from pycompress.ir import SEQUENCE_LENGTH, has_sequence_axis, infer_model_shapes, load_model, model_cost, \
        simplify_model

    model = load_model(path, simplify=False)
    params = model_cost(model).params
    simplify_model(model, where=str(path))
    infer_model_shapes(model, where=str(path))
    # A token model: MACs per sequence of SEQUENCE_LENGTH tokens (ir.accounting).
    return params, model_cost(model, SEQUENCE_LENGTH if has_sequence_axis(model) else None).macs


def measure_latency(session, feeds: Mapping[str, np.ndarray], warmup: int, iters: int) -> dict[str, float]:
    for _ in range(warmup):
        session.run(None, feeds)
    times = np.empty(iters)
    for i in range(iters):
        start = time.perf_counter()
        session.run(None, feeds)
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]


def bench_models(paths: Sequence[str | os.PathLike], *, provider: str = "cpu", threads: int | None = None,
                 batch: int = 1, warmup: int = 10, iters: int = 100,
                 data: Mapping[str, np.ndarray] | None = None, progress=None) -> list[ModelBench]:
    """Measure every model; a model that cannot load on the provider gets ``error`` and no timings."""
    resolve_provider(provider)
    if batch < 1 or iters < 1 or warmup < 0:
        raise PycompressError("--batch and --iters must be >= 1, --warmup >= 0")
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise PycompressError(f"{path}: no such file")
    results: list[ModelBench] = []
    reference: np.ndarray | None = None
    for index, (path, name) in enumerate(zip(paths, _unique_names(paths))):
        row = ModelBench(str(path), name, file_bytes(path), provider=resolve_provider(provider),
                         threads=int(threads or 0), batch=batch)
        row.params, row.macs = model_accounting(path)
        results.append(row)
        outputs = _measure(row, path, provider, threads, batch, warmup, iters, data)
        if outputs is not None:
            if index == 0:
                reference = outputs
            if reference is not None and outputs.shape != reference.shape:
                row.error = f"{path}: output shape {outputs.shape} differs from the first model's {reference.shape}"
            elif reference is not None:
                row.fidelity = compare_outputs(reference, outputs).to_dict()
        if progress is not None:
            progress(row)
    return results


def _measure(row: ModelBench, path: Path, provider: str, threads: int | None, batch: int, warmup: int, iters: int,
             data: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """Fill the row's timings; return the first output on ``data`` (None without data or when not run)."""
    try:
        session = open_session(path, provider, threads)
    except ProviderUnavailable as exc:
        row.error = str(exc)
        return None
    fixed = static_batch(session)
    if fixed is not None and fixed != batch:
        row.error = f"{path}: the model's batch is fixed at {fixed}; run with --batch {fixed}"
        return None
    if data is not None:
        available = len(next(iter(data.values())))
        if available < batch:
            raise PycompressError(f"--batch {batch}: the data has only {available} samples")
        feeds = batches(data, batch)[0]
    else:
        feeds = random_inputs(session, batch, vocabulary=token_vocabulary(path))
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    row.latency_ms = measure_latency(session, feeds, warmup, iters)
    row.throughput = batch / (row.latency_ms["mean"] / 1e3)
    if data is None:
        return None
    return run_all(session, data, batch_size=fixed or max(batch, 32))[0]
