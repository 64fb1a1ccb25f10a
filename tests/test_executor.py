"""Executors: the same search gives the same result in process, in threads and as Ray tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zoo
from conftest import export

from pycompress.cli.main import main
from pycompress.errors import PycompressError
from pycompress.executor import ThreadExecutor, parse_executor


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("executor")
    (x_train, y_train), _ = zoo.digits()
    module = zoo.train_one_thread(zoo.MLP((64, 96, 64, 10)), x_train, y_train, epochs=5)
    path = export(module, (1, 64), folder / "mlp.onnx")
    np.savez(folder / "calib.npz", x=x_train.astype(np.float32))
    return path, folder / "calib.npz"


def _search(tmp_path, model, data, name, *extra):
    out = tmp_path / f"{name}.onnx"
    code = main(["compress", str(model), "--data", str(data), "-o", str(out), "--actions", "svd",
                 "--gamma", "2", "--initial", "4", "--max-evals", "8", "--seed", "3", "--threads", "1",
                 "--no-recover", "--quiet", "--json", *extra])
    assert code == 0
    trace = json.loads((tmp_path / f"{name}.trace.json").read_text())
    plan = json.loads((tmp_path / f"{name}.plan.json").read_text())
    return trace, plan


def _same_search(a, b) -> None:
    (trace_a, plan_a), (trace_b, plan_b) = a, b
    steps_a, steps_b = trace_a["search"]["trace"], trace_b["search"]["trace"]
    assert [s["theta"] for s in steps_a] == [s["theta"] for s in steps_b]
    assert [s["J"] for s in steps_a] == [s["J"] for s in steps_b]
    assert [d["params"] for d in plan_a["decisions"]] == [d["params"] for d in plan_b["decisions"]]


def test_ray_executor_equals_local(digits_mlp, tmp_path, monkeypatch):
    """Two Ray workers, two points per GP fit: the same evaluations, values and plan as in process."""
    pytest.importorskip("ray")
    from pycompress.executor import RayExecutor

    model, data = digits_mlp
    on_ray: list[int] = []
    map_on_ray = RayExecutor.map

    def counted(self, objective, jobs):
        on_ray.extend(job[1] for job in jobs)
        return map_on_ray(self, objective, jobs)

    monkeypatch.setattr(RayExecutor, "map", counted)
    local = _search(tmp_path, model, data, "local", "--points-per-fit", "2")
    try:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        remote = _search(tmp_path, model, data, "ray", "--executor", "ray")
    finally:
        ray.shutdown()
    _same_search(local, remote)
    assert sorted(on_ray) == list(range(8))
    assert json.loads((tmp_path / "ray.run" / "compress.json").read_text())["points_per_fit"] == 2
    assert len(local[0]["search"]["trace"]) == 8


def test_thread_executor_equals_local(digits_mlp, tmp_path):
    model, data = digits_mlp
    from pycompress.data import load_data
    from pycompress.decisions.bo import LocalExecutor
    from pycompress.fidelity import FidelityEstimator
    from pycompress.ir import load_model
    from pycompress.pipeline import CompressionObjective, build_search_space

    loaded = load_model(model)
    calib = load_data(str(data), loaded)
    space, _ = build_search_space(loaded, ["svd"])
    jobs = [(np.full(space.d, u), i) for i, u in enumerate(np.linspace(0.1, 0.9, 6))]

    def objective():
        estimator = FidelityEstimator(loaded, calib.inputs, samples=40, seed=1, threads=1)
        return CompressionObjective(loaded, space, estimator)

    serial = list(LocalExecutor().map(objective(), jobs))
    threaded = list(ThreadExecutor(3).map(objective(), jobs))
    assert [r[:2] for r in threaded] == [r[:2] for r in serial]


def test_executor_arguments(digits_mlp, tmp_path, capsys):
    assert parse_executor("ray:10.0.0.1:6379") == ("ray", "10.0.0.1:6379")
    with pytest.raises(PycompressError, match="choose local or ray"):
        parse_executor("dask")
    model, data = digits_mlp
    base = ["compress", str(model), "--data", str(data), "-o", str(tmp_path / "x.onnx"), "--quiet"]
    assert main(base + ["--executor", "spark"]) == 2
    assert "--executor 'spark'" in capsys.readouterr().err
    assert main(base + ["--device", "127.0.0.1:1", "--run-dir", str(tmp_path / "r2")]) == 2
    assert "needs --objective latency" in capsys.readouterr().err
