"""Closed-form recovery on real (digits-trained) layers, checked on held-out data."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import zoo
from conftest import export
from pycompress.fidelity import collect_activations, run_model
from pycompress.ir import check_model, load_model
from pycompress.recover import RefitTarget, refit_layers
from pycompress.recover.layerwise import RIDGE_GRID
from pycompress.recover.normal_equations import LayerStatistics


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    (xtr, ytr), (xte, yte) = zoo.digits()
    module = zoo.train(zoo.MLP((64, 64, 32, 10)), xtr, ytr, epochs=25)
    path = export(module, (1, 64), tmp_path_factory.mktemp("mlp") / "mlp.onnx")
    return path, (xtr, ytr), (xte, yte)


def gemms(model):
    return [n for n in model.graph if n.op_type == "Gemm"]


def layer_error(teacher, student, tensor_t, tensor_s, x):
    """Held-out mean squared error between a teacher tensor and a student tensor."""
    t = next(collect_activations(teacher, [tensor_t], [{"input": x}]))[tensor_t]
    s = next(collect_activations(student, [tensor_s], [{"input": x}]))[tensor_s]
    return float(np.mean(np.sum((t - s) ** 2, axis=1)))


def truncate(model, node, rank):
    """Replace a Gemm's weight by its rank-k truncated SVD (a crude compression)."""
    value = node.inputs[1]
    w = value.const_value.numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    value.const_value = __import__("onnx_ir").tensor(((u[:, :rank] * s[:rank]) @ vt[:rank]).astype(np.float32))


def test_refit_consumer_lowers_held_out_error(digits_mlp):
    path, (xtr, _), (xte, yte) = digits_mlp
    teacher, student = load_model(path), load_model(path)
    truncate(student, gemms(student)[0], 4)
    second_t, second_s = gemms(teacher)[1], gemms(student)[1]
    before = layer_error(teacher, student, second_t.outputs[0].name, second_s.outputs[0].name, xte)
    report = refit_layers(teacher, student, [RefitTarget([second_s.name], second_t.outputs[0].name)],
                          lambda: [{"input": b} for b in np.array_split(xtr, 4)])
    after = layer_error(teacher, student, second_t.outputs[0].name, second_s.outputs[0].name, xte)
    result = report.results[0]
    # 4 batches, 4 folds: every sample is judged once by a fit that left it out.
    assert result.kept and result.folds == 4 and result.samples == result.validation_samples == len(xtr)
    assert result.lam in RIDGE_GRID
    assert after < 0.8 * before
    check_model(student)


def factor_first_layer(path, rank, out):
    """The student: layer 1 as MatMul(x, A) -> Gemm(B, bias) from a truncated SVD (weight-only)."""
    proto = onnx.load(path)
    node = [n for n in proto.graph.node if n.op_type == "Gemm"][0]
    inits = {t.name: t for t in proto.graph.initializer}
    w = numpy_helper.to_array(inits[node.input[1]])  # (out, in) with transB=1
    u, s, vt = np.linalg.svd(w.T, full_matrices=False)
    a = (u[:, :rank] * np.sqrt(s[:rank])).astype(np.float32)
    b = (np.sqrt(s[:rank])[:, None] * vt[:rank]).astype(np.float32)
    proto.graph.initializer.extend([numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")])
    mid = node.name + "/mid"
    first = helper.make_node("MatMul", [node.input[0], "A"], [mid], name=node.name + "/svd_a")
    second = helper.make_node("Gemm", [mid, "B", node.input[2]], list(node.output), name=node.name + "/svd_b")
    index = list(proto.graph.node).index(node)
    proto.graph.node.remove(node)
    proto.graph.node.insert(index, second)
    proto.graph.node.insert(index, first)
    onnx.save(proto, out)
    return out, node.name, node.output[0]


def test_refit_factored_pair_reduced_rank_lowers_held_out_error(digits_mlp, tmp_path):
    path, (xtr, ytr), (xte, yte) = digits_mlp
    teacher = load_model(path)
    student_path, name, tensor = factor_first_layer(path, 6, tmp_path / "student.onnx")
    student = load_model(student_path)
    before = layer_error(teacher, student, tensor, tensor, xte)
    acc_before = zoo.accuracy(run_model(student, {"input": xte})[0], yte)
    report = refit_layers(teacher, student, [RefitTarget([name + "/svd_a", name + "/svd_b"], tensor, rank=6)],
                          lambda: [{"input": xtr}])
    after = layer_error(teacher, student, tensor, tensor, xte)
    assert report.results[0].kept
    assert after < 0.9 * before
    # Still rank 6: the factors keep their shapes.
    shapes = {v.name: v.const_value.shape for v in student.graph.initializers.values()}
    assert any(tuple(s) == (64, 6) for s in shapes.values()) and any(tuple(s) == (6, 64) for s in shapes.values())
    acc_after = zoo.accuracy(run_model(student, {"input": xte})[0], yte)
    assert acc_after >= acc_before - 0.01
    check_model(student)


def test_conv_refit_recovers_perturbed_weights_exactly(tmp_path):
    # im2col must match the conv's layout: refitting a perturbed conv against
    # its original (same inputs) has to give the original back.
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, stride=2, padding=(1, 1), dilation=1), torch.nn.ReLU(),
                                 torch.nn.Conv2d(5, 4, (3, 2), padding=(2, 1), dilation=2))
    path = export(module, (1, 3, 12, 12), tmp_path / "c.onnx")
    teacher, student = load_model(path), load_model(path)
    conv_s = [n for n in student.graph if n.op_type == "Conv"][1]
    conv_t = [n for n in teacher.graph if n.op_type == "Conv"][1]
    w = conv_s.inputs[1].const_value.numpy()
    conv_s.inputs[1].const_value = __import__("onnx_ir").tensor(w * 0.5 + 0.1)
    x = np.random.default_rng(0).normal(size=(40, 3, 12, 12)).astype(np.float32)
    report = refit_layers(teacher, student, [RefitTarget([conv_s.name], conv_t.outputs[0].name)],
                          lambda: [{"input": x}], lam=0.0, max_pixels=None)
    assert report.results[0].kept and report.results[0].error_after < 1e-6 * report.results[0].error_before
    got = run_model(student, {"input": x})[0]
    np.testing.assert_allclose(got, run_model(teacher, {"input": x})[0], atol=1e-4)


def test_two_batches_still_refit(digits_mlp):
    # Every 4th batch used to validate: with 2 batches (the EfficientNet demo's 128 samples)
    # nothing validated, every error was nan and no layer was ever refitted.
    path, (xtr, _), (xte, _) = digits_mlp
    teacher, student = load_model(path), load_model(path)
    truncate(student, gemms(student)[0], 4)
    second_t, second_s = gemms(teacher)[1], gemms(student)[1]
    before = layer_error(teacher, student, second_t.outputs[0].name, second_s.outputs[0].name, xte)
    result = refit_layers(teacher, student, [RefitTarget([second_s.name], second_t.outputs[0].name)],
                          lambda: [{"input": b} for b in np.array_split(xtr, 2)]).results[0]
    assert result.kept and result.folds == 2 and np.isfinite(result.error_after)
    assert layer_error(teacher, student, second_t.outputs[0].name, second_s.outputs[0].name, xte) < 0.8 * before


def test_sample_groups_are_the_folds(digits_mlp):
    path, (xtr, _), _ = digits_mlp
    teacher, student = load_model(path), load_model(path)
    truncate(student, gemms(student)[0], 4)
    batches = np.array_split(xtr, 3)
    groups = [np.arange(len(b)) % 5 for b in batches]     # 5 "photos" across 3 batches
    result = refit_layers(teacher, student, [RefitTarget([gemms(student)[1].name], gemms(teacher)[1].outputs[0].name)],
                          lambda: [{"input": b} for b in batches], sample_groups=groups).results[0]
    assert result.folds == 5 and result.kept and result.validation_samples == len(xtr)


def test_pooled_statistics_are_exact_and_the_ridge_shrinks_toward_the_prior():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 6)) + 2.0, rng.normal(size=(300, 3)) - 1.0
    whole, parts = LayerStatistics(6, 3), [LayerStatistics(6, 3) for _ in range(3)]
    whole.update(x, y)
    for part, idx in zip(parts, np.array_split(np.arange(300), 3)):
        part.update(x[idx], y[idx])
    pooled = LayerStatistics.pooled(parts)
    assert pooled.count == 300
    for lam in (0.0, 0.1):
        for got, want in zip(pooled.ridge(lam), whole.ridge(lam)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    prior = rng.normal(size=(6, 3))
    w_far, _ = whole.ridge(1e6, prior=prior)
    np.testing.assert_allclose(w_far, prior, atol=1e-4)     # a strong ridge leaves the weights as they are
    w_ls, _ = whole.ridge(0.0, prior=prior)
    np.testing.assert_allclose(w_ls, whole.ridge(0.0)[0], atol=1e-9)
    with pytest.raises(ValueError):
        pooled.update(x, y)
