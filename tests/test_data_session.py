import numpy as np
import pytest

import zoo
from conftest import export
from pycompress.data import load_data
from pycompress.errors import PycompressError
from pycompress.fidelity import collect_activations, run_model
from pycompress.ir import load_model


@pytest.fixture
def mlp(tmp_path):
    module = zoo.MLP((64, 32, 10))
    return module, load_model(export(module, (1, 64), tmp_path / "mlp.onnx"))


def test_builtin_digits_and_activations_match_torch(mlp):
    module, model = mlp
    cal = load_data("builtin:digits", model)
    assert len(cal) == 1797 and cal.labels is not None
    hidden = [n.outputs[0].name for n in model.graph if n.op_type == "Gemm"][0]
    blocks = list(collect_activations(model, [hidden], cal.batches(700)))
    assert [b[hidden].shape for b in blocks] == [(700, 32), (700, 32), (397, 32)]
    import torch
    with torch.no_grad():
        expected = module.net[0](torch.from_numpy(cal.inputs["input"])).numpy()
    np.testing.assert_allclose(np.concatenate([b[hidden] for b in blocks]), expected, atol=1e-5)
    np.testing.assert_allclose(run_model(model, cal.inputs, batch_size=100)[0],
                               module(torch.from_numpy(cal.inputs["input"])).detach().numpy(), atol=1e-5)


def test_npz_shape_and_dtype_mismatch_are_clear(mlp, tmp_path):
    _, model = mlp
    np.savez(tmp_path / "bad.npz", input=np.zeros((5, 63), np.float32))
    with pytest.raises(PycompressError, match=r"shape \(5, 63\).*expects"):
        load_data(str(tmp_path / "bad.npz"), model)
    np.savez(tmp_path / "int.npz", input=np.zeros((5, 64), np.int64))
    with pytest.raises(PycompressError, match="dtype int64"):
        load_data(str(tmp_path / "int.npz"), model)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(PycompressError, match="cannot read data"):
        load_data(str(tmp_path / "obj.npy"), model)
    with pytest.raises(PycompressError, match="unknown built-in"):
        load_data("builtin:mnist", model)
    good = np.random.default_rng(0).normal(size=(7, 64)).astype(np.float32)
    np.savez(tmp_path / "good.npz", input=good, labels=np.arange(7))
    cal = load_data(str(tmp_path / "good.npz"), model)
    assert len(cal) == 7 and list(cal.labels) == list(range(7))
