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
    assert "certified: P(J(t*) - J(t^) < 0.05) >= 0.995" in md and "15 evaluations" in md
    # delta meant in units of Q (gamma 2.5): the report says so next to the gap in J.
    report["search"].update(delta=0.125, delta_scale=2.5)
    md = write_report(report, tmp_path / "scaled")["md"].read_text()
    assert "certified: P(J(t*) - J(t^) < 0.125) (delta 0.05 in units of Q) >= 0.995" in md
    assert "<table>" in paths["html"].read_text()
    assert paths["bo_trace.png"].read_bytes()[:4] == b"\x89PNG"


def test_report_shows_finetuning_held_out_and_latency(tmp_path):
    report = {"model": "m.onnx", "before": {"params": 10}, "after": {"params": 5},
              "finetune": {"kept": True, "best_epoch": 2, "before": {"loss": 4.0, "mse": 4.0, "agreement": 0.5},
                           "epochs": [{"epoch": 1, "train_loss": 3.0, "heldout": {"loss": 2.5, "mse": 2.5,
                                                                                  "agreement": 0.7}, "seconds": 1.0},
                                      {"epoch": 2, "train_loss": 2.0, "heldout": {"loss": 1.5, "mse": 1.5,
                                                                                  "agreement": 0.8}, "seconds": 1.0}]},
              "heldout": {"samples": 128, "top1_agreement": 0.75},
              "bench": [{"name": "a.onnx", "provider": "CPUExecutionProvider", "batch": 1,
                         "latency_ms": {"p50": 8.0, "p90": 9.0}},
                        {"name": "b.onnx", "latency_ms": {"p50": 6.0, "p90": 7.0}}]}
    md = write_report(report, tmp_path)["md"].read_text()
    assert "## Fine-tuning (kept epoch 2)" in md and "| 2 | 2 | 1.5 | 1.5 | 0.8 | 1.0 |" in md
    assert "top1_agreement: 0.75" in md
    assert "| b.onnx | 6.000 | 7.000 | 0.750 |" in md
