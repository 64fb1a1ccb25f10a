"""`lowrank_conv` rewrite: Tai's vertical + horizontal pair and the channel (k x k + 1x1)
structure, weight-only and data-aware (ALGORITHMS.md 1.2, 1.3)."""

import numpy as np
import pytest

from pycompress.errors import PycompressError
from pycompress.ir import load_model, model_cost, node_by_name
from pycompress.rewrites import REGISTRY
from rewrite_testing import apply, check, model_from_text, op_types, relative_error, run

LOWRANK = REGISTRY["lowrank_conv"]
SVD = REGISTRY["svd"]
RNG = np.random.default_rng(1)


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws the same numbers whatever ran before it (or -k selected)."""
    global RNG
    RNG = np.random.default_rng(1)
CI, CO = 4, 6

CASES = {
    "stride_2": dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1)),
    "asymmetric_pads": dict(kernel=(3, 3), pads=(0, 2, 1, 0)),
    "dilation_2": dict(kernel=(3, 3), dilations=(2, 2), pads=(2, 1, 2, 1)),
    "non_square_kernel": dict(kernel=(3, 5), strides=(1, 2), pads=(1, 2, 1, 2)),
    "tall_kernel": dict(kernel=(5, 1), strides=(2, 1), pads=(2, 0, 2, 0)),
    "same_upper_stride_2": dict(kernel=(3, 3), strides=(2, 2), auto_pad="SAME_UPPER"),
    "same_lower_even_kernel": dict(kernel=(4, 2), strides=(2, 2), auto_pad="SAME_LOWER"),
    "valid": dict(kernel=(3, 3), strides=(2, 1), auto_pad="VALID"),
    "no_bias": dict(kernel=(3, 3), pads=(1, 1, 1, 1), bias=False),
}


def conv_text(kernel, strides=(1, 1), pads=None, dilations=(1, 1), auto_pad=None, bias=True, group=1, ci=CI):
    attrs = [f"kernel_shape=[{kernel[0]}, {kernel[1]}]", f"strides=[{strides[0]}, {strides[1]}]",
             f"dilations=[{dilations[0]}, {dilations[1]}]", f"group={group}"]
    if pads is not None:
        attrs.append(f"pads=[{', '.join(map(str, pads))}]")
    if auto_pad is not None:
        attrs.append(f'auto_pad="{auto_pad}"')
    return f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {ci}, 9, 11] x) => (float[N, {CO}, H, W] y) {{
      [conv] y = Conv <{", ".join(attrs)}> (x, w{", b" if bias else ""})
    }}"""


def conv_model(tmp_path, name, case, weight=None, group=1):
    kh, kw = case["kernel"]
    w = RNG.normal(size=(CO, CI // group, kh, kw)).astype(np.float32) if weight is None else weight
    inits = {"w": w}
    if case.get("bias", True):
        inits["b"] = np.linspace(-1, 1, CO).astype(np.float32)
    return model_from_text(conv_text(**case, group=group), tmp_path / f"{name}.onnx", **inits), inits


def tai_truncated(w, rank):
    """The conv weight whose Tai matrix is the rank-K truncation of the original's."""
    co, ci, kh, kw = w.shape
    m = w.astype(np.float64).transpose(1, 2, 0, 3).reshape(ci * kh, co * kw)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    mk = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return mk.reshape(ci, kh, co, kw).transpose(2, 0, 1, 3).astype(np.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_tai_pair_reproduces_at_full_rank_and_truncates_exactly(tmp_path, name):
    case = CASES[name]
    kh, kw = case["kernel"]
    model, inits = conv_model(tmp_path, name, case)
    sites = LOWRANK.sites(model)
    assert [(s.name, s.ok) for s in sites] == [("conv", True)]
    full = min(CI * kh, CO * kw)
    assert sites[0].info["full_rank"] == full
    assert sites[0].info["r_max"] == (CI * kh * CO * kw) // (CI * kh + CO * kw)
    x = RNG.normal(size=(2, CI, 9, 11)).astype(np.float32)
    original = run(model, {"x": x})[0]

    exact = model.clone()
    plan = apply(exact, ("conv", "lowrank_conv", {"rank": full}))
    check(exact)
    assert plan.decisions[0].result["nodes"] == ["conv/lowrank_v", "conv/lowrank_h"]
    assert op_types(exact) == ["Conv", "Conv"]
    np.testing.assert_allclose(run(exact, {"x": x})[0], original, rtol=1e-5, atol=1e-5)

    # Rank 2 is exactly the conv with the rank-2 Tai weight: padding, strides and dilations split correctly.
    rank = 2
    plan = apply(model, ("conv", "lowrank_conv", {"rank": rank}))
    check(model)
    reference, _ = conv_model(tmp_path, name + "_ref", case, weight=tai_truncated(inits["w"], rank))
    np.testing.assert_allclose(run(model, {"x": x})[0], run(reference, {"x": x})[0], rtol=1e-4, atol=1e-4)
    result = plan.decisions[0].result
    bias = CO if case.get("bias", True) else 0
    assert model_cost(model).params == result["params_after"] == rank * (CI * kh + CO * kw) + bias
    # The MAC formula agrees with the accounting on the shape-inferred rewritten graph.
    assert model_cost(model).macs == result["macs_after"]
    assert model_cost(reference).macs == result["macs_before"]


@pytest.mark.parametrize("name", ["stride_2", "same_upper_stride_2", "non_square_kernel", "no_bias"])
def test_channel_structure_reproduces_at_full_rank(tmp_path, name):
    case = CASES[name]
    kh, kw = case["kernel"]
    model, _ = conv_model(tmp_path, name, case)
    x = RNG.normal(size=(2, CI, 9, 11)).astype(np.float32)
    original = run(model, {"x": x})[0]
    full = LOWRANK.site(model, "conv").info["channel_full_rank"]
    assert full == min(CO, CI * kh * kw)
    plan = apply(model, ("conv", "lowrank_conv", {"rank": full, "structure": "channel"}))
    check(model)
    assert plan.decisions[0].result["nodes"] == ["conv/lowrank_a", "conv/lowrank_b"]
    np.testing.assert_allclose(run(model, {"x": x})[0], original, rtol=1e-5, atol=1e-5)
    bias = CO if case.get("bias", True) else 0
    assert model_cost(model).params == full * (CI * kh * kw + CO) + bias


def test_grouped_depthwise_1x1_and_1d_convs_are_not_applicable(tmp_path):
    w = lambda *shape: RNG.normal(size=shape).astype(np.float32)  # noqa: E731
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 8, 8] x, float[N, 4, 8] s) => (float[N, 4, 8, 8] a, float[N, 6, 8, 8] b, float[N, 6, 8, 8] c,
                                                  float[N, 6, 8] d) {
      [depthwise] a = Conv <kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=4> (x, wd)
      [grouped] b = Conv <kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2> (x, wg)
      [pointwise] c = Conv <kernel_shape=[1, 1]> (x, wp)
      [conv1d] d = Conv <kernel_shape=[3], pads=[1, 1]> (s, w1)
    }""", tmp_path / "na.onnx", wd=w(4, 1, 3, 3), wg=w(6, 2, 3, 3), wp=w(6, 4, 1, 1), w1=w(6, 4, 3))
    sites = {s.name: s for s in LOWRANK.sites(model)}
    assert not any(s.ok for s in sites.values())
    assert "depthwise conv (group=4)" in sites["depthwise"].reason
    assert "grouped conv (group=2)" in sites["grouped"].reason
    assert "'svd'" in sites["pointwise"].reason and SVD.site(model, "pointwise").ok
    assert "1-D convolution" in sites["conv1d"].reason
    for name in ("depthwise", "grouped"):
        with pytest.raises(PycompressError, match=f"site '{name}': cannot apply 'lowrank_conv': .*conv"):
            apply(model, (name, "lowrank_conv", {"rank": 1}))
    with pytest.raises(PycompressError, match="site 'grouped': 'svd' applies to Gemm, MatMul or 1x1 Conv"):
        apply(model, ("grouped", "svd", {"rank": 1}))


@pytest.mark.parametrize("params,message", [
    ({"rank": 0}, "rank 0 is below 1"),
    ({"rank": 13}, r"rank 13 is above the full rank 12 \(Tai"),
    ({"rank": 7, "structure": "channel"}, r"rank 7 is above the full rank 6 \(channel"),
    ({"rank": 7, "data_aware": True}, r"rank 7 is above the full rank 6 \(channel"),
    ({"rank": 2, "structure": "cp"}, "structure must be one of"),
    ({"rank": 2, "structure": "tai", "data_aware": True}, "data_aware needs structure 'channel'"),
])
def test_bad_parameters_name_the_site(tmp_path, params, message):
    model, _ = conv_model(tmp_path, "bad", CASES["stride_2"])
    with pytest.raises(PycompressError, match=f"site 'conv': {message}"):
        apply(model, ("conv", "lowrank_conv", params))
    assert op_types(model) == ["Conv"] and node_by_name(model, "conv")


@pytest.mark.parametrize("name", ["stride_2", "same_upper_stride_2", "no_bias"])
def test_data_aware_channel_structure_never_worse_than_weight_only(tmp_path, name):
    case = CASES[name]
    path = tmp_path / f"{name}.onnx"
    conv_model(tmp_path, name, case)
    # Inputs with correlated channels and a mean offset, like real feature maps.
    mix = RNG.normal(size=(CI, CI)) * [3, 1, 0.5, 0.1]
    x = (np.einsum("nchw,cd->ndhw", RNG.normal(size=(64, CI, 9, 11)), mix) + 1.0).astype(np.float32)
    expected = run(load_model(path), {"x": x})[0]
    for rank in (1, 2, 4):
        errors = {}
        for data_aware in (True, False):
            model = load_model(path)
            plan = apply(model, ("conv", "lowrank_conv", {"rank": rank, "structure": "channel",
                                                         "data_aware": data_aware}), data={"x": x}, batch=16)
            assert plan.decisions[0].result["data_aware"] is data_aware
            check(model)
            errors[data_aware] = relative_error(expected, run(model, {"x": x})[0])
        assert errors[True] <= errors[False] * (1 + 1e-5) + 1e-6, (rank, errors)


def test_context_option_makes_channel_decisions_data_aware_but_not_tai(tmp_path):
    model, _ = conv_model(tmp_path, "ctx", CASES["stride_2"])
    x = RNG.normal(size=(8, CI, 9, 11)).astype(np.float32)
    plan = apply(model, ("conv", "lowrank_conv", {"rank": 2, "structure": "channel"}), data={"x": x},
                 data_aware=True)
    assert plan.decisions[0].result["data_aware"] is True
    model, _ = conv_model(tmp_path, "ctx2", CASES["stride_2"])
    plan = apply(model, ("conv", "lowrank_conv", {"rank": 2}), data={"x": x}, data_aware=True)
    assert plan.decisions[0].result["data_aware"] is False and "structure 'channel'" in plan.decisions[0].result["note"]


# --- the real EfficientNet-Lite0 -------------------------------------------------------------------

STEM = "/_conv_stem/Conv"


@pytest.fixture(scope="module")
def effnet(efficientnet_onnx):
    return load_model(efficientnet_onnx)


@pytest.mark.slow
def test_efficientnet_full_rank_1x1_3x3_convs_and_fc_reproduce(effnet, crops):
    lowrank, svd = LOWRANK.sites(effnet), SVD.sites(effnet)
    assert [s.name for s in lowrank if s.ok] == [STEM]
    reasons = [s.reason for s in lowrank if not s.ok]
    assert sum("depthwise" in r for r in reasons) == 16 and sum("'svd'" in r for r in reasons) == 32
    assert len(svd) == 33 and all(s.ok for s in svd)
    assert {s.info["op"] for s in svd} == {"Conv", "Gemm"}
    model = effnet.clone()
    decisions = [(s.name, "svd", {"rank": s.info["full_rank"]}) for s in svd]
    apply(model, *decisions, (STEM, "lowrank_conv", {"rank": 9}))
    check(model)
    assert sum(n.name.endswith(("/svd_a", "/svd_b", "/lowrank_v", "/lowrank_h")) for n in model.graph) == 2 * 34
    expected = run(effnet, {"input": crops})[0]
    got = run(model, {"input": crops})[0]
    assert relative_error(expected, got) < 1e-5
    assert np.array_equal(expected.argmax(1), got.argmax(1))


@pytest.mark.slow
def test_efficientnet_stem_error_decreases_monotonically_with_rank(effnet, crops):
    stem_out = node_by_name(effnet, STEM).outputs[0].name
    feeds = {"input": crops[:8]}
    expected = run(effnet, feeds, [stem_out])[0]
    errors = []
    for rank in (1, 3, 5, 7, 9):
        model = effnet.clone()
        apply(model, (STEM, "lowrank_conv", {"rank": rank}))
        errors.append(relative_error(expected, run(model, feeds, [stem_out])[0]))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("site,action,rank", [(STEM, "lowrank_conv", 6),
                                              ("/_blocks.15/_project_conv/Conv", "svd", 48)])
def test_efficientnet_data_aware_beats_weight_only_on_real_activations(effnet, crops, site, action, rank):
    calibration = {"input": crops[:16]}
    out = node_by_name(effnet, site).outputs[0].name  # pre-activation (Clip follows the stem; none the project)
    expected = run(effnet, calibration, [out])[0]
    errors = {}
    for data_aware in (True, False):
        model = effnet.clone()
        params = {"rank": rank, "data_aware": data_aware} | ({"structure": "channel"} if action != "svd" else {})
        apply(model, (site, action, params), data=calibration, batch=8)
        errors[data_aware] = relative_error(expected, run(model, calibration, [out])[0])
    assert errors[True] < 0.8 * errors[False], errors
