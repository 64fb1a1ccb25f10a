"""`svd` rewrite: Gemm / MatMul / 1x1 Conv factored to rank K (ALGORITHMS.md 1.1, 1.3)."""

import numpy as np
import onnx_ir as ir
import pytest
import torch

import zoo
from conftest import export
from pycompress.errors import PycompressError
from pycompress.ir import load_model, model_cost, node_by_name
from pycompress.rewrites import REGISTRY
from rewrite_testing import apply, assert_exact_on_a_copy, check, model_from_text, op_types, relative_error, run

SVD = REGISTRY["svd"]
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws the same numbers whatever ran before it (or -k selected)."""
    global RNG
    RNG = np.random.default_rng(0)


def numpy_truncated(w: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


# --- Gemm ---------------------------------------------------------------------------------------

GEMM_CASES = [  # transA, transB, alpha, beta, bias, opset
    (0, 0, 1.0, 1.0, "vector", 17),
    (0, 1, 1.0, 1.0, "vector", 17),
    (0, 1, 1.5, 1.0, None, 17),
    (1, 0, 0.5, 2.0, "row", 17),
    (1, 1, 2.0, 0.5, "scalar", 17),
    (1, 1, 1.0, 1.0, "vector", 10),   # opset 10: Gemm needs C, so the first factor gets a zero C
]


def gemm_model(tmp_path, trans_a, trans_b, alpha, beta, bias, opset, n_in=12, n_out=7):
    w = RNG.normal(size=(n_out, n_in) if trans_b else (n_in, n_out)).astype(np.float32)
    inits, args = {"w": w}, "x, w"
    if bias is not None:
        inits["c"] = {"vector": RNG.normal(size=n_out), "row": RNG.normal(size=(1, n_out)),
                      "scalar": np.array(0.7)}[bias].astype(np.float32)
        args += ", c"
    x_dims = f"{n_in}, N" if trans_a else f"N, {n_in}"
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[{x_dims}] x) => (float[N, {n_out}] y) {{
      [fc] y = Gemm <transA={trans_a}, transB={trans_b}, alpha={alpha}, beta={beta}> ({args})
    }}"""
    return model_from_text(text, tmp_path / "gemm.onnx", **inits), inits


def gemm_reference(x, inits, trans_a, trans_b, alpha, beta, rank=None):
    a = x.T if trans_a else x
    w = inits["w"].T if trans_b else inits["w"]
    w = alpha * w.astype(np.float64)
    if rank is not None:
        w = numpy_truncated(w, rank)
    y = a @ w
    return y + beta * inits["c"] if "c" in inits else y


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,bias,opset", GEMM_CASES)
def test_gemm_full_rank_reproduces_and_rank_k_is_the_truncated_svd(tmp_path, trans_a, trans_b, alpha, beta, bias,
                                                                   opset):
    model, inits = gemm_model(tmp_path, trans_a, trans_b, alpha, beta, bias, opset)
    sites = SVD.sites(model)
    assert [(s.name, s.ok) for s in sites] == [("fc", True)]
    assert sites[0].info["full_rank"] == 7 and sites[0].info["r_max"] == 12 * 7 // 19
    x = RNG.normal(size=(12, 5) if trans_a else (5, 12)).astype(np.float32)
    original = run(model, {"x": x})[0]

    full = model.clone()
    plan = apply(full, ("fc", "svd", {"rank": 7}))
    assert plan.decisions[0].result["nodes"] == ["fc/svd_a", "fc/svd_b"]
    assert "fc" not in [n.name for n in full.graph] and len(op_types(full)) == 2
    check(full)
    np.testing.assert_allclose(run(full, {"x": x})[0], original, rtol=1e-5, atol=1e-5)

    plan = apply(model, ("fc", "svd", {"rank": 3}))
    check(model)
    expected = gemm_reference(x, inits, trans_a, trans_b, alpha, beta, rank=3)
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)
    bias_params = 0 if bias in (None, "scalar") else 7
    assert model_cost(model).params == 3 * (12 + 7) + bias_params == plan.decisions[0].result["params_after"]


# --- MatMul -------------------------------------------------------------------------------------

def test_matmul_with_the_weight_first(tmp_path):
    w = RNG.normal(size=(7, 12)).astype(np.float32)
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 12, 5] x) => (float[N, 7, 5] y) { [mm] y = MatMul (w, x) }""", tmp_path / "left.onnx", w=w)
    site = SVD.site(model, "mm")
    assert site.ok and site.info["kind"] == "matmul_left" and (site.info["in"], site.info["out"]) == (12, 7)
    assert site.info["macs"] == 5 * 12 * 7  # symbolic batch counts 1
    x = RNG.normal(size=(3, 12, 5)).astype(np.float32)
    original = run(model, {"x": x})[0]
    assert_exact_on_a_copy(model, ("mm", "svd", {"rank": 7}), {"x": x}, original)
    apply(model, ("mm", "svd", {"rank": 2}))
    np.testing.assert_allclose(run(model, {"x": x})[0], numpy_truncated(w.T, 2).T @ x, rtol=1e-4, atol=1e-4)
    assert model_cost(model).params == 2 * (12 + 7)


def transformer_matmul(tmp_path, hidden=16, out=24):
    w = RNG.normal(size=(hidden, out)).astype(np.float32)
    return model_from_text(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[B, S, {hidden}] x) => (float[B, S, {out}] y) {{ [proj] y = MatMul (x, w) }}""",
                           tmp_path / "proj.onnx", w=w), w


def test_transformer_style_3d_matmul(tmp_path):
    model, w = transformer_matmul(tmp_path)
    x = RNG.normal(size=(2, 9, 16)).astype(np.float32)
    original = run(model, {"x": x})[0]
    assert_exact_on_a_copy(model, ("proj", "svd", {"rank": 16}), {"x": x}, original)
    apply(model, ("proj", "svd", {"rank": 5}))
    check(model)
    got = run(model, {"x": x})[0]
    assert got.shape == (2, 9, 24)
    np.testing.assert_allclose(got, x @ numpy_truncated(w, 5), rtol=1e-4, atol=1e-4)


def test_matmuls_without_a_2d_constant_are_listed_with_the_reason(tmp_path):
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 6] q, float[N, 6, 4] k) => (float[N, 4, 4] s, float[N, 4, 4] t) {
      [scores] s = MatMul (q, k)
      [batched] t = MatMul (q, w3)
    }""", tmp_path / "attn.onnx", w3=RNG.normal(size=(2, 6, 4)).astype(np.float32))
    sites = {s.name: s for s in SVD.sites(model)}
    assert not sites["scores"].ok and "both operands are activations" in sites["scores"].reason
    assert not sites["batched"].ok and "3-D" in sites["batched"].reason
    with pytest.raises(PycompressError, match="site 'scores': cannot apply 'svd': both operands"):
        apply(model, ("scores", "svd", {"rank": 2}))


# --- a real exported MLP, 1x1 convs ---------------------------------------------------------------

def test_mlp_at_full_rank_reproduces_every_layer(tmp_path):
    torch.manual_seed(0)
    path = export(zoo.MLP((64, 32, 16, 10)), (1, 64), tmp_path / "mlp.onnx")
    model = load_model(path)
    sites = SVD.sites(model)
    assert len(sites) == 3 and all(s.ok for s in sites)
    x = RNG.normal(size=(8, 64)).astype(np.float32)
    original = run(model, {"input": x})[0]
    plan = apply(model, *[(s.name, "svd", {"rank": s.info["full_rank"]}) for s in sites])
    check(model)
    names = {n.name for n in model.graph}
    assert {f"{s.name}/svd_{p}" for s in sites for p in "ab"} <= names
    assert not {s.name for s in sites} & names
    assert [d.result["rank"] for d in plan.decisions] == [32, 16, 10]
    np.testing.assert_allclose(run(model, {"input": x})[0], original, rtol=1e-5, atol=1e-5)


def conv1x1_model(tmp_path, group=1):
    w = RNG.normal(size=(12, 8 // group, 1, 1)).astype(np.float32)
    b = RNG.normal(size=12).astype(np.float32)
    return model_from_text(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8, 9, 7] x) => (float[N, 12, 6, 4] y) {{
      [pw] y = Conv <kernel_shape=[1, 1], strides=[2, 2], pads=[1, 0, 1, 0], group={group}> (x, w, b)
    }}""", tmp_path / f"pw{group}.onnx", w=w, b=b), w, b


def test_1x1_conv_goes_through_the_matrix_path(tmp_path):
    model, w, b = conv1x1_model(tmp_path)
    site = SVD.site(model, "pw")
    assert site.ok and site.info["kind"] == "conv1x1" and site.info["r_max"] == 96 // 20
    assert site.info["macs"] == 6 * 4 * 8 * 12
    x = RNG.normal(size=(2, 8, 9, 7)).astype(np.float32)
    original = run(model, {"x": x})[0]
    full = assert_exact_on_a_copy(model, ("pw", "svd", {"rank": 8}), {"x": x}, original)
    assert op_types(full) == ["Conv", "Conv"]
    # Rank 3 equals the 1x1 conv with the rank-3 weight (padded border = bias only, as in the original).
    plan = apply(model, ("pw", "svd", {"rank": 3}))
    w3 = numpy_truncated(w.reshape(12, 8).T, 3).T.reshape(12, 8, 1, 1).astype(np.float32)
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w3), torch.from_numpy(b),
                                          stride=2, padding=(1, 0)).numpy()
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)
    result = plan.decisions[0].result
    assert model_cost(model).params == result["params_after"] == 3 * (8 + 12) + 12
    assert model_cost(model).macs == result["macs_after"] == 6 * 4 * 3 * (8 + 12)


def test_grouped_1x1_conv_is_not_applicable(tmp_path):
    model, _, _ = conv1x1_model(tmp_path, group=2)
    site = SVD.site(model, "pw")
    assert not site.ok and "grouped conv (group=2)" in site.reason


# --- parameter counts, names, bad plans ------------------------------------------------------------

def test_parameter_counts_equal_the_formulas(tmp_path):
    torch.manual_seed(1)
    sizes = (64, 48, 20, 10)
    model = load_model(export(zoo.MLP(sizes), (1, 64), tmp_path / "mlp.onnx"))
    sites = SVD.sites(model)
    for site, (n_in, n_out) in zip(sites, zip(sizes[:-1], sizes[1:])):
        assert site.info["r_max"] == n_in * n_out // (n_in + n_out)
        assert site.info["params"] == n_in * n_out + n_out
    ranks = [5, 7, 3]
    before = model_cost(model).params
    plan = apply(model, *[(s.name, "svd", {"rank": k}) for s, k in zip(sites, ranks)])
    expected = sum(k * (a + b) + b for k, a, b in zip(ranks, sizes[:-1], sizes[1:]))
    assert model_cost(model).params == expected
    assert sum(d.result["params_after"] for d in plan.decisions) == expected
    assert sum(d.result["params_before"] for d in plan.decisions) == before


def test_emitted_names_stay_unique(tmp_path):
    w = RNG.normal(size=(6, 5)).astype(np.float32)
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 6] x) => (float[N, 5] y) {
      ["fc/svd_a"] h = Relu (x)
      [fc] y = MatMul (h, w)
    }""", tmp_path / "names.onnx", w=w)
    plan = apply(model, ("fc", "svd", {"rank": 2}))
    assert plan.decisions[0].result["nodes"] == ["fc/svd_a_1", "fc/svd_b"]
    names = [n.name for n in model.graph]
    assert len(names) == len(set(names))
    check(model)


def proto_bytes(model):
    return ir.to_proto(model).SerializeToString()


@pytest.mark.parametrize("decisions,message", [
    ([("fc1", "svd", {"rank": 0})], "site 'fc1': rank 0 is below 1"),
    ([("fc1", "svd", {"rank": 11})], "site 'fc1': rank 11 is above the full rank 10"),
    ([("fc1", "svd", {"rank": 2.5})], "site 'fc1': rank must be an integer"),
    ([("fc1", "svd", {})], "site 'fc1': 'svd' needs a 'rank'"),
    ([("fc1", "svd", {"rank": 2, "bits": 4})], r"site 'fc1': unknown parameter\(s\) \['bits'\]"),
    ([("fc1", "svd", {"rank": 2, "data_aware": "yes"})], "site 'fc1': 'data_aware' must be true or false"),
    ([("nope", "svd", {"rank": 2})], "site 'nope': no node of that name"),
    ([("act", "svd", {"rank": 2})], "site 'act': 'svd' applies to Gemm, MatMul or 1x1 Conv, not to Relu"),
    ([("fc1", "lowrank_conv", {"rank": 2})], "site 'fc1': 'lowrank_conv' applies to Conv, not to Gemm"),
    ([("fc1", "svd", {"rank": 4}), ("fc2", "svd", {"rank": 9})], "site 'fc2': rank 9 is above the full rank 6"),
])
def test_bad_plans_fail_naming_the_site_and_change_nothing(tmp_path, decisions, message):
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16] x) => (float[N, 6] y) {
      [fc1] h = Gemm <transB=1> (x, w1, b1)
      [act] r = Relu (h)
      [fc2] y = Gemm (r, w2)
    }""", tmp_path / "two.onnx", w1=RNG.normal(size=(10, 16)).astype(np.float32),
                            b1=RNG.normal(size=10).astype(np.float32), w2=RNG.normal(size=(10, 6)).astype(np.float32))
    before = proto_bytes(model)
    with pytest.raises(PycompressError, match=message):
        apply(model, *decisions)
    assert proto_bytes(model) == before


# --- data-aware low rank (ALGORITHMS.md 1.3) --------------------------------------------------------

def correlated(n, dim, offset=2.0):
    """Rows with a few strong directions and a non-zero mean (like real activations)."""
    basis = RNG.normal(size=(4, dim))
    return (RNG.normal(size=(n, 4)) * [5, 3, 2, 1] @ basis + 0.3 * RNG.normal(size=(n, dim)) + offset)


def layer_errors(make, rank, feeds, output):
    """(data-aware error, weight-only error) of the layer's output on the calibration feeds."""
    original = make()
    expected = run(original, feeds, [output])[0]
    errors = []
    for data_aware in (True, False):
        model = make()
        plan = apply(model, (SITE, "svd", {"rank": rank, "data_aware": data_aware}), data=feeds, batch=50)
        assert plan.decisions[0].result["data_aware"] is data_aware
        check(model)
        errors.append(relative_error(expected, run(model, feeds, [output])[0]))
    return errors


SITE = "layer"


@pytest.mark.parametrize("case", ["gemm_bias", "gemm_scalar_bias", "gemm_no_bias", "matmul_3d", "matmul_left",
                                  "conv1x1"])
def test_data_aware_never_has_a_larger_calibration_error_than_weight_svd(tmp_path, case):
    w = RNG.normal(size=(20, 14)).astype(np.float32)
    header = '<ir_version: 8, opset_import: ["" : 17]>'
    if case.startswith("gemm"):
        bias = {"gemm_bias": RNG.normal(size=14), "gemm_scalar_bias": np.array(1.5), "gemm_no_bias": None}[case]
        inits = {"w": w} | ({} if bias is None else {"c": bias.astype(np.float32)})
        text = f"""{header} g (float[N, 20] x) => (float[N, 14] y) {{
          [layer] y = Gemm <alpha=0.5> (x, w{", c" if bias is not None else ""}) }}"""
        feeds = {"x": correlated(300, 20).astype(np.float32)}
    elif case == "matmul_3d":
        inits, text = {"w": w}, f"{header} g (float[B, S, 20] x) => (float[B, S, 14] y) {{ [layer] y = MatMul (x, w) }}"
        feeds = {"x": correlated(300 * 4, 20).reshape(300, 4, 20).astype(np.float32)}
    elif case == "matmul_left":
        inits = {"w": w.T.copy()}
        text = f"{header} g (float[B, 20, 3] x) => (float[B, 14, 3] y) {{ [layer] y = MatMul (w, x) }}"
        feeds = {"x": correlated(300 * 3, 20).reshape(300, 3, 20).transpose(0, 2, 1).astype(np.float32)}
    else:
        inits = {"w": w.T.reshape(14, 20, 1, 1).copy(), "b": RNG.normal(size=14).astype(np.float32)}
        text = f"""{header} g (float[N, 20, 4, 4] x) => (float[N, 14, 4, 4] y) {{
          [layer] y = Conv <kernel_shape=[1, 1]> (x, w, b) }}"""
        feeds = {"x": correlated(300 * 16, 20).reshape(300, 4, 4, 20).transpose(0, 3, 1, 2).astype(np.float32)}
    path = tmp_path / f"{case}.onnx"
    model_from_text(text, path, **inits)
    for rank in (1, 3, 6):
        aware, weight_only = layer_errors(lambda: load_model(path), rank, feeds, "y")
        assert aware <= weight_only * (1 + 1e-5) + 1e-6, (rank, aware, weight_only)
    assert aware < 0.9 * weight_only  # correlated inputs: the projection clearly helps


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    (x_train, y_train), (x_test, y_test) = zoo.digits()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: extra threads only contend (3x slower on shared cores)
    try:
        module = zoo.train(zoo.MLP((64, 128, 64, 10)), x_train, y_train, epochs=20)
    finally:
        torch.set_num_threads(threads)
    path = export(module, (1, 64), tmp_path_factory.mktemp("digits") / "mlp.onnx")
    return path, (x_train, y_train), (x_test, y_test)


def test_data_aware_beats_weight_svd_on_a_digits_mlp(digits_mlp):
    path, (x_train, _), (x_test, y_test) = digits_mlp
    first = SVD.sites(load_model(path))[0]
    original = load_model(path)
    hidden = node_by_name(original, first.name).outputs[0].name  # pre-activation of the first layer
    expected_train = run(original, {"input": x_train}, [hidden])[0]
    expected_test = run(original, {"input": x_test}, [hidden])[0]
    logits = run(original, {"input": x_test})[0]
    errors = {}
    for data_aware in (True, False):
        model = load_model(path)
        apply(model, (first.name, "svd", {"rank": 6, "data_aware": data_aware}), data={"input": x_train})
        errors[data_aware] = (relative_error(expected_train, run(model, {"input": x_train}, [hidden])[0]),
                              relative_error(expected_test, run(model, {"input": x_test}, [hidden])[0]),
                              zoo.accuracy(run(model, {"input": x_test})[0], y_test))
    (fit_aware, test_aware, acc_aware), (fit_plain, test_plain, acc_plain) = errors[True], errors[False]
    assert fit_aware < 0.8 * fit_plain            # on the data it was fitted on: guaranteed, and large here
    assert test_aware < 0.8 * test_plain          # and it generalizes to held-out digits
    assert acc_aware >= acc_plain and zoo.accuracy(logits, y_test) > 0.9


@pytest.mark.slow
def test_error_decreases_monotonically_with_rank_on_efficientnet_fc(efficientnet_onnx, crops):
    original = load_model(efficientnet_onnx)
    feeds = {"input": crops[:8]}
    expected = run(original, feeds)[0]  # the logits are the FC's own output
    errors = []
    for rank in (8, 32, 128, 512, 1000):
        model = original.clone()
        apply(model, ("/_fc/Gemm", "svd", {"rank": rank}))
        errors.append(relative_error(expected, run(model, feeds)[0]))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5 and errors[0] > 0.1
