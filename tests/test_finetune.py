"""Gradient fine-tuning of compressed ONNX graphs: the torch interpreter, the
CramNet loss with keep-only-if-better, write-back, and `compress --finetune`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import zoo
from conftest import export
from pycompress.errors import PycompressError
from pycompress.fidelity.session import run_model
from pycompress.ir import check_model, load_model, save_model
from pycompress.plan import LayerDecision, Plan
from pycompress.recover.finetune import compressed_initializers, finetune
from pycompress.recover.torch_graph import TorchGraph
from pycompress.rewrites import apply_plan, get_rewrite


def _assert_matches_onnxruntime(model: ir.Model, feeds: dict[str, np.ndarray], rtol: float = 1e-4) -> None:
    expected = run_model(model, feeds)
    actual = TorchGraph(model).run(feeds)
    assert len(actual) == len(expected)
    for e, a in zip(expected, actual):
        assert a.shape == e.shape
        scale = max(1.0, float(np.abs(e).max()))
        assert float(np.abs(a - e).max()) <= rtol * scale


def _structure(model: ir.Model):
    return ([n.op_type for n in model.graph],
            sorted((name, v.const_value.dtype, tuple(v.const_value.shape))
                   for name, v in model.graph.initializers.items()))


@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ft_zoo")
    torch.manual_seed(0)
    return {
        "mlp": (load_model(export(zoo.MLP(), (1, 64), folder / "mlp.onnx")), (32, 64)),
        "residual": (load_model(export(zoo.randomize_bn(zoo.ResidualCNN()), (1, 1, 8, 8), folder / "res.onnx")),
                     (16, 1, 8, 8)),
        "depthwise": (load_model(export(zoo.DepthwiseBlock(), (1, 3, 16, 16), folder / "dw.onnx")),
                      (16, 3, 16, 16)),
    }


def _plan(model: ir.Model, action: str) -> Plan:
    """Every applicable site of ``action`` at a small setting."""
    decisions = []
    for site in get_rewrite("lowrank_conv" if action == "lowrank_tai" else action).sites(model):
        if not site.ok:
            continue
        if action == "prune":
            params = {"keep": max(1, site.info["width"] // 2)}
        elif action == "share":
            params = {"bits": 3}
        elif action == "lowrank_conv":
            params = {"rank": 2, "structure": "channel"}
        elif action == "lowrank_tai":
            action, params = "lowrank_conv", {"rank": 2, "structure": "tai"}
        else:
            params = {"rank": 2}
        decisions.append(LayerDecision(site.name, action, params))
    return Plan(decisions)


@pytest.mark.parametrize("name, action", [
    *[(name, action) for name in ("mlp", "residual", "depthwise") for action in (None, "svd", "prune", "share")],
    *[(name, action) for name in ("residual", "depthwise") for action in ("lowrank_conv", "lowrank_tai")]])
def test_torch_graph_reproduces_onnxruntime(zoo_models, name, action):
    model, shape = zoo_models[name]
    model = model.clone()
    if action is not None:
        plan = _plan(model, action)
        assert plan.decisions
        applied = apply_plan(model, plan)
        assert len(applied.decisions) == len(plan.decisions)
    feeds = {model.graph.inputs[0].name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    _assert_matches_onnxruntime(model, feeds)


# Ops the zoo exports do not produce, in one graph, checked against onnxruntime
# (built with the parser and not constant-folded, so Shape/Gather chains stay).
_MANY_OPS_14 = """
<ir_version: 8, opset_import: ["" : 14]>
many (float[2, 3, 6, 6] x) => (float[2, 5] y, float[2, 4] p, float[2, 3, 4, 4] q) {
    s = Constant <value = float[3] {1.5, 0.5, 2.0}> ()
    b = Constant <value = float[3] {0.1, -0.2, 0.3}> ()
    m = Constant <value = float[3] {0.05, 0.0, -0.1}> ()
    v = Constant <value = float[3] {0.9, 1.2, 0.7}> ()
    bn = BatchNormalization <epsilon = 0.001> (x, s, b, m, v)
    hs = HardSigmoid <alpha = 0.25, beta = 0.4> (bn)
    hw = HardSwish (bn)
    t = Tanh (hw)
    sg = Sigmoid (t)
    mix = Sub (sg, hs)
    two = Constant <value = float {2.0}> ()
    dv = Div (mix, two)
    lo = Constant <value = float {-0.3}> ()
    hi = Constant <value = float {0.3}> ()
    cl = Clip (dv, lo, hi)
    pads = Constant <value = int64[8] {0, 0, 1, 0, 0, 0, 0, 2}> ()
    pv = Constant <value = float {0.25}> ()
    pd = Pad <mode = "constant"> (cl, pads, pv)
    mp = MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (pd)
    ap = AveragePool <kernel_shape = [2, 2], pads = [0, 0, 1, 1], count_include_pad = 1> (mp)
    q = Identity (ap)
    tr = Transpose <perm = [0, 2, 3, 1]> (ap)
    rm = ReduceMean <axes = [1, 2], keepdims = 1> (tr)
    ax = Constant <value = int64[1] {1}> ()
    sq = Squeeze (rm, ax)
    sh = Shape (sq)
    zero = Constant <value = int64 {0}> ()
    n = Gather <axis = 0> (sh, zero)
    ax0 = Constant <value = int64[1] {0}> ()
    n1 = Unsqueeze (n, ax0)
    minus = Constant <value = int64[1] {-1}> ()
    shape = Concat <axis = 0> (n1, minus)
    fl = Reshape (sq, shape)
    w = Constant <value = float[3, 4] {0.5, -1.0, 0.25, 2.0, 1.5, 0.0, -0.5, 1.0, -2.0, 0.75, 1.0, -1.0}> ()
    mm = MatMul (fl, w)
    f2 = Flatten <axis = 1> (mm)
    p = Softmax <axis = -1> (f2)
    batch = Cast <to = 1> (n1)
    f2s = ReduceSum <keepdims = 1> (f2, ax)
    scaled = Mul (f2s, batch)
    cc = Concat <axis = 1> (mm, scaled)
    y = Identity (cc)
}
"""


def _parse(text: str) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def test_many_ops_match_onnxruntime():
    model = _parse(_MANY_OPS_14)
    ops = {n.op_type for n in model.graph}
    assert {"BatchNormalization", "HardSwish", "Pad", "MaxPool", "AveragePool", "Shape", "Gather",
            "Softmax", "Transpose", "Squeeze", "Unsqueeze", "ReduceSum", "Cast"} <= ops
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    _assert_matches_onnxruntime(model, {"x": x})


def test_opset18_axes_inputs_and_opset11_attributes():
    text18 = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 3, 4] x) => (float[2, 1, 6] y) {
        axes = Constant <value = int64[1] {1}> ()
        r = ReduceMean <keepdims = 1> (x, axes)
        pads = Constant <value = int64[2] {1, 1}> ()
        pax = Constant <value = int64[1] {2}> ()
        v = Constant <value = float {-1.0}> ()
        y = Pad (r, pads, v, pax)
    }
    """
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    _assert_matches_onnxruntime(_parse(text18), {"x": x})
    text11 = """
    <ir_version: 6, opset_import: ["" : 11]>
    g (float[2, 3, 4] x) => (float[2, 12] y, float[2, 4] z) {
        u = Unsqueeze <axes = [0]> (x)
        s = Squeeze <axes = [0]> (u)
        c = Clip (s)
        sm = Softmax <axis = 1> (c)
        y = Flatten (sm)
        r = ReduceMean <axes = [1], keepdims = 0> (x)
        z = Relu (r)
    }
    """
    _assert_matches_onnxruntime(_parse(text11), {"x": x})


def test_unsupported_op_is_a_one_line_error_naming_the_node():
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 3] x) => (float[2, 3] y) {
        h = Relu (x)
        y = Sin (h)
    }
    """)
    next(n for n in model.graph if n.op_type == "Sin").name = "my_sin"
    with pytest.raises(PycompressError) as err:
        TorchGraph(model)
    message = str(err.value)
    assert "\n" not in message
    assert "'my_sin'" in message and "'Sin'" in message and "not supported by fine-tuning" in message


# The ops torch.onnx.export writes for a BERT-style encoder (mask arithmetic, GELU by Erf,
# LayerNormalization, position ids by Range/Slice, mean pooling and L2 normalisation).
_ENCODER_OPS_18 = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[2, 5, 4] x, int64[2, 5] mask) => (float[2, 4] y, float[2, 4, 5] z, float[2, 5, 4] w, float[2, 5] v) {
    scale = Constant <value = float[4] {1.0, 0.5, 2.0, -1.0}> ()
    bias = Constant <value = float[4] {0.1, 0.2, 0.3, 0.4}> ()
    ln = LayerNormalization <axis = -1, epsilon = 1e-5> (x, scale, bias)
    half = Constant <value = float {0.5}> ()
    lnh = Mul (ln, half)
    e = Erf (lnh)
    one = Constant <value = int64 {1}> ()
    zero = Constant <value = int64 {0}> ()
    eq = Equal (mask, one)
    ge = GreaterOrEqual (mask, zero)
    m = And (eq, ge)
    nm = Not (m)
    v = Cast <to = 1> (nm)
    axes2 = Constant <value = int64[1] {2}> ()
    shp = Constant <value = int64[3] {2, 5, 4}> ()
    mu = Unsqueeze (m, axes2)
    mexp = Expand (mu, shp)
    fill = ConstantOfShape <value = float[1] {-3.5}> (shp)
    h = Where (mexp, e, fill)
    two = Constant <value = float {2.0}> ()
    hh = Mul (h, h)
    sq = Sqrt (hh)
    pw = Pow (sq, two)
    p = Neg (pw)
    axes1 = Constant <value = int64[1] {1}> ()
    r = ReduceL2 <keepdims = 0> (p, axes1)
    last = Constant <value = int64[1] {-1}> ()
    rn = ReduceL2 <keepdims = 1> (r, last)
    y = Div (r, rn)
    start = Constant <value = int64 {0}> ()
    limit = Constant <value = int64 {5}> ()
    step = Constant <value = int64 {1}> ()
    pos = Range (start, limit, step)
    s1 = Constant <value = int64[1] {1}> ()
    e1 = Constant <value = int64[1] {100}> ()
    a0 = Constant <value = int64[1] {0}> ()
    tail = Slice (pos, s1, e1, a0)
    five = Constant <value = int64 {5}> ()
    shape141 = Constant <value = int64[3] {1, 4, 1}> ()
    shape245 = Constant <value = int64[3] {2, 4, 5}> ()
    shifted = Sub (tail, five)
    column = Reshape (shifted, shape141)
    negative = Expand (column, shape245)
    ht = Transpose <perm = [0, 2, 1]> (h)
    z = GatherElements <axis = 2> (ht, negative)
    rs = Constant <value = int64[2] {-1, 0}> ()
    re = Constant <value = int64[2] {-100, 100}> ()
    ra = Constant <value = int64[2] {1, 2}> ()
    rstep = Constant <value = int64[2] {-1, 2}> ()
    pads = Constant <value = int64[6] {0, 0, 0, 0, 0, 2}> ()
    rev = Slice (h, rs, re, ra, rstep)
    padded = Pad (rev, pads)
    w = Add (h, padded)
}
"""


def test_encoder_ops_match_onnxruntime():
    model = _parse(_ENCODER_OPS_18)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 2]], dtype=np.int64)
    _assert_matches_onnxruntime(model, {"x": x, "mask": mask})


def test_torch_graph_reproduces_onnxruntime_on_a_transformer_encoder(tmp_path):
    from transformer_models import export_tiny_encoder, token_batch
    model = load_model(export_tiny_encoder(tmp_path / "encoder.onnx"))
    assert {"LayerNormalization", "Erf", "Where", "Expand"} & {n.op_type for n in model.graph}
    _assert_matches_onnxruntime(model, token_batch(3))


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    """A 64-128-64-10 MLP trained on digits, its ONNX teacher and an svd(rank 6) student."""
    folder = tmp_path_factory.mktemp("ft_digits")
    (xtr, ytr), (xte, yte) = zoo.digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        module = zoo.train(zoo.MLP((64, 128, 64, 10)), xtr, ytr, epochs=15)
    finally:
        torch.set_num_threads(threads)
    path = export(module, (1, 64), folder / "mlp.onnx")
    teacher = load_model(path)
    gemms = [n.name for n in teacher.graph if n.op_type == "Gemm"]
    plan = Plan([LayerDecision(gemms[0], "svd", {"rank": 6}), LayerDecision(gemms[1], "svd", {"rank": 6})])
    student = teacher.clone()
    apply_plan(student, plan)
    np.savez(folder / "calib.npz", x=xtr, labels=ytr)
    plan.without_results().save(folder / "plan.json")
    return {"path": path, "teacher": teacher, "student": student, "folder": folder, "train": (xtr, ytr),
            "test": (xte, yte), "input": teacher.graph.inputs[0].name}


@pytest.mark.parametrize("use_labels", [False, True])
def test_finetune_svd_student_gets_closer_to_the_teacher_on_unseen_data(digits_mlp, tmp_path, use_labels):
    d = digits_mlp
    (xtr, ytr), (xte, yte) = d["train"], d["test"]
    student = d["student"].clone()
    before_structure = _structure(student)
    report = finetune(d["teacher"], student, {d["input"]: xtr}, ytr if use_labels else None, epochs=3, seed=0,
                      threads=1)
    assert report.kept and report.best_epoch >= 1
    assert len(report.epochs) == 3
    # trained: the factored layers' weights and their biases; the untouched last layer is not
    last = [n for n in d["teacher"].graph if n.op_type == "Gemm"][-1]
    assert last.inputs[1].name not in report.trainable
    assert any("svd_a" in n for n in report.trainable) and any("svd_b" in n for n in report.trainable)
    assert report.after.loss < report.before.loss

    # the test split was never seen by fine-tuning
    teacher_out = run_model(d["teacher"], {d["input"]: xte})[0]
    before_out = run_model(d["student"], {d["input"]: xte})[0]
    after_out = run_model(student, {d["input"]: xte})[0]
    mse_before = float(np.mean((before_out - teacher_out) ** 2))
    mse_after = float(np.mean((after_out - teacher_out) ** 2))
    assert mse_after < 0.7 * mse_before
    assert zoo.accuracy(after_out, yte) >= zoo.accuracy(before_out, yte) - 0.01

    assert _structure(student) == before_structure
    check_model(student)
    save_model(student, tmp_path / "ft.onnx")
    onnx.checker.check_model(str(tmp_path / "ft.onnx"))
    again = run_model(load_model(tmp_path / "ft.onnx"), {d["input"]: xte})[0]
    np.testing.assert_array_equal(again, after_out)
    assert report.verification["max_abs_diff"] <= report.verification["tolerance"]


def test_without_a_rate_the_lowest_probe_loss_picks_it(digits_mlp):
    d = digits_mlp
    student = d["student"].clone()
    report = finetune(d["teacher"], student, {d["input"]: d["train"][0]}, epochs=1, threads=1)
    probe = report.settings["lr_probe"]
    assert set(probe) == {"0.001", "0.0001", "1e-05"}
    assert f"{report.settings['lr']:g}" == min(probe, key=probe.get)
    given = finetune(d["teacher"], d["student"].clone(), {d["input"]: d["train"][0]}, epochs=1, lr=1e-4, threads=1)
    assert given.settings["lr_probe"] is None and given.settings["lr"] == 1e-4


def test_finetune_leaves_the_student_alone_when_no_epoch_helps(digits_mlp):
    d = digits_mlp
    student = d["student"].clone()
    values = {n: v.const_value.numpy().copy() for n, v in student.graph.initializers.items()}
    # a learning rate this large diverges: nothing beats the compressed model
    report = finetune(d["teacher"], student, {d["input"]: d["train"][0]}, epochs=1, lr=10.0, optimizer="sgd",
                      threads=1)
    assert not report.kept and report.best_epoch == 0 and report.verification is None
    for name, v in student.graph.initializers.items():
        np.testing.assert_array_equal(v.const_value.numpy(), values[name])


def test_finetune_validates_on_whole_groups_when_given(digits_mlp):
    d = digits_mlp
    x = d["train"][0]
    groups = np.arange(len(x)) % 7            # e.g. the photo each crop came from
    report = finetune(d["teacher"], d["student"].clone(), {d["input"]: x}, epochs=1, threads=1, groups=groups,
                      validation_fraction=0.2)
    held = np.asarray(report.heldout_indices)
    held_groups = set(groups[held].tolist())
    assert report.settings["validation_groups"] == sorted(held_groups)
    # whole groups: every sample of a held-out group is held out, none of the others
    np.testing.assert_array_equal(np.sort(held), np.flatnonzero(np.isin(groups, list(held_groups))))
    assert 0.2 * len(x) <= len(held) < 0.2 * len(x) + len(x) / 7 + 1
    assert report.train_samples == len(x) - len(held)


def test_finetune_groups_errors_name_the_problem(digits_mlp):
    d = digits_mlp
    x = d["train"][0]
    with pytest.raises(PycompressError, match="one per sample"):
        finetune(d["teacher"], d["student"].clone(), {d["input"]: x}, epochs=1, threads=1, groups=np.zeros(3))
    with pytest.raises(PycompressError, match="at least 2 groups"):
        finetune(d["teacher"], d["student"].clone(), {d["input"]: x}, epochs=1, threads=1,
                 groups=np.zeros(len(x)))


def test_write_back_keeps_shared_indices_and_trains_the_codebook(digits_mlp):
    d = digits_mlp
    teacher = d["teacher"]
    student = teacher.clone()
    gemm = [n for n in teacher.graph if n.op_type == "Gemm"][1]
    apply_plan(student, Plan([LayerDecision(gemm.name, "share", {"bits": 3})]))
    codebook = next(n for n in student.graph.initializers if n.endswith("_codebook"))
    indices = next(n for n in student.graph.initializers if n.endswith("_indices"))
    assert codebook in compressed_initializers(teacher, student)
    assert indices not in compressed_initializers(teacher, student)
    old_codebook = student.graph.initializers[codebook].const_value.numpy().copy()
    old_indices = student.graph.initializers[indices].const_value.numpy().copy()
    assert old_indices.dtype == np.uint8
    before_structure = _structure(student)

    report = finetune(teacher, student, {d["input"]: d["train"][0]}, epochs=2, threads=1)
    assert report.kept
    assert codebook in report.trainable
    new_indices = student.graph.initializers[indices].const_value.numpy()
    new_codebook = student.graph.initializers[codebook].const_value.numpy()
    assert new_indices.dtype == np.uint8
    np.testing.assert_array_equal(new_indices, old_indices)
    assert new_codebook.shape == old_codebook.shape and not np.array_equal(new_codebook, old_codebook)
    assert _structure(student) == before_structure
    # still 2^3 distinct weight values per channel scale: the layer is still shared
    run_model(student, {d["input"]: d["test"][0]})


def test_compress_cli_finetune_writes_a_report_that_matches_a_recomputation(digits_mlp, tmp_path):
    from pycompress.cli.main import main

    d = digits_mlp
    out = tmp_path / "small.onnx"
    code = main(["compress", str(d["path"]), "--data", str(d["folder"] / "calib.npz"), "-o", str(out),
                 "--method", str(d["folder"] / "plan.json"), "--finetune", "--finetune-epochs", "2",
                 "--finetune-batch", "32", "--threads", "1", "--quiet", "--json"])
    assert code == 0
    report = json.loads((tmp_path / "small.report" / "report.json").read_text())
    names = [s["name"] for s in report["stages"]]
    assert names.index("recover") < names.index("finetune") < names.index("verify")
    ft = report["finetune"]
    assert ft["kept"] and ft["settings"]["optimizer"] == "rmsprop" and ft["settings"]["labels"]
    assert ft["settings"]["batch_size"] == 32
    assert len(ft["epochs"]) == 2

    # recompute the held-out numbers from the written model
    x, y = d["train"]
    held = np.asarray(ft["heldout_indices"])
    teacher_out = run_model(load_model(d["path"]), {d["input"]: x[held]})[0]
    student_out = run_model(load_model(out), {d["input"]: x[held]})[0]
    mse = float(np.mean((student_out - teacher_out) ** 2))
    logp = torch.log_softmax(torch.from_numpy(student_out), 1).numpy()
    ce = float(-np.mean(logp[np.arange(len(held)), y[held]]))
    assert ft["after"]["mse"] == pytest.approx(mse, rel=1e-5)
    assert ft["after"]["loss"] == pytest.approx(mse + ce, rel=1e-5)
    assert ft["after"]["accuracy"] == pytest.approx(zoo.accuracy(student_out, y[held]))
    assert ft["after"]["loss"] < ft["before"]["loss"]
    assert ft["fidelity_after"] == report["fidelity"]["mean"]
    assert ft["fidelity_after"] < ft["fidelity_before"]


def test_compress_cli_finetunes_on_its_own_data(digits_mlp, tmp_path):
    """--finetune-data: the calibration pool stays small, fine-tuning reads the larger source."""
    from pycompress.cli.main import main

    d = digits_mlp
    x, y = d["train"]
    np.savez(tmp_path / "small_calib.npz", x=x[:200], labels=y[:200])
    np.savez(tmp_path / "more.npz", x=x, labels=y)
    out = tmp_path / "small.onnx"
    code = main(["compress", str(d["path"]), "--data", str(tmp_path / "small_calib.npz"), "-o", str(out),
                 "--method", str(d["folder"] / "plan.json"), "--finetune-data", str(tmp_path / "more.npz"),
                 "--finetune-epochs", "1", "--threads", "1", "--quiet", "--json"])
    assert code == 0
    ft = json.loads((tmp_path / "small.report" / "report.json").read_text())["finetune"]
    assert ft["train_samples"] + len(ft["heldout_indices"]) == len(x)        # the larger source, not the 200
    held = np.asarray(ft["heldout_indices"])
    student_out = run_model(load_model(out), {d["input"]: x[held]})[0]
    teacher_out = run_model(load_model(d["path"]), {d["input"]: x[held]})[0]
    assert ft["after"]["mse"] == pytest.approx(float(np.mean((student_out - teacher_out) ** 2)), rel=1e-5)


def test_compress_refuses_to_finetune_on_the_heldout_source(tmp_path, capsys):
    from pycompress.cli.main import main

    model = tmp_path / "m.onnx"
    model.write_bytes(b"never read")
    code = main(["compress", str(model), "--data", "builtin:skimage:8", "-o", str(tmp_path / "o.onnx"),
                 "--finetune-data", "builtin:skimage-heldout:64"])
    err = capsys.readouterr().err
    assert code != 0 and "--finetune-data builtin:skimage-heldout:64" in err and "held-out" in err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
def test_torch_graph_reproduces_onnxruntime_on_efficientnet(efficientnet_onnx, crops):
    model = load_model(efficientnet_onnx)
    feeds = {model.graph.inputs[0].name: crops[:4]}
    _assert_matches_onnxruntime(model, feeds)
    # pruned channels and a shared layer run the same way
    prune = [s for s in get_rewrite("prune").sites(model) if s.ok][:2]
    share = [s for s in get_rewrite("share").sites(model) if s.ok][:2]
    plan = Plan([LayerDecision(s.name, "prune", {"keep": s.info["width"] // 2}) for s in prune]
                + [LayerDecision(s.name, "share", {"bits": 4}) for s in share])
    apply_plan(model, plan)
    assert sum(n.op_type == "Gather" for n in model.graph) >= 2
    _assert_matches_onnxruntime(model, feeds)


def test_compress_validates_finetuning_on_whole_photos(tmp_path):
    """builtin:skimage crops know their photo: fine-tuning validates on photos it does not train on."""
    import pfa_models

    from pycompress.cli.main import main

    model = pfa_models.rgb_net(32)
    plan = tmp_path / "plan.json"
    assert main(["plan", str(model), "--actions", "prune", "-o", str(plan)]) == 0
    out = tmp_path / "small.onnx"
    code = main(["compress", str(model), "--data", "builtin:skimage:64", "-o", str(out), "--method", str(plan),
                 "--finetune-epochs", "1", "--finetune-lr", "1e-4", "--finetune-data", "builtin:skimage:96",
                 "--heldout", "none", "--threads", "1", "--quiet", "--json"])
    assert code == 0
    ft = json.loads((tmp_path / "small.report" / "report.json").read_text())["finetune"]
    held_photos = ft["settings"]["validation_groups"]
    assert held_photos and ft["train_samples"] + len(ft["heldout_indices"]) == 96
    from pycompress.data import load_data
    groups = load_data("builtin:skimage:96", load_model(model)).inputs[load_model(model).graph.inputs[0].name].groups
    assert set(groups[ft["heldout_indices"]]) == set(held_photos)
    train = np.setdiff1d(np.arange(96), ft["heldout_indices"])
    assert not set(groups[train]) & set(held_photos)
