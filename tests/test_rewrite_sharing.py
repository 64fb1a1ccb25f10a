"""The `share` rewrite: Gather(codebook, Cast(uint8 indices)) [* channel scale], numerically against onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import zoo
from conftest import export
from pycompress.errors import PycompressError
from pycompress.fidelity import collect_activations
from pycompress.ir import check_model, constant_array, load_model, node_by_name, save_model
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import ApplyContext, apply_plan, get_rewrite

SHARE = get_rewrite("share")

MODEL_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 8, 8] x, float[N, 5] z) => (float[N, 10] y, float[N, 4] m, float[4, N] a, float[N, N] q) {
  c = Conv <pads = [1, 1, 1, 1]> (x, conv_w, conv_b)
  r = Relu (c)
  d = Conv <group = 6> (r, dw_w, dw_b)
  r2 = Relu (d)
  f = Flatten (r2)
  y = Gemm <transB = 1> (f, fc_w, fc_b)
  m = MatMul (z, mm_w)
  t = Transpose (z)
  a = MatMul (mm_a, t)
  q = MatMul (z, t)
}
"""


def build(tmp_path, seed=0, name="m.onnx"):
    """Conv 3->6, depthwise 3x3 (no padding), Gemm 216->10, MatMul with constant B, with constant A, and without."""
    proto = onnx.parser.parse_model(MODEL_TEXT)
    rng = np.random.default_rng(seed)
    weights = {
        # Channels of very different scales, as after BatchNorm folding.
        "conv_w": rng.normal(size=(6, 3, 3, 3)) * np.array([1, 0.01, 3, 0.2, 1, 0.5])[:, None, None, None],
        "conv_b": rng.normal(size=6) * 0.1, "dw_w": rng.normal(size=(6, 1, 3, 3)), "dw_b": rng.normal(size=6) * 0.1,
        "fc_w": rng.normal(size=(10, 216)) * 0.1, "fc_b": rng.normal(size=10) * 0.1,
        "mm_w": rng.normal(size=(5, 4)), "mm_a": rng.normal(size=(4, 5)),
    }
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items())
    for i, node in enumerate(proto.graph.node):
        node.name = f"{node.op_type.lower()}_{i}"
    onnx.checker.check_model(proto, full_check=True)
    path = tmp_path / name
    onnx.save(proto, path)
    return path


def inputs(n=16, seed=1):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 3, 8, 8)).astype(np.float32) + 0.5,
            "z": rng.normal(size=(n, 5)).astype(np.float32)}


def run(path_or_proto, feeds):
    source = path_or_proto if isinstance(path_or_proto, (str, bytes)) else str(path_or_proto)
    return ort.InferenceSession(source).run(None, feeds)


def shared_plan(model, bits, **params):
    return Plan([LayerDecision(s.name, "share", {"bits": bits, **params}) for s in SHARE.sites(model) if s.ok])


def reconstructed_weights(path):
    """Weight name (as consumed by each layer) -> codebook[indices] * scale, read back from the saved file."""
    proto = onnx.load(path)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {out: n for n in proto.graph.node for out in n.output}
    result = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        for position, name in enumerate(node.input[:2]):
            chain, scale = producer.get(name), None
            if chain is not None and chain.op_type == "Mul":
                scale = init[chain.input[1]]
                chain = producer.get(chain.input[0])
            if chain is None or chain.op_type != "Gather":
                continue
            cast = producer[chain.input[1]]
            assert cast.op_type == "Cast" and init[cast.input[0]].dtype == np.uint8
            weight = init[chain.input[0]][init[cast.input[0]].astype(np.int64)]
            result[(node.name, position)] = weight * scale if scale is not None else weight
    return result


def test_sites_and_reasons(tmp_path):
    model = load_model(build(tmp_path), simplify=False)
    sites = {s.name: s for s in SHARE.sites(model)}
    assert sorted(n for n, s in sites.items() if s.ok) == ["conv_0", "conv_2", "gemm_5", "matmul_6", "matmul_8"]
    assert not sites["matmul_9"].ok and sites["matmul_9"].reason == "weight is not a constant"
    assert sites["matmul_8"].info["input"] == 0 and sites["matmul_6"].info["input"] == 1
    assert sites["gemm_5"].info["params"] == 2160


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_gather_model_reproduces_reconstructed_weights_exactly(tmp_path, bits, per_channel):
    source = build(tmp_path)
    model = load_model(source)
    applied = apply_plan(model, shared_plan(model, bits, per_channel=per_channel))
    assert [n.op_type for n in model.graph].count("Gather") == 5
    assert [n.op_type for n in model.graph].count("Mul") == (5 if per_channel else 0)
    out = tmp_path / "shared.onnx"
    save_model(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    weights = reconstructed_weights(out)
    assert len(weights) == 5
    # The original model with its weights replaced by the reconstruction runs
    # bit-identically to the Gather model in onnxruntime.
    proto = onnx.load(source)
    consumer = {(n.name, i): name for n in proto.graph.node for i, name in enumerate(n.input)}
    originals = {}
    for tensor in proto.graph.initializer:
        for key, name in consumer.items():
            if name == tensor.name and key in weights:
                originals[key] = onnx.numpy_helper.to_array(tensor)
                tensor.CopyFrom(onnx.numpy_helper.from_array(weights[key].astype(np.float32), tensor.name))
    feeds = inputs()
    for got, expected in zip(run(str(out), feeds), run(proto.SerializeToString(), feeds)):
        np.testing.assert_array_equal(got, expected)
    for key, weight in weights.items():
        assert weight.shape == originals[key].shape
        if not per_channel:
            assert np.unique(weight).size <= 2 ** bits
        else:
            # Within one output channel the weight is codebook[idx] * s_c: at most 2^b values.
            axis = {"conv_0": 0, "conv_2": 0, "gemm_5": 0, "matmul_6": 1, "matmul_8": 0}[key[0]]
            for channel in np.moveaxis(weight, axis, 0):
                assert np.unique(channel).size <= 2 ** bits
    errors = [d.result["relative_weight_error"] for d in applied.decisions]
    assert all(d.result["converged"] for d in applied.decisions)
    if bits == 8:
        assert max(errors) < 0.02
    # More bits, smaller error: the same layers at 1 bit are far worse.
    assert all(0 <= e < 1 for e in errors)


def test_per_channel_scale_keeps_small_channels(tmp_path):
    # conv_w channel 1 is 100x smaller than channel 2: one plain codebook snaps it to a few values.
    model = load_model(build(tmp_path))
    original = constant_array(node_by_name(model, "conv_0").inputs[1])

    def channel_error(per_channel):
        m = load_model(tmp_path / "m.onnx")
        apply_plan(m, Plan([LayerDecision("conv_0", "share", {"bits": 3, "per_channel": per_channel})]))
        path = tmp_path / f"conv_{per_channel}.onnx"
        save_model(m, path)
        w = reconstructed_weights(path)[("conv_0", 1)]
        return np.linalg.norm(w[1] - original[1]) / np.linalg.norm(original[1])

    assert channel_error(True) < 0.2 < 1.0 <= channel_error(False) + 0.5


def test_reload_keeps_sharing_and_site_says_already_shared(tmp_path):
    model = load_model(build(tmp_path))
    apply_plan(model, shared_plan(model, 4))
    save_model(model, tmp_path / "s.onnx")
    # load_model constant-folds: the small shared weights must not be folded back to float.
    again = load_model(tmp_path / "s.onnx")
    ops = [n.op_type for n in again.graph]
    assert ops.count("Gather") == 5 and ops.count("Cast") == 5
    sites = {s.name: s for s in SHARE.sites(again)}
    assert not sites["conv_0"].ok and sites["conv_0"].reason == "weight is already shared"
    with pytest.raises(PycompressError, match="site 'conv_0': cannot apply 'share': weight is already shared"):
        apply_plan(again, Plan([LayerDecision("conv_0", "share", {"bits": 4})]))


def test_prune_fraction_zeroes_smallest_weights(tmp_path):
    model = load_model(build(tmp_path))
    original = constant_array(node_by_name(model, "gemm_5").inputs[1])
    applied = apply_plan(model, Plan([LayerDecision("gemm_5", "share", {"bits": 3, "prune_fraction": 0.6})]))
    assert applied.decisions[0].result["pruned"] == round(0.6 * 2160)
    save_model(model, tmp_path / "p.onnx")
    weight = reconstructed_weights(tmp_path / "p.onnx")[("gemm_5", 1)]
    zero = weight == 0
    assert zero.sum() == round(0.6 * 2160)
    threshold = np.sort(np.abs(original).ravel())[round(0.6 * 2160)]
    assert np.all(np.abs(original[zero]) <= threshold) and np.all(np.abs(original[~zero]) >= threshold)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "p.onnx").graph.initializer}
    codebook = next(v for k, v in init.items() if k.endswith("_codebook"))
    assert codebook[0] == 0 and codebook.size == 8


@pytest.mark.parametrize("params, message", [
    ({"bits": 0}, "'bits' must be an integer in 1..8"),
    ({"bits": 9}, "'bits' must be an integer in 1..8"),
    ({"bits": "8"}, "'bits' must be an integer in 1..8"),
    ({"bits": True}, "'bits' must be an integer in 1..8"),
    ({}, "'bits' must be an integer in 1..8"),
    ({"bits": 4, "prune_fraction": 1.0}, "'prune_fraction' must be a number in \\[0, 1\\)"),
    ({"bits": 4, "per_channel": "yes"}, "'per_channel' must be true or false"),
    ({"bits": 4, "rank": 3}, "unknown parameter"),
])
def test_bad_params_are_refused_before_any_change(tmp_path, params, message):
    model = load_model(build(tmp_path))
    before = [n.op_type for n in model.graph]
    plan = Plan([LayerDecision("conv_0", "share", {"bits": 4}), LayerDecision("gemm_5", "share", params)])
    with pytest.raises(PycompressError, match=f"site 'gemm_5': {message}"):
        apply_plan(model, plan)
    assert [n.op_type for n in model.graph] == before


def test_starting_decision(tmp_path):
    model = load_model(build(tmp_path))
    sites = {s.name: s for s in SHARE.sites(model)}
    assert SHARE.starting_decision(model, sites["gemm_5"]).params == {"bits": 8}
    assert SHARE.starting_decision(model, sites["gemm_5"], bits=5, rank=3).params == {"bits": 5}
    # 20 weights cannot pay for a 256-entry codebook, but can for 4 entries.
    assert SHARE.starting_decision(model, sites["matmul_6"], bits=8) is None
    assert SHARE.starting_decision(model, sites["matmul_6"], bits=2).params == {"bits": 2}
    assert SHARE.starting_decision(model, sites["matmul_9"]) is None


def test_bias_correction_removes_the_mean_output_shift(tmp_path):
    """With calibration activations, mean(y_shared - y) over the calibration data is 0 per channel."""
    source = build(tmp_path)
    feeds = inputs(64, seed=3)
    teacher = load_model(source)
    names = ["c", "d", "y"]

    def activations(names_):
        return collect_activations(teacher, names_, [feeds])

    def shifted(model):
        return {k: v for k, v in next(iter(collect_activations(model, names, [feeds]))).items()}

    reference = next(iter(collect_activations(teacher, names, [feeds])))
    shifts = {}
    for corrected in (False, True):
        model = load_model(source)
        plan = Plan([LayerDecision(s, "share", {"bits": 2, "bias_correction": corrected})
                     for s in ("conv_0", "conv_2", "gemm_5")])
        # One layer at a time, so each layer's shift is measured on the teacher's inputs.
        for decision in plan.decisions:
            single = load_model(source)
            result = apply_plan(single, Plan([decision]), ApplyContext(activations=activations)).decisions[0].result
            assert result["bias_corrected"] is corrected
            out = shifted(single)
            tensor = {"conv_0": "c", "conv_2": "d", "gemm_5": "y"}[decision.site]
            axes = (0, 2, 3) if out[tensor].ndim == 4 else (0,)
            shifts[(decision.site, corrected)] = np.abs((out[tensor] - reference[tensor]).mean(axis=axes)).max()
        apply_plan(model, plan, ApplyContext(activations=activations))
        check_model(model)
    # Gemm: exact. Conv: E[x] is the channel mean, while windows (and zero
    # padding) weight border pixels differently, so the shift shrinks (measured
    # 4.4 -> 0.9 and 5.7 -> 0.7) but does not vanish.
    assert shifts[("gemm_5", True)] < 1e-5 < 1.0 < shifts[("gemm_5", False)]
    for site in ("conv_0", "conv_2"):
        assert shifts[(site, True)] < 0.25 * shifts[(site, False)]


def test_bias_correction_follows_the_context_unless_the_decision_says(tmp_path):
    source = build(tmp_path)
    feeds = inputs(8)
    teacher = load_model(source)

    def activations(names):
        return collect_activations(teacher, names, [feeds])

    cases = [({}, ApplyContext(), False),                                                    # no data
             ({}, ApplyContext(activations=activations), True),                              # data: on
             ({}, ApplyContext(activations=activations, options={"data_aware": False}), False),  # --weight-only
             ({"bias_correction": True}, ApplyContext(activations=activations, options={"data_aware": False}), True),
             ({"bias_correction": False}, ApplyContext(activations=activations), False)]
    for params, ctx, expected in cases:
        model = load_model(source)
        result = apply_plan(model, Plan([LayerDecision("gemm_5", "share", {"bits": 3, **params})]), ctx)
        assert result.decisions[0].result["bias_corrected"] is expected, (params, ctx.options)
    model = load_model(source)
    with pytest.raises(PycompressError, match="site 'gemm_5': bias_correction needs calibration data"):
        apply_plan(model, Plan([LayerDecision("gemm_5", "share", {"bits": 3, "bias_correction": True})]))


def test_bias_correction_adds_a_bias_when_missing(tmp_path):
    module = zoo.DepthwiseBlock()
    path = export(module, (1, 3, 16, 16), tmp_path / "dw.onnx")
    proto = onnx.load(path)
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    del conv.input[2]  # the stem conv without bias
    onnx.save(proto, tmp_path / "nobias.onnx")
    model = load_model(tmp_path / "nobias.onnx")
    name = next(n.name for n in model.graph if n.op_type == "Conv")
    x = np.abs(np.random.default_rng(0).normal(size=(32, 3, 16, 16))).astype(np.float32)
    teacher = load_model(tmp_path / "nobias.onnx")
    ctx = ApplyContext(activations=lambda names: collect_activations(teacher, names, [{"input": x}]))
    apply_plan(model, Plan([LayerDecision(name, "share", {"bits": 2})]), ctx)
    conv = node_by_name(model, name)
    assert len(conv.inputs) == 3 and constant_array(conv.inputs[2]).shape == (8,)


def test_digits_mlp_keeps_accuracy_at_4_bits(tmp_path):
    import torch

    (x_train, y_train), (x_test, y_test) = zoo.digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: 1 s on one thread, 20 s with two contended ones
    try:
        module = zoo.train(zoo.MLP((64, 128, 64, 10)), x_train, y_train, epochs=25)
    finally:
        torch.set_num_threads(threads)
    path = export(module, (1, 64), tmp_path / "mlp.onnx")
    fp32 = zoo.accuracy(run(str(path), {"input": x_test})[0], y_test)
    model = load_model(path)
    apply_plan(model, shared_plan(model, 4))
    save_model(model, tmp_path / "mlp4.onnx")
    shared = zoo.accuracy(run(str(tmp_path / "mlp4.onnx"), {"input": x_test})[0], y_test)
    assert fp32 > 0.9 and shared >= fp32 - 0.02


@pytest.mark.slow
def test_efficientnet_8_bit_sharing(efficientnet_onnx, crops, tmp_path, capsys):
    reference = run(str(efficientnet_onnx), {"input": crops})[0]
    # One real layer (the 1280x1000 classifier), no data: a small output error.
    model = load_model(efficientnet_onnx)
    fc = next(s for s in SHARE.sites(model) if s.name.endswith("Gemm"))
    apply_plan(model, Plan([LayerDecision(fc.name, "share", {"bits": 8})]))
    save_model(model, tmp_path / "fc8.onnx")
    out = run(str(tmp_path / "fc8.onnx"), {"input": crops})[0]
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) < 0.01
    assert np.mean(out.argmax(1) == reference.argmax(1)) == 1.0
    # Every layer, through `pycompress plan --actions share` and `apply --data`
    # (bias correction on 8 other crops): top-1 kept on (almost) all crops.
    from pycompress.cli import main

    np.savez(tmp_path / "calibration.npz", input=zoo.skimage_crops(8, seed=5))
    plan_path, shared = tmp_path / "share.json", tmp_path / "all8.onnx"
    assert main(["plan", str(efficientnet_onnx), "--actions", "share", "--bits", "8", "-o", str(plan_path)]) == 0
    plan = Plan.load(plan_path)
    assert len(plan.decisions) == 48 and {d.params["bits"] for d in plan.decisions} == {8}
    assert main(["apply", str(efficientnet_onnx), str(plan_path), "--data", str(tmp_path / "calibration.npz"),
                 "-o", str(shared), "--json"]) == 0
    capsys.readouterr()
    results = Plan.load(tmp_path / "all8.plan.json")
    assert all(d.result["bias_corrected"] and d.result["converged"] for d in results.decisions)
    out = run(str(shared), {"input": crops})[0]
    assert np.mean(out.argmax(1) == reference.argmax(1)) >= 22 / 24
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) < 0.06
    assert shared.stat().st_size < 0.27 * efficientnet_onnx.stat().st_size


def test_bias_correction_reads_a_bounded_sample_per_layer(tmp_path):
    """Each layer's input mean stops after MEAN_SAMPLES: 48 layers x 256 crops took 358 s on EfficientNet-Lite0."""
    from pycompress.rewrites.weight_sharing import MEAN_SAMPLES

    source = build(tmp_path)
    teacher = load_model(source)
    batches = [inputs(16, seed=s) for s in range(3 * MEAN_SAMPLES // 16)]
    served = []

    def activations(names_):
        for out in collect_activations(teacher, names_, batches):
            served.append(len(next(iter(out.values()))))
            yield out

    model = load_model(source)
    result = apply_plan(model, Plan([LayerDecision("conv_0", "share", {"bits": 4})]),
                        ApplyContext(activations=activations)).decisions[0].result
    assert result["bias_corrected"] and sum(served) == MEAN_SAMPLES
