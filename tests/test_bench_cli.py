"""`pycompress bench`: latency, size, cost and fidelity per model, as a table, JSON, Markdown and PNG."""

import json

import numpy as np
import onnxruntime as ort
import pytest

import zoo
from conftest import export
from pycompress.cli import main
from pycompress.export import export_model
from pycompress.ir import load_model, save_model
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import apply_plan, get_rewrite

MLP_SIZES = (64, 128, 10)
MLP_PARAMS = 64 * 128 + 128 + 128 * 10 + 10
MLP_MACS = 64 * 128 + 128 * 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A digits MLP (fp32), the same shared at 2 bits, and its ORT-format file."""
    import torch

    folder = tmp_path_factory.mktemp("bench")
    (x_train, y_train), _ = zoo.digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = zoo.train(zoo.MLP(MLP_SIZES), x_train, y_train, epochs=5)
    finally:
        torch.set_num_threads(threads)
    fp32 = export(module, (1, 64), folder / "fp32.onnx")
    model = load_model(fp32)
    sites = [s for s in get_rewrite("share").sites(model) if s.ok]
    apply_plan(model, Plan([LayerDecision(s.name, "share", {"bits": 2}) for s in sites]))
    shared = save_model(model, folder / "shared2.onnx")
    ort_file = folder / "fp32.ort"
    export_model(fp32, "ort", ort_file)
    return fp32, shared, ort_file


def test_bench_table_json_markdown_plot(models, tmp_path, capsys):
    fp32, shared, ort_file = models
    common = [str(fp32), str(shared), str(ort_file), "--iters", "5", "--warmup", "1", "--threads", "1",
              "--data", "builtin:digits", "--samples", "300"]
    markdown, png = tmp_path / "bench.md", tmp_path / "bench.png"
    assert main(["bench", *common, "--markdown", str(markdown), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    for column in ("model", "size", "size ratio", "params", "MACs", "p50 ms", "p90 ms", "p99 ms", "samples/s",
                   "output error (± se)", "top-1 agreement"):
        assert column in header
    rows = {line.split()[0]: line for line in table.splitlines()[2:5]}
    assert set(rows) == {"fp32.onnx", "shared2.onnx", "fp32.ort"}
    assert "100.0% ± 0.0" in rows["fp32.onnx"] and "0 ± 0" in rows["fp32.onnx"]
    assert "provider CPUExecutionProvider, 1 intra-op threads, batch 1" in table and "interleaved" in table

    assert main(["bench", *common, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["provider"] == "CPUExecutionProvider" and payload["iters"] == 5
    first, second, third = payload["models"]
    for row, path in zip(payload["models"], (fp32, shared, ort_file)):
        assert row["file_bytes"] == path.stat().st_size and row["error"] is None
        lat = row["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert lat["round_p50_min"] <= lat["p50"] <= lat["round_p50_max"] and lat["rounds"] == 5
        assert row["throughput"] == pytest.approx(1e3 / lat["mean"])
    assert (first["params"], first["macs"]) == (MLP_PARAMS, MLP_MACS)
    assert second["macs"] == MLP_MACS and second["params"] > MLP_PARAMS - 200  # indices + codebooks + scales
    assert third["params"] is None and third["macs"] is None  # .ort: no ONNX graph to count
    assert first["fidelity"]["mean_sq_error"] == 0 and first["fidelity"]["top1_agreement"] == 1.0
    assert third["fidelity"]["max_abs_diff"] < 1e-4
    # The 2-bit model differs: check the fidelity numbers against a direct computation.
    x = load_digits_inputs()[:300]
    a = ort.InferenceSession(str(fp32)).run(None, {"input": x})[0]
    b = ort.InferenceSession(str(shared)).run(None, {"input": x})[0]
    losses = ((a - b) ** 2).sum(axis=1)
    fid = second["fidelity"]
    assert fid["samples"] == 300
    assert fid["mean_sq_error"] == pytest.approx(losses.mean(), rel=1e-4)
    assert fid["sq_error_se"] == pytest.approx(losses.std(ddof=1) / np.sqrt(300), rel=1e-3)
    assert fid["top1_agreement"] == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert 0 < fid["mean_sq_error"] and fid["top1_agreement"] < 1.0

    lines = markdown.read_text().splitlines()
    assert lines[0].startswith("| model | size |") and len([l for l in lines if l.startswith("| fp32")]) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_models_are_timed_interleaved_in_rotating_rounds():
    from pycompress.bench.measure import intra_op_threads, measure_interleaved

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, outputs, feeds):
            calls.append(self.name)

    runs = [(Fake(name), {}) for name in "abc"]
    latency = measure_interleaved(runs, warmup=2, iters=7, rounds=3)
    timed = calls[6:]                                       # after 2 warm-up runs each
    assert calls[:6] == list("aabbcc") and len(timed) == 21
    # Round r times a slice of every model, starting at model r: 3+3+3, then 2+2+2 twice (7 = 3 + 2 + 2).
    assert "".join(timed) == "aaabbbccc" + "bbccaa" + "ccaabb"
    assert [row["rounds"] for row in latency] == [3, 3, 3]
    assert intra_op_threads(3) == 3 and intra_op_threads(0) >= 1


def load_digits_inputs():
    from sklearn.datasets import load_digits

    return (load_digits().data / 16.0).astype(np.float32)


def test_bench_batch_and_random_inputs(models, capsys):
    fp32, shared, _ = models
    assert main(["bench", str(fp32), str(shared), "--iters", "3", "--warmup", "0", "--batch", "8", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    for row in payload["models"]:
        assert row["batch"] == 8 and row["fidelity"] is None
        assert row["throughput"] == pytest.approx(8e3 / row["latency_ms"]["mean"])


def gpu_really_loads(folder):
    try:
        session = ort.InferenceSession(str(export(zoo.MLP((4, 2)), (1, 4), folder / "probe.onnx")),
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:
        return False
    return "CUDAExecutionProvider" in session.get_providers()


def test_unloadable_gpu_provider_is_reported(models, tmp_path, capsys):
    if gpu_really_loads(tmp_path):
        pytest.skip("CUDA loads on this machine")
    fp32, shared, _ = models
    code = main(["bench", str(fp32), str(shared), "--provider", "cuda", "--iters", "2", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 2
    for row in payload["models"]:
        assert row["latency_ms"] is None and "CUDAExecutionProvider could not be loaded" in row["error"]
        assert row["file_bytes"] > 0 and row["params"] > 0  # what does not need the provider is still reported
    assert main(["bench", str(fp32), "--provider", "cuda", "--iters", "2"]) == 2
    assert "not measured:" in capsys.readouterr().out


def test_bench_errors(models, tmp_path, capsys):
    fp32, _, _ = models
    assert main(["bench", str(fp32), "--provider", "abacus"]) == 2
    assert "unknown execution provider" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    fixed = export(zoo.MLP((4, 2)), (1, 4), tmp_path / "fixed.onnx", dynamic_batch=False)
    assert main(["bench", str(fixed), "--batch", "4", "--iters", "2", "--json"]) == 2
    assert "batch is fixed at 1" in json.loads(capsys.readouterr().out)["models"][0]["error"]
