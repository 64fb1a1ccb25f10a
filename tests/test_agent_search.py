"""`compress --objective latency --device`: timings from agents on loopback; a device lost
mid-search is replaced by another, or the search stops and `--resume` finishes it with the same plan."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import zoo
from agent_helpers import TOKEN, running_agent, stop
from conftest import export

from pycompress.agent.client import DeviceClient
from pycompress.bench.remote import RemoteLatencyProbe
from pycompress.cli.main import main


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agent_search")
    (x_train, y_train), _ = zoo.digits()
    module = zoo.train_one_thread(zoo.MLP((64, 256, 256, 10)), x_train, y_train, epochs=3)
    path = export(module, (1, 64), folder / "mlp.onnx")
    np.savez(folder / "calib.npz", x=x_train.astype(np.float32))
    return path, folder / "calib.npz"


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv("PYCOMPRESS_AGENT_TOKEN", TOKEN)


def _compress(model, data, out, device, *extra):
    # gamma large: J is led by the fidelity (a function of the evaluation index alone), so the
    # plan does not hinge on timing noise; max-evals = the initial design: no proposal depends on it.
    return main(["compress", str(model), "--data", str(data), "-o", str(out), "--objective", "latency",
                 "--device", device, "--actions", "svd", "--gamma", "1000", "--initial", "5", "--max-evals", "5",
                 "--latency-runs", "5", "--threads", "1", "--seed", "0", "--no-recover", "--quiet", *extra])


def _kill_on_call(monkeypatch, call: int, proc) -> list[int]:
    """Kill the agent process just before the ``call``-th candidate is timed (mid-search)."""
    calls: list[int] = []
    ratio = RemoteLatencyProbe.ratio

    def killing(self, model):
        calls.append(1)
        if len(calls) == call:
            stop(proc)
        return ratio(self, model)

    monkeypatch.setattr(RemoteLatencyProbe, "ratio", killing)
    return calls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan(path) -> list:
    return [(d["site"], d["params"]) for d in json.loads(path.read_text())["decisions"]]


def test_killed_agent_then_resume_gives_the_same_plan(mlp, tmp_path, monkeypatch, capsys):
    model, data = mlp
    with running_agent() as (address, _):
        assert _compress(model, data, tmp_path / "whole.onnx", address) == 0
    port = _free_port()
    run_dir = tmp_path / "cut.run"
    with running_agent(port=port) as (address, proc):
        _kill_on_call(monkeypatch, 3, proc)
        capsys.readouterr()
        assert _compress(model, data, tmp_path / "cut.onnx", address) == 2
    err = capsys.readouterr().err
    assert f"device {address}" in err and "--resume" in err
    saved = json.loads((run_dir / "state.json").read_text())["observations"]
    assert len(saved) == 2
    monkeypatch.undo()
    monkeypatch.setenv("PYCOMPRESS_AGENT_TOKEN", TOKEN)
    with running_agent(port=port) as (again, _):
        assert again == address
        assert _compress(model, data, tmp_path / "cut.onnx", address, "--resume", str(run_dir)) == 0
    trace = json.loads((tmp_path / "cut.trace.json").read_text())["search"]["trace"]
    assert [t["J"] for t in trace[:2]] == [o["value"] for o in saved]     # kept, not re-evaluated
    assert len(trace) == 5
    assert _plan(tmp_path / "cut.plan.json") == _plan(tmp_path / "whole.plan.json")
    report = json.loads((tmp_path / "cut.trace.json").read_text())["result"]
    assert report["latency_ratio"] > 0


def test_two_devices_share_the_work_and_cover_for_each_other(mlp, tmp_path, monkeypatch):
    model, data = mlp
    with running_agent() as (first, first_proc), running_agent() as (second, _):
        calls = _kill_on_call(monkeypatch, 4, first_proc)
        assert _compress(model, data, tmp_path / "two.onnx", f"{first},{second}") == 0
        assert len(calls) >= 5 + 1        # every candidate timed, and the final model
        client = DeviceClient(second, TOKEN)
        served = client.request({"op": "describe"})[0]
        client.close()
    config = json.loads((tmp_path / "two.run" / "compress.json").read_text())
    assert config["points_per_fit"] == 2
    # The second device timed its share, and the candidates the killed one could not.
    assert served["served"] >= 3


def test_ray_workers_time_on_the_device(mlp, tmp_path):
    """--executor ray with --device: the probe travels to the workers and they time on the agent."""
    pytest.importorskip("ray")
    import ray

    model, data = mlp
    with running_agent() as (address, _):
        client = DeviceClient(address, TOKEN)
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            assert _compress(model, data, tmp_path / "ray.onnx", address, "--executor", "ray") == 0
        finally:
            ray.shutdown()
        served = client.request({"op": "describe"})[0]["served"]
        client.close()
    trace = json.loads((tmp_path / "ray.trace.json").read_text())
    assert len(trace["search"]["trace"]) == 5
    assert all(t["ratio"] > 0 for t in trace["search"]["trace"])
    # baseline + 5 candidates + the final model, each a has_model + run (workers send the model once each)
    assert served >= 2 * 7
