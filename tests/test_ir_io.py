import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from pycompress.errors import PycompressError
from pycompress.ir import check_external_data, load_model, save_model


def tiny_model_proto(opset=13):
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "W")
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def with_external(proto, location):
    tensor = proto.graph.initializer[0]
    tensor.ClearField("float_data")
    tensor.raw_data = b""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=location)
    return proto


def test_load_keeps_opset_and_ir_version_and_infers_shapes(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_model_proto(opset=13), path)
    model = load_model(path)
    assert model.ir_version == 8
    assert model.opset_imports[""] == 13
    out = tmp_path / "out.onnx"
    save_model(model, out)
    again = onnx.load(out)
    assert again.ir_version == 8 and again.opset_import[0].version == 13
    assert [d.dim_param or d.dim_value for d in again.graph.output[0].type.tensor_type.shape.dim] == ["N", 4]


@pytest.mark.parametrize("location", ["/etc/passwd", "../secret.bin", "sub/../../secret.bin"])
def test_external_data_outside_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 48)
    path = folder / "m.onnx"
    path.write_bytes(with_external(tiny_model_proto(), location).SerializeToString())
    with pytest.raises(PycompressError, match="outside the model's folder"):
        load_model(path)


def test_external_data_symlink_escaping_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 48)
    os.symlink(tmp_path / "secret.bin", folder / "w.bin")
    path = folder / "m.onnx"
    path.write_bytes(with_external(tiny_model_proto(), "w.bin").SerializeToString())
    with pytest.raises(PycompressError, match="resolves outside"):
        load_model(path)


def test_external_data_inside_folder_loads(tmp_path):
    proto = tiny_model_proto()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    assert check_external_data(onnx.load(path, load_external_data=False), path) == 48
    model = load_model(path)
    w = model.graph.initializers["W"].const_value.numpy()
    np.testing.assert_array_equal(w, np.arange(12, dtype=np.float32).reshape(3, 4) / 10)


def test_truncated_and_garbage_files_give_one_line_errors(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(tiny_model_proto(), good)
    data = good.read_bytes()
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model\n" * 10)
    for path in (truncated, garbage, tmp_path / "missing.onnx"):
        with pytest.raises(PycompressError) as err:
            load_model(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_checker_failure_is_reported(tmp_path):
    proto = tiny_model_proto()
    proto.graph.node[0].input[1] = "missing_tensor"
    path = tmp_path / "bad.onnx"
    onnx.save(proto, path)
    with pytest.raises(PycompressError, match="checker"):
        load_model(path)


def test_save_refuses_to_overwrite_input_and_is_atomic(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_model_proto(), path)
    before = path.read_bytes()
    model = load_model(path)
    with pytest.raises(PycompressError, match="overwrite the input"):
        save_model(model, path)
    assert path.read_bytes() == before
    save_model(model, path, overwrite_input=True)
    assert onnx.load(path).graph.node[0].op_type == "MatMul"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp files left behind


def test_save_with_external_data_round_trips(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_model_proto(), path)
    model = load_model(path)
    out = tmp_path / "big.onnx"
    save_model(model, out, external_data=True)
    assert (tmp_path / "big.onnx.data").is_file()
    reloaded = load_model(out)
    np.testing.assert_array_equal(reloaded.graph.initializers["W"].const_value.numpy(),
                                  model.graph.initializers["W"].const_value.numpy())


def test_atomic_writes_use_the_umask_mode(tmp_path):
    from pycompress.ir import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "plan.json", "{}")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_truncated_model_computes_the_intermediate_tensor_only(tmp_path):
    import zoo
    from conftest import export
    from pycompress.fidelity import make_session, run_tensors
    from pycompress.ir import truncated

    model = load_model(export(zoo.ResidualCNN(), (2, 1, 8, 8), tmp_path / "r.onnx"))
    nodes = list(model.graph)
    name = nodes[len(nodes) // 2].outputs[0].name
    small = truncated(model, [name])
    assert 0 < len(list(small.graph)) < len(nodes) and [v.name for v in small.graph.outputs] == [name]
    x = {model.graph.inputs[0].name: np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)}
    want = run_tensors(make_session(model, extra_outputs=[name]), [name], x)[0]
    got = run_tensors(make_session(small), [name], x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert len(list(model.graph)) == len(nodes)            # the original is untouched
    with pytest.raises(PycompressError, match="not produced"):
        truncated(model, ["nope"])


def test_saved_models_carry_no_inferred_intermediate_shapes(tmp_path):
    """Inferred value_info is not written (onnxruntime fuses differently with it, see
    intermediate_shapes_hidden); the model in memory keeps its shapes; graph outputs keep theirs."""
    relu = helper.make_node("Relu", ["y"], ["z"], name="relu")
    proto = tiny_model_proto()
    proto.graph.node.append(relu)
    proto.graph.output[0].name = "z"
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    model = load_model(path)
    middle = next(n for n in model.graph if n.name == "mm").outputs[0]
    assert middle.shape is not None                               # inferred on load
    save_model(model, tmp_path / "out.onnx")
    saved = onnx.load(tmp_path / "out.onnx")
    assert "y" not in {v.name for v in saved.graph.value_info}
    assert [d.dim_param or d.dim_value for d in saved.graph.output[0].type.tensor_type.shape.dim] == ["N", 4]
    assert middle.shape is not None and middle.type is not None   # restored after writing
