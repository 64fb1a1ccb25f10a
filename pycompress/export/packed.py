"""The packed container (``.pcz``): an ONNX file with its 8-bit streams Huffman-coded.

Deep Compression's storage step (ALGORITHMS.md 1.5). Every uint8/int8
initializer (the index streams of weight sharing, and the weights of int8
models) is cut out of the ONNX file and canonical-Huffman coded
(``kernels.huffman_*``); the rest of the file (the "skeleton": graph,
codebooks, biases, float weights) is deflated (zlib) when that is smaller
(flag ``SKELETON_DEFLATED``; 276 KB -> 211 KB on EfficientNet-Lite0 shared
per layer, 0.35% of the fp32 file, bytes the bit allocation spends on the
indices instead). Unpacking puts the decoded
bytes back at their offsets, which restores the *same bytes* (no protobuf
re-serialization; see ``onnx_spans``). A stream dominated by one symbol (index
0 = 0.0 after magnitude pruning) is coded as zero runs when that is smaller:
pairs ``(run, symbol)`` meaning "run copies of the zero symbol, then symbol",
runs capped at 255 with ``(255, zero)`` fillers (Deep Compression's relative
indexing), each of the two streams Huffman-coded.

Layout (integers little-endian)::

    magic       8 bytes   b"\\x89PCZ\\r\\n\\x1a\\n"
    version     u16       FORMAT_VERSION
    flags       u16       SKELETON_DEFLATED (1) or 0 (version 1: always 0)
    header_len  u32
    header      header_len bytes of UTF-8 JSON: onnx size + SHA-256, sections
                (length, crc32 each), streams (tensor, offset, count, coding)
    header_crc  u32       CRC-32 of version .. header
    sections    the bytes of each section, in header order, nothing after

Section 0 is the skeleton (zlib-deflated with the flag; the header's
``skeleton_bytes`` is then its inflated length). A Huffman section is 256 code
lengths (one byte per symbol) then the payload.
Reading checks, in order: magic, version, header CRC, header schema, exact
total size (truncation), each section's CRC, each stream's decoding, offsets,
and the SHA-256 of the restored file: a damaged file is refused with a
one-line error naming it, never turned into a different model.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pycompress import kernels
from pycompress.errors import PycompressError
from pycompress.export.onnx_spans import DATA_TYPES, TensorSpan, initializer_spans
from pycompress.ir import atomic_write_bytes

MAGIC = b"\x89PCZ\r\n\x1a\n"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)   # version 1: the same layout, skeleton always stored as is (flags 0)
SKELETON_DEFLATED = 1
_PREFIX = struct.Struct("<8sHHI")
_CRC = struct.Struct("<I")
_TABLE_BYTES = 256
# Streams shorter than this stay in the skeleton: the 256-byte code table would outweigh the saving.
MIN_STREAM_BYTES = 512
_CODED_TYPES = (2, 3)  # uint8, int8
# The largest header we read (the JSON of a model with ~10^5 streams).
_MAX_HEADER_BYTES = 64 << 20


@dataclass
class StreamReport:
    tensor: str
    kind: str                 # "shared-weight indices" or "int8 tensor" / "uint8 tensor"
    count: int                # symbols (= weights)
    coding: str               # "huffman" or "zero-runs"
    coded_bytes: int          # code tables + payloads
    bits_per_weight: float    # coded_bytes * 8 / count
    entropy_bits: float       # empirical order-0 entropy of the stream, bits per symbol


@dataclass
class PackReport:
    source: str
    output: str
    onnx_bytes: int
    packed_bytes: int
    streams: list[StreamReport] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.packed_bytes / self.onnx_bytes

    @property
    def index_bits_per_weight(self) -> float:
        count = sum(s.count for s in self.streams)
        return sum(s.coded_bytes for s in self.streams) * 8 / count if count else 0.0

    @property
    def index_entropy_bits(self) -> float:
        count = sum(s.count for s in self.streams)
        return sum(s.entropy_bits * s.count for s in self.streams) / count if count else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "index_bits_per_weight": self.index_bits_per_weight,
                "index_entropy_bits": self.index_entropy_bits}


def entropy_bits(symbols: np.ndarray) -> float:
    """Empirical entropy ``H = -sum_s p_s log2 p_s`` of a uint8 stream, bits per symbol."""
    counts = np.bincount(symbols, minlength=256)
    p = counts[counts > 0] / symbols.size
    return float(-(p * np.log2(p)).sum()) if symbols.size else 0.0


def _huffman_section(symbols: np.ndarray) -> bytes:
    lengths = kernels.huffman_code_lengths(np.bincount(symbols, minlength=256))
    return np.asarray(lengths, np.uint8).tobytes() + kernels.huffman_encode(symbols, lengths)


def _decode_section(section: bytes, count: int) -> np.ndarray:
    if len(section) < _TABLE_BYTES:
        raise ValueError("section shorter than its code table")
    lengths = np.frombuffer(section[:_TABLE_BYTES], np.uint8)
    return np.asarray(kernels.huffman_decode(section[_TABLE_BYTES:], lengths, count))


def zero_runs(symbols: np.ndarray, zero: int) -> tuple[np.ndarray, np.ndarray]:
    """``(runs, values)``: each pair means "runs[i] copies of zero, then values[i]" (runs <= 255)."""
    nonzero = np.flatnonzero(symbols != zero)
    gaps = np.diff(np.concatenate([[-1], nonzero])) - 1
    fillers = gaps // 256
    total = int(fillers.sum()) + nonzero.size
    runs = np.full(total, 255, np.int64)
    values = np.full(total, zero, np.uint8)
    last = np.cumsum(fillers + 1) - 1
    runs[last] = gaps % 256
    values[last] = symbols[nonzero]
    tail = symbols.size - 1 - (int(nonzero[-1]) if nonzero.size else -1)
    tail_runs = [255] * (tail // 256) + ([tail % 256 - 1] if tail % 256 else [])
    runs = np.concatenate([runs, tail_runs]).astype(np.uint8)
    values = np.concatenate([values, np.full(len(tail_runs), zero, np.uint8)])
    return runs, values


def from_zero_runs(runs: np.ndarray, values: np.ndarray, zero: int, count: int) -> np.ndarray:
    ends = np.cumsum(runs.astype(np.int64) + 1)
    if runs.size != values.size or (ends[-1] if ends.size else 0) != count:
        raise ValueError("zero runs do not add up to the stream length")
    out = np.full(count, zero, np.uint8)
    out[ends - 1] = values
    return out


def _stream_names(onnx_bytes: bytes, where: str) -> tuple[set[str], set[str]]:
    """(all tensor names with external data, names of shared-weight index initializers), parsing once."""
    import onnx

    try:
        proto = onnx.load_model_from_string(onnx_bytes)
    except Exception as exc:
        raise PycompressError(f"{where}: not a valid ONNX model ({type(exc).__name__})") from exc
    if not proto.graph.node and not proto.graph.output:
        raise PycompressError(f"{where}: not a valid ONNX model (empty graph)")
    external = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    gathered = {n.input[1] for n in proto.graph.node if n.op_type == "Gather" and len(n.input) > 1}
    indices = {n.input[0] for n in proto.graph.node if n.op_type == "Cast" and n.output[0] in gathered}
    return external, indices


def pack_bytes(onnx_bytes: bytes, *, where: str = "model") -> tuple[bytes, list[StreamReport]]:
    """The container for one ONNX file's bytes, and a report per coded stream."""
    external, index_names = _stream_names(onnx_bytes, where)
    if external:
        raise PycompressError(f"{where}: initializer '{sorted(external)[0]}' uses external data; the packed "
                              "container holds single-file models only")
    try:
        spans = [s for s in initializer_spans(onnx_bytes)
                 if s.data_type in _CODED_TYPES and s.length >= MIN_STREAM_BYTES]
    except ValueError as exc:
        raise PycompressError(f"{where}: cannot walk the ONNX file ({exc})") from exc
    sections: list[bytes] = []
    skeleton_parts, streams, reports = [], [], []
    cursor = 0
    for span in sorted(spans, key=lambda s: s.offset):
        skeleton_parts.append(onnx_bytes[cursor:span.offset])
        cursor = span.offset + span.length
        symbols = np.frombuffer(onnx_bytes, np.uint8, span.length, span.offset)
        entry, coded = _code_stream(symbols, span, len(sections) + 1)
        sections.extend(coded)
        streams.append(entry)
        kind = "shared-weight indices" if span.name in index_names else f"{DATA_TYPES[span.data_type]} tensor"
        size = sum(len(c) for c in coded)
        reports.append(StreamReport(span.name, kind, span.length, entry["coding"], size,
                                    size * 8 / span.length, entropy_bits(symbols)))
    skeleton_parts.append(onnx_bytes[cursor:])
    skeleton = b"".join(skeleton_parts)
    deflated = zlib.compress(skeleton, 9)
    flags = SKELETON_DEFLATED if len(deflated) < len(skeleton) else 0
    sections.insert(0, deflated if flags else skeleton)
    header = {
        "format": "pycompress-packed",
        "onnx_bytes": len(onnx_bytes),
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        **({"skeleton_bytes": len(skeleton)} if flags else {}),
        "sections": [{"length": len(s), "crc32": zlib.crc32(s)} for s in sections],
        "streams": streams,
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, flags, len(header_bytes))
    crc = zlib.crc32(prefix[8:] + header_bytes)
    return prefix + header_bytes + _CRC.pack(crc) + b"".join(sections), reports


def _code_stream(symbols: np.ndarray, span: TensorSpan, first_section: int) -> tuple[dict, list[bytes]]:
    """The smaller of plain Huffman and zero-run coding for one stream."""
    dense = [_huffman_section(symbols)]
    entry = {"tensor": span.name, "offset": span.offset, "count": span.length, "coding": "huffman",
             "sections": [first_section]}
    counts = np.bincount(symbols, minlength=256)
    zero = int(np.argmax(counts))
    # Plain Huffman spends >= 1 bit per symbol; runs only pay when one symbol dominates.
    if counts[zero] > symbols.size // 2:
        runs, values = zero_runs(symbols, zero)
        sparse = [_huffman_section(runs), _huffman_section(values)]
        if sum(map(len, sparse)) < len(dense[0]):
            return ({**entry, "coding": "zero-runs", "zero": zero, "pairs": int(runs.size),
                     "sections": [first_section, first_section + 1]}, sparse)
    return entry, dense


# ---------------------------------------------------------------- reading


def _fail(where: str, message: str) -> PycompressError:
    return PycompressError(f"{where}: {message}")


def _int(value, where: str, what: str, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise _fail(where, f"corrupted header ({what} is {value!r})")
    return value


def _read_header(data: bytes, where: str) -> tuple[dict, int, int]:
    if len(data) < _PREFIX.size or data[:8] != MAGIC:
        if len(data) < _PREFIX.size and MAGIC.startswith(data[:8]) and data:
            raise _fail(where, f"truncated packed file ({len(data)} bytes)")
        raise _fail(where, "not a pycompress packed file (bad magic bytes)")
    _, version, flags, header_len = _PREFIX.unpack_from(data)
    if version not in READ_VERSIONS:
        raise _fail(where, f"packed format version {version} is not supported (this pycompress reads "
                           f"versions {', '.join(map(str, READ_VERSIONS))})")
    if header_len > _MAX_HEADER_BYTES:
        raise _fail(where, f"corrupted header (length {header_len})")
    end = _PREFIX.size + header_len + _CRC.size
    if len(data) < end:
        raise _fail(where, f"truncated packed file ({len(data)} bytes, the header alone needs {end})")
    header_bytes = data[_PREFIX.size:_PREFIX.size + header_len]
    (crc,) = _CRC.unpack_from(data, _PREFIX.size + header_len)
    known = SKELETON_DEFLATED if version >= 2 else 0
    if zlib.crc32(data[8:_PREFIX.size] + header_bytes) != crc or flags & ~known:
        raise _fail(where, "corrupted header (checksum mismatch)")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _fail(where, "corrupted header (not JSON)") from None
    except RecursionError:  # a crafted header nested thousands deep (its CRC can be forged)
        raise _fail(where, "corrupted header (nested too deeply)") from None
    if not isinstance(header, dict) or header.get("format") != "pycompress-packed":
        raise _fail(where, "corrupted header (unknown format)")
    return header, end, flags


def unpack_bytes(data: bytes, *, where: str = "packed file") -> bytes:
    """The original ONNX bytes; PycompressError if the container is damaged in any way."""
    header, pos, flags = _read_header(data, where)
    # Bounded by what the file can hold: Huffman codes take >= 1 bit per symbol
    # and a zero-run pair stands for at most 256 symbols, so a restored model is
    # never more than 2048x the container; a larger claim would only allocate.
    total = _int(header.get("onnx_bytes"), where, "onnx_bytes", 0, 2048 * len(data))
    digest = header.get("onnx_sha256")
    sections_meta, streams = header.get("sections"), header.get("streams")
    if not isinstance(digest, str) or not isinstance(sections_meta, list) or not sections_meta \
            or not isinstance(streams, list):
        raise _fail(where, "corrupted header (missing fields)")
    lengths = []
    for i, meta in enumerate(sections_meta):
        if not isinstance(meta, dict):
            raise _fail(where, f"corrupted header (section {i})")
        lengths.append(_int(meta.get("length"), where, f"section {i} length"))
        _int(meta.get("crc32"), where, f"section {i} crc32", 0, 2**32 - 1)
    expected = pos + sum(lengths)
    if len(data) < expected:
        raise _fail(where, f"truncated packed file ({len(data)} bytes, expected {expected})")
    if len(data) > expected:
        raise _fail(where, f"corrupted packed file ({len(data) - expected} unexpected bytes at the end)")
    sections = []
    for i, (length, meta) in enumerate(zip(lengths, sections_meta)):
        section = data[pos:pos + length]
        if zlib.crc32(section) != meta["crc32"]:
            raise _fail(where, f"corrupted packed file (section {i} checksum mismatch)")
        sections.append(section)
        pos += length

    skeleton = sections[0]
    if flags & SKELETON_DEFLATED:
        skeleton = _inflate(skeleton, _int(header.get("skeleton_bytes"), where, "skeleton_bytes", 0, total), where)
    pieces, cursor, restored = [], 0, len(skeleton)
    for entry in streams:
        stream = _decode_stream(entry, sections, where)
        offset = _int(entry.get("offset"), where, "stream offset")
        # Offsets are positions in the original file; the skeleton is that
        # file with each stream removed, so subtract what was removed before.
        skeleton_offset = offset - sum(len(p) for p in pieces[1::2])
        if skeleton_offset < cursor or skeleton_offset > len(skeleton):
            raise _fail(where, f"corrupted header (stream '{entry.get('tensor')}' offset {offset})")
        pieces.extend([skeleton[cursor:skeleton_offset], stream])
        cursor = skeleton_offset
        restored += len(stream)
    pieces.append(skeleton[cursor:])
    if restored != total:
        raise _fail(where, f"corrupted header (sizes add up to {restored} bytes, not {total})")
    onnx_bytes = b"".join(pieces)
    if hashlib.sha256(onnx_bytes).hexdigest() != digest:
        raise _fail(where, "restored model does not match its SHA-256 checksum; the file is corrupted")
    return onnx_bytes


def _inflate(section: bytes, size: int, where: str) -> bytes:
    """The deflated skeleton, exactly ``size`` bytes (never more is allocated: a bomb stops at ``size + 1``)."""
    inflater = zlib.decompressobj()
    try:
        skeleton = inflater.decompress(section, size + 1)
    except zlib.error as exc:
        raise _fail(where, f"corrupted packed file (the skeleton does not inflate: {exc})") from None
    if len(skeleton) != size or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise _fail(where, f"corrupted packed file (the skeleton inflates to other than its {size} bytes)")
    return skeleton


def _decode_stream(entry, sections: list[bytes], where: str) -> bytes:
    if not isinstance(entry, dict):
        raise _fail(where, "corrupted header (stream entry)")
    name = entry.get("tensor")
    count = _int(entry.get("count"), where, f"stream '{name}' count", 0, sum(8 * 256 * len(s) for s in sections))
    refs = entry.get("sections")
    coding = entry.get("coding")
    wanted = {"huffman": 1, "zero-runs": 2}.get(coding)
    if wanted is None or not isinstance(refs, list) or len(refs) != wanted:
        raise _fail(where, f"corrupted header (stream '{name}' coding)")
    parts = [sections[_int(r, where, f"stream '{name}' section", 1, len(sections) - 1)] for r in refs]
    try:
        if coding == "huffman":
            if count > 8 * len(parts[0]):
                raise ValueError(f"count {count} is more than its section's {8 * len(parts[0])} bits")
            symbols = _decode_section(parts[0], count)
        else:
            zero = _int(entry.get("zero"), where, f"stream '{name}' zero symbol", 0, 255)
            pairs = _int(entry.get("pairs"), where, f"stream '{name}' pairs", 0, 8 * len(parts[0]))
            runs, values = _decode_section(parts[0], pairs), _decode_section(parts[1], pairs)
            symbols = from_zero_runs(runs, values, zero, count)
    except ValueError as exc:
        raise _fail(where, f"corrupted stream '{name}' ({exc})") from None
    return symbols.tobytes()


# ---------------------------------------------------------------- files


def _read(path: Path) -> bytes:
    if not path.exists():
        raise PycompressError(f"{path}: no such file")
    if not path.is_file():
        raise PycompressError(f"{path}: not a file")
    return path.read_bytes()


def _check_output(source: Path, output: Path) -> None:
    if output.exists() and output.resolve() == source.resolve():
        raise PycompressError(f"{output}: refusing to overwrite the input; choose another output path")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise PycompressError(f"{output}: output folder {folder} does not exist")


def pack_file(source: str | Path, output: str | Path) -> PackReport:
    source, output = Path(source), Path(output)
    _check_output(source, output)
    onnx_bytes = _read(source)
    packed, reports = pack_bytes(onnx_bytes, where=str(source))
    # Never write a container that does not read back to the same bytes.
    if unpack_bytes(packed, where=f"{output} (just packed)") != onnx_bytes:
        raise PycompressError(f"{source}: packing did not round-trip; nothing written")
    atomic_write_bytes(output, packed)
    return PackReport(str(source), str(output), len(onnx_bytes), len(packed), reports)


def unpack_file(source: str | Path, output: str | Path) -> tuple[Path, int]:
    """Restore the ONNX file; returns (path, bytes written)."""
    source, output = Path(source), Path(output)
    _check_output(source, output)
    onnx_bytes = unpack_bytes(_read(source), where=str(source))
    atomic_write_bytes(output, onnx_bytes)
    return output, len(onnx_bytes)

