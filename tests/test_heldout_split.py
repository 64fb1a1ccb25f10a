"""Held-out quality on other photos: disjoint image splits, agreement / top-5 / KL, compress's held-out section."""

import json

import numpy as np
import pfa_models
import pytest

from pycompress.cli.main import main
from pycompress.data import default_heldout, images, load_data
from pycompress.fidelity.compare import classifier_agreement, compare_outputs
from pycompress.ir import load_model


def test_splits_crop_disjoint_photos(monkeypatch):
    # Each photo a solid colour of its own: a crop's pixels name the photo it came from.
    names = images.SKIMAGE_PHOTOS
    colour = {name: np.full((64, 96, 3), 20 * (k + 1), np.uint8) for k, name in enumerate(names)}
    monkeypatch.setattr(images, "_skimage_photo", lambda name: colour[name])
    model = load_model(pfa_models.rgb_net(32))
    spec = images.Preprocess.parse("mean=none,std=none,scale=1")

    def photos_used(source: str) -> set[str]:
        x = np.asarray(load_data(source, model, preprocess=spec).inputs["input"])
        return {names[round(v / 20) - 1] for v in x[:, 0, 0, 0]}

    calibration, heldout = photos_used("builtin:skimage:60"), photos_used("builtin:skimage-heldout:60")
    assert calibration == set(images.SKIMAGE_CALIBRATION_PHOTOS)
    assert heldout == set(images.SKIMAGE_HELDOUT_PHOTOS)
    assert not calibration & heldout


def test_heldout_split_loads_real_photos_and_defaults():
    model = load_model(pfa_models.rgb_net(32))
    held = load_data("builtin:skimage-heldout:8", model).inputs["input"]
    assert held.shape == (8, 3, 32, 32) and "chelsea" in held.description
    assert len(load_data("builtin:skimage-heldout", model)) == images.SKIMAGE_HELDOUT_DEFAULT_COUNT
    assert default_heldout("builtin:skimage:256") == "builtin:skimage-heldout:160"
    assert default_heldout("builtin:skimage-heldout:10") is None and default_heldout("calib.npz") is None


def test_classifier_agreement_top5_and_kl():
    ref = np.array([[5.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0],
                    [0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    out = np.array([[1.0, 5.0, 0.0, 0.0, 0.0, 0.0, -1.0],      # top-1 lost, still in the top 5
                    [0.0, -9.0, 1.0, 1.0, 1.0, 1.0, 1.0]])      # top-1 lost, out of the top 5
    got = classifier_agreement(ref, out)
    assert got["top1_agreement"] == 0.0 and got["top5_containment"] == 0.5

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(ref), softmax(out)
    assert got["kl_divergence"] == pytest.approx(np.mean((p * np.log(p / q)).sum(1)))
    # Rows that are already distributions are taken as they are.
    assert classifier_agreement(p, q)["kl_divergence"] == pytest.approx(got["kl_divergence"])
    same = compare_outputs(ref, ref)
    assert same.top1_agreement == 1.0 and same.top5_containment == 1.0 and same.kl_divergence == pytest.approx(0.0)


def test_compress_reports_quality_on_heldout_photos(tmp_path, capsys):
    model = pfa_models.rgb_net(32)
    out = tmp_path / "small.onnx"
    code = main(["compress", str(model), "--data", "builtin:skimage:32", "--method", "pfa", "--target-size", "0.6",
                 "--no-recover", "--samples", "16", "-o", str(out), "--json", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "small.report" / "report.json").read_text())
    held = report["heldout"]
    assert held["source"] == "builtin:skimage-heldout:160" and held["samples"] == 160
    assert 0.0 <= held["top1_agreement"] <= held["top5_containment"] <= 1.0 and held["kl_divergence"] >= 0
    assert "Held-out data" in (tmp_path / "small.report" / "report.md").read_text()
