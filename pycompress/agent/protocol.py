"""The agent's wire format: length-prefixed frames of a JSON header and raw blobs.

One frame::

    b"PCAG" | version u8 | header length u32 | body length u64 | header | body

The header is a UTF-8 JSON object; ``header["blobs"]`` lists ``[name, size]``
of the byte strings concatenated in the body (a model, or arrays as ``.npy``
bytes). Arrays are written and read by numpy's ``.npy`` format with
``allow_pickle=False``: nothing received is ever unpickled. Every length is
checked against a cap *before* anything of that size is read or allocated,
and every read is bounded by a socket timeout, so a slow, truncated or
hostile peer costs a bounded amount of memory and time.

Only the standard library and numpy: this runs on the device.
"""

from __future__ import annotations

import io
import json
import socket
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from pycompress.errors import PycompressError

MAGIC = b"PCAG"
VERSION = 1
_PREFIX = struct.Struct(">4sBIQ")
MAX_HEADER_BYTES = 1 << 20           # a header is a few hundred bytes; 1 MiB is generous
ENV_TOKEN = "PYCOMPRESS_AGENT_TOKEN"
DEFAULT_PORT = 7370


class ProtocolError(PycompressError):
    """A frame that cannot be read (bad magic, too large, truncated, timed out)."""


class Closed(ProtocolError):
    """The peer closed the connection cleanly between frames."""


def encode_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ProtocolError(f"blob '{name}' is not a numpy .npy array without objects ({exc})") from None


def encode_frame(header: Mapping[str, Any], blobs: Mapping[str, bytes] | None = None) -> bytes:
    blobs = dict(blobs or {})
    header = {**header, "blobs": [[name, len(data)] for name, data in blobs.items()]}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body_len = sum(len(d) for d in blobs.values())
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(head), body_len), head, *blobs.values()])


def _read_exact(sock: socket.socket, n: int, what: str, *, at_start: bool = False) -> bytes:
    """Exactly ``n`` bytes (the socket's timeout bounds each wait); ProtocolError if the peer stops early."""
    chunks = bytearray()
    while len(chunks) < n:
        try:
            chunk = sock.recv(min(n - len(chunks), 1 << 20))
        except TimeoutError:
            raise ProtocolError(f"timed out reading the {what}") from None
        if not chunk:
            if at_start and not chunks:
                raise Closed("connection closed")
            raise ProtocolError(f"truncated {what}: got {len(chunks)} of {n} bytes")
        chunks += chunk
    return bytes(chunks)


def read_header(sock: socket.socket, *, max_body: int, timeout: float | None = None) -> tuple[dict[str, Any], int]:
    """The header of the next frame and its body length (the body is still unread).

    ``timeout``: once a frame has begun, the socket's timeout for the rest of it
    (the wait for the frame's first bytes may be longer: an idle connection).
    """
    prefix = _read_exact(sock, _PREFIX.size, "frame prefix", at_start=True)
    if timeout is not None:
        sock.settimeout(timeout)
    magic, version, head_len, body_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError("not a pycompress agent frame (bad magic bytes)")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this side speaks {VERSION})")
    if head_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {head_len} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    if body_len > max_body:
        raise ProtocolError(f"request of {body_len} bytes exceeds the limit of {max_body} bytes")
    try:
        header = json.loads(_read_exact(sock, head_len, "header").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    blobs = header.get("blobs", [])
    if (not isinstance(blobs, list) or
            not all(isinstance(b, list) and len(b) == 2 and isinstance(b[0], str) and isinstance(b[1], int)
                    and b[1] >= 0 for b in blobs)):
        raise ProtocolError("header 'blobs' must be a list of [name, size]")
    if sum(b[1] for b in blobs) != body_len:
        raise ProtocolError("header 'blobs' sizes do not add up to the body length")
    return header, body_len


def read_body(sock: socket.socket, header: Mapping[str, Any]) -> dict[str, bytes]:
    blobs = {}
    for name, size in header.get("blobs", []):
        blobs[name] = _read_exact(sock, size, f"blob '{name}'")
    return blobs


def read_frame(sock: socket.socket, *, max_body: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    header, _ = read_header(sock, max_body=max_body)
    return header, read_body(sock, header)


def arrays_with_prefix(blobs: Mapping[str, bytes], prefix: str) -> dict[str, np.ndarray]:
    """``{name: array}`` of the blobs named ``prefix/name``."""
    return {name[len(prefix) + 1:]: decode_array(data, name) for name, data in blobs.items()
            if name.startswith(prefix + "/")}


def parse_address(text: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``[v6]:PORT`` -> (host, port)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise PycompressError(f"--device {text!r}: expected HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT})")
    return (host.strip("[]") or default_host), int(port)
