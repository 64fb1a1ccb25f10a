"""`share` error compensation and per-layer bit allocation, against onnxruntime on a digits-trained CNN."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import zoo
from conftest import export
from pycompress.fidelity import collect_activations
from pycompress.ir import load_model, save_model
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import ApplyContext, apply_plan, get_rewrite
from pycompress.rewrites.share_allocation import LayerCost, allocate_bits, allocation_plan, layer_costs

SHARE = get_rewrite("share")


class SmallCNN(nn.Module):
    """3x3 conv, 1x1 conv (error compensation applies), 3x3 conv (it does not), classifier (Gemm)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 1)
        self.c3 = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.c3(x)).flatten(1))


@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory):
    (x_train, y_train), (x_test, _) = zoo.digits()
    x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)   # the initial weights too: the same model in every run
    module = zoo.train_one_thread(SmallCNN(), x_train, y_train, epochs=8)
    path = export(module, (1, 1, 8, 8), tmp_path_factory.mktemp("cnn") / "cnn.onnx")
    reference = ort.InferenceSession(str(path)).run(None, {"input": x_test})[0]
    return path, x_train[:256], x_test, reference


def context(model, calibration):
    batches = [{"input": calibration[i:i + 64]} for i in range(0, len(calibration), 64)]
    return ApplyContext(activations=lambda names: collect_activations(model, names, batches))


def shared_output(path, plan, calibration, tmp_path, name):
    model = load_model(path)
    applied = apply_plan(model, plan, context(model, calibration))
    out = tmp_path / name
    save_model(model, out)
    return applied, out


def run(path, x):
    return ort.InferenceSession(str(path)).run(None, {"input": x})[0]


def relative_error(out, reference):
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


def test_error_compensation_lowers_the_output_error_on_unseen_digits(digits_cnn, tmp_path):
    path, calibration, held, reference = digits_cnn
    model = load_model(path)
    sites = [s.name for s in SHARE.sites(model) if s.ok]

    def plan(**params):
        return Plan([LayerDecision(s, "share", {"bits": 3, **params}) for s in sites])

    _, plain_path = shared_output(path, plan(), calibration, tmp_path, "plain.onnx")
    comp, comp_path = shared_output(path, plan(error_compensation=True), calibration, tmp_path, "comp.onnx")
    flags = {d.site: d.result["error_compensated"] for d in comp.decisions}
    # 1x1 conv and Gemm compensated; the 3x3 convs keep nearest-centroid indices (and the same weights).
    assert sorted(flags.values()) == [False, False, True, True]
    plain_error = relative_error(run(plain_path, held), reference)
    comp_error = relative_error(run(comp_path, held), reference)
    assert comp_error < 0.9 * plain_error, (comp_error, plain_error)
    agree = np.mean(run(comp_path, held).argmax(1) == reference.argmax(1))
    assert agree >= np.mean(run(plain_path, held).argmax(1) == reference.argmax(1))
    # Same codebook size: only the assignment changed.
    for d in comp.decisions:
        assert d.result["values_used"] <= 8


def test_error_compensation_needs_data(digits_cnn):
    path, *_ = digits_cnn
    model = load_model(path)
    site = next(s.name for s in SHARE.sites(model) if s.ok and s.info["op"] == "Gemm")
    with pytest.raises(Exception, match="error_compensation needs calibration data"):
        apply_plan(model, Plan([LayerDecision(site, "share", {"bits": 4, "error_compensation": True})]))


def test_allocate_bits_spends_bits_where_the_error_is():
    costs = [LayerCost("big_robust", 1000, {b: 1000 * b / 8 for b in (4, 6, 8)}, {4: 0.01, 6: 0.002, 8: 0.001}),
             LayerCost("small_sensitive", 100, {b: 100 * b / 8 for b in (4, 6, 8)}, {4: 5.0, 6: 1.0, 8: 0.1})]
    assert allocate_bits(costs, 1e9) == {"big_robust": 8, "small_sensitive": 8}
    assert allocate_bits(costs, 850) == {"big_robust": 6, "small_sensitive": 8}
    assert allocate_bits(costs, 600) == {"big_robust": 4, "small_sensitive": 8}
    assert allocate_bits(costs, 590) == {"big_robust": 4, "small_sensitive": 6}
    assert allocate_bits(costs, 0) == {"big_robust": 4, "small_sensitive": 4}   # cannot fit: narrowest


def test_allocation_beats_uniform_bits_at_the_same_bytes(digits_cnn, tmp_path):
    path, calibration, held, reference = digits_cnn
    model = load_model(path)
    sites = [s.name for s in SHARE.sites(model) if s.ok]
    probe_reference = run(path, calibration)

    def measure(candidate):
        out = tmp_path / "probe.onnx"
        save_model(candidate, out)
        return float(np.mean(np.sum(np.square(run(out, calibration) - probe_reference), axis=1)))

    costs = layer_costs(model, sites, measure, bits=(3, 4, 5, 6, 8), probe_bits=5, ctx=context(model, calibration))
    # The probe's error is the measured one at the probe width, and falls with the bits.
    for c in costs:
        assert c.error[5] == pytest.approx(c.probe_error)
        assert c.error[3] > c.error[5] > c.error[8]
    budget = sum(c.bytes[4] for c in costs)          # what uniform 4 bits costs
    plan = allocation_plan(costs, budget)
    bits = {d.site: d.params["bits"] for d in plan.decisions}
    assert sum(c.bytes[bits[c.site]] for c in costs) <= budget
    assert len(set(bits.values())) > 1               # not uniform
    _, allocated = shared_output(path, plan, calibration, tmp_path, "alloc.onnx")
    uniform_plan = Plan([LayerDecision(s, "share", {"bits": 4}) for s in sites])
    _, uniform = shared_output(path, uniform_plan, calibration, tmp_path, "uniform.onnx")
    # Held-out digits, never seen by the allocation.
    assert relative_error(run(allocated, held), reference) < relative_error(run(uniform, held), reference)
