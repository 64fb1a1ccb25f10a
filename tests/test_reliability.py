"""Reliability promises beyond single bad inputs (the fuzz suite covers those):
outputs on success and failure, locks between concurrent runs, plans that
compose, weights built by ConstantOfShape, scratch files of onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_models import conv_proto, write_data, write_mlp
from test_fuzz_cli import run_in_process, snapshot

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    write_mlp(tmp_path / "m.onnx")
    write_data(tmp_path / "d.npz")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- outputs ----------------------------------------------------------------------------------

def test_successful_compress_writes_its_outputs_and_no_lock_or_temp_file(folder):
    code, text = run_in_process(["compress", "m.onnx", "--data", "d.npz", "-o", "out.onnx", "--max-evals", "3",
                                 "--initial", "2", "--no-recover", "--quiet"])
    assert code == 0, text
    names = {p.name for p in folder.iterdir()}
    assert {"out.onnx", "out.plan.json", "out.trace.json", "out.report", "out.run"} <= names
    assert not [n for n in names if n.startswith(".")], names   # no .lock, no .tmp
    # The run folder holds state: the same command refuses instead of starting over.
    code, text = run_in_process(["compress", "m.onnx", "--data", "d.npz", "-o", "out.onnx", "--quiet"])
    assert code == 2 and "already holds a search" in text


def test_failed_compress_after_the_run_folder_was_created_leaves_nothing(folder):
    """The run folder is created at start (compress.json); a failure before the search removes it."""
    np.save(folder / "labels.npy", np.zeros(3, np.int64))
    before = snapshot(folder)
    code, text = run_in_process(["compress", "m.onnx", "--data", "d.npz", "--labels", "labels.npy",
                                 "-o", "out.onnx", "--quiet"])
    assert code == 2 and "labels.npy" in text
    assert snapshot(folder) == before


def test_resume_refusal_leaves_the_run_folder_byte_identical(folder):
    run = folder / "out.run"
    run.mkdir()
    (run / "compress.json").write_text(json.dumps({"method": "pacbo", "actions": ["svd"], "data": "d.npz",
                                                   "seed": 0, "model_sha256": "0" * 64}, indent=3))
    before = snapshot(folder)
    code, text = run_in_process(["compress", "m.onnx", "-o", "out.onnx", "--resume", "out.run"])
    assert code == 2 and "not the model" in text
    assert snapshot(folder) == before


def test_an_existing_output_is_replaced_atomically_and_a_failure_keeps_it(folder):
    (folder / "p.json").write_text("old")
    code, _ = run_in_process(["plan", "m.onnx", "--actions", "svd", "-o", "p.json"])
    assert code == 0 and json.loads((folder / "p.json").read_text())["version"] == 1
    (folder / "p.json").write_text("old")
    code, _ = run_in_process(["plan", "m.onnx", "--actions", "nosuch", "-o", "p.json"])
    assert code == 2 and (folder / "p.json").read_text() == "old"


# -- concurrent runs ---------------------------------------------------------------------------

def test_a_second_process_on_the_same_output_refuses_while_the_first_holds_it(folder):
    from pycompress.files import OutputPolicy

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with OutputPolicy({"-o": folder / "out.onnx"}, lock=[folder / "out.onnx"]):
        proc = subprocess.run([sys.executable, "-m", "pycompress", "compress", "m.onnx", "--data", "d.npz",
                               "-o", "out.onnx", "--quiet"], cwd=folder, env=env, capture_output=True,
                              text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "another pycompress run is writing this output" in proc.stderr
    assert not (folder / "out.run").exists() and not (folder / "out.onnx").exists()
    assert not (folder / ".out.onnx.lock").exists()   # released and removed by the holder


def test_two_concurrent_compress_runs_one_refuses(folder):
    """Started together on the same -o: one finishes, the other refuses (none silently lost)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pycompress", "compress", "m.onnx", "--data", "d.npz", "-o", "out.onnx",
           "--max-evals", "4", "--initial", "2", "--no-recover", "--quiet"]
    procs = [subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0, results
    assert codes[1] == 2, results
    refused = next(err for code, err in results if code == 2)
    assert "another pycompress run" in refused or "already holds a search" in refused, refused


# -- plans compose -------------------------------------------------------------------------------

@pytest.mark.parametrize("actions", ["prune,svd", "svd,share", "prune,svd,share", "prune,lowrank_conv,share",
                                     "share,prune,lowrank_conv,svd"])
def test_plan_writes_only_plans_apply_accepts(actions, tmp_path, monkeypatch):
    """Every action mix on an MLP and a CNN: the plan written applies (the issue: svd+share on one layer,
    svd ranks chosen for the unpruned layer)."""
    monkeypatch.chdir(tmp_path)
    write_mlp(tmp_path / "m.onnx", hidden=32)
    onnx.save(conv_proto(), str(tmp_path / "c.onnx"))
    decided = 0
    for model in ("m.onnx", "c.onnx"):
        code, text = run_in_process(["plan", model, "--actions", actions, "--energy", "0.99", "--keep", "0.5",
                                     "--bits", "4", "-o", "p.json"])
        assert code == 0, text
        plan = json.loads((tmp_path / "p.json").read_text())
        sites = [d["site"] for d in plan["decisions"]]
        assert len(sites) == len(set(sites)), sites  # one action per layer
        if not sites:
            continue
        decided += 1
        code, text = run_in_process(["apply", model, "p.json", "-o", "a.onnx"])
        assert code == 0, text
    assert decided, "no model got a decision: the test checks nothing"


def test_apply_refuses_a_rank_above_the_pruned_layer_before_reading_data(folder):
    (folder / "p.json").write_text(json.dumps({"version": 1, "decisions": [
        {"site": "group:fc1", "action": "prune", "params": {"keep": 4}},
        {"site": "fc1", "action": "svd", "params": {"rank": 6, "data_aware": True}}]}))
    # --data names a FIFO: reading it would hang; the plan is refused before.
    os.mkfifo(folder / "never.npy")
    code, text = run_in_process(["apply", "m.onnx", "p.json", "-o", "a.onnx", "--data", "never.npy"])
    assert code == 2 and "rank 6 is above the full rank 4 (once the plan's prune is applied)" in text


# -- models ---------------------------------------------------------------------------------------

def test_constant_of_shape_weights_are_counted_and_compressible(tmp_path):
    """A weight built by ConstantOfShape above onnxscript's folding limit becomes an initializer."""
    from pycompress.ir import load_model, model_cost

    n = 1024
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.01])),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                              [numpy_helper.from_array(np.array([n, n], np.int64), "shape")])
    path = tmp_path / "cos.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    model = load_model(path)
    assert model_cost(model).params == n * n
    import onnxruntime as ort

    from pycompress.ir import save_model
    x = np.random.default_rng(0).standard_normal((2, n)).astype(np.float32)
    save_model(model, tmp_path / "folded.onnx")
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "folded.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_zipmap_output_is_refused_with_the_scikit_learn_hint(tmp_path):
    from test_fuzz_cli import _zipmap

    (tmp_path / "skl.onnx").write_bytes(_zipmap())
    code, text = run_in_process(["info", str(tmp_path / "skl.onnx")])
    assert code == 2 and "graph output 'output' is a sequence" in text and "zipmap" in text


def test_failed_int8_export_leaves_no_onnxruntime_scratch_files(tmp_path, monkeypatch):
    """onnxruntime's quantizer writes scratch files into the working folder; they go to a removed temp folder."""
    from pycompress.export import quantized

    monkeypatch.chdir(tmp_path)
    write_mlp(tmp_path / "m.onnx")

    def failing_quantize(source, output, *args, **kwargs):
        Path("sym_shape_infer_temp.onnx").write_bytes(b"scratch")   # what onnxruntime leaves on failure
        Path("0123-uuid.data").write_bytes(b"\0" * 1024)
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT")

    import onnxruntime.quantization as q
    monkeypatch.setattr(q, "quantize_dynamic", failing_quantize)
    before = snapshot(tmp_path)
    with pytest.raises(Exception, match="dynamic quantization failed"):
        quantized.to_int8_dynamic(tmp_path / "m.onnx", tmp_path / "q.onnx")
    assert snapshot(tmp_path) == before
