"""The host's side of the agent: send a model once (by hash), time it, get outputs back."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pycompress.agent.protocol import (
    ENV_TOKEN,
    ProtocolError,
    arrays_with_prefix,
    encode_array,
    encode_frame,
    parse_address,
    read_frame,
)
from pycompress.errors import PycompressError

MAX_REPLY_BYTES = 4 << 30


class DeviceUnavailable(PycompressError):
    """The agent cannot be reached or dropped the connection: the work may be retried elsewhere."""


class DeviceError(PycompressError):
    """The agent answered with an error (bad token, too large, model does not load, ...)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass
class DeviceRun:
    latency_ms: dict[str, float]        # p50, p90, p99, mean
    seconds: np.ndarray                 # every timed run
    outputs: list[np.ndarray] | None    # every model output on the data, when asked
    providers: list[str]
    agent_seconds: float = 0.0          # the agent's time on the request (session, runs, outputs)


def token_from_env() -> str:
    token = os.environ.get(ENV_TOKEN)
    if not token:
        raise PycompressError(f"--device needs the agent's token in the environment variable {ENV_TOKEN}")
    return token


def model_bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DeviceClient:
    """One connection to one agent (reopened after a failure); not shared between threads."""

    def __init__(self, address: str, token: str | None = None, *, timeout: float = 300.0):
        self.address = address
        self.host, self.port = parse_address(address)
        self.token = token if token is not None else token_from_env()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._sent: set[str] = set()      # models this agent process has (it forgets them on restart)

    # Picklable (for Ray workers): the connection is reopened where it lands.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_sock": None, "_sent": set()}

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = socket.create_connection((self.host, self.port), timeout=min(self.timeout, 10.0))
            except OSError as exc:
                raise DeviceUnavailable(f"device {self.address}: cannot connect ({exc.strerror or exc})") from None
            self._sock.settimeout(self.timeout)
            self._sent.clear()
        return self._sock

    def request(self, header: Mapping[str, Any], blobs: Mapping[str, bytes] | None = None
                ) -> tuple[dict[str, Any], dict[str, bytes]]:
        sock = self._connect()
        frame = encode_frame({**header, "token": self.token}, blobs)
        try:
            try:
                sock.sendall(frame)
            except OSError:
                pass  # the agent may have refused early (too large, bad token): its reply says why
            reply, out = read_frame(sock, max_body=MAX_REPLY_BYTES)
        except (OSError, ProtocolError) as exc:
            self.close()
            raise DeviceUnavailable(f"device {self.address}: connection lost ({exc})") from None
        if not reply.get("ok"):
            code = str(reply.get("code", "error"))
            if code in ("bad_frame", "unauthorized", "too_large", "busy"):
                self.close()   # the agent closes these connections
            raise DeviceError(f"device {self.address}: {reply.get('error', 'unknown error')}", code)
        return reply, out

    def describe(self) -> dict[str, Any]:
        return self.request({"op": "describe"})[0]["device"]

    def put_model(self, model: bytes) -> str:
        digest = model_bytes_sha256(model)
        self.request({"op": "put_model", "sha256": digest}, {"model": model})
        self._sent.add(digest)
        return digest

    def run(self, model: bytes, feeds: Mapping[str, np.ndarray], *, data: Mapping[str, np.ndarray] | None = None,
            provider: str = "CPUExecutionProvider", threads: int = 0, optimization: str = "all",
            warmup: int = 10, runs: int = 100, output_batch: int = 32) -> DeviceRun:
        """Time ``model`` on ``feeds`` (and its outputs on ``data``); the model is sent only if the agent lacks it
        (asked by hash: the agent keeps models between connections)."""
        digest = model_bytes_sha256(model)
        header = {"op": "run", "sha256": digest, "provider": provider, "threads": int(threads or 0),
                  "optimization": optimization, "warmup": int(warmup), "runs": int(runs),
                  "output_batch": int(output_batch)}
        blobs = {f"feed/{k}": encode_array(v) for k, v in feeds.items()}
        blobs.update({f"data/{k}": encode_array(v) for k, v in (data or {}).items()})
        for attempt in range(2):
            if digest not in self._sent:
                if attempt or not self.request({"op": "has_model", "sha256": digest})[0]["cached"]:
                    self.put_model(model)
                self._sent.add(digest)
            try:
                reply, out = self.request(header, blobs)
                break
            except DeviceError as exc:
                if exc.code != "unknown_model" or attempt:
                    raise
                self._sent.discard(digest)      # evicted from the agent's cache: send it again
        outputs = None
        if data:
            arrays = arrays_with_prefix(out, "output")
            outputs = [arrays[str(i)] for i in range(len(arrays))]
        return DeviceRun(reply["latency_ms"], np.asarray(reply["seconds"], np.float64), outputs,
                         list(reply.get("providers", [])), float(reply.get("agent_seconds", 0.0)))
