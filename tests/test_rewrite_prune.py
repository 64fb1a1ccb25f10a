"""The 'prune' rewrite: numerics with onnxruntime, a hand-pruned torch oracle, clean failures."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

import prune_models as pm
from conftest import export
from pycompress.errors import PycompressError
from pycompress.fidelity.session import make_session
from pycompress.ir import load_model, model_cost
from pycompress.ir.channels import channel_group, channel_groups
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import REGISTRY, apply_plan
from pycompress.rewrites.prune_channels import l1_scores

PRUNE = REGISTRY["prune"]


def load_arch(cls, tmp_path, seed=0):
    module = pm.build(cls, seed)
    return module, load_model(export(module, cls.shape, tmp_path / f"{cls.__name__}.onnx"))


def run(model, x):
    session = make_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def inputs_for(shape, n=3, seed=1):
    return np.random.default_rng(seed).standard_normal((n,) + tuple(shape[1:])).astype(np.float32)


def set_constant(model, node, index, array):
    """Give ``node`` input ``index`` a new value (a private copy: shared constants stay intact)."""
    from pycompress.ir import add_initializer

    node.replace_input_with(index, add_initializer(model, "zeroed", np.ascontiguousarray(array)))


def zero_channels(model, removed: dict[str, np.ndarray]) -> None:
    """Zero, in ONNX, what makes the removed channels exactly zero: producer weights and
    biases, BatchNormalization beta and mean (so BN(0) = 0), and depthwise biases (the
    exporter folds the BN after a depthwise conv into its bias)."""
    for group in channel_groups(model):
        if group.id not in removed:
            continue
        for s in group.slices:
            wanted = (s.role in ("producer weight", "producer bias", "depthwise bias")
                      or (s.role == "batchnorm" and s.input_index in (2, 3)))
            if not wanted:
                continue
            mask = np.isin(s.channels, removed[group.id])
            array = np.array(s.ir_node.inputs[s.input_index].const_value.numpy(), copy=True)
            index = [slice(None)] * array.ndim
            index[s.axis] = s.positions[mask]
            array[tuple(index)] = 0
            set_constant(model, s.ir_node, s.input_index, array)


def random_removal(groups, rng, fraction=0.5):
    out = {}
    for g in groups:
        if g.prunable:
            n = min(g.width - 1, max(1, int(g.width * fraction)))
            out[g.id] = np.sort(rng.choice(g.width, size=n, replace=False))
    return out


def keep_plan(groups, removed):
    return Plan([LayerDecision(g.id, "prune", {"keep_indices": sorted(set(range(g.width)) - set(removed[g.id].tolist()))})
                 for g in groups if g.id in removed])


def assert_zero_channels_prune_exactly(model, x, rng):
    groups = channel_groups(model)
    removed = random_removal(groups, rng)
    assert removed, "no prunable group"
    zero_channels(model, removed)
    expected = run(model, x)
    params_before = model_cost(model).params
    plan = apply_plan(model, keep_plan(channel_groups(model), removed))
    assert len(plan.decisions) == len(removed)
    assert all(d.result["removed"] == len(removed[d.site]) for d in plan.decisions)
    assert model_cost(model).params < params_before
    got = run(model, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
    for group in channel_groups(model):                    # every group is narrower by what was removed
        if group.id in removed:
            original = next(g for g in groups if g.id == group.id)
            assert group.width == original.width - len(removed[group.id])


@pytest.mark.parametrize("cls", pm.ARCHITECTURES, ids=lambda c: c.__name__)
def test_pruning_zeroed_channels_leaves_outputs_unchanged(cls, tmp_path):
    _, model = load_arch(cls, tmp_path)
    assert_zero_channels_prune_exactly(model, inputs_for(cls.shape), np.random.default_rng(0))


def prune_both_ways(module, table, model, rng):
    """Random keep sets per group, applied to the ONNX model by the rewrite and to torch by hand."""
    by_producers = {frozenset(pm.torch_name(p.node) for p in g.producers): g for g in channel_groups(model)}
    keep_torch, decisions = {}, []
    for key, specs in table.items():
        group = by_producers[frozenset(s[1] for s in specs if s[0] == "out")]
        k = int(rng.integers(1, group.width + 1))
        keep = np.sort(rng.choice(group.width, size=k, replace=False))
        keep_torch[key] = keep
        decisions.append(LayerDecision(group.id, "prune", {"keep_indices": keep.tolist()}))
    apply_plan(model, Plan(decisions))
    return pm.prune_torch(module, table, keep_torch)


@pytest.mark.parametrize("cls", pm.ARCHITECTURES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_plans_match_hand_pruned_torch(cls, seed, tmp_path):
    module, model = load_arch(cls, tmp_path)
    pruned = prune_both_ways(module, cls.table, model, np.random.default_rng(seed))
    oracle = load_model(export(pruned, cls.shape, tmp_path / "oracle.onnx"))
    assert model_cost(model).params == model_cost(oracle).params
    assert model_cost(model).macs == model_cost(oracle).macs
    x = inputs_for(cls.shape)
    np.testing.assert_allclose(run(model, x), run(oracle, x), rtol=1e-4, atol=1e-5)


def test_blocked_group_fails_cleanly(tmp_path):
    _, model = load_arch(pm.TransposeOverChannels, tmp_path)
    before = ir.to_proto(model).SerializeToString()
    site = PRUNE.site(model, "group:/conv1/Conv")
    assert not site.ok and "Transpose '/Transpose'" in site.reason
    plan = Plan([LayerDecision("group:/conv0/Conv", "prune", {"keep": 3}),
                 LayerDecision("group:/conv1/Conv", "prune", {"keep": 4})])
    with pytest.raises(PycompressError, match=r"site 'group:/conv1/Conv': cannot apply 'prune': Transpose"):
        apply_plan(model, plan)
    assert ir.to_proto(model).SerializeToString() == before             # validated before touching anything
    _, model = load_arch(pm.SoftmaxOverChannels, tmp_path)
    with pytest.raises(PycompressError, match="Softmax '/Softmax' normalizes over the channel axis"):
        apply_plan(model, Plan([LayerDecision("group:/conv1/Conv", "prune", {"keep": 4})]))
    with pytest.raises(PycompressError, match="group:/nowhere"):
        apply_plan(model, Plan([LayerDecision("group:/nowhere", "prune", {"keep": 4})]))


@pytest.mark.parametrize("params,message", [
    ({"keep": 0}, r"'keep' must be an integer in \[1, 32\]"),
    ({"keep": 33}, r"'keep' must be an integer in \[1, 32\]"),
    ({"keep": 2.5}, "'keep' must be an integer"),
    ({"keep_indices": [0, 0]}, "repeated"),
    ({"keep_indices": [32]}, r"integers in \[0, 31\]"),
    ({"keep_indices": []}, "non-empty"),
    ({"keep": 3, "keep_indices": [1]}, "exactly one"),
    ({}, "exactly one"),
    ({"rank": 3}, "unknown parameter"),
])
def test_bad_params_are_one_line_errors(params, message, tmp_path):
    _, model = load_arch(pm.MLP, tmp_path)
    with pytest.raises(PycompressError, match=message) as info:
        apply_plan(model, Plan([LayerDecision("group:/net/net.0/Gemm", "prune", params)]))
    assert "site 'group:/net/net.0/Gemm'" in str(info.value) and "\n" not in str(info.value)


def test_keep_count_keeps_the_largest_l1_filters(tmp_path):
    module, model = load_arch(pm.Residual, tmp_path)
    group = channel_group(model, "group:/stem/stem.0/Conv")
    # Independent score: sum of |W| of each output filter of both producers (BN folded by the exporter).
    weights = {n.name: n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "Conv"}
    expected = sum(np.abs(weights[name]).reshape(8, -1).sum(axis=1) for name in ("/stem/stem.0/Conv", "/b1/b1.3/Conv"))
    np.testing.assert_allclose(l1_scores(group), expected, rtol=1e-6)
    plan = apply_plan(model, Plan([LayerDecision(group.id, "prune", {"keep": 3})]))
    kept = np.sort(np.argsort(-expected)[:3])
    stem = next(n for n in model.graph if n.name == "/stem/stem.0/Conv").inputs[1].const_value.numpy()
    np.testing.assert_array_equal(stem, weights["/stem/stem.0/Conv"][kept])
    assert plan.decisions[0].result["kept"] == 3


def test_results_account_for_the_change(tmp_path):
    _, model = load_arch(pm.DenseBlock, tmp_path)
    before = model_cost(model)
    plan = apply_plan(model, Plan([LayerDecision("group:/conv1/Conv", "prune", {"keep_indices": [0, 3]})]))
    after = model_cost(model)
    result = plan.decisions[0].result
    assert result["params_before"] - result["params_after"] == before.params - after.params > 0
    assert result["macs_before"] - result["macs_after"] == before.macs - after.macs > 0
    # The concat behind conv1 shrinks by 2 channels: the transition conv reads 14, at the right offsets.
    trans = next(n for n in model.graph if n.name == "/trans/Conv")
    assert trans.inputs[1].const_value.shape[1] == 14


@pytest.mark.parametrize("style", ["explicit", "size0"])
def test_view_before_fc(style, tmp_path):
    """x.reshape(-1, C*H*W) spells the width in a constant: it is rewritten with the channels.
    x.view(x.size(0), -1) computes the shape from the tensor at run time: only the batch is read."""
    class ViewNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.fc = torch.nn.Linear(6 * 16, 5)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            return self.fc(x.reshape(-1, 6 * 16) if style == "explicit" else x.view(x.size(0), -1))

    torch.manual_seed(0)
    path = tmp_path / "view.onnx"
    from pycompress.convert import export_to_onnx
    export_to_onnx(ViewNet().eval(), [(1, 3, 4, 4)], path, dynamic_batch=style != "explicit")
    model = load_model(path)
    group = channel_group(model, "group:/conv/Conv")
    assert group.prunable, group.blocked_by
    assert [c.kind for c in group.counts] == (["shape entry"] if style == "explicit" else [])
    n = 1 if style == "explicit" else 3
    assert_zero_channels_prune_exactly(model, inputs_for((1, 3, 4, 4), n=n), np.random.default_rng(3))


def test_sites_and_starting_decisions(tmp_path):
    _, model = load_arch(pm.InvertedResidual, tmp_path)
    sites = PRUNE.sites(model)
    assert [s.name for s in sites if s.ok] == ["group:/stem/Conv", "group:/b1_expand/Conv", "group:/b2_expand/Conv",
                                                "group:/b2_project/Conv", "group:/head/Conv"]
    blocked = [s for s in sites if not s.ok]
    assert [s.name for s in blocked] == ["group:/fc/Gemm"] and "graph output" in blocked[0].reason
    info = next(s for s in sites if s.name == "group:/b1_expand/Conv").info
    assert info["width"] == 48 and info["producers"] == ["/b1_expand/Conv"]
    assert info["consumers"] == ["/b1_project/Conv"] and info["pass_through"] == ["/b1_dw/Conv"]
    assert {m["role"] for m in info["members"]} >= {"depthwise weight", "group attribute", "consumer weight"}
    decisions = [PRUNE.starting_decision(model, s) for s in sites]
    assert [d.params["keep"] for d in decisions if d] == [12, 36, 36, 18, 24]
    assert decisions[-1] is None
    assert PRUNE.starting_decision(model, sites[0], keep=0.5).params == {"keep": 8}
    assert PRUNE.starting_decision(model, sites[0], keep=1.0) is None
    with pytest.raises(PycompressError, match="--keep"):
        PRUNE.starting_decision(model, sites[0], keep=1.5)
    # Aligned to onnxruntime's channel blocks: 36 of 48 -> 32; 12 of 16 and 24 of 32 round up to all.
    aligned = [PRUNE.starting_decision(model, s, align=16) for s in sites]
    assert [d.params["keep"] if d else None for d in aligned] == [None, 32, 32, 16, None, None]
    with pytest.raises(PycompressError, match="--align"):
        PRUNE.starting_decision(model, sites[0], align=0)
    plan = apply_plan(model, Plan([d for d in decisions if d]))
    assert [d.result["kept"] for d in plan.decisions] == [12, 36, 36, 18, 24]
    json.dumps([s.info for s in sites])                     # --explain / --json can print them
    assert Plan.from_json(plan.to_json()).decisions[0].result == plan.decisions[0].result
    dw = next(n for n in model.graph if n.name == "/b1_dw/Conv")
    assert dw.attributes["group"].value == 36


@pytest.mark.slow
def test_efficientnet_zeroed_channels_prune_exactly(efficientnet_onnx, crops):
    model = load_model(efficientnet_onnx)
    assert sum(g.prunable for g in channel_groups(model)) == 24
    assert_zero_channels_prune_exactly(model, crops[:2], np.random.default_rng(0))


@pytest.mark.slow
def test_efficientnet_random_plan_matches_hand_pruned_torch(efficientnet_onnx, efficientnet_torch, crops, tmp_path):
    model = load_model(efficientnet_onnx)
    module = copy.deepcopy(efficientnet_torch)
    pruned = prune_both_ways(module, pm.efficientnet_table(module), model, np.random.default_rng(7))
    oracle = load_model(export(pruned, (1, 3, 224, 224), tmp_path / "oracle.onnx"))
    assert model_cost(model).params == model_cost(oracle).params
    assert model_cost(model).macs == model_cost(oracle).macs
    got, want = run(model, crops[:2]), run(oracle, crops[:2])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))


def test_shared_constants_and_fixed_concat_channels(tmp_path):
    """A bias shared by two groups is copied, not pruned for both; a Concat segment from the
    graph input is never pruned and the consumer's offsets follow the pruned segments."""
    from test_channels import parsed, w

    model = parsed("""
        g (float[2,3,4,4] x) => (float[2,5,4,4] y) {
            a = Conv(x, wa, bias)
            ra = Relu(a)
            b = Conv(x, wb, bias)
            rb = Relu(b)
            c = Concat<axis=1>(ra, x, rb)
            y = Conv(c, wc)
        }""", {"wa": w(6, 3, 1, 1), "wb": w(6, 3, 1, 1, seed=1), "bias": w(6, seed=2),
               "wc": w(5, 15, 1, 1, seed=3)}, tmp_path)
    groups = channel_groups(model)
    assert [g.width for g in groups if g.prunable] == [6, 6]
    consumer = [s for g in groups for s in g.slices if s.role == "consumer weight"]
    assert [s.positions.tolist() for s in consumer] == [list(range(6)), list(range(9, 15))]
    x = inputs_for((1, 3, 4, 4), n=2)
    assert_zero_channels_prune_exactly(model, x, np.random.default_rng(5))
    biases = [n.inputs[2].const_value.shape[0] for n in model.graph if n.op_type == "Conv" and len(n.inputs) > 2]
    assert biases == [3, 3]                                  # each producer got its own pruned copy
    assert next(n for n in model.graph if n.outputs[0].name == "y").inputs[1].const_value.shape[1] == 9
