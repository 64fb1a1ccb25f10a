"""Torch test architectures for channel pruning, and an independent torch-side pruner.

Each architecture comes with a hand-written *channel table*: its coupled
channel groups in torch terms (which module's output channels, which
module's input channels at which offset / flatten block), written from the
architecture's forward() and never from the ONNX analysis. ``prune_torch``
removes the same channels from the torch module by hand, so the exported
result is an oracle for the ONNX rewrite (parameter count and outputs).

Table entries, per group (keyed by the torch name of its first producer):
  ("out", module)                 output channels of a Conv/Linear (weight dim 0, bias)
  ("dw", module)                  a depthwise Conv: filters follow its input channels
  ("bn", module, offset)          BatchNorm channels at offset
  ("in", module, offset, block)   input channels of a Conv/Linear: channel c owns
                                  positions offset + [c*block, (c+1)*block)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import zoo


class PlainCNN(nn.Module):
    """conv-ReLU-BN-maxpool, conv-ReLU, flatten -> FC -> FC. Input 1x3x8x8."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)          # after the ReLU: not folded by the exporter
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc1 = nn.Linear(12 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.bn1(torch.relu(self.conv1(x))), 2)
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))

    shape = (1, 3, 8, 8)
    table = {
        "conv1": [("out", "conv1"), ("bn", "bn1", 0), ("in", "conv2", 0, 1)],
        "conv2": [("out", "conv2"), ("in", "fc1", 0, 16)],
        "fc1": [("out", "fc1"), ("in", "fc2", 0, 1)],
    }
    blocked = {"fc2": "graph output"}


class Residual(zoo.ResidualCNN):
    """zoo.ResidualCNN: identity and projection shortcuts, flatten -> FC. Input 1x1x8x8."""

    shape = (1, 1, 8, 8)
    table = {
        "stem.0": [("out", "stem.0"), ("bn", "stem.1", 0), ("out", "b1.3"), ("bn", "b1.4", 0),
                   ("in", "b1.0", 0, 1), ("in", "b2.0", 0, 1), ("in", "proj.0", 0, 1)],
        "b1.0": [("out", "b1.0"), ("bn", "b1.1", 0), ("in", "b1.3", 0, 1)],
        "b2.0": [("out", "b2.0"), ("bn", "b2.1", 0), ("in", "b2.3", 0, 1)],
        "b2.3": [("out", "b2.3"), ("bn", "b2.4", 0), ("out", "proj.0"), ("bn", "proj.1", 0),
                 ("in", "fc", 0, 16)],
    }
    blocked = {"fc": "graph output"}


class InvertedResidual(nn.Module):
    """MobileNetV2-style: expand 1x1 - depthwise 3x3 - project 1x1 with and without residual. Input 1x3x16x16."""

    def __init__(self):
        super().__init__()
        bn = nn.BatchNorm2d
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.stem_bn = bn(16)
        self.b1_expand, self.b1_bn0 = nn.Conv2d(16, 48, 1, bias=False), bn(48)
        self.b1_dw, self.b1_bn1 = nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), bn(48)
        self.b1_project, self.b1_bn2 = nn.Conv2d(48, 16, 1, bias=False), bn(16)
        self.b2_expand, self.b2_bn0 = nn.Conv2d(16, 48, 1, bias=False), bn(48)
        self.b2_dw, self.b2_bn1 = nn.Conv2d(48, 48, 3, stride=2, padding=1, groups=48, bias=False), bn(48)
        self.b2_project, self.b2_bn2 = nn.Conv2d(48, 24, 1, bias=False), bn(24)
        self.head = nn.Conv2d(24, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        act = nn.functional.relu6
        x = act(self.stem_bn(self.stem(x)))
        y = act(self.b1_bn0(self.b1_expand(x)))
        y = act(self.b1_bn1(self.b1_dw(y)))
        x = x + self.b1_bn2(self.b1_project(y))
        y = act(self.b2_bn0(self.b2_expand(x)))
        y = act(self.b2_bn1(self.b2_dw(y)))
        x = self.b2_bn2(self.b2_project(y))
        x = act(self.head(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    shape = (1, 3, 16, 16)
    table = {
        "stem": [("out", "stem"), ("bn", "stem_bn", 0), ("out", "b1_project"), ("bn", "b1_bn2", 0),
                 ("in", "b1_expand", 0, 1), ("in", "b2_expand", 0, 1)],
        "b1_expand": [("out", "b1_expand"), ("bn", "b1_bn0", 0), ("dw", "b1_dw"), ("bn", "b1_bn1", 0),
                      ("in", "b1_project", 0, 1)],
        "b2_expand": [("out", "b2_expand"), ("bn", "b2_bn0", 0), ("dw", "b2_dw"), ("bn", "b2_bn1", 0),
                      ("in", "b2_project", 0, 1)],
        "b2_project": [("out", "b2_project"), ("bn", "b2_bn2", 0), ("in", "head", 0, 1)],
        "head": [("out", "head"), ("in", "fc", 0, 1)],
    }
    blocked = {"fc": "graph output"}


class DenseBlock(nn.Module):
    """DenseNet-style: two BN-ReLU-conv layers whose outputs are concatenated, then a transition. Input 1x3x8x8."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(12), nn.Conv2d(12, 4, 3, padding=1)
        self.bn3, self.trans = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.conv1(torch.relu(self.bn1(x)))], 1)
        x = torch.cat([x, self.conv2(torch.relu(self.bn2(x)))], 1)
        x = nn.functional.avg_pool2d(self.trans(torch.relu(self.bn3(x))), 2)
        return self.fc(torch.flatten(x, 1))

    shape = (1, 3, 8, 8)
    table = {
        "stem": [("out", "stem"), ("bn", "bn1", 0), ("in", "conv1", 0, 1), ("bn", "bn2", 0), ("in", "conv2", 0, 1),
                 ("bn", "bn3", 0), ("in", "trans", 0, 1)],
        "conv1": [("out", "conv1"), ("bn", "bn2", 8), ("in", "conv2", 8, 1), ("bn", "bn3", 8), ("in", "trans", 8, 1)],
        "conv2": [("out", "conv2"), ("bn", "bn3", 12), ("in", "trans", 12, 1)],
        "trans": [("out", "trans"), ("in", "fc", 0, 16)],
    }
    blocked = {"fc": "graph output"}


class SqueezeExcite(nn.Module):
    """conv-ReLU, squeeze-excitation (GAP -> 1x1 -> ReLU -> 1x1 -> sigmoid -> Mul), conv + swish, GAP, FC. Input 1x3x8x8."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        s = self.se_expand(torch.relu(self.se_reduce(nn.functional.adaptive_avg_pool2d(x, 1))))
        x = x * torch.sigmoid(s)
        x = self.conv(x)
        x = x * torch.sigmoid(x)                                   # swish
        return self.fc(x.mean(dim=(2, 3)))

    shape = (1, 3, 8, 8)
    table = {
        "stem": [("out", "stem"), ("out", "se_expand"), ("in", "se_reduce", 0, 1), ("in", "conv", 0, 1)],
        "se_reduce": [("out", "se_reduce"), ("in", "se_expand", 0, 1)],
        "conv": [("out", "conv"), ("in", "fc", 0, 1)],
    }
    blocked = {"fc": "graph output"}


class MLP(zoo.MLP):
    shape = (1, 64)
    table = {
        "net.0": [("out", "net.0"), ("in", "net.2", 0, 1)],
        "net.2": [("out", "net.2"), ("in", "net.4", 0, 1)],
    }
    blocked = {"net.4": "graph output"}


class TransposeOverChannels(nn.Module):
    """conv -> conv -> permute NCHW->NHWC -> Linear over channels. The second conv's group is blocked."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv1(torch.relu(self.conv0(x)))
        return self.fc(x.permute(0, 2, 3, 1))

    shape = (1, 3, 4, 4)
    table = {"conv0": [("out", "conv0"), ("in", "conv1", 0, 1)]}
    blocked = {"conv1": "Transpose", "fc": "graph output"}


class SoftmaxOverChannels(nn.Module):
    """conv -> conv -> softmax over channels -> conv. The second conv's group is blocked."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 8, 1)
        self.conv2 = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = self.conv1(torch.relu(self.conv0(x)))
        return self.conv2(torch.softmax(x, dim=1))

    shape = (1, 3, 4, 4)
    table = {"conv0": [("out", "conv0"), ("in", "conv1", 0, 1)]}
    blocked = {"conv1": "Softmax", "conv2": "graph output"}


ARCHITECTURES = [PlainCNN, Residual, InvertedResidual, DenseBlock, SqueezeExcite, MLP]


def build(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.randomize_bn(cls()).eval()


def efficientnet_table(model: nn.Module) -> dict[str, list[tuple]]:
    """The channel table of efficientnet_lite_pytorch's EfficientNet, from its forward() semantics."""
    table: dict[str, list[tuple]] = {"_conv_stem": [("out", "_conv_stem"), ("bn", "_bn0", 0)]}
    current = "_conv_stem"                      # the group carrying the block input
    for i, block in enumerate(model._blocks):
        p = f"_blocks.{i}"
        args = block._block_args
        assert not block.has_se, "EfficientNet-Lite has no squeeze-excitation"
        if args.expand_ratio != 1:
            table[current].append(("in", f"{p}._expand_conv", 0, 1))
            inner = f"{p}._expand_conv"
            table[inner] = [("out", inner), ("bn", f"{p}._bn0", 0)]
        else:
            inner = current
        table[inner] += [("dw", f"{p}._depthwise_conv"), ("bn", f"{p}._bn1", 0), ("in", f"{p}._project_conv", 0, 1)]
        project = [("out", f"{p}._project_conv"), ("bn", f"{p}._bn2", 0)]
        if block.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
            table[current] += project           # residual: x + inputs
        else:
            current = f"{p}._project_conv"
            table[current] = project
    table[current].append(("in", "_conv_head", 0, 1))
    table["_conv_head"] = [("out", "_conv_head"), ("bn", "_bn1", 0), ("in", "_fc", 0, 1)]
    return table


def torch_name(onnx_node: str) -> str:
    """Legacy exporter scope -> module path: '/b1/b1.0/Conv' -> 'b1.0', '/_blocks.3/_expand_conv/Conv' ->
    '_blocks.3._expand_conv' (children of containers repeat the parent's path, others do not)."""
    path = ""
    for part in onnx_node.strip("/").split("/")[:-1]:
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path


def table_width(module: nn.Module, specs: list[tuple]) -> int:
    kind, name = specs[0][:2]
    assert kind == "out"
    return module.get_submodule(name).weight.shape[0]


def prune_torch(module: nn.Module, table: dict[str, list[tuple]], keep: dict[str, np.ndarray]) -> nn.Module:
    """Remove, in place, the channels of each table group not in ``keep[group]`` (group channel numbers)."""
    masks: dict[tuple[str, int], np.ndarray] = {}
    for key, specs in table.items():
        width = table_width(module, specs)
        removed = np.setdiff1d(np.arange(width), keep.get(key, np.arange(width)))
        for spec in specs:
            kind, name = spec[:2]
            sub = module.get_submodule(name)
            if kind in ("out", "dw", "bn"):
                dim, offset, block = 0, (spec[2] if kind == "bn" else 0), 1
                length = sub.num_features if kind == "bn" else sub.weight.shape[0]
            else:
                dim, offset, block = 1, spec[2], spec[3]
                length = sub.weight.shape[1]
            mask = masks.setdefault((name, dim), np.ones(length, dtype=bool))
            for c in removed:
                mask[offset + c * block: offset + (c + 1) * block] = False
    with torch.no_grad():
        for (name, dim), mask in masks.items():
            idx = torch.from_numpy(np.nonzero(mask)[0])
            sub = module.get_submodule(name)
            if isinstance(sub, nn.BatchNorm2d):
                for attr in ("weight", "bias"):
                    setattr(sub, attr, nn.Parameter(getattr(sub, attr)[idx]))
                sub.running_mean = sub.running_mean[idx]
                sub.running_var = sub.running_var[idx]
                sub.num_features = len(idx)
                continue
            sub.weight = nn.Parameter(sub.weight.index_select(dim, idx))
            if dim == 0:
                if sub.bias is not None:
                    sub.bias = nn.Parameter(sub.bias[idx])
                if isinstance(sub, nn.Conv2d) and sub.groups > 1:        # depthwise
                    sub.groups = sub.in_channels = len(idx)
    return module.eval()
