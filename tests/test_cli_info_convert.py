import json
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

import zoo
from conftest import export
from pycompress.cli import main


def run_cli(*args):
    """Run the real console entry point in a subprocess (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "pycompress", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_info_table_and_json(tmp_path, capsys):
    path = export(zoo.MLP((64, 32, 10)), (1, 64), tmp_path / "mlp.onnx")
    assert main(["info", str(path)]) == 0
    table = capsys.readouterr().out
    assert "Gemm" in table and f"{64 * 32 + 32 + 32 * 10 + 10:,} params" in table
    assert main(["info", str(path), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["total"]["params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert payload["total"]["macs"] == 64 * 32 + 32 * 10
    assert [layer["op"] for layer in payload["layers"]] == ["Gemm", "Gemm"]


@pytest.mark.parametrize("content", [b"", b"garbage" * 20, None])
def test_bad_model_file_is_one_line_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run_cli("info", path)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], err
    assert "Traceback" not in err


def test_truncated_model_is_one_line_error(tmp_path):
    path = export(zoo.MLP(), (1, 64), tmp_path / "mlp.onnx")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    code, _, err = run_cli("info", path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err and "Traceback" not in err


def write_factory(tmp_path, body):
    src = tmp_path / "factory.py"
    src.write_text(textwrap.dedent(body))
    return src


def test_convert_round_trip_small_module(tmp_path):
    src = write_factory(tmp_path, """
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                       torch.nn.Linear(4 * 6 * 6, 5))
    """)
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli("convert", f"{src}:build", "-o", out, "--input-shape", "2,3,8,8", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["max_abs_diff"] < 1e-4
    # Independent check: same weights in torch vs the written file in onnxruntime, another batch size.
    namespace = {}
    exec(src.read_text(), namespace)
    module = namespace["build"]().eval()
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, module(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_convert_errors_are_clear(tmp_path):
    src = write_factory(tmp_path, "def build():\n    return 3\n")
    code, _, err = run_cli("convert", f"{src}:build", "-o", tmp_path / "x.onnx", "--input-shape", "1,3")
    assert code == 2 and "expected a torch.nn.Module" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("convert", f"{src}:missing", "-o", tmp_path / "x.onnx", "--input-shape", "1,3")
    assert code == 2 and "has no attribute 'missing'" in err
    (tmp_path / "w.pt").write_bytes(b"pickle")
    code, _, err = run_cli("convert", tmp_path / "w.pt", "-o", tmp_path / "x.onnx")
    assert code == 2 and "pickled checkpoints are not loaded" in err
    code, _, err = run_cli("convert", f"{src}:build", "-o", tmp_path / "x.onnx", "--input-shape", "1,a")
    assert code == 2 and "--input-shape" in err
    assert not (tmp_path / "x.onnx").exists()


def test_convert_rejects_mismatch_above_tolerance(tmp_path):
    # Dropout in train mode differs between runs: the check must catch a mismatch.
    src = write_factory(tmp_path, """
        import torch
        class Noisy(torch.nn.Module):
            def forward(self, x):
                return x + (torch.rand_like(x) if not torch.onnx.is_in_onnx_export() else 0)
        def build():
            return Noisy()
    """)
    out = tmp_path / "n.onnx"
    code, _, err = run_cli("convert", f"{src}:build", "-o", out, "--input-shape", "1,8")
    assert code == 2 and "differs from torch" in err
    assert not out.exists()


def test_convert_pt2_exported_program(tmp_path):
    module = zoo.MLP((8, 6, 3)).eval()
    program = torch.export.export(module, (torch.randn(2, 8),))
    torch.export.save(program, tmp_path / "mlp.pt2")
    out = tmp_path / "mlp.onnx"
    code, _, err = run_cli("convert", tmp_path / "mlp.pt2", "-o", out)
    assert code == 0, err
    x = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(out))
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, module(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


@pytest.mark.slow
def test_convert_efficientnet_lite0_round_trip(tmp_path, crops):
    src = write_factory(tmp_path, f"""
        import sys
        sys.path.insert(0, {str(zoo.__file__.rsplit('/', 1)[0])!r})
        import zoo
        def build():
            return zoo.efficientnet_lite0()
    """)
    out = tmp_path / "eff.onnx"
    code, stdout, err = run_cli("convert", f"{src}:build", "-o", out, "--input-shape", "1,3,224,224")
    assert code == 0, err
    sess = ort.InferenceSession(str(out))
    logits = sess.run(None, {"input": crops[:4]})[0]
    with torch.no_grad():
        expected = zoo.efficientnet_lite0()(torch.from_numpy(crops[:4])).numpy()
    np.testing.assert_allclose(logits, expected, atol=2e-3)
    # Real weights, real photo: chelsea the cat is ImageNet class 285.
    from skimage import data
    from skimage.transform import resize
    img = resize(data.chelsea().astype(np.float32) / 255.0, (224, 224), anti_aliasing=True)
    x = ((img - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)[None].astype(np.float32)
    assert int(np.argmax(sess.run(None, {"input": x})[0])) == 285
