"""The device agent on loopback: bench through it equals bench here, hostile or broken
requests get a clear error and the agent keeps serving, and it imports neither torch nor gpytorch."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest
import zoo
from agent_helpers import ROOT, TOKEN, running_agent
from conftest import export

from pycompress.agent.client import DeviceClient, DeviceError
from pycompress.agent.protocol import MAGIC, VERSION, encode_frame, read_frame
from pycompress.cli.main import main
from pycompress.ir import load_model, save_model
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import apply_plan


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A 64-256-256-10 digits MLP, the same with both hidden layers at SVD rank 8, and digits inputs."""
    folder = tmp_path_factory.mktemp("agent")
    (x_train, y_train), (x_test, _) = zoo.digits()
    module = zoo.train_one_thread(zoo.MLP((64, 256, 256, 10)), x_train, y_train, epochs=3)
    original = export(module, (1, 64), folder / "mlp.onnx")
    model = load_model(original)
    # Both hidden layers at rank 8: about 9x fewer MACs, a latency gap that load on the machine does not
    # hide (with the first layer alone, 84k -> 71k MACs, the two p50s were within 0.1 us of each other).
    sites = [n.name for n in model.graph if n.op_type in ("Gemm", "MatMul")][:2]
    apply_plan(model, Plan([LayerDecision(site, "svd", {"rank": 8}) for site in sites]))
    small = save_model(model, folder / "mlp_r8.onnx")
    np.savez(folder / "test.npz", x=x_test[:200].astype(np.float32))
    return original, small, folder / "test.npz"


@pytest.fixture(scope="module")
def agent():
    # A small model cap so that the 64-256-256-10 MLP (~350 KB) is "oversized"; a short read timeout.
    with running_agent("--max-model-mb", "0.2", "--timeout", "2") as (address, proc):
        yield address, proc


@pytest.fixture(scope="module")
def roomy_agent():
    with running_agent() as (address, proc):
        yield address, proc


def _tiny_model() -> bytes:
    """A 64 -> 10 Gemm (a few KB): under every cap."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(64, 10)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _still_serves(address: str) -> None:
    client = DeviceClient(address, TOKEN, timeout=30)
    try:
        run = client.run(_tiny_model(), {"x": np.ones((1, 64), np.float32)}, warmup=1, runs=3)
        assert run.seconds.shape == (3,) and run.latency_ms["p50"] > 0
    finally:
        client.close()


def _raw(address: str, payload: bytes, *, half_close: bool = True) -> dict:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        reply, _ = read_frame(sock, max_body=1 << 20)
    return reply


def _bench_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["bench", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_on_device_matches_local(mlp, roomy_agent, capsys, monkeypatch):
    """Same machine, same options: the agent's latency is within noise of local bench; fidelity is equal."""
    original, small, data = mlp
    address, _ = roomy_agent
    monkeypatch.setenv("PYCOMPRESS_AGENT_TOKEN", TOKEN)
    common = [str(original), str(small), "--data", str(data), "--threads", "1", "--iters", "300"]
    # Interleaved, the faster of two passes each: the shared machine's noise hits both alike.
    runs = [_bench_json(capsys, *common, *extra) for extra in ([], ["--device", address]) * 2]
    local = [min(r["models"][i]["latency_ms"]["p50"] for r in runs[0::2]) for i in range(2)]
    remote = [min(r["models"][i]["latency_ms"]["p50"] for r in runs[1::2]) for i in range(2)]
    for here, there in zip(local, remote):
        assert 0.6 < there / here < 1.6, (local, remote)
    # The rank-8 model is faster on the device as it is here.
    assert remote[1] < remote[0]
    assert runs[1]["device"]["address"] == address and runs[1]["device"]["onnxruntime"]
    for i in range(2):
        assert runs[1]["models"][i]["fidelity"] == runs[0]["models"][i]["fidelity"]
        assert runs[1]["models"][i]["params"] == runs[0]["models"][i]["params"]
    assert runs[1]["models"][1]["fidelity"]["mean_sq_error"] > 0


def test_wrong_token_is_refused(agent):
    address, _ = agent
    client = DeviceClient(address, "not-the-token")
    with pytest.raises(DeviceError, match="unauthorized") as info:
        client.describe()
    assert info.value.code == "unauthorized"
    _still_serves(address)


def test_oversized_model_is_refused(agent, mlp):
    address, _ = agent
    original, _, _ = mlp
    client = DeviceClient(address, TOKEN)
    with pytest.raises(DeviceError, match="exceeds the agent's limit") as info:
        client.put_model(original.read_bytes())
    assert info.value.code == "too_large"
    _still_serves(address)


def test_truncated_request_and_garbage_get_errors(agent):
    address, _ = agent
    frame = encode_frame({"op": "describe", "token": TOKEN})
    reply = _raw(address, frame[: len(frame) - 5])
    assert not reply["ok"] and "truncated header" in reply["error"]
    reply = _raw(address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not reply["ok"] and "bad magic" in reply["error"]
    head = b"{not json"
    reply = _raw(address, struct.pack(">4sBIQ", MAGIC, VERSION, len(head), 0) + head)
    assert not reply["ok"] and "JSON" in reply["error"]
    # A body far larger than the caps is refused from its announced length, before anything is read.
    reply = _raw(address, struct.pack(">4sBIQ", MAGIC, VERSION, 2, 1 << 40) + b"{}")
    assert not reply["ok"] and "exceeds the limit" in reply["error"]
    # A peer that stops mid-request without closing: the read times out (--timeout 2).
    reply = _raw(address, frame[: len(frame) - 5], half_close=False)
    assert not reply["ok"] and "timed out" in reply["error"]
    _still_serves(address)


def test_bad_requests_keep_the_connection(agent):
    address, _ = agent
    client = DeviceClient(address, TOKEN)
    try:
        with pytest.raises(DeviceError, match="unknown op"):
            client.request({"op": "format_disk"})
        with pytest.raises(DeviceError, match="not the announced") as info:
            client.request({"op": "put_model", "sha256": "0" * 64}, {"model": _tiny_model()})
        assert info.value.code == "hash_mismatch"
        with pytest.raises(DeviceError, match="not in the agent's cache"):
            client.request({"op": "run", "sha256": "f" * 64, "runs": 3})
        with pytest.raises(DeviceError, match="cannot load the model"):
            client.run(b"\x08\x01garbage", {"x": np.ones((1, 64), np.float32)}, runs=3)
        # A pickled array is refused, never loaded.
        import io

        buffer = io.BytesIO()
        np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        digest = client.put_model(_tiny_model())
        with pytest.raises(DeviceError, match="without objects"):
            client.request({"op": "run", "sha256": digest, "runs": 3}, {"feed/x": buffer.getvalue()})
        # The same connection still serves, and the model is run from the cache by its hash.
        served = client.request({"op": "describe"})[0]["served"]
        run = client.run(_tiny_model(), {"x": np.ones((2, 64), np.float32)}, runs=3,
                         data={"x": np.ones((5, 64), np.float32)}, output_batch=2)
        assert run.outputs[0].shape == (5, 10)
        assert client.request({"op": "describe"})[0]["served"] == served + 2   # run + describe: no put_model
        # Another connection finds the model by its hash: has_model + run, nothing sent again.
        other = DeviceClient(address, TOKEN)
        other.run(_tiny_model(), {"x": np.ones((1, 64), np.float32)}, runs=3)
        other.close()
        assert client.request({"op": "describe"})[0]["served"] == served + 5
    finally:
        client.close()


def test_agent_imports_neither_torch_nor_gpytorch(tmp_path):
    """What goes on the device: the agent serves a run and has loaded only numpy and onnxruntime."""
    model = tmp_path / "tiny.onnx"
    model.write_bytes(_tiny_model())
    script = f"""
import sys, threading, json
import numpy as np
from pycompress.agent.server import Agent, AgentServer, AgentSettings
from pycompress.agent.client import DeviceClient
import pycompress.agent.command
server = AgentServer("127.0.0.1", 0, Agent(AgentSettings(token="t")))
threading.Thread(target=server.serve_forever, daemon=True).start()
client = DeviceClient(f"127.0.0.1:{{server.port}}", "t")
run = client.run(open({str(model)!r}, "rb").read(), {{"x": np.ones((1, 64), np.float32)}}, runs=3)
server.shutdown()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "gpytorch", "onnx", "onnx_ir", "scipy"))
print(json.dumps({{"heavy": heavy, "ort": "onnxruntime" in sys.modules, "runs": len(run.seconds)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "ort": True, "runs": 3}


def test_agent_command_line_errors(capsys):
    assert main(["agent", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err


def test_bench_on_device_of_a_model_with_external_data(mlp, roomy_agent, tmp_path, capsys, monkeypatch):
    """Weights in a file next to the model: sent inlined, the device runs the same model."""
    import onnx

    original, _, data = mlp
    external = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(str(original)), str(external), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.bin", size_threshold=0)
    assert external.stat().st_size < 10_000
    monkeypatch.setenv("PYCOMPRESS_AGENT_TOKEN", TOKEN)
    out = _bench_json(capsys, str(original), str(external), "--data", str(data), "--device", roomy_agent[0],
                      "--iters", "5")
    first, second = out["models"]
    assert second["error"] is None and second["params"] == first["params"]
    assert second["fidelity"]["mean_sq_error"] == 0.0


def test_bench_on_device_with_a_provider_it_lacks(mlp, roomy_agent, capsys, monkeypatch):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has TensorRT")
    monkeypatch.setenv("PYCOMPRESS_AGENT_TOKEN", TOKEN)
    capsys.readouterr()
    assert main(["bench", str(mlp[0]), "--device", roomy_agent[0], "--provider", "tensorrt", "--iters", "3",
                 "--json"]) == 2
    row = json.loads(capsys.readouterr().out)["models"][0]
    assert row["latency_ms"] is None and "TensorrtExecutionProvider could not be loaded on the device" in row["error"]
