"""Residual blocks and resolution stages found on exported graphs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from conftest import export
from pycompress.ir import load_model
from pycompress.ir.blocks import block_labels, stage_labels


class TinyResNet(nn.Module):
    """Stem, two identity blocks, one projection block, GAP, FC: 3 residual blocks + classifier."""

    def __init__(self, w=4):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1)

        def branch(ci, co, stride):
            return nn.Sequential(nn.Conv2d(ci, co, 3, stride, 1), nn.ReLU(), nn.Conv2d(co, co, 3, 1, 1))
        self.b1, self.b2 = branch(w, w, 1), branch(w, w, 1)
        self.b3, self.proj = branch(w, 2 * w, 2), nn.Conv2d(w, 2 * w, 1, 2)
        self.fc = nn.Linear(2 * w, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.b1(x))
        x = torch.relu(x + self.b2(x))
        x = torch.relu(self.proj(x) + self.b3(x))
        return self.fc(x.mean(dim=(2, 3)))


def _convs_and_gemms(model):
    return [n for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")]


def test_blocks_of_a_resnet_follow_its_residual_blocks(tmp_path):
    model = load_model(export(TinyResNet(), (1, 3, 16, 16), tmp_path / "r.onnx"))
    labels = block_labels(model)
    layers = [labels[n.name] for n in _convs_and_gemms(model)]
    # stem + b1's two convs; b2's two convs; b3's two convs + projection; the classifier.
    assert len(layers) == 9
    assert layers[0] == layers[1] == layers[2]
    assert layers[3] == layers[4] != layers[2]
    assert len(set(layers[5:8])) == 1 and layers[5] != layers[4]
    assert layers[8] not in layers[:8]
    assert len(set(layers)) == 4


def test_an_mlp_has_one_block_per_layer(tmp_path):
    model = load_model(export(zoo.MLP((64, 32, 16, 10)), (2, 64), tmp_path / "m.onnx"))
    layers = [block_labels(model)[n.name] for n in _convs_and_gemms(model)]
    assert len(layers) == 3 and len(set(layers)) == 3


def test_stages_follow_resolution(tmp_path):
    model = load_model(export(TinyResNet(), (1, 3, 16, 16), tmp_path / "r.onnx"))
    labels = stage_labels(model)
    layers = [labels[n.name] for n in _convs_and_gemms(model)]
    assert layers[:5] == ["stage16x16"] * 5
    assert set(layers[5:8]) == {"stage8x8"}
    assert layers[8].startswith("node:")


@pytest.mark.slow
def test_efficientnet_blocks_and_stages(efficientnet_onnx):
    model = load_model(efficientnet_onnx)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    blocks = {block_labels(model)[n.name] for n in convs}
    stages = {stage_labels(model)[n.name] for n in convs}
    # 9 residual blocks (each closing a run of plain blocks) plus the plain tail
    # (last MBConv's 3 convs and the head conv).
    assert len(blocks) == 9 + 4
    assert stages == {"stage112x112", "stage56x56", "stage28x28", "stage14x14", "stage7x7"}
