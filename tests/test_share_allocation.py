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
from pycompress.rewrites.share_allocation import packed_layer_bytes
from pycompress.rewrites.weight_sharing import (activation_importance, conv_patches, share_weights, uniform_levels,
                                                 weighted_lloyd)

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
    # Every layer compensated: the 1x1 conv and Gemm on the input channels, the 3x3 convs on patches.
    assert sorted(flags.values()) == [True, True, True, True]
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
    # Two probes: both widths measured, the widths between follow the fitted exponent.
    low, high = (layer_costs(model, sites, measure, bits=(3, 4, 5, 6, 8), probe_bits=b,
                             ctx=context(model, calibration)) for b in (4, 6))
    both = layer_costs(model, sites, measure, bits=(3, 4, 5, 6, 8), probe_bits=(4, 6), ctx=context(model, calibration))
    for c, c4, c6 in zip(both, low, high):
        assert c.error[4] == pytest.approx(c4.probe_error, rel=1e-6)
        assert c.error[6] == pytest.approx(c6.probe_error, rel=1e-6)
        assert c.error[3] > c.error[4] > c.error[5] > c.error[6] > c.error[8]
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


class DepthwiseCNN(nn.Module):
    """3x3 conv, depthwise 3x3 stride 2 (grouped: compensated per channel on its windows), 1x1 conv, classifier."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.c1(x))))))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def depthwise_cnn(tmp_path_factory):
    (x_train, y_train), (x_test, _) = zoo.digits()
    x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    module = zoo.train_one_thread(DepthwiseCNN(), x_train, y_train, epochs=8)
    path = export(module, (1, 1, 8, 8), tmp_path_factory.mktemp("dw") / "dw.onnx")
    return path, x_train[:256], x_test, run(path, x_test)


@pytest.mark.parametrize("layer", ["/c1/Conv", "/dw/Conv"])
def test_error_compensation_of_spatial_and_depthwise_convs_on_unseen_digits(depthwise_cnn, tmp_path, layer):
    path, calibration, held, reference = depthwise_cnn
    errors = {}
    for compensate in (False, True):
        plan = Plan([LayerDecision(layer, "share", {"bits": 2, "error_compensation": compensate})])
        applied, out = shared_output(path, plan, calibration, tmp_path, f"{compensate}.onnx")
        assert applied.decisions[0].result["error_compensated"] is compensate
        assert applied.decisions[0].result["values_used"] <= 4
        errors[compensate] = relative_error(run(out, held), reference)
    # Measured: the 3x3 conv on the one-channel image 0.054 -> 0.050, the depthwise conv 0.088 -> 0.064.
    assert errors[True] < {"/c1/Conv": 0.96, "/dw/Conv": 0.8}[layer] * errors[False], errors


@pytest.mark.parametrize(("groups", "stride", "pads", "dilation"),
                         [(1, 1, (1, 1, 1, 1), 1), (4, 2, (1, 0, 2, 1), 1), (8, 1, (2, 2, 2, 2), 2)])
def test_conv_patches_reproduce_the_convolution(tmp_path, groups, stride, pads, dilation):
    """Each patch times the weight row is the Conv's output (onnxruntime) at that position."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 8 // groups, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=groups, strides=[stride, stride],
                            pads=list(pads), dilations=[dilation, dilation])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 9, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, "h", "w"])],
                              [onnx.numpy_helper.from_array(weight, "w")])
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.normal(size=(2, 8, 9, 7)).astype(np.float32)
    y = run_named(path, {"x": x})                                              # [N, Co, Ho, Wo]
    model = load_model(path)
    p = conv_patches(model.graph.node(0), x.astype(np.float64))                  # [rows, g, D]
    out_per_group = 8 // groups
    rows = weight.reshape(groups, out_per_group, -1).astype(np.float64)
    got = np.einsum("rgd,god->rgo", p, rows).reshape(-1, 8)
    expected = np.moveaxis(y, 1, -1).reshape(-1, 8)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def run_named(path, feeds):
    return ort.InferenceSession(str(path)).run(None, feeds)[0]


def test_weighted_lloyd_lowers_the_weighted_error_and_is_a_fixed_point_of_uniform_weights():
    rng = np.random.default_rng(1)
    x = rng.standard_t(4, size=5000).astype(np.float32)
    codebook, indices, _, _ = share_weights(x, 3)
    # Uniform weights: the unweighted k-means is already a fixed point.
    same, same_indices, _, converged = weighted_lloyd(x, np.ones(x.size), codebook)
    assert converged
    np.testing.assert_allclose(same, codebook, rtol=1e-6, atol=1e-7)
    assert np.array_equal(same_indices, indices.ravel())
    # Values above 1 count 100x: centroids move there and the weighted error falls.
    weight = np.where(x > 1, 100.0, 1.0)
    moved, moved_indices, _, converged = weighted_lloyd(x, weight, codebook)
    assert converged and np.all(np.diff(moved) >= 0)

    def weighted_error(c, idx):
        return float(np.sum(weight * (x - c[idx]) ** 2))

    assert weighted_error(moved, moved_indices) < 0.8 * weighted_error(codebook, indices.ravel())
    assert np.sum(moved > 1) > np.sum(codebook > 1)
    # Each centroid is the weighted mean of its members (Lloyd's fixed point).
    for k in np.unique(moved_indices):
        members = moved_indices == k
        assert moved[k] == pytest.approx(np.average(x[members], weights=weight[members]), rel=1e-5, abs=1e-6)


def test_activation_importance_follows_the_input_channels(depthwise_cnn):
    path, *_ = depthwise_cnn
    model = load_model(path)
    square = np.arange(1.0, 17.0)          # E[x^2] of 16 input channels
    dw = model.graph.node(next(i for i, n in enumerate(model.graph) if n.name == "/dw/Conv"))
    weights = np.zeros((16, 1, 3, 3))
    imp = np.broadcast_to(activation_importance(dw, weights, square), weights.shape)
    # Depthwise: output channel o reads input channel o; halfway between E[x^2] / mean and 1.
    np.testing.assert_allclose(imp[:, 0, 1, 1], 0.5 * square / square.mean() + 0.5)
    fc = next(n for n in model.graph if n.op_type == "Gemm")
    assert activation_importance(fc, np.zeros((10, 16)), square) is not None   # transB=1: columns
    assert activation_importance(fc, np.zeros((10, 16)), np.zeros(16)) is None  # silent inputs: unweighted


def test_activation_weighting_on_unseen_digits(depthwise_cnn, tmp_path):
    path, calibration, held, reference = depthwise_cnn
    model = load_model(path)
    sites = [s.name for s in SHARE.sites(model) if s.ok]
    with pytest.raises(Exception, match="activation_weighting needs calibration data"):
        apply_plan(model, Plan([LayerDecision(sites[0], "share", {"bits": 3, "activation_weighting": True})]))
    errors = {}
    for weighted in (False, True):
        plan = Plan([LayerDecision(s, "share", {"bits": 2, "activation_weighting": weighted}) for s in sites])
        applied, out = shared_output(path, plan, calibration, tmp_path, f"w{weighted}.onnx")
        flags = [d.result["activation_weighted"] for d in applied.decisions]
        assert flags == [weighted] * len(sites)
        errors[weighted] = relative_error(run(out, held), reference)
    # The weighting must not cost output error on digits never seen (measured: see the assertion's message).
    assert errors[True] < 1.05 * errors[False], errors


def entropy(indices):
    p = np.bincount(indices.ravel()) / indices.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("bits", [3, 4, 5, 6])
def test_uniform_levels_match_the_kmeans_error_with_fewer_bits(bits):
    x = np.random.default_rng(2).laplace(size=20000).astype(np.float32)
    codebook, indices, _, _ = share_weights(x, bits)
    target = float(np.mean((codebook[indices].astype(np.float64) - x) ** 2))
    grid, grid_indices = uniform_levels(x, target)
    assert grid.size <= 256 and np.all(np.diff(grid) > 0)
    steps = np.diff(grid)
    error = float(np.mean((grid[grid_indices].astype(np.float64) - x) ** 2))
    assert error <= target * (1 + 1e-6)
    # Entropy-coded, the evenly spaced grid costs less than the k-means levels at the same error
    # (measured 0.1-0.2 bit per value on this Laplacian sample).
    assert entropy(grid_indices) < entropy(indices) - 0.05
    assert np.median(steps) == pytest.approx(np.median(steps[len(steps) // 4: -len(steps) // 4]), rel=0.2)
    # Heavy tails and an error no 256 evenly spaced values reach: no grid.
    assert uniform_levels(x, target * 1e-6) is None


def test_uniform_levels_through_the_rewrite_on_unseen_digits(depthwise_cnn, tmp_path):
    path, calibration, held, reference = depthwise_cnn
    model = load_model(path)
    sites = [s.name for s in SHARE.sites(model) if s.ok]
    results, errors = {}, {}
    for levels in ("kmeans", "uniform"):
        plan = Plan([LayerDecision(s, "share", {"bits": 4, "levels": levels}) for s in sites])
        applied, out = shared_output(path, plan, calibration, tmp_path, f"{levels}.onnx")
        results[levels] = {d.site: d.result for d in applied.decisions}
        errors[levels] = relative_error(run(out, held), reference)     # onnxruntime on the saved file
    fc = next(s for s in sites if "fc" in s)
    assert results["kmeans"][fc]["codebook_values"] == 16
    assert results["uniform"][fc]["codebook_values"] > 16
    assert results["uniform"][fc]["relative_weight_error"] <= 1.02 * results["kmeans"][fc]["relative_weight_error"]
    # Same weight error, so about the same output error on digits never seen.
    assert errors["uniform"] < 1.15 * errors["kmeans"], errors
    weights = constant_weight(path, fc)
    kmeans_bytes = packed_layer_bytes(share_weights(weights, 4, channel_axis=0)[1], 16, weights.shape[0])
    codebook, indices, _, _ = share_weights(weights, 4, channel_axis=0, levels="uniform")
    assert packed_layer_bytes(indices, codebook.size, weights.shape[0]) < kmeans_bytes


def constant_weight(path, node_name):
    from pycompress.ir import constant_array, node_by_name

    model = load_model(path)
    return constant_array(node_by_name(model, node_name).inputs[1])


def test_drift_correction_removes_the_mean_shift_left_by_earlier_layers(depthwise_cnn, tmp_path):
    path, calibration, held, reference = depthwise_cnn
    batches = [{"input": calibration[i:i + 64]} for i in range(0, len(calibration), 64)]
    measured = {}
    for drift in (False, True):
        model = load_model(path)
        original = model.clone()
        ctx = ApplyContext(activations=lambda names, m=model: collect_activations(m, names, batches),
                           reference_activations=lambda names, m=original: collect_activations(m, names, batches))
        sites = [s.name for s in SHARE.sites(model) if s.ok]
        plan = Plan([LayerDecision(s, "share", {"bits": 3, "error_compensation": True, "drift_correction": drift})
                     for s in sites])
        applied = apply_plan(model, plan, ctx)
        assert [d.result["drift_corrected"] for d in applied.decisions] == [drift] * len(sites)
        out = tmp_path / f"drift{drift}.onnx"
        save_model(model, out)
        got = run(out, held)                                               # digits never seen
        measured[drift] = (relative_error(got, reference), float(np.abs((got - reference).mean(axis=0)).mean()))
    # Measured: relative output error 0.079 -> 0.056, mean logit shift 0.18 -> 0.012.
    assert measured[True][0] < 0.85 * measured[False][0], measured
    assert measured[True][1] < 0.25 * measured[False][1], measured


def test_drift_correction_needs_the_original_activations(depthwise_cnn):
    path, calibration, *_ = depthwise_cnn
    model = load_model(path)
    site = next(s.name for s in SHARE.sites(model) if s.ok)
    with pytest.raises(Exception, match="drift_correction needs the original model's activations"):
        apply_plan(model, Plan([LayerDecision(site, "share", {"bits": 4, "drift_correction": True})]),
                   context(model, calibration))


def test_cli_apply_passes_the_original_activations(depthwise_cnn, tmp_path):
    import json

    from pycompress.cli import main

    path, calibration, *_ = depthwise_cnn
    np.savez(tmp_path / "calibration.npz", input=calibration)
    model = load_model(path)
    plan = {"version": 1, "decisions": [{"site": s.name, "action": "share",
                                         "params": {"bits": 3, "drift_correction": True}}
                                        for s in SHARE.sites(model) if s.ok]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "shared.onnx"
    assert main(["apply", str(path), str(tmp_path / "plan.json"), "--data", str(tmp_path / "calibration.npz"),
                 "-o", str(out)]) == 0
    results = json.loads((tmp_path / "shared.plan.json").read_text())
    assert all(d["result"]["drift_corrected"] for d in results["decisions"])
