"""`pycompress analyze` end to end, and the image data sources it reads."""

import json
import re

import numpy as np
import pytest
from PIL import Image

import pfa_models
from pycompress.cli.main import main
from pycompress.data import LazySamples, Preprocess, load_data
from pycompress.errors import PycompressError
from pycompress.ir import load_model, model_cost
from pycompress.plan import Plan


@pytest.fixture(scope="module")
def cnn_path():
    return pfa_models.digits_cnn()[1]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_writes_table_plan_json_and_plots(cnn_path, tmp_path, capsys):
    out_dir = tmp_path / "analysis"
    code, out, err = run_cli(capsys, "analyze", cnn_path, "--data", "builtin:digits", "-o", out_dir,
                             "--no-progress")
    assert code == 0, err
    assert "En 0.95" in out and "KL" in out and "H/logC" in out
    assert re.search(r"/fc2/Gemm \(width 10\): .*graph output", out)
    payload = json.loads((out_dir / "analysis.json").read_text())
    assert payload["recipe"] == "kl" and payload["samples"] == 1797
    layers = {row["site"]: row for row in payload["layers"]}
    assert set(layers) == {"group:/c1/Conv", "group:/c2/Conv", "group:/fc1/Gemm"}
    for site, row in layers.items():
        assert row["keep_plan"] == row["keep_kl"] <= row["width"]
        assert len(row["spectrum"]) == row["width"] and abs(sum(row["spectrum"]) - 1) < 1e-9
        line = next(l for l in out.splitlines() if l.startswith(site + " "))
        assert line.split()[-3] == str(row["keep_kl"])       # the table shows what the JSON says
    plan = Plan.load(out_dir / "plan.json")
    assert {d.site for d in plan.decisions} == {s for s, r in layers.items() if r["keep_plan"] < r["width"]}
    for d in plan.decisions:
        assert d.action == "prune" and len(d.params["keep_indices"]) == layers[d.site]["keep_plan"]
    costs = payload["cost"]["params"]
    assert costs["plan"] < costs["original"] and costs["plan"] == costs["kl"]
    for name in ("spectra_01.png", "cost_vs_tau.png", "kept_per_layer.png"):
        with Image.open(out_dir / name) as image:
            assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 300
    assert sorted(payload["plots"]) == sorted(str(out_dir / n) for n in
                                              ("spectra_01.png", "cost_vs_tau.png", "kept_per_layer.png"))
    # `pycompress apply` executes the plan with the channel-pruning rewrite.
    code, out, err = run_cli(capsys, "apply", cnn_path, out_dir / "plan.json", "-o", tmp_path / "small.onnx")
    assert code == 0, err
    assert model_cost(load_model(tmp_path / "small.onnx")).params == pytest.approx(costs["plan"])


def test_analyze_target_and_energy_recipes(cnn_path, tmp_path, capsys):
    code, out, err = run_cli(capsys, "analyze", cnn_path, "--data", "builtin:digits", "-o", tmp_path / "t",
                             "--target-size", "0.5", "--measure", "macs", "--json", "--no-plots")
    assert code == 0, err
    payload = json.loads(out)
    macs = payload["cost"]["macs"]
    assert payload["recipe"] == "target" and macs["plan"] <= 0.5 * macs["original"]
    assert 0 <= payload["tau"] <= 1 and not list((tmp_path / "t").glob("*.png"))
    code, out, err = run_cli(capsys, "analyze", cnn_path, "--data", "builtin:digits", "-o", tmp_path / "e",
                             "--energy", "0.9", "--json", "--no-plots")
    payload = json.loads(out)
    assert code == 0 and payload["recipe"] == "energy" and payload["tau"] == 0.9
    assert all(row["keep_plan"] == row["keep_energy"]["0.9"] for row in payload["layers"])


def test_analyze_after_activation_uses_the_relu_outputs(cnn_path, tmp_path, capsys):
    code, out, err = run_cli(capsys, "analyze", cnn_path, "--data", "builtin:digits", "-o", tmp_path,
                             "--after", "activation", "--json", "--no-plots")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["response"] == "activation"
    assert [row["responses"] for row in payload["layers"]] == [["/Relu_output_0"], ["/Relu_1_output_0"],
                                                                ["/Relu_2_output_0"]]


@pytest.mark.parametrize("argv, message", [
    (["--energy", "1.5"], "--energy 1.5: must be in [0, 1]"),
    (["--target-size", "0"], "--target-size 0.0: must be in (0, 1]"),
    (["--target-size", "0.0001"], "out of reach"),
    (["--taus", "0.9,x"], "--taus"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--min-keep", "0"], "--min-keep 0: must be >= 1"),
])
def test_analyze_errors_are_one_line(cnn_path, tmp_path, capsys, argv, message):
    code, out, err = run_cli(capsys, "analyze", cnn_path, "--data", "builtin:digits", "-o", tmp_path,
                             "--no-progress", "--no-plots", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_recipe_options_are_exclusive(cnn_path, capsys):
    code, _, err = run_cli(capsys, "analyze", cnn_path, "--data", "builtin:digits", "--kl", "--energy", "0.9")
    assert code == 2 and "not allowed with" in err


# ---------------------------------------------------------------- image data

def write_images(folder):
    rng = np.random.default_rng(0)
    folder.mkdir()
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(folder / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 20), dtype=np.uint8)).save(folder / "c.bmp")   # grayscale
    (folder / "notes.txt").write_text("not an image")


def test_image_folder_is_lazy_and_preprocessed_as_specified(tmp_path):
    model = load_model(pfa_models.rgb_net(32))
    write_images(tmp_path / "imgs")
    cal = load_data(str(tmp_path / "imgs"), model, preprocess="mean=0.5:0.5:0.5,std=0.25")
    x = cal.inputs["input"]
    assert isinstance(x, LazySamples) and x.shape == (3, 3, 32, 32) and x.dtype == np.float32
    # a.png (40x60): shorter side to 32 -> 32x48, centre crop 32x32, /255, (x - .5) / .25, CHW.
    image = Image.open(tmp_path / "imgs" / "a.png").resize((48, 32), Image.BILINEAR).crop((8, 0, 40, 32))
    expected = ((np.asarray(image, np.float32) / 255 - 0.5) / 0.25).transpose(2, 0, 1)
    np.testing.assert_allclose(x[0], expected, atol=1e-6)
    batches = list(cal.batches(2))
    assert [b["input"].shape[0] for b in batches] == [2, 1]
    gray = batches[0]["input"][1]                   # files sorted by path: a.png, c.bmp, sub/b.jpg
    assert np.allclose(gray[0], gray[1]) and np.allclose(gray[1], gray[2])  # grayscale -> 3 equal channels
    assert not np.allclose(batches[1]["input"][0, 0], batches[1]["input"][0, 1])
    stretched = load_data(str(tmp_path / "imgs"), model, preprocess="resize=stretch").inputs["input"][0]
    assert not np.allclose(stretched, x[0])


def test_builtin_skimage_crops_are_deterministic_and_normalized():
    model = load_model(pfa_models.rgb_net(32))
    a = load_data("builtin:skimage:40", model)
    b = load_data("builtin:skimage:40", model)
    xa = a.inputs["input"]
    assert len(a) == 40 and xa.shape == (40, 3, 32, 32)
    np.testing.assert_array_equal(xa[10:20], b.inputs["input"][10:20])
    np.testing.assert_array_equal(xa[[3, 17]], np.stack([xa[3], xa[17]]))
    full = np.asarray(xa)
    assert -1.0 < full.mean() < 1.0 and 0.5 < full.std() < 2.0      # ImageNet-normalized photos
    assert len(load_data("builtin:skimage", model)) == 2000


def test_analyze_on_image_crops(tmp_path, capsys):
    code, out, err = run_cli(capsys, "analyze", pfa_models.rgb_net(32), "--data", "builtin:skimage:48",
                             "-o", tmp_path, "--json", "--no-plots")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["samples"] == 48 and [row["width"] for row in payload["layers"]] == [8, 16]
    assert [s["site"] for s in payload["skipped"]] == ["group:/fc/Gemm"]


@pytest.mark.parametrize("spec, message", [
    ("size=abc", "expected N or HxW"),
    ("layout=chwn", "expected nchw or nhwc"),
    ("std=0", "must be positive"),
    ("color=1", "unknown key"),
    ("mean", "expected key=value"),
])
def test_preprocess_spec_errors(spec, message):
    with pytest.raises(PycompressError, match=message):
        Preprocess.parse(spec)


def test_image_data_mismatches_are_clear(tmp_path):
    model = load_model(pfa_models.rgb_net(32))
    write_images(tmp_path / "imgs")
    with pytest.raises(PycompressError, match=r"size=64x64 but the model input is 32x32"):
        load_data(str(tmp_path / "imgs"), model, preprocess="size=64")
    with pytest.raises(PycompressError, match="3 values for 1 channel"):
        Preprocess.parse("mean=imagenet").resolve((None, 1, 8, 8), "x")
    with pytest.raises(PycompressError, match="cannot tell the channel axis"):
        Preprocess().resolve((None, 5, 8, 8), "x")
    with pytest.raises(PycompressError, match="give --preprocess size"):
        Preprocess().resolve((None, 3, None, None), "x")
    with pytest.raises(PycompressError, match="no image files"):
        (tmp_path / "empty").mkdir()
        load_data(str(tmp_path / "empty"), model)
    with pytest.raises(PycompressError, match="COUNT must be a positive integer"):
        load_data("builtin:skimage:0", model)
    with pytest.raises(PycompressError, match="unknown built-in source"):
        load_data("builtin:digits:5", model)
    with pytest.raises(PycompressError, match="--preprocess applies to image folders"):
        load_data("builtin:digits", model, preprocess="size=32")
    digits_cnn = load_model(pfa_models.digits_cnn()[1])
    with pytest.raises(PycompressError, match=r"images need a 4-D model input .* got 2-D"):
        load_data("builtin:skimage:4", load_model(_mlp(tmp_path)))
    assert load_data("builtin:skimage:4", digits_cnn).inputs["input"].shape == (4, 1, 8, 8)


def _mlp(tmp_path):
    import zoo
    from conftest import export

    return export(zoo.MLP((64, 16, 10)), (1, 64), tmp_path / "mlp.onnx")
