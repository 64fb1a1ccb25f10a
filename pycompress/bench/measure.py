"""Latency, size, cost and fidelity of model files on one execution provider.

Latency: every model's session is opened first and warmed up (``warmup``
untimed runs), then the ``iters`` timed ``session.run`` calls on one batch
are made in ``rounds`` rounds over all models (each round times a slice of
every model's runs, the order rotated from round to round). Timing the
models one after another let a shared machine's slow minute land on one model
only: ORT's static int8 Lite0 read 1.76x faster than fp32 that way and 0.97x
interleaved. Reported: p50/p90/p99/mean over all runs, the spread (lowest and
highest per-round median) and the intra-op thread count actually used;
throughput = batch / mean time. Fidelity (with data): every model against the
first one (ALGORITHMS.md 2, 5), see ``fidelity.compare``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
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
    threads: int = 0                                 # intra-op threads used (onnxruntime's default resolved)
    batch: int = 1
    latency_ms: dict[str, float] | None = None      # p50, p90, p99, mean, round_p50_min, round_p50_max
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


def _summary(rounds_ms: Sequence[np.ndarray]) -> dict[str, float]:
    ms = np.concatenate(rounds_ms)
    medians = [float(np.median(r)) for r in rounds_ms if len(r)]
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()),
            "round_p50_min": min(medians), "round_p50_max": max(medians), "rounds": len(medians)}


def measure_interleaved(runs: Sequence[tuple[Any, Mapping[str, np.ndarray]]], warmup: int, iters: int,
                        rounds: int = 10) -> list[dict[str, float]]:
    """Latency of several ``(session, feeds)``: warm-up each, then ``rounds`` rounds over all of them."""
    for session, feeds in runs:
        for _ in range(warmup):
            session.run(None, feeds)
    rounds = max(1, min(rounds, iters))
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    times: list[list[np.ndarray]] = [[] for _ in runs]
    for r, count in enumerate(per_round):
        for k in range(len(runs)):
            index = (k + r) % len(runs)        # rotate: no model always runs right after another
            session, feeds = runs[index]
            lap = np.empty(count)
            for i in range(count):
                start = time.perf_counter()
                session.run(None, feeds)
                lap[i] = time.perf_counter() - start
            times[index].append(lap * 1e3)
    return [_summary(t) for t in times]


def measure_latency(session, feeds: Mapping[str, np.ndarray], warmup: int, iters: int) -> dict[str, float]:
    """One model's latency (``measure_interleaved`` with one model)."""
    return measure_interleaved([(session, feeds)], warmup, iters)[0]


def intra_op_threads(threads: int | None) -> int:
    """The intra-op thread count onnxruntime uses: ``threads``, or its default (one per physical core)."""
    if threads:
        return int(threads)
    cores = set()
    try:   # Linux: distinct (package, core) pairs of the CPUs this process may use
        allowed = os.sched_getaffinity(0)
        block: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            key, _, value = line.partition(":")
            if key.strip():
                block[key.strip()] = value.strip()
            elif block:
                if int(block.get("processor", -1)) in allowed:
                    cores.add((block.get("physical id"), block.get("core id", block.get("processor"))))
                block = {}
    except (OSError, AttributeError, ValueError):
        pass
    return len(cores) or os.cpu_count() or 1


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]


def checked_bench_paths(paths: Sequence[str | os.PathLike], *, batch: int, iters: int, warmup: int) -> list[Path]:
    """The models to bench as paths, after the checks every bench (local or on a device) makes first."""
    if batch < 1 or iters < 1 or warmup < 0:
        raise PycompressError("--batch and --iters must be >= 1, --warmup >= 0")
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise PycompressError(f"{path}: no such file")
    return paths


def bench_models(paths: Sequence[str | os.PathLike], *, provider: str = "cpu", threads: int | None = None,
                 batch: int = 1, warmup: int = 10, iters: int = 100,
                 data: Mapping[str, np.ndarray] | None = None, progress=None, rounds: int = 10) -> list[ModelBench]:
    """Measure every model, interleaved; a model that cannot load on the provider gets ``error`` and no timings."""
    resolve_provider(provider)
    paths = checked_bench_paths(paths, batch=batch, iters=iters, warmup=warmup)
    results: list[ModelBench] = []
    prepared = []
    for path, name in zip(paths, _unique_names(paths)):
        row = ModelBench(str(path), name, file_bytes(path), provider=resolve_provider(provider),
                         threads=intra_op_threads(threads), batch=batch)
        row.params, row.macs = model_accounting(path)
        results.append(row)
        prepared.append(_prepare(row, path, provider, threads, batch, data))
    timed = [(row, run) for row, run in zip(results, prepared) if run is not None]
    for (row, _), latency in zip(timed, measure_interleaved([run for _, run in timed], warmup, iters, rounds)):
        row.latency_ms = latency
        row.throughput = batch / (latency["mean"] / 1e3)
    reference: np.ndarray | None = None
    for index, (row, path, run) in enumerate(zip(results, paths, prepared)):
        outputs = None
        if run is not None and data is not None:
            session = run[0]
            outputs = run_all(session, data, batch_size=static_batch(session) or max(batch, 32))[0]
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


def _prepare(row: ModelBench, path: Path, provider: str, threads: int | None, batch: int,
             data: Mapping[str, np.ndarray] | None):
    """(session, timed feeds), or None with ``row.error`` set when the model cannot run."""
    try:
        session = open_session(path, provider, threads)
    except ProviderUnavailable as exc:
        row.error = str(exc)
        return None
    row.error = batch_mismatch(session, path, batch)
    return None if row.error else (session, timed_feeds(session, path, batch, data))


def batch_mismatch(session, path: Path, batch: int) -> str | None:
    """Why ``--batch`` cannot run this model (its batch is fixed at another size), or None."""
    fixed = static_batch(session)
    if fixed is not None and fixed != batch:
        return f"{path}: the model's batch is fixed at {fixed}; run with --batch {fixed}"
    return None


def timed_feeds(session, path: Path, batch: int, data: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The inputs of every timed run, here or on a device: the data's first batch, else random
    inputs (token ids within the embedding's vocabulary); ``session`` lists the inputs."""
    if data is not None:
        available = len(next(iter(data.values())))
        if available < batch:
            raise PycompressError(f"--batch {batch}: the data has only {available} samples")
        feeds = batches(data, batch)[0]
    else:
        feeds = random_inputs(session, batch, vocabulary=token_vocabulary(path))
    return {i.name: feeds[i.name] for i in session.get_inputs()}
