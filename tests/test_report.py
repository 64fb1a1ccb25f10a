import json

import numpy as np

from pycompress.report import pareto_front, write_report


def test_pareto_front_against_brute_force():
    rng = np.random.default_rng(0)
    r, e = list(rng.uniform(size=60)), list(rng.uniform(size=60))
    front = set(pareto_front(r, e))
    for i in range(60):
        dominated = any(r[j] <= r[i] and e[j] <= e[i] and (r[j] < r[i] or e[j] < e[i]) for j in range(60))
        assert (i in front) == (not dominated)


def test_write_report_files_and_numbers(tmp_path):
    trace = [{"eval": i + 1, "ratio": 1 - i / 20, "fidelity_mean": (i / 20) ** 2, "fidelity_se": 0.01,
              "J": -(i / 20) ** 2 + 1 / (1 - i / 20), "z_max": 2.0 - i / 5} for i in range(15)]
    report = {"model": "m.onnx", "output": "s.onnx", "method": "pacbo", "actions": ["svd"],
              "before": {"params": 1000, "macs": 5000}, "after": {"params": 250, "macs": 1500},
              "search": {"gamma": 2.5, "certificate": True, "delta": 0.05, "epsilon": 0.005, "trace": trace},
              "layers": [{"site": "fc1", "action": "svd", "params": {"rank": 3}, "params_before": 600,
                          "params_after": 150}]}
    paths = write_report(report, tmp_path / "out")
    assert {"json", "md", "html", "bo_trace.png", "pareto.png", "layers.png"} <= set(paths)
    assert json.loads(paths["json"].read_text())["after"]["params"] == 250
    md = paths["md"].read_text()
    assert "| parameters | 1,000 | 250 | 0.250 |" in md and "| MACs | 5,000 | 1,500 | 0.300 |" in md
    assert "certified" in md and "15 evaluations" in md
    assert "<table>" in paths["html"].read_text()
    assert paths["bo_trace.png"].read_bytes()[:4] == b"\x89PNG"
