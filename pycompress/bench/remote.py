"""Timing on a target device through its agent (``pycompress.agent``): ``bench --device``
and the latency probe of ``compress --objective latency --device``.

The host prepares everything that needs the model file (feeds from the data
or seeded random inputs, parameters and MACs, the comparison of outputs) and
the device only runs onnxruntime: the figures are the device's, computed as
``bench`` computes them locally.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir

from pycompress.agent.client import (
    DeviceClient,
    DeviceError,
    DeviceUnavailable,
    token_from_env,
)
from pycompress.bench.measure import (
    ModelBench,
    _unique_names,
    batch_mismatch,
    checked_bench_paths,
    file_bytes,
    model_accounting,
    timed_feeds,
)
from pycompress.bench.runtime import (
    open_session,
    resolve_provider,
    static_batch,
)
from pycompress.errors import PycompressError
from pycompress.fidelity.compare import compare_outputs
from pycompress.fidelity.latency import Timing, latency_ratio, trimmed_timing


def parse_devices(text: str) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]`` -> the addresses (checked)."""
    from pycompress.agent.protocol import parse_address

    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise PycompressError("--device: give HOST:PORT[,HOST:PORT...]")
    for d in devices:
        parse_address(d)
    return devices


def model_file_bytes(path: Path, total_bytes: int) -> bytes:
    """The bytes to send: the file itself, or (``total_bytes``, with the external data next to it, more
    than the file) the model with its data inlined."""
    if path.suffix == ".onnx" and total_bytes != path.stat().st_size:
        import onnx

        return onnx.load(str(path)).SerializeToString()
    return path.read_bytes()


def bench_models_on_device(paths: Sequence[str | os.PathLike], device: str, *, provider: str = "cpu",
                           threads: int | None = None, batch: int = 1, warmup: int = 10, iters: int = 100,
                           data: Mapping[str, np.ndarray] | None = None, token: str | None = None,
                           progress=None) -> tuple[list[ModelBench], dict]:
    """``bench_models`` with the runs on the agent at ``device``: (rows, the device's description)."""
    wanted = resolve_provider(provider)
    paths = checked_bench_paths(paths, batch=batch, iters=iters, warmup=warmup)
    client = DeviceClient(device, token)
    try:
        description = client.describe()
        results: list[ModelBench] = []
        reference = None
        for index, (path, name) in enumerate(zip(paths, _unique_names(paths))):
            row = ModelBench(str(path), name, file_bytes(path), provider=wanted, threads=int(threads or 0),
                             batch=batch)
            row.params, row.macs = model_accounting(path)
            results.append(row)
            outputs = _measure_on_device(client, row, path, wanted, threads, batch, warmup, iters, data)
            if outputs is not None:
                if index == 0:
                    reference = outputs
                if reference is not None and outputs.shape != reference.shape:
                    row.error = (f"{path}: output shape {outputs.shape} differs from the first model's "
                                 f"{reference.shape}")
                elif reference is not None:
                    row.fidelity = compare_outputs(reference, outputs).to_dict()
            if progress is not None:
                progress(row)
    finally:
        client.close()
    return results, description


class _GraphInputs:
    """The model's inputs as ``session.get_inputs()`` lists them, read from the ONNX file: feeds for the
    device are made as a local bench makes them, without building a session here."""

    def __init__(self, path: Path):
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        self._inputs = [SimpleNamespace(
            name=v.name, type=f"tensor({onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()})",
            shape=[d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                   for d in v.type.tensor_type.shape.dim]) for v in graph.input if v.name not in weights]

    def get_inputs(self) -> list[SimpleNamespace]:
        return self._inputs


def _measure_on_device(client: DeviceClient, row: ModelBench, path: Path, provider: str, threads: int | None,
                       batch: int, warmup: int, iters: int, data: Mapping[str, np.ndarray] | None):
    # The feeds are made on the host, from the same input metadata and seed as a local bench.
    local = _GraphInputs(path) if path.suffix == ".onnx" else open_session(path, "cpu")
    row.error = batch_mismatch(local, path, batch)
    if row.error:
        return None
    fixed = static_batch(local)
    feeds = timed_feeds(local, path, batch, data)
    names = list(feeds)
    try:
        run = client.run(model_file_bytes(path, row.file_bytes), feeds, data={n: data[n] for n in names} if data else None,
                         provider=provider, threads=int(threads or 0), warmup=warmup, runs=iters,
                         output_batch=fixed or max(batch, 32))
    except DeviceError as exc:
        if exc.code in ("provider_unavailable", "load_failed", "run_failed"):
            row.error = f"{path}: {exc}"
            return None
        raise
    row.latency_ms = run.latency_ms
    row.throughput = batch / (run.latency_ms["mean"] / 1e3)
    return None if run.outputs is None else run.outputs[0]


class RemoteLatencyProbe:
    """``LatencyProbe`` with the timings on one or more devices (``compress --objective latency --device``).

    Each device has its own baseline (the original timed there): a ratio is
    always candidate / original on the same device, so devices of different
    speed can share the work. A free device is taken from a queue (threads
    of a parallel executor time on different devices at once). A device that
    fails is skipped and the candidate timed on the next one; when none
    answers, the evaluation fails with a message saying so and the search,
    saved after every evaluation, continues with ``--resume``.
    """

    def __init__(self, original: ir.Model, feeds: Mapping[str, np.ndarray], devices: Sequence[str], *,
                 runs: int = 10, baseline_runs: int = 40, threads: int | None = None, token: str | None = None,
                 warmup: int = 2):
        if runs < 3:
            raise PycompressError(f"--latency-runs must be at least 3 (a timing needs a spread), got {runs}")
        self.devices = list(devices)
        self.token = token if token is not None else token_from_env()
        self.feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        self.runs, self.baseline_runs, self.warmup = int(runs), int(baseline_runs), int(warmup)
        self.threads = int(threads or 0)
        self.original = ir.to_proto(original).SerializeToString()
        self.baselines: dict[str, Timing] = {}
        self._init_runtime()
        # The first device that answers times the original now: a bad address or token fails at once.
        self._timed(self.original, self.baseline_runs, baseline=True)

    def _init_runtime(self, start: int = 0) -> None:
        self._free: queue.Queue[DeviceClient] = queue.Queue()
        for i in range(len(self.devices)):
            self._free.put(DeviceClient(self.devices[(start + i) % len(self.devices)], self.token))
        self._lock = threading.Lock()

    # Picklable (Ray workers): connections and locks are made anew where it lands.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_free", "_lock")}

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        # Worker processes (Ray) each start with a different device, not all with the first.
        self._init_runtime(start=os.getpid())

    @property
    def baseline(self) -> Timing:
        return next(iter(self.baselines.values()))

    def _timed(self, model: bytes, runs: int, *, baseline: bool = False) -> tuple[Timing, str]:
        """Time ``model`` on the first free device that answers: (timing, that device).

        A device that fails is skipped: every other device is tried once, on a
        connection of its own (the queue's may be busy in another thread, and
        waiting for it could deadlock two threads that each hold a dead one).
        """
        failures: list[str] = []
        client = self._free.get()
        try:
            return self._attempt(client, model, runs, baseline), client.address
        except DeviceUnavailable as exc:
            failures.append(str(exc))
        finally:
            self._free.put(client)
        for address in self.devices:
            if address == client.address:
                continue
            other = DeviceClient(address, self.token)
            try:
                return self._attempt(other, model, runs, baseline), address
            except DeviceUnavailable as exc:
                failures.append(str(exc))
            finally:
                other.close()
        raise PycompressError("no device could time the model (" + "; ".join(failures) + "); finished "
                              "evaluations are saved in the run folder: start the agent(s) again and continue "
                              "with --resume RUN_DIR")

    def _attempt(self, client: DeviceClient, model: bytes, runs: int, baseline: bool) -> Timing:
        if not baseline and client.address not in self.baselines:
            self._baseline(client)
        run = client.run(model, self.feeds, threads=self.threads, warmup=self.warmup, runs=runs)
        if baseline:
            with self._lock:
                self.baselines.setdefault(client.address, trimmed_timing(run.seconds))
        return trimmed_timing(run.seconds)

    def _baseline(self, client: DeviceClient) -> None:
        run = client.run(self.original, self.feeds, threads=self.threads, warmup=self.warmup,
                         runs=self.baseline_runs)
        with self._lock:
            self.baselines.setdefault(client.address, trimmed_timing(run.seconds))

    def ratio(self, model: ir.Model) -> tuple[float, float]:
        """``(R, var R)`` of ``model`` against the original, on whichever device timed it."""
        timing, address = self._timed(ir.to_proto(model).SerializeToString(), self.runs)
        return latency_ratio(timing, self.baselines[address])
