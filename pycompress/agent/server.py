"""The measuring agent that runs on the device: models in, timings (and outputs) out.

Requests (``header["op"]``), each answered by one frame ``{"ok": true, ...}``
or ``{"ok": false, "error": "...", "code": "..."}``:

- ``describe``: CPU model, cores, OS, onnxruntime version and providers;
- ``put_model``: blob ``model`` with ``sha256``; kept in a cache by hash
  (least recently used dropped beyond ``max_cache_bytes``); ``has_model``:
  whether ``sha256`` is cached (a host sends a model only when it is not);
- ``run``: the cached model ``sha256`` (code ``unknown_model`` when it is not
  cached: the host then sends it), session options (``provider``,
  ``threads``, ``optimization``), the timed batch as blobs ``feed/NAME`` (or
  ``input_spec`` ``{NAME: {shape, dtype}}``: seeded N(0, 1) inputs),
  ``warmup`` and ``runs``; returns the run seconds and p50/p90/p99/mean in
  ms; with blobs ``data/NAME`` it also returns every output on those samples
  (blobs ``output/I``, computed in batches of ``output_batch``).

Security: the agent binds loopback unless told otherwise, and every request
carries the shared token, compared in constant time before its body is read.
Sizes are capped before reading, reads time out, arrays are ``.npy`` without
pickle. A request that cannot be parsed gets an error reply and its
connection is closed (the stream cannot be resynchronized); the agent goes
on serving other connections. Runs are serialized by a lock: two hosts never
time on the device at once.

Only the standard library, numpy and onnxruntime: this is what goes on the device.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import platform
import socket
import socketserver
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pycompress.agent.protocol import (
    Closed,
    ProtocolError,
    arrays_with_prefix,
    encode_array,
    encode_frame,
    read_body,
    read_header,
)

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
MAX_RUNS = 100_000


class RequestError(Exception):
    """A well-formed request the agent cannot serve (the connection stays open)."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


@dataclass
class AgentSettings:
    token: str
    max_model_bytes: int = 512 << 20
    max_data_bytes: int = 256 << 20      # input arrays of one request
    max_cache_bytes: int = 2 << 30
    timeout: float = 30.0                # seconds any single read may wait
    idle_timeout: float = 300.0          # seconds a connection may stay silent between requests
    max_connections: int = 8

    @property
    def max_body(self) -> int:
        return self.max_model_bytes + self.max_data_bytes


def describe_device() -> dict[str, Any]:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(),
            "system": f"{platform.system()} {platform.release()}", "hostname": platform.node(),
            "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers()}


def _percentiles(seconds: np.ndarray) -> dict[str, float]:
    ms = seconds * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}


class Agent:
    """Serves requests (transport-free: ``handle(header, blobs) -> (header, blobs)``)."""

    def __init__(self, settings: AgentSettings):
        if not settings.token:
            raise ValueError("the agent needs a token")
        self.settings = settings
        self._models: OrderedDict[str, bytes] = OrderedDict()
        self._models_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self.served = 0

    # -- checks done on the header, before the body is read ----------------------
    def authorize(self, header: Mapping[str, Any]) -> None:
        token = header.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode("utf-8"),
                                                                 self.settings.token.encode("utf-8")):
            raise RequestError("unauthorized: wrong or missing token", "unauthorized")

    def check_sizes(self, header: Mapping[str, Any]) -> None:
        s = self.settings
        model = sum(size for name, size in header["blobs"] if name == "model")
        data = sum(size for name, size in header["blobs"] if name != "model")
        if model > s.max_model_bytes:
            raise RequestError(f"model of {model} bytes exceeds the agent's limit of {s.max_model_bytes} bytes "
                               "(--max-model-mb)", "too_large")
        if data > s.max_data_bytes:
            raise RequestError(f"input arrays of {data} bytes exceed the agent's limit of {s.max_data_bytes} "
                               "bytes (--max-data-mb)", "too_large")

    # -- requests ------------------------------------------------------------
    def handle(self, header: Mapping[str, Any], blobs: Mapping[str, bytes]) -> tuple[dict[str, Any], dict]:
        op = header.get("op")
        if op == "describe":
            return {"ok": True, "device": describe_device(), "served": self.served,
                    "cached_models": len(self._models)}, {}
        if op == "has_model":
            with self._models_lock:
                return {"ok": True, "cached": header.get("sha256") in self._models}, {}
        if op == "put_model":
            return self._put_model(header, blobs), {}
        if op == "run":
            return self._run(header, blobs)
        raise RequestError(f"unknown op {op!r} (describe, has_model, put_model, run)")

    def _put_model(self, header: Mapping[str, Any], blobs: Mapping[str, bytes]) -> dict[str, Any]:
        data = blobs.get("model")
        if data is None:
            raise RequestError("put_model needs a blob named 'model'")
        digest = hashlib.sha256(data).hexdigest()
        if header.get("sha256") != digest:
            raise RequestError(f"model bytes hash to {digest}, not the announced {header.get('sha256')}",
                               "hash_mismatch")
        with self._models_lock:
            self._models[digest] = data
            self._models.move_to_end(digest)
            while sum(len(m) for m in self._models.values()) > self.settings.max_cache_bytes and \
                    len(self._models) > 1:
                self._models.popitem(last=False)
        return {"ok": True, "sha256": digest}

    def _model(self, digest: Any) -> bytes:
        with self._models_lock:
            if not isinstance(digest, str) or digest not in self._models:
                raise RequestError(f"model {digest} is not in the agent's cache", "unknown_model")
            self._models.move_to_end(digest)
            return self._models[digest]

    def _session(self, model: bytes, header: Mapping[str, Any]):
        import onnxruntime as ort

        provider = header.get("provider", "CPUExecutionProvider")
        threads = header.get("threads", 0)
        level = header.get("optimization", "all")
        if not isinstance(provider, str) or not isinstance(threads, int) or threads < 0:
            raise RequestError("'provider' must be a string and 'threads' an integer >= 0")
        if level not in OPTIMIZATION_LEVELS:
            raise RequestError(f"'optimization' must be one of {', '.join(OPTIMIZATION_LEVELS)}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RequestError(f"onnxruntime cannot load the model: {first}", "load_failed") from None
        if provider not in session.get_providers():
            raise RequestError(f"{provider} could not be loaded on the device (the session fell back to "
                               f"{', '.join(session.get_providers())})", "provider_unavailable")
        return session

    @staticmethod
    def _spec_inputs(spec: Any) -> dict[str, np.ndarray]:
        if not isinstance(spec, dict):
            raise RequestError("'input_spec' must map input names to {shape, dtype}")
        rng = np.random.default_rng(0)
        out = {}
        for name, item in spec.items():
            try:
                shape = tuple(int(d) for d in item["shape"])
                dtype = np.dtype(str(item["dtype"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise RequestError(f"input_spec '{name}': {exc}") from None
            if dtype.kind not in "fiub" or any(d < 0 for d in shape) or int(np.prod(shape)) > (64 << 20):
                raise RequestError(f"input_spec '{name}': unsupported dtype or shape")
            out[name] = rng.normal(size=shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
        return out

    def _run(self, header: Mapping[str, Any], blobs: Mapping[str, bytes]) -> tuple[dict[str, Any], dict]:
        started = time.perf_counter()
        model = self._model(header.get("sha256"))
        warmup, runs = header.get("warmup", 10), header.get("runs", 100)
        output_batch = header.get("output_batch", 32)
        if not all(isinstance(v, int) for v in (warmup, runs, output_batch)) or warmup < 0 or \
                not 1 <= runs <= MAX_RUNS or output_batch < 1:
            raise RequestError(f"'warmup' >= 0, 1 <= 'runs' <= {MAX_RUNS} and 'output_batch' >= 1 are required")
        try:
            feeds = arrays_with_prefix(blobs, "feed")
            data = arrays_with_prefix(blobs, "data")
        except ProtocolError as exc:
            raise RequestError(str(exc)) from None
        if not feeds:
            feeds = self._spec_inputs(header.get("input_spec"))
        with self._run_lock:
            session = self._session(model, header)
            names = [i.name for i in session.get_inputs()]
            missing = [n for n in names if n not in feeds]
            if missing:
                raise RequestError(f"no feed for the model input(s) {missing}")
            feeds = {n: feeds[n] for n in names}
            try:
                for _ in range(warmup):
                    session.run(None, feeds)
                seconds = np.empty(runs)
                for i in range(runs):
                    start = time.perf_counter()
                    session.run(None, feeds)
                    seconds[i] = time.perf_counter() - start
                outputs = self._outputs(session, names, data, output_batch) if data else None
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise RequestError(f"onnxruntime failed to run the model: {first}", "run_failed") from None
        reply = {"ok": True, "latency_ms": _percentiles(seconds), "seconds": seconds.tolist(),
                 "providers": session.get_providers()}
        out_blobs = {} if outputs is None else {f"output/{i}": encode_array(o) for i, o in enumerate(outputs)}
        reply["agent_seconds"] = time.perf_counter() - started   # the host's wall time minus this: the transport
        return reply, out_blobs

    @staticmethod
    def _outputs(session, names: list[str], data: Mapping[str, np.ndarray], batch: int) -> list[np.ndarray]:
        missing = [n for n in names if n not in data]
        if missing:
            raise RequestError(f"no data for the model input(s) {missing}")
        n = len(data[names[0]])
        parts = [session.run(None, {k: data[k][s:s + batch] for k in names}) for s in range(0, n, batch)]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


class _Handler(socketserver.BaseRequestHandler):
    server: AgentServer

    def handle(self) -> None:
        agent = self.server.agent
        sock: socket.socket = self.request
        if not self.server.slots.acquire(blocking=False):
            self._reply_error(sock, "busy: too many connections", "busy")
            return
        try:
            while True:
                if not self._serve_one(sock, agent):
                    break
        finally:
            self.server.slots.release()

    def _serve_one(self, sock: socket.socket, agent: Agent) -> bool:
        """One request; False when the connection must end."""
        s = agent.settings
        sock.settimeout(s.idle_timeout)
        try:
            header, _ = read_header(sock, max_body=s.max_body, timeout=s.timeout)
        except Closed:
            return False
        except ProtocolError as exc:
            self._reply_error(sock, str(exc), "bad_frame", drain=True)
            return False
        except OSError:
            return False
        try:
            agent.authorize(header)
            agent.check_sizes(header)
        except RequestError as exc:
            self._reply_error(sock, str(exc), exc.code, drain=True)
            return False
        try:
            blobs = read_body(sock, header)
        except ProtocolError as exc:
            self._reply_error(sock, str(exc), "bad_frame", drain=True)
            return False
        except OSError:
            return False
        try:
            reply, out = agent.handle(header, blobs)
        except RequestError as exc:
            reply, out = {"ok": False, "error": str(exc), "code": exc.code}, {}
        except Exception as exc:  # noqa: BLE001 - the agent must survive anything one request does
            reply, out = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}",
                          "code": "internal"}, {}
        agent.served += 1
        try:
            sock.sendall(encode_frame(reply, out))
        except OSError:
            return False
        return True

    def _reply_error(self, sock: socket.socket, message: str, code: str, drain: bool = False) -> None:
        """Reply, then (drain) read and drop what the peer still sends, a bounded amount and time,
        so that closing does not reset the connection before the peer reads the reply."""
        try:
            sock.sendall(encode_frame({"ok": False, "error": message, "code": code}))
            sock.shutdown(socket.SHUT_WR)
            if drain:
                sock.settimeout(1.0)
                deadline, left = time.monotonic() + 2.0, 64 << 20
                while left > 0 and time.monotonic() < deadline:
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        break
                    left -= len(chunk)
        except OSError:
            pass


class AgentServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, agent: Agent):
        self.agent = agent
        self.slots = threading.BoundedSemaphore(agent.settings.max_connections)
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(host: str, port: int, settings: AgentSettings, *, announce=None) -> None:
    """Serve until interrupted; ``announce(line)`` is told the bound address."""
    server = AgentServer(host, port, Agent(settings))
    try:
        if announce is not None:
            announce(f"pycompress agent listening on {host}:{server.port}")
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
