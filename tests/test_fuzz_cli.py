"""Fuzz suite: malformed and adversarial inputs through every command.

Each case builds its inputs in a fresh folder, runs ``pycompress.cli.main``
in-process (stdout/stderr captured, the working folder set to the case's
folder) and asserts what the README promises for bad input:

- a non-zero exit and a clean one-line error (no traceback printed or logged,
  no "internal error");
- the message names the file or argument at fault;
- every input file is byte-identical afterwards and nothing is left behind
  (the folder holds exactly what it held before);
- no hang (each case runs under a 60 s alarm; FIFOs included).

A handful of cases also go through a real ``python -m pycompress`` process.
The generator (``CASES``) covers: output paths, numeric flags, ONNX files,
external data, data files, image folders, plans, run state, ``.pcz``
containers, ``convert`` sources, and concurrent runs (locks).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_models import conv_proto, mlp_proto

pytestmark = pytest.mark.fuzz
REPO = Path(__file__).resolve().parents[1]

# -- base inputs (bytes built once, written into each case's folder) -------------

MLP = mlp_proto().SerializeToString()
CNN = conv_proto().SerializeToString()
X = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
PLAN = {"version": 1, "decisions": [{"site": "fc1", "action": "svd", "params": {"rank": 2}}]}
FACTORIES = '''
import sys, torch, numpy as np

class NumpyForward(torch.nn.Module):
    def forward(self, x):
        return torch.from_numpy(np.tanh(x.numpy()))

class DictForward(torch.nn.Module):
    def forward(self, x):
        return {"y": x}

class ExitForward(torch.nn.Module):
    def forward(self, x):
        sys.exit(0)

class HardExit(torch.nn.Module):
    def forward(self, x):
        import os
        os._exit(0)

class NanForward(torch.nn.Module):
    def forward(self, x):
        return x * float("nan")

def linear(): return torch.nn.Linear(4, 3)
def exits(): sys.exit(0)
def exits3(): sys.exit(3)
def raises(): raise RuntimeError("boom")
def returns_none(): return None
def returns_int(): return 3
def numpy_forward(): return NumpyForward()
def dict_forward(): return DictForward()
def nan_forward(): return NanForward()
def exit_forward(): return ExitForward()
def hard_exit(): return HardExit()
def hard_exit_factory():
    import os
    os._exit(0)
'''


def _packed_bytes() -> bytes:
    from pycompress.export.packed import pack_bytes

    return pack_bytes(MLP, where="mlp")[0]


def base(d: Path) -> None:
    (d / "m.onnx").write_bytes(MLP)
    (d / "img.onnx").write_bytes(CNN)
    np.savez(d / "d.npz", x=X)
    np.save(d / "d.npy", X)
    (d / "plan.json").write_text(json.dumps(PLAN))
    (d / "fac.py").write_text(FACTORIES)
    (d / "p.pcz").write_bytes(PACKED)


PACKED = _packed_bytes()


@dataclass
class Case:
    id: str
    make: Callable[[Path], list[str]]   # writes its inputs into the folder, returns argv
    names: tuple[str, ...]              # the message names one of these


CASES: list[Case] = []


def case(id: str, names, make) -> None:
    CASES.append(Case(id, make, tuple([names] if isinstance(names, str) else names)))


def argv(*parts) -> Callable[[Path], list[str]]:
    return lambda d: [str(p) for p in parts]


# -- models ------------------------------------------------------------------------

def _proto_with(mutate) -> bytes:
    proto = mlp_proto()
    mutate(proto)
    return proto.SerializeToString()


def _set_init(name, fn):
    def mutate(proto):
        for i, t in enumerate(proto.graph.initializer):
            if t.name == name:
                a = numpy_helper.to_array(t).copy()
                fn(a)
                proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, name))
    return mutate


def _nan(a):
    a.flat[0] = np.nan


def _inf(a):
    a.flat[-1] = np.inf


def _external(location: str, offset: int | None = None, length: int | None = None, size: int = 576,
              write: bool = True):
    """bad.onnx with w1 in external data ``location`` (``size`` bytes written when ``write``)."""
    def make(d: Path):
        proto = mlp_proto()
        t = next(t for t in proto.graph.initializer if t.name == "w1")
        raw = numpy_helper.to_array(t).tobytes()
        t.ClearField("float_data")
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        entries = {"location": location}
        if offset is not None:
            entries["offset"] = str(offset)
        if length is not None:
            entries["length"] = str(length)
        for k, v in entries.items():
            t.external_data.add(key=k, value=v)
        if write and not os.path.isabs(location) and ".." not in location:
            (d / location).write_bytes((raw * (size // len(raw) + 1))[:size])
        (d / "bad.onnx").write_bytes(proto.SerializeToString())
    return make


def _zipmap() -> bytes:
    """scikit-learn's default classifier export: LinearClassifier + ZipMap (a sequence of maps)."""
    nodes = [helper.make_node("LinearClassifier", ["x"], ["label", "probs"], domain="ai.onnx.ml",
                              coefficients=[0.1] * 16, intercepts=[0.0, 0.0], classlabels_ints=[0, 1],
                              post_transform="SOFTMAX"),
             helper.make_node("ZipMap", ["probs"], ["output"], domain="ai.onnx.ml", classlabels_int64s=[0, 1])]
    seq = helper.make_value_info("output", helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))
    graph = helper.make_graph(nodes, "skl", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]), seq])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
                              ir_version=8)
    return model.SerializeToString()


def _raw(data: bytes):
    return lambda d: (d / "bad.onnx").write_bytes(data)


def _shape_mismatch(proto):
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((16, 9), np.float32), "w1"))


def _type_mismatch(proto):
    proto.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones(16, np.int64), "b1"))


def _unknown_op(proto):
    proto.graph.node[1].op_type = "NoSuchOp"


def _dangling_input(proto):
    proto.graph.node[1].input[0] = "nowhere"


def _duplicate_output(proto):
    proto.graph.node[1].output[0] = "h"


def _opset(proto):
    proto.opset_import[0].version = 1000


def _ir_version(proto):
    proto.ir_version = 1000


def _empty_graph(proto):
    del proto.graph.node[:]
    del proto.graph.output[:]


BAD_MODELS: dict[str, Callable[[Path], None]] = {
    "empty-file": _raw(b""),
    "random-bytes": _raw(bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8))),
    "truncated": _raw(MLP[: len(MLP) // 2]),
    "text": _raw(b"hello, not a model\n"),
    "empty-graph": _raw(_proto_with(_empty_graph)),
    "shape-mismatch": _raw(_proto_with(_shape_mismatch)),
    "type-mismatch": _raw(_proto_with(_type_mismatch)),
    "nan-weight": _raw(_proto_with(_set_init("w1", _nan))),
    "inf-bias": _raw(_proto_with(_set_init("b2", _inf))),
    "unknown-op": _raw(_proto_with(_unknown_op)),
    "dangling-input": _raw(_proto_with(_dangling_input)),
    "duplicate-output": _raw(_proto_with(_duplicate_output)),
    "opset-1000": _raw(_proto_with(_opset)),
    "ir-version-1000": _raw(_proto_with(_ir_version)),
    "zipmap-output": _raw(_zipmap()),
    "external-dotdot": _external("../w1.bin"),
    "external-absolute": _external("/etc/hostname"),
    "external-offset-beyond": _external("w1.bin", offset=10_000, length=512),
    "external-length-beyond": _external("w1.bin", offset=0, length=100_000),
    "external-short-file": _external("w1.bin", size=100),
    "external-missing": _external("w1.bin", write=False),
    "external-length-wrong": _external("w1.bin", offset=0, length=8),
    "folder": lambda d: (d / "bad.onnx").mkdir(),
    "fifo": lambda d: os.mkfifo(d / "bad.onnx"),
    "missing": lambda d: None,
}

MODEL_COMMANDS = {
    "info": ["info", "bad.onnx"],
    "plan": ["plan", "bad.onnx", "--actions", "svd", "-o", "out.json"],
    "apply": ["apply", "bad.onnx", "plan.json", "-o", "out.onnx"],
    "compress": ["compress", "bad.onnx", "--data", "d.npz", "-o", "out.onnx", "--max-evals", "2", "--quiet"],
    "export-fp16": ["export", "bad.onnx", "--to", "fp16", "-o", "out.onnx"],
    "export-int8": ["export", "bad.onnx", "--to", "int8", "--dynamic", "-o", "out.onnx"],
    "bench": ["bench", "bad.onnx", "--iters", "1", "--warmup", "0"],
    "analyze": ["analyze", "bad.onnx", "--data", "d.npz", "-o", "an", "--no-plots", "--no-progress"],
}

for model_id, build in BAD_MODELS.items():
    for cmd_id, cmd in MODEL_COMMANDS.items():
        def make(d, build=build, cmd=cmd):
            build(d)
            return list(cmd)
        case(f"model-{model_id}-{cmd_id}", "bad.onnx", make)

# -- data ----------------------------------------------------------------------------


def _npy(array, name="bad.npy", **kw):
    def make(d):
        np.save(d / name, array, **kw)
    return make


def _npy_header_huge(d):
    with open(d / "bad.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10**12, 8)})
        fh.write(b"\0" * 64)


def _npy_truncated(d):
    np.save(d / "bad.npy", X)
    data = (d / "bad.npy").read_bytes()
    (d / "bad.npy").write_bytes(data[: len(data) // 2])


def _nan_x():
    x = X.copy()
    x[3, 3] = np.nan
    return x


def _inf_x():
    x = X.copy()
    x[0, 0] = -np.inf
    return x


def _write(name, data: bytes):
    return lambda d: (d / name).write_bytes(data)


BAD_DATA: dict[str, tuple[str, Callable[[Path], None]]] = {
    "nan": ("bad.npy", _npy(_nan_x())),
    "inf": ("bad.npy", _npy(_inf_x())),
    "empty": ("bad.npy", _npy(np.zeros((0, 8), np.float32))),
    "strings": ("bad.npy", _npy(np.array(["a"] * 8))),
    "complex": ("bad.npy", _npy(np.ones((4, 8), np.complex64))),
    "pickled-object": ("bad.npy", _npy(np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)),
    "wrong-width": ("bad.npy", _npy(np.ones((4, 7), np.float32))),
    "wrong-rank": ("bad.npy", _npy(np.ones(8, np.float32))),
    "scalar": ("bad.npy", _npy(np.float32(1.0))),
    "huge-header": ("bad.npy", _npy_header_huge),
    "truncated": ("bad.npy", _npy_truncated),
    "random-bytes": ("bad.npy", _write("bad.npy", b"\x93NUMPY garbage" * 10)),
    "fifo": ("bad.npy", lambda d: os.mkfifo(d / "bad.npy")),
    "folder-npy": ("bad.npy", lambda d: (d / "bad.npy").mkdir()),
    "npz-wrong-keys": ("bad.npz", lambda d: np.savez(d / "bad.npz", a=X, b=X)),
    "npz-nan": ("bad.npz", lambda d: np.savez(d / "bad.npz", x=_nan_x())),
    "npz-corrupt": ("bad.npz", _write("bad.npz", b"PK\x03\x04" + b"\0" * 60)),
    "npz-empty": ("bad.npz", lambda d: np.savez(d / "bad.npz")),
    "npz-bad-labels": ("bad.npz", lambda d: np.savez(d / "bad.npz", x=X, labels=np.zeros(3, np.int64))),
    "npz-float-labels": ("bad.npz", lambda d: np.savez(d / "bad.npz", x=X, labels=np.zeros(64, np.float32))),
    "unsupported-suffix": ("bad.txt", _write("bad.txt", b"1 2 3\n")),
    "missing": ("bad.npy", lambda d: None),
}

DATA_COMMANDS = {
    "compress": ["compress", "m.onnx", "--data", "{data}", "-o", "out.onnx", "--max-evals", "2", "--quiet"],
    "apply": ["apply", "m.onnx", "plan.json", "-o", "out.onnx", "--data", "{data}"],
    "bench": ["bench", "m.onnx", "--data", "{data}", "--iters", "1", "--warmup", "0"],
    "export-int8": ["export", "m.onnx", "--to", "int8", "--data", "{data}", "-o", "out.onnx"],
    "analyze": ["analyze", "m.onnx", "--data", "{data}", "-o", "an", "--no-plots", "--no-progress"],
}

for data_id, (name, build) in BAD_DATA.items():
    for cmd_id, cmd in DATA_COMMANDS.items():
        def make(d, build=build, cmd=cmd, name=name):
            build(d)
            return [p.replace("{data}", name) for p in cmd]
        case(f"data-{data_id}-{cmd_id}", name, make)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb is refused before decoding)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _images(files: dict[str, bytes]):
    def make(d):
        (d / "imgs").mkdir()
        for name, data in files.items():
            (d / "imgs" / name).write_bytes(data)
    return make


BAD_IMAGES = {
    "no-images": _images({"readme.txt": b"nothing"}),
    "corrupt-png": _images({"a.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40}),
    "bomb-png": _images({"a.png": _png_header(40000, 40000)}),
    "random-jpg": _images({"a.jpg": bytes(range(256)) * 4}),
}
IMAGE_COMMANDS = {
    "analyze": ["analyze", "img.onnx", "--data", "imgs", "-o", "an", "--no-plots", "--no-progress"],
    "compress": ["compress", "img.onnx", "--data", "imgs", "-o", "out.onnx", "--max-evals", "2", "--quiet"],
    "apply": ["apply", "img.onnx", "cplan.json", "-o", "out.onnx", "--data", "imgs"],
}
for image_id, build in BAD_IMAGES.items():
    for cmd_id, cmd in IMAGE_COMMANDS.items():
        def make(d, build=build, cmd=cmd):
            build(d)
            (d / "cplan.json").write_text(json.dumps({"version": 1, "decisions": [
                {"site": "node_Conv_0", "action": "lowrank_conv", "params": {"rank": 2}}]}))
            return list(cmd)
        case(f"images-{image_id}-{cmd_id}", ("imgs", "a.png", "a.jpg"), make)

case("labels-mismatch", "labels.npy", lambda d: (np.save(d / "labels.npy", np.zeros(3, np.int64)), [
    "compress", "m.onnx", "--data", "d.npz", "--labels", "labels.npy", "-o", "out.onnx", "--quiet"])[1])
case("labels-fifo", "labels.npy", lambda d: (os.mkfifo(d / "labels.npy"), [
    "compress", "m.onnx", "--data", "d.npz", "--labels", "labels.npy", "-o", "out.onnx", "--quiet"])[1])
case("labels-float", "labels.npy", lambda d: (np.save(d / "labels.npy", np.zeros(64, np.float32)), [
    "compress", "m.onnx", "--data", "d.npz", "--labels", "labels.npy", "-o", "out.onnx", "--quiet"])[1])

# -- numeric flags ---------------------------------------------------------------------

COMMAND_BASE = {
    "compress": ["compress", "m.onnx", "--data", "d.npz", "-o", "out.onnx", "--quiet"],
    "apply": ["apply", "m.onnx", "plan.json", "-o", "out.onnx"],
    "bench": ["bench", "m.onnx"],
    "export": ["export", "m.onnx", "--to", "int8", "--data", "d.npz", "-o", "out.onnx"],
    "plan": ["plan", "m.onnx", "--actions", "svd,prune,share"],
    "analyze": ["analyze", "m.onnx", "--data", "d.npz", "-o", "an", "--no-plots"],
    "convert": ["convert", "fac.py:linear", "-o", "out.onnx", "--input-shape", "1,4"],
}
BAD_NUMBERS = {
    "compress": {"--gamma": ["-1", "0", "nan", "inf"], "--target-size": ["0", "1.5", "nan", "-0.1"],
                 "--samples": ["0", "-1", "x"], "--delta": ["-1", "nan", "inf"],
                 "--epsilon": ["0", "1", "nan", "2"], "--max-evals": ["0", "-5", "1.5"],
                 "--time-limit": ["0", "-1", "nan", "inf"], "--max-prune": ["0", "2", "nan"],
                 "--align": ["0", "-1"], "--energy": ["0", "nan", "2"], "--recover-samples": ["0", "-2"],
                 "--finetune-epochs": ["0"], "--finetune-batch": ["0", "-2"], "--finetune-lr": ["0", "nan", "-1"], "--latency-runs": ["0"],
                 "--initial": ["-1"], "--seed": ["-1"], "--threads": ["-1", "100000"]},
    "apply": {"--samples": ["0", "-1"], "--batch-size": ["0", "-4"], "--seed": ["-1"]},
    "bench": {"--iters": ["0", "-1"], "--warmup": ["-1"], "--batch": ["0"], "--samples": ["-1"],
              "--threads": ["-1"]},
    "export": {"--samples": ["0", "-2"], "--calibration-samples": ["0", "-3"]},
    "plan": {"--energy": ["0", "nan", "1.5", "inf", "-1"], "--keep": ["0", "nan", "2", "-inf"],
             "--bits": ["0", "33"], "--align": ["0", "-8"]},
    "analyze": {"--energy": ["nan", "2", "-1"], "--target-size": ["0", "nan", "2"], "--min-keep": ["0"],
                "--batch-size": ["0"], "--threads": ["-1"], "--taus": ["nan", "a", "2", ""]},
    "convert": {"--tolerance": ["nan", "-1", "inf"], "--opset": ["0", "99"],
                "--input-shape": ["a", "0,3", "-1", "1,x"]},
}
for cmd_id, flags in BAD_NUMBERS.items():
    for flag, values in flags.items():
        for value in values:
            def make(d, cmd_id=cmd_id, flag=flag, value=value):
                return COMMAND_BASE[cmd_id] + [f"{flag}={value}"]
            case(f"number-{cmd_id}{flag}={value}", flag, make)

# -- output paths -----------------------------------------------------------------------


def _link(d, name="link.onnx", target="m.onnx"):
    os.symlink(target, d / name)


def _hardlink(d, name="hard.onnx", target="m.onnx"):
    os.link(d / target, d / name)


OUTPUT_CASES = {
    # command -> [(id, setup, extra argv, names)]
    "compress": [
        ("o-model", None, ["-o", "m.onnx"], "m.onnx"),
        ("o-symlink", _link, ["-o", "link.onnx"], "link.onnx"),
        ("o-hardlink", _hardlink, ["-o", "hard.onnx"], "hard.onnx"),
        ("plan-model", None, ["-o", "out.onnx", "--plan", "m.onnx"], "--plan"),
        ("trace-data", None, ["-o", "out.onnx", "--trace", "d.npz"], "--trace"),
        ("plan-is-trace", None, ["-o", "out.onnx", "--plan", "x.json", "--trace", "x.json"], "--trace"),
        ("trace-is-o", None, ["-o", "out.onnx", "--trace", "out.onnx"], "--trace"),
        ("report-dir-file", None, ["-o", "out.onnx", "--report-dir", "m.onnx"], "--report-dir"),
        ("run-dir-data", None, ["-o", "out.onnx", "--run-dir", "d.npz"], "--run-dir"),
        ("o-folder", lambda d: (d / "sub").mkdir(), ["-o", "sub"], "sub"),
        ("o-missing-folder", None, ["-o", "nowhere/out.onnx"], "nowhere"),
        ("o-fifo", lambda d: os.mkfifo(d / "f.onnx"), ["-o", "f.onnx"], "f.onnx"),
        ("plan-fifo", lambda d: os.mkfifo(d / "f.json"), ["-o", "out.onnx", "--plan", "f.json"], "f.json"),
        ("o-dangling-link", lambda d: os.symlink("gone.onnx", d / "dl.onnx"), ["-o", "dl.onnx"], "dl.onnx"),
        ("method-plan-overwritten", None, ["-o", "out.onnx", "--method", "plan.json", "--plan", "plan.json"],
         "--plan"),
        ("seed-plan-overwritten", None, ["-o", "out.onnx", "--seed-plan", "plan.json", "--trace", "plan.json"],
         "--trace"),
        ("data-symlink-trace", lambda d: _link(d, "dl.npz", "d.npz"), ["-o", "out.onnx", "--trace", "dl.npz"],
         "--trace"),
    ],
    "plan": [
        ("o-model", None, ["-o", "m.onnx"], "m.onnx"),
        ("o-symlink", _link, ["-o", "link.onnx"], "link.onnx"),
        ("o-hardlink", _hardlink, ["-o", "hard.onnx"], "hard.onnx"),
        ("o-folder", lambda d: (d / "sub").mkdir(), ["-o", "sub"], "sub"),
        ("o-missing-folder", None, ["-o", "nowhere/p.json"], "nowhere"),
        ("o-fifo", lambda d: os.mkfifo(d / "f.json"), ["-o", "f.json"], "f.json"),
    ],
    "apply": [
        ("o-model", None, ["-o", "m.onnx"], "m.onnx"),
        ("o-plan", None, ["-o", "plan.json"], "plan.json"),
        ("o-data", None, ["-o", "d.npz", "--data", "d.npz"], "d.npz"),
        ("o-symlink", _link, ["-o", "link.onnx"], "link.onnx"),
        ("o-hardlink", _hardlink, ["-o", "hard.onnx"], "hard.onnx"),
        ("o-folder", lambda d: (d / "sub").mkdir(), ["-o", "sub"], "sub"),
        ("o-missing-folder", None, ["-o", "nowhere/a.onnx"], "nowhere"),
        ("o-fifo", lambda d: os.mkfifo(d / "f.onnx"), ["-o", "f.onnx"], "f.onnx"),
    ],
    "bench": [
        ("markdown-model", None, ["--markdown", "m.onnx"], "--markdown"),
        ("plot-model", None, ["--plot", "m.onnx"], "--plot"),
        ("markdown-data", None, ["--data", "d.npz", "--markdown", "d.npz"], "--markdown"),
        ("markdown-is-plot", None, ["--markdown", "r.md", "--plot", "r.md"], "--plot"),
        ("markdown-folder", lambda d: (d / "sub").mkdir(), ["--markdown", "sub"], "sub"),
        ("markdown-symlink", _link, ["--markdown", "link.onnx"], "link.onnx"),
    ],
    "export": [
        *[(f"o-model-{fmt}", None, ["--to", fmt, "-o", "m.onnx"], "m.onnx") for fmt in
          ("packed", "fp16", "int4", "ort")],
        ("o-symlink", _link, ["--to", "fp16", "-o", "link.onnx"], "link.onnx"),
        ("o-hardlink", _hardlink, ["--to", "fp16", "-o", "hard.onnx"], "hard.onnx"),
        ("o-data", None, ["--to", "int8", "--data", "d.npz", "-o", "d.npz"], "d.npz"),
        ("o-folder", lambda d: (d / "sub").mkdir(), ["--to", "fp16", "-o", "sub"], "sub"),
        ("o-missing-folder", None, ["--to", "fp16", "-o", "nowhere/x.onnx"], "nowhere"),
        ("o-fifo", lambda d: os.mkfifo(d / "f.onnx"), ["--to", "fp16", "-o", "f.onnx"], "f.onnx"),
        ("ort-config-onto-data", lambda d: (d / "x.required_operators.config").write_bytes(b"data"),
         ["--to", "ort", "--data", "x.required_operators.config", "-o", "x.ort"], "operator config"),
    ],
    "unpack": [
        ("o-packed", None, ["-o", "p.pcz"], "p.pcz"),
        ("o-symlink", lambda d: _link(d, "lp.pcz", "p.pcz"), ["-o", "lp.pcz"], "lp.pcz"),
        ("o-folder", lambda d: (d / "sub").mkdir(), ["-o", "sub"], "sub"),
        ("o-missing-folder", None, ["-o", "nowhere/x.onnx"], "nowhere"),
        ("o-fifo", lambda d: os.mkfifo(d / "f.onnx"), ["-o", "f.onnx"], "f.onnx"),
    ],
    "convert": [
        ("o-source", None, ["-o", "fac.py"], "fac.py"),
        ("o-symlink", lambda d: _link(d, "lf.py", "fac.py"), ["-o", "lf.py"], "lf.py"),
        ("o-folder", lambda d: (d / "sub").mkdir(), ["-o", "sub"], "sub"),
        ("o-missing-folder", None, ["-o", "nowhere/x.onnx"], "nowhere"),
    ],
    "analyze": [
        ("o-model", None, ["-o", "m.onnx"], "m.onnx"),
        ("o-data", None, ["-o", "d.npz"], "d.npz"),
    ],
}
OUTPUT_BASE = {
    "compress": ["compress", "m.onnx", "--data", "d.npz", "--quiet", "--max-evals", "2"],
    "plan": ["plan", "m.onnx", "--actions", "svd"],
    "apply": ["apply", "m.onnx", "plan.json"],
    "bench": ["bench", "m.onnx", "--iters", "1", "--warmup", "0"],
    "export": ["export", "m.onnx"],
    "unpack": ["unpack", "p.pcz"],
    "convert": ["convert", "fac.py:linear", "--input-shape", "1,4"],
    "analyze": ["analyze", "m.onnx", "--data", "d.npz", "--no-plots", "--no-progress"],
}
for cmd_id, items in OUTPUT_CASES.items():
    for out_id, setup, extra, names in items:
        def make(d, cmd_id=cmd_id, setup=setup, extra=extra):
            if setup:
                setup(d)
            return OUTPUT_BASE[cmd_id] + extra
        case(f"output-{cmd_id}-{out_id}", names, make)

case("output-apply-sidecar-onto-external-data", "a.onnx.data", lambda d: (
    _external("a.onnx.data")(d), ["apply", "bad.onnx", "plan.json", "-o", "a.onnx"])[1])
case("output-apply-results-onto-plan", "out.plan.json", lambda d: (
    (d / "out.plan.json").write_text(json.dumps(PLAN)), ["apply", "m.onnx", "out.plan.json", "-o", "out.onnx"])[1])

# -- plans -----------------------------------------------------------------------------

BAD_PLANS: dict[str, bytes | Callable[[Path], None]] = {
    "not-json": b"{decisions: [",
    "not-utf8": b"\xff\xfe\x00{",
    "list": b"[]",
    "number": b"3",
    "version-2": json.dumps({"version": 2, "decisions": []}).encode(),
    "unknown-key": json.dumps({"version": 1, "decisions": [], "extra": 1}).encode(),
    "decisions-not-list": json.dumps({"version": 1, "decisions": {}}).encode(),
    "decision-not-object": json.dumps({"version": 1, "decisions": [3]}).encode(),
    "no-site": json.dumps({"version": 1, "decisions": [{"action": "svd", "params": {"rank": 2}}]}).encode(),
    "unknown-action": json.dumps({"version": 1, "decisions": [{"site": "fc1", "action": "zip"}]}).encode(),
    "unknown-site": json.dumps({"version": 1, "decisions": [{"site": "nope", "action": "svd",
                                                              "params": {"rank": 2}}]}).encode(),
    "rank-too-big": json.dumps({"version": 1, "decisions": [{"site": "fc1", "action": "svd",
                                                              "params": {"rank": 99}}]}).encode(),
    "rank-zero": json.dumps({"version": 1, "decisions": [{"site": "fc1", "action": "svd",
                                                           "params": {"rank": 0}}]}).encode(),
    "rank-string": json.dumps({"version": 1, "decisions": [{"site": "fc1", "action": "svd",
                                                             "params": {"rank": "2"}}]}).encode(),
    "rank-bool": json.dumps({"version": 1, "decisions": [{"site": "fc1", "action": "svd",
                                                           "params": {"rank": True}}]}).encode(),
    "rank-nan": b'{"version": 1, "decisions": [{"site": "fc1", "action": "svd", "params": {"rank": NaN}}]}',
    "rank-float": json.dumps({"version": 1, "decisions": [{"site": "fc1", "action": "svd",
                                                            "params": {"rank": 2.5}}]}).encode(),
    "unknown-param": json.dumps({"version": 1, "decisions": [{"site": "fc1", "action": "svd",
                                                               "params": {"rank": 2, "x": 1}}]}).encode(),
    "duplicate": json.dumps({"version": 1, "decisions": [{"site": "fc1", "action": "svd", "params": {"rank": 2}}] * 2
                             }).encode(),
    "svd-and-share": json.dumps({"version": 1, "decisions": [
        {"site": "fc1", "action": "svd", "params": {"rank": 2}},
        {"site": "fc1", "action": "share", "params": {"bits": 4}}]}).encode(),
    "rank-above-pruned": json.dumps({"version": 1, "decisions": [
        {"site": "group:fc1", "action": "prune", "params": {"keep": 4}},
        {"site": "fc1", "action": "svd", "params": {"rank": 6}}]}).encode(),
    "keep-too-big": json.dumps({"version": 1, "decisions": [
        {"site": "group:fc1", "action": "prune", "params": {"keep": 99}}]}).encode(),
    "bits-33": json.dumps({"version": 1, "decisions": [
        {"site": "fc1", "action": "share", "params": {"bits": 33}}]}).encode(),
    "deeply-nested": b'{"version": 1, "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b', "decisions": []}',
    "empty-file": b"",
    "fifo": lambda path: os.mkfifo(path),
    "folder": lambda path: path.mkdir(),
}
PLAN_COMMANDS = {
    "apply": ["apply", "m.onnx", "bad.json", "-o", "out.onnx"],
    "compress-method": ["compress", "m.onnx", "--data", "d.npz", "--method", "bad.json", "-o", "out.onnx",
                        "--quiet", "--no-recover"],
}
for plan_id, content in BAD_PLANS.items():
    for cmd_id, cmd in PLAN_COMMANDS.items():
        def make(d, content=content, cmd=cmd):
            if callable(content):
                content(d / "bad.json")
            else:
                (d / "bad.json").write_bytes(content)
            return list(cmd)
        case(f"plan-{plan_id}-{cmd_id}", ("bad.json", "site", "fc1"), make)

# -- run state (--resume) -----------------------------------------------------------------


def _run_dir(config=None, state=None, raw_config: bytes | None = None, raw_state: bytes | None = None):
    def make(d):
        run = d / "out.run"
        run.mkdir()
        sha = hashlib.sha256(MLP).hexdigest()
        cfg = {"method": "pacbo", "actions": ["svd"], "data": "d.npz", "seed": 0, "model_sha256": sha,
               "samples": 50, "loss": "norm", "objective": "size", "delta": 0.05, "epsilon": 0.005}
        if config is not None:
            cfg = config(cfg)
        (run / "compress.json").write_bytes(raw_config if raw_config is not None else json.dumps(cfg).encode())
        if raw_state is not None:
            (run / "state.json").write_bytes(raw_state)
        elif state is not None:
            (run / "state.json").write_text(json.dumps(state))
        return ["compress", "m.onnx", "-o", "out.onnx", "--resume", "out.run", "--quiet"]
    return make


RESUME_CASES = {
    "config-not-json": _run_dir(raw_config=b"{oops"),
    "config-not-utf8": _run_dir(raw_config=b"\xff\xfe"),
    "config-list": _run_dir(raw_config=b"[1, 2]"),
    "config-missing-keys": _run_dir(raw_config=b"{}"),
    "config-wrong-type": _run_dir(config=lambda c: {**c, "samples": "fifty"}),
    "config-actions-type": _run_dir(config=lambda c: {**c, "actions": "svd"}),
    "config-other-model": _run_dir(config=lambda c: {**c, "model_sha256": "0" * 64}),
    "state-not-json": _run_dir(raw_state=b"{nope"),
    "state-list": _run_dir(raw_state=b"[]"),
    "state-wrong-types": _run_dir(state={"format": "pycompress-pacbo", "version": 1, "d": "two",
                                         "observations": {}, "pending": []}),
    "state-bad-observation": _run_dir(state={"format": "pycompress-pacbo", "version": 1, "d": 2,
                                             "observations": [{"theta": ["a"]}], "pending": []}),
    "state-nested": _run_dir(raw_state=b"[" * 100_000 + b"]" * 100_000),
    "no-run-folder": lambda d: ["compress", "m.onnx", "-o", "out.onnx", "--resume", "nowhere.run"],
    "run-folder-is-file": lambda d: ["compress", "m.onnx", "-o", "out.onnx", "--resume", "d.npz"],
}
for resume_id, make in RESUME_CASES.items():
    case(f"resume-{resume_id}", ("out.run", "compress.json", "state.json", "nowhere.run", "d.npz", "m.onnx"), make)

# -- .pcz containers -----------------------------------------------------------------------


def _pcz(header: dict | bytes, sections: bytes = b"", version: int = 1, flags: int = 0,
         crc_ok: bool = True) -> bytes:
    from pycompress.export.packed import MAGIC

    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = struct.pack("<HHI", version, flags, len(body))
    crc = zlib.crc32(prefix + body) if crc_ok else 0
    return MAGIC + prefix + body + struct.pack("<I", crc) + sections


def _valid_header() -> dict:
    from pycompress.export.packed import _read_header

    return _read_header(PACKED, "p")[0]


BAD_PCZ = {
    "empty": b"",
    "random": bytes(np.random.default_rng(2).integers(0, 256, 500, dtype=np.uint8)),
    "onnx-file": MLP,
    "truncated": PACKED[: len(PACKED) // 2],
    "magic-only": PACKED[:8],
    "trailing-bytes": PACKED + b"\0" * 10,
    "flipped-byte": PACKED[:-20] + bytes([PACKED[-20] ^ 0xFF]) + PACKED[-19:],
    "version-9": _pcz(_valid_header(), version=9),
    "bad-crc": _pcz(_valid_header(), crc_ok=False),
    "header-not-json": _pcz(b"{not json"),
    "header-nested": _pcz(b"[" * 200_000 + b"]" * 200_000),
    "header-list": _pcz(b"[]"),
    "huge-onnx-bytes": _pcz({**_valid_header(), "onnx_bytes": 10**15}),
    "huge-section": _pcz({**_valid_header(), "sections": [{"length": 10**12, "crc32": 0}]}),
    "negative-length": _pcz({**_valid_header(), "sections": [{"length": -5, "crc32": 0}]}),
    "huge-stream-count": _pcz({**_valid_header(), "sections": [{"length": 0, "crc32": 0}, {"length": 0, "crc32": 0}],
                               "streams": [{"tensor": "w", "offset": 0, "count": 10**12, "coding": "huffman",
                                            "sections": [1]}]}),
    "header-length-lies": PACKED[:12] + struct.pack("<I", 2**31) + PACKED[16:],
}
for pcz_id, data in BAD_PCZ.items():
    def make(d, data=data):
        (d / "bad.pcz").write_bytes(data)
        return ["unpack", "bad.pcz", "-o", "out.onnx"]
    case(f"pcz-{pcz_id}", "bad.pcz", make)
case("pcz-fifo", "bad.pcz", lambda d: (os.mkfifo(d / "bad.pcz"), ["unpack", "bad.pcz", "-o", "out.onnx"])[1])
case("pcz-folder", "bad.pcz", lambda d: ((d / "bad.pcz").mkdir(), ["unpack", "bad.pcz", "-o", "out.onnx"])[1])
case("pcz-missing", "bad.pcz", argv("unpack", "bad.pcz", "-o", "out.onnx"))

# -- convert sources ---------------------------------------------------------------------------

CONVERT_CASES = {
    "sys-exit-0": ("fac.py:exits", "fac.py"),
    "sys-exit-3": ("fac.py:exits3", "fac.py"),
    "raises": ("fac.py:raises", "fac.py"),
    "returns-none": ("fac.py:returns_none", "fac.py"),
    "returns-int": ("fac.py:returns_int", "fac.py"),
    "numpy-forward": ("fac.py:numpy_forward", "differs"),
    "dict-forward": ("fac.py:dict_forward", "dict"),
    "nan-forward": ("fac.py:nan_forward", "NaN"),
    "exit-in-forward": ("fac.py:exit_forward", "sys.exit"),
    "os-exit-in-forward": ("fac.py:hard_exit", "os._exit"),
    "os-exit-in-factory": ("fac.py:hard_exit_factory", "os._exit"),
    "missing-attr": ("fac.py:nothing", "fac.py"),
    "missing-file": ("nofile.py:f", "nofile.py"),
    "no-colon": ("fac.py", "fac.py"),
    "pickle": ("model.pt", "model.pt"),
    "pt2-garbage": ("bad.pt2", "bad.pt2"),
}
for conv_id, (source, names) in CONVERT_CASES.items():
    def make(d, source=source):
        (d / "bad.pt2").write_bytes(b"PK\x03\x04 not an archive")
        (d / "model.pt").write_bytes(b"\x80\x04 pickle")
        return ["convert", source, "-o", "out.onnx", "--input-shape", "1,4"]
    case(f"convert-{conv_id}", names, make)
case("convert-syntax-error", "broken.py", lambda d: ((d / "broken.py").write_text("def f(:\n"),
                                                     ["convert", "broken.py:f", "-o", "o.onnx",
                                                      "--input-shape", "1,4"])[1])
case("convert-import-exits", "exits.py", lambda d: ((d / "exits.py").write_text("import sys\nsys.exit(0)\n"),
                                                    ["convert", "exits.py:f", "-o", "o.onnx",
                                                     "--input-shape", "1,4"])[1])

# -- concurrent runs: a held lock ------------------------------------------------------------

LOCKED = {
    "compress": (["compress", "m.onnx", "--data", "d.npz", "-o", "out.onnx", "--quiet"], "out.onnx"),
    "compress-run-dir": (["compress", "m.onnx", "--data", "d.npz", "-o", "o2.onnx", "--run-dir", "out.run",
                          "--quiet"], "out.run"),
    "apply": (["apply", "m.onnx", "plan.json", "-o", "out.onnx"], "out.onnx"),
    "plan": (["plan", "m.onnx", "--actions", "svd", "-o", "out.onnx"], "out.onnx"),
    "export": (["export", "m.onnx", "--to", "fp16", "-o", "out.onnx"], "out.onnx"),
    "unpack": (["unpack", "p.pcz", "-o", "out.onnx"], "out.onnx"),
}
for lock_id, (cmd, target) in LOCKED.items():
    def make(d, cmd=cmd, target=target):
        return list(cmd)
    case(f"locked-{lock_id}", ("another pycompress run",), make)
    CASES[-1].lock = target  # type: ignore[attr-defined]


# -- the harness ---------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: file hashes, folders, FIFOs and links (what the run must not change)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            elif not path.is_file():
                out[rel] = "special"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int):
    def fire(signum, frame):
        raise _Timeout(f"no answer within {seconds} s (a hang)")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_in_process(args: list[str]) -> tuple[int, str]:
    from pycompress.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), alarm(60):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse inside main exits through here only if main lets it
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_clean_error(case: Case, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "case"
    folder.mkdir()
    base(folder)
    args = case.make(folder)
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    lock = getattr(case, "lock", None)
    caplog.set_level(logging.WARNING)
    if lock:
        from pycompress.files import OutputPolicy

        with OutputPolicy({}, lock=[folder / lock]):
            code, text = run_in_process(args)
    else:
        code, text = run_in_process(args)
    assert code not in (0, None), f"exit 0 on bad input: {text[-500:]}"
    assert "Traceback" not in text, text
    assert "internal error" not in text, text
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert any(name in text for name in case.names), f"message names none of {case.names}: {text[-500:]}"
    assert snapshot(folder) == before, "an input changed or something was left behind"


def test_the_generator_covers_every_category_with_400_cases():
    prefixes = {c.id.split("-")[0] for c in CASES}
    assert {"model", "data", "images", "number", "output", "plan", "resume", "pcz", "convert",
            "locked", "labels"} <= prefixes
    assert len(CASES) >= 400
    assert len({c.id for c in CASES}) == len(CASES)


# -- a few through a real process: exit status, stderr, no hang -------------------------------

SUBPROCESS_CASES = ["model-nan-weight-compress", "data-fifo-bench", "output-plan-o-model", "pcz-header-nested",
                    "convert-sys-exit-0", "convert-os-exit-in-forward", "number-compress--gamma=nan"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(case_id: str, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    base(tmp_path)
    args = case.make(tmp_path)
    before = snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pycompress", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("pycompress: error:"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 or "Warning" in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before
