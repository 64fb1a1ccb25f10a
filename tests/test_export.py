"""Export: the packed Huffman container (round trip, refusal of damaged files), and int8 / int4 / fp16 / ORT."""

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import zoo
from conftest import export
from pycompress import kernels
from pycompress.errors import PycompressError
from pycompress.export import export_model
from pycompress.export.onnx_spans import initializer_spans
from pycompress.export.packed import (MAGIC, entropy_bits, from_zero_runs, pack_bytes, pack_file, unpack_bytes,
                                      unpack_file, zero_runs)
from pycompress.export.quantized import gemm_to_matmul
from pycompress.ir import load_model, save_model
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import apply_plan, get_rewrite


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "pycompress", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    """An MLP 64-256-128-10 as fp32, shared at 5 bits, and shared at 4 bits after 90% pruning."""
    folder = tmp_path_factory.mktemp("packed")
    torch_module = zoo.MLP((64, 256, 128, 10))
    fp32 = export(torch_module, (1, 64), folder / "mlp.onnx")
    files = {"fp32": fp32}
    for key, params in {"shared": {"bits": 5}, "pruned": {"bits": 4, "prune_fraction": 0.9}}.items():
        model = load_model(fp32)
        sites = [s for s in get_rewrite("share").sites(model) if s.ok]
        apply_plan(model, Plan([LayerDecision(s.name, "share", dict(params)) for s in sites]))
        files[key] = save_model(model, folder / f"mlp_{key}.onnx")
    return files


def test_initializer_spans_point_at_the_raw_bytes(mlp_files):
    data = mlp_files["shared"].read_bytes()
    proto = onnx.load_model_from_string(data)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    spans = initializer_spans(data)
    assert {s.name for s in spans} == set(arrays)
    for span in spans:
        assert data[span.offset:span.offset + span.length] == arrays[span.name].tobytes()
    with pytest.raises(ValueError):
        initializer_spans(data[:len(data) // 2])


@pytest.mark.parametrize("key", ["shared", "pruned"])
def test_pack_unpack_restores_identical_bytes(mlp_files, tmp_path, key):
    source = mlp_files[key]
    report = pack_file(source, tmp_path / "m.pcz")
    # One byte per index in ONNX: 5-bit indices code to about 5/8 of it, 90% zeros to far less.
    assert report.packed_bytes == (tmp_path / "m.pcz").stat().st_size < {"shared": 0.7, "pruned": 0.35}[key] * \
        report.onnx_bytes
    assert [s.kind for s in report.streams] == ["shared-weight indices"] * 3
    out, size = unpack_file(tmp_path / "m.pcz", tmp_path / "back.onnx")
    assert out.read_bytes() == source.read_bytes() and size == source.stat().st_size
    proto = onnx.load(source)
    indices = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == 2}
    for stream in report.streams:
        symbols = indices[stream.tensor].ravel()
        assert stream.count == symbols.size
        assert stream.entropy_bits == pytest.approx(entropy_bits(symbols))
        if key == "shared":
            # Plain Huffman: at least the entropy, and < 1 bit above it plus the 256-byte table.
            assert stream.coding == "huffman"
            assert stream.entropy_bits <= stream.bits_per_weight < stream.entropy_bits + 1 + 2048 / stream.count
        else:
            # The smaller of the two codings is kept; on the large streams 90%
            # zeros code as runs below one bit per weight, which plain Huffman cannot reach.
            lengths = kernels.huffman_code_lengths(np.bincount(symbols, minlength=256))
            dense = 256 + len(kernels.huffman_encode(symbols, lengths))
            assert stream.coded_bytes <= dense
            if stream.count >= 16384:
                payload_bits = (stream.coded_bytes - 2 * 256) * 8 / stream.count  # minus the two code tables
                assert stream.coding == "zero-runs" and payload_bits < 1.0 <= (dense - 256) * 8 / stream.count


def test_pack_codes_int8_tensors_too(tmp_path):
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4096] x) => (float[N, 4096] y) {
          w = DequantizeLinear (q, s)
          y = Add (x, w)
        }""")
    q = np.clip(np.round(rng.normal(0, 20, 4096)), -128, 127).astype(np.int8)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(q, "q"),
                                    onnx.numpy_helper.from_array(np.array(0.01, np.float32), "s")])
    data = proto.SerializeToString()
    packed, reports = pack_bytes(data)
    assert [(r.tensor, r.kind) for r in reports] == [("q", "int8 tensor")]
    assert reports[0].bits_per_weight < 7.5
    assert unpack_bytes(packed) == data


@pytest.mark.parametrize("stream", [
    [], [0], [3], [0] * 1000, [5] * 70, [0] * 255 + [1], [0] * 256 + [1], [0] * 257 + [1], [1] + [0] * 256,
    [1] + [0] * 512, [1] + [0] * 255, [1] + [0] * 511, list(range(256)) * 3,
])
def test_zero_runs_round_trip(stream):
    symbols = np.array(stream, np.uint8)
    runs, values = zero_runs(symbols, 0)
    assert runs.dtype == np.uint8 and runs.size == values.size
    np.testing.assert_array_equal(from_zero_runs(runs, values, 0, symbols.size), symbols)


# ----------------------------------------------------------------- damaged containers


@pytest.fixture(scope="module")
def container(mlp_files):
    data, _ = pack_bytes(mlp_files["pruned"].read_bytes())
    header_len = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(data[16:16 + header_len])
    return data, header, 16 + header_len + 4


def rebuild(header, sections_blob, version=2, flags=1):
    """A container with a (tampered) header whose checksums are recomputed: only the SHA-256 can catch it."""
    body = json.dumps(header, separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack("<HHI", version, flags, len(body))
    return prefix + body + struct.pack("<I", zlib.crc32(prefix[8:] + body)) + sections_blob


def flip(data, position):
    return data[:position] + bytes([data[position] ^ 0x40]) + data[position + 1:]


def damaged(container):
    data, header, start = container
    sections = header["sections"]
    skeleton_end = start + sections[0]["length"]
    cases = {
        "bad magic": (b"PK\x03\x04" + data[4:], "not a pycompress packed file"),
        "newer version": (data[:8] + struct.pack("<H", 3) + data[10:], "version 3 is not supported"),
        "header byte": (flip(data, 30), "corrupted header"),
        "skeleton byte": (flip(data, start + 10), "section 0 checksum mismatch"),
        "stream byte": (flip(data, skeleton_end + 300), "section 1 checksum mismatch"),
        "last byte": (flip(data, len(data) - 1), "checksum mismatch"),
        "trailing garbage": (data + b"\x00", "unexpected bytes at the end"),
        "empty": (b"", "not a pycompress packed file"),
    }
    for cut in (5, 12, 40, start - 1, start + 7, skeleton_end + 1, len(data) - 1):
        cases[f"truncated at {cut}"] = (data[:cut], "truncated")
    blob = data[start:]
    assert struct.unpack_from("<H", data, 10)[0] == 1            # the skeleton is deflated
    skeleton = bytearray(zlib.decompress(blob[:sections[0]["length"]]))
    skeleton[100] ^= 1

    def with_skeleton(deflated, **fields):
        forged = json.loads(json.dumps(header))
        forged["sections"][0] = {"length": len(deflated), "crc32": zlib.crc32(deflated)}
        forged.update(fields)
        return rebuild(forged, deflated + blob[sections[0]["length"]:])

    cases["skeleton changed, checksums forged"] = (with_skeleton(zlib.compress(bytes(skeleton))), "SHA-256")
    cases["skeleton not deflate data, checksums forged"] = (with_skeleton(b"\x00garbage" * 50),
                                                             "skeleton does not inflate")
    original = zlib.compress(zlib.decompress(blob[:sections[0]["length"]]))
    cases["skeleton longer than said, checksums forged"] = (
        with_skeleton(original, skeleton_bytes=header["skeleton_bytes"] - 1), "inflates to other than")
    cases["deflate flag in a version 1 file"] = (rebuild(header, blob, version=1), "corrupted header")
    forged = json.loads(json.dumps(header))
    forged["streams"][0]["offset"] += 3
    cases["stream moved, checksums forged"] = (rebuild(forged, blob), "SHA-256")
    forged = json.loads(json.dumps(header))
    forged["streams"][0]["count"] = 10**12
    cases["forged count"] = (rebuild(forged, blob), "corrupted")
    forged = json.loads(json.dumps(header))
    forged["streams"][1]["offset"] = 0
    cases["streams out of order"] = (rebuild(forged, blob), "corrupted header")
    forged = json.loads(json.dumps(header))
    forged["streams"][0]["sections"] = [0]
    cases["stream points at the skeleton"] = (rebuild(forged, blob), "corrupted header")
    forged = json.loads(json.dumps(header))
    del forged["onnx_sha256"]
    cases["missing field"] = (rebuild(forged, blob), "corrupted header")
    return cases


def test_damaged_containers_are_refused_with_one_line_naming_the_file(container, tmp_path):
    cases = damaged(container)
    assert len(cases) == 24
    for name, (data, message) in cases.items():
        path = tmp_path / "bad.pcz"
        path.write_bytes(data)
        out = tmp_path / "out.onnx"
        with pytest.raises(PycompressError) as info:
            unpack_file(path, out)
        text = str(info.value)
        assert message in text and str(path) in text and "\n" not in text, (name, text)
        assert not out.exists(), name


def test_intact_container_still_unpacks(container, mlp_files):
    assert unpack_bytes(container[0]) == mlp_files["pruned"].read_bytes()


def test_pack_refuses_non_onnx_and_overwriting_the_input(tmp_path, mlp_files):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(PycompressError, match="not a valid ONNX model"):
        pack_file(junk, tmp_path / "j.pcz")
    with pytest.raises(PycompressError, match="refusing to overwrite the input"):
        pack_file(mlp_files["shared"], mlp_files["shared"])
    assert not (tmp_path / "j.pcz").exists()


def test_cli_export_packed_unpack_round_trip(mlp_files, tmp_path):
    code, out, err = run_cli("export", mlp_files["shared"], "--to", "packed", "-o", tmp_path / "m.pcz")
    assert code == 0, err
    assert "bits/weight" in out and "entropy" in out and "max |diff| 0," in out
    code, out, err = run_cli("unpack", tmp_path / "m.pcz", "-o", tmp_path / "m.onnx", "--json")
    assert code == 0, err
    assert json.loads(out)["bytes"] == mlp_files["shared"].stat().st_size
    assert (tmp_path / "m.onnx").read_bytes() == mlp_files["shared"].read_bytes()
    code, out, err = run_cli("export", mlp_files["pruned"], "--to", "packed", "-o", tmp_path / "p.pcz", "--json")
    report = json.loads(out)
    assert code == 0 and report["format"] == "packed" and report["ratio"] < 0.35
    assert report["verification"]["outputs"][0]["max_abs_diff"] == 0
    assert [s["coding"] for s in report["details"]["streams"]][:2] == ["zero-runs", "zero-runs"]
    (tmp_path / "bad.pcz").write_bytes((tmp_path / "m.pcz").read_bytes()[:-10])
    code, out, err = run_cli("unpack", tmp_path / "bad.pcz", "-o", tmp_path / "x.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "truncated" in err and "Traceback" not in err


def test_export_argument_errors(mlp_files, tmp_path):
    code, _, err = run_cli("export", mlp_files["fp32"], "--to", "int8", "-o", tmp_path / "q.onnx")
    assert code == 2 and "needs calibration inputs (--data), or use --dynamic" in err
    code, _, err = run_cli("export", mlp_files["fp32"], "--to", "fp16", "--dynamic", "-o", tmp_path / "q.onnx")
    assert code == 2 and "--dynamic applies to --to int8 only" in err
    code, _, err = run_cli("export", mlp_files["fp32"], "--to", "fp16", "-o", mlp_files["fp32"])
    assert code == 2 and "refusing to overwrite the input" in err


GEMM_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 6] x) => (float[N, 5] y) {
  a = Gemm <alpha = 0.5, beta = 2.0> (x, w1, b1)
  r = Relu (a)
  y = Gemm <transB = 1> (r, w2)
}
"""


def test_gemm_to_matmul_is_exact():
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(GEMM_TEXT)
    proto.graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "w1"),
        onnx.numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b1"),
        onnx.numpy_helper.from_array(rng.normal(size=(5, 4)).astype(np.float32), "w2")])
    import onnx_ir as ir

    model = ir.from_proto(proto)
    assert gemm_to_matmul(model) == 2
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Relu", "MatMul"]
    x = rng.normal(size=(7, 6)).astype(np.float32)
    expected = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_int8_dynamic_and_int4_on_digits_mlp(tmp_path):
    (x_train, y_train), (x_test, _) = zoo.digits()
    module = zoo.train(zoo.MLP((64, 256, 10)), x_train, y_train, epochs=3)
    fp32 = export(module, (1, 64), tmp_path / "mlp.onnx")
    feeds = {"input": x_test[:32]}  # one batch: dynamic ranges depend on the batch
    dynamic = export_model(fp32, "int8", tmp_path / "dyn.onnx", dynamic=True, sample_inputs=feeds)
    int4 = export_model(fp32, "int4", tmp_path / "int4.onnx", sample_inputs=feeds)
    assert int4.details["layers_quantized"] == 2 and int4.details["gemm_rewritten_as_matmul"] == 2
    expected = ort.InferenceSession(str(fp32)).run(None, feeds)[0]
    for report, ops in ((dynamic, "MatMulInteger"), (int4, "MatMulNBits")):
        assert ops in {n.op_type for n in onnx.load(report.output).graph.node}
        assert report.output_bytes < 0.5 * report.input_bytes
        check = report.verification["outputs"][0]
        assert report.verification["inputs"] == "data" and check["samples"] == 32
        got = ort.InferenceSession(report.output).run(None, feeds)[0]
        assert check["max_abs_diff"] == pytest.approx(np.abs(got - expected).max(), rel=1e-5)
        assert check["top1_agreement"] >= 0.9 and check["relative_error"] < 0.1


def test_int4_refuses_a_model_without_fully_connected_layers(tmp_path):
    path = export(zoo.DepthwiseBlock().eval(), (1, 3, 16, 16), tmp_path / "dw.onnx")
    proto = onnx.load(path)
    # Drop the final Gemm: a conv-only model.
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    proto.graph.output[0].name = gemm.input[0]
    proto.graph.node.remove(gemm)
    proto.graph.output[0].type.tensor_type.shape.Clear()
    onnx.save(proto, tmp_path / "conv_only.onnx")
    with pytest.raises(PycompressError, match="covers fully-connected layers only"):
        export_model(tmp_path / "conv_only.onnx", "int4", tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
def test_efficientnet_int8_fp16_ort_exports_load_and_run(efficientnet_onnx, crops, tmp_path):
    reference = ort.InferenceSession(str(efficientnet_onnx)).run(None, {"input": crops})[0]
    calibration = {"input": zoo.skimage_crops(16, seed=5)}
    sample = {"input": crops[:8]}
    reports = {
        "int8": export_model(efficientnet_onnx, "int8", tmp_path / "int8.onnx", calibration=calibration,
                             sample_inputs=sample),
        "fp16": export_model(efficientnet_onnx, "fp16", tmp_path / "fp16.onnx", sample_inputs=sample),
        "ort": export_model(efficientnet_onnx, "ort", tmp_path / "eff.ort", sample_inputs=sample),
    }
    limits = {"int8": (0.30, 0.75), "fp16": (0.51, 1.0), "ort": (1.01, 1.0)}
    for name, report in reports.items():
        size, agreement = limits[name]
        assert report.ratio < size, name
        assert report.verification["samples"] == 8
        out = ort.InferenceSession(report.output).run(None, {"input": crops})[0]
        assert np.mean(out.argmax(1) == reference.argmax(1)) >= agreement, name
    assert reports["int8"].details["calibration_samples"] == 16
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(tmp_path / "int8.onnx").graph.node}
    onnx.checker.check_model(str(tmp_path / "fp16.onnx"))
    assert reports["fp16"].verification["outputs"][0]["relative_error"] < 0.01
    assert reports["ort"].verification["outputs"][0]["relative_error"] < 1e-5
    config = (tmp_path / "eff.required_operators.config").read_text()
    assert reports["ort"].files == [str(tmp_path / "eff.required_operators.config")]
    assert "Conv" in config and "Gemm" in config


def test_version_1_containers_still_unpack(container, mlp_files):
    """Files written before the skeleton was deflated (version 1, flags 0) read back the same bytes."""
    data, header, start = container
    length = header["sections"][0]["length"]
    skeleton = zlib.decompress(data[start:start + length])
    old = {key: value for key, value in header.items() if key != "skeleton_bytes"}
    old["sections"] = [{"length": len(skeleton), "crc32": zlib.crc32(skeleton)}] + header["sections"][1:]
    packed = rebuild(old, skeleton + data[start + length:], version=1, flags=0)
    assert unpack_bytes(packed) == mlp_files["pruned"].read_bytes()
    assert len(packed) > len(data)
