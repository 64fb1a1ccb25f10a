import math

import pytest
import torch

import zoo
from conftest import export
from pycompress.ir import load_model, model_cost


def test_mlp_params_and_macs(tmp_path):
    module = zoo.MLP((64, 32, 16, 10))
    cost = model_cost(load_model(export(module, (1, 64), tmp_path / "mlp.onnx")))
    assert cost.params == zoo.torch_params(module)
    assert cost.macs == 64 * 32 + 32 * 16 + 16 * 10
    assert cost.bytes == 4 * cost.params


def test_depthwise_block_params_and_macs(tmp_path):
    module = zoo.DepthwiseBlock()
    cost = model_cost(load_model(export(module, (1, 3, 16, 16), tmp_path / "dw.onnx")))
    assert cost.params == zoo.torch_params(module)
    expected = (zoo.conv_macs(8, 3, 3, 3, 8, 8)      # stem, stride 2 -> 8x8
                + zoo.conv_macs(8, 1, 3, 3, 8, 8)    # depthwise: one input channel per group
                + zoo.conv_macs(16, 8, 1, 1, 8, 8)   # pointwise
                + 16 * 10)
    assert cost.macs == expected
    convs = [l for l in cost.layers if l.op == "Conv"]
    assert [l.weight_shape for l in convs] == [[8, 3, 3, 3], [8, 1, 3, 3], [16, 8, 1, 1]]


def test_residual_cnn_with_bn_is_folded(tmp_path):
    module = zoo.randomize_bn(zoo.ResidualCNN(width=8))
    cost = model_cost(load_model(export(module, (1, 1, 8, 8), tmp_path / "res.onnx")))
    # Eval-mode export folds BN into the conv: BN's gamma and beta (2 per
    # channel) disappear and the conv gains a bias (1 per channel).
    assert cost.params == zoo.torch_params(module) - zoo.bn_channels(module)
    w = 8
    expected = (zoo.conv_macs(w, 1, 3, 3, 8, 8) + 2 * zoo.conv_macs(w, w, 3, 3, 8, 8)
                + zoo.conv_macs(2 * w, w, 3, 3, 4, 4) + zoo.conv_macs(2 * w, 2 * w, 3, 3, 4, 4)
                + zoo.conv_macs(2 * w, w, 1, 1, 4, 4) + 2 * w * 16 * 10)
    assert cost.macs == expected


def test_dilated_strided_grouped_conv_macs(tmp_path):
    module = torch.nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=4)
    cost = model_cost(load_model(export(module, (1, 8, 15, 11), tmp_path / "c.onnx")))
    ho = (15 + 4 - 2 * 2 - 1) // 2 + 1
    wo = (11 + 2 - 5) // 1 + 1
    assert cost.macs == zoo.conv_macs(12, 2, 3, 5, ho, wo)
    assert cost.params == 12 * 2 * 3 * 5 + 12


def test_matmul_of_two_activations_counts_macs_without_params(tmp_path):
    class Attn(torch.nn.Module):
        def forward(self, x):
            return x @ x.transpose(1, 2)

    cost = model_cost(load_model(export(Attn(), (1, 6, 4), tmp_path / "a.onnx")))
    assert cost.params == 0
    assert cost.macs == 6 * 6 * 4


@pytest.mark.slow
def test_efficientnet_lite0_counts(efficientnet_torch, efficientnet_onnx):
    assert zoo.torch_params(efficientnet_torch) == 4_652_008
    cost = model_cost(load_model(efficientnet_onnx))
    assert cost.params == 4_631_000
    assert cost.params == zoo.torch_params(efficientnet_torch) - zoo.bn_channels(efficientnet_torch)
    # EfficientNet-Lite0 is ~0.4 GMACs at 224x224.
    assert 3.5e8 < cost.macs < 4.5e8
    assert math.isclose(cost.bytes, 4 * cost.params)
