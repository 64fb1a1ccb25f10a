"""Channel-group analysis (pycompress.ir.channels) against hand-written torch channel tables."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import prune_models as pm
from conftest import export
from pycompress.errors import PycompressError
from pycompress.ir import load_model
from pycompress.ir.channels import channel_group, channel_groups


def load_arch(cls, tmp_path, seed=0):
    module = pm.build(cls, seed)
    return module, load_model(export(module, cls.shape, tmp_path / f"{cls.__name__}.onnx"))


def assert_matches_table(model, module, table, blocked=None):
    """The ONNX groups are exactly the table's groups, with the same members at the same positions."""
    groups = channel_groups(model)
    onnx_modules = {pm.torch_name(n.name) for n in model.graph}
    by_producers = {frozenset(pm.torch_name(p.node) for p in g.producers): g for g in groups}
    for key, specs in table.items():
        producers = frozenset(s[1] for s in specs if s[0] == "out")
        assert producers in by_producers, f"no ONNX group with producers {sorted(producers)}"
        group = by_producers[producers]
        width = pm.table_width(module, specs)
        assert group.prunable, (key, group.blocked_by)
        assert group.width == width
        for p in group.producers:
            np.testing.assert_array_equal(p.channels, np.arange(width))
        expected = set()
        for spec in specs:
            kind, name = spec[:2]
            if kind == "bn" and name not in onnx_modules:
                continue                                    # folded into the conv by the exporter
            if kind == "in":
                offset, block = spec[2], spec[3]
                want_pos, want_ch = offset + np.arange(width * block), np.repeat(np.arange(width), block)
                roles = ("consumer weight",)
            elif kind == "out":
                want_pos = want_ch = np.arange(width)
                roles = ("producer weight",)
            elif kind == "dw":
                want_pos = want_ch = np.arange(width)
                roles = ("depthwise weight",)
            else:
                want_pos, want_ch = spec[2] + np.arange(width), np.arange(width)
                roles = ("batchnorm",)
            found = [s for s in group.slices if pm.torch_name(s.node) == name and s.role in roles]
            assert found, f"group {group.id}: no {roles[0]} member for {name}"
            for s in found:
                np.testing.assert_array_equal(s.positions, want_pos, err_msg=f"{group.id} {name}")
                np.testing.assert_array_equal(s.channels, want_ch, err_msg=f"{group.id} {name}")
            expected.add((name, roles[0]))
        got = {(pm.torch_name(s.node), s.role) for s in group.slices
               if s.role in ("consumer weight", "producer weight", "depthwise weight", "batchnorm")}
        assert got == expected, group.id
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) == len(table)
    for name, reason in (blocked or {}).items():
        group = next(g for g in groups if pm.torch_name(g.producers[0].node) == name)
        assert not group.prunable and reason in group.blocked_by, (name, group.blocked_by)
        assert group.blocking_node


@pytest.mark.parametrize("cls", pm.ARCHITECTURES + [pm.TransposeOverChannels, pm.SoftmaxOverChannels],
                         ids=lambda c: c.__name__)
def test_groups_match_hand_written_tables(cls, tmp_path):
    module, model = load_arch(cls, tmp_path)
    assert_matches_table(model, module, cls.table, cls.blocked)


def test_blocked_groups_name_the_node(tmp_path):
    _, model = load_arch(pm.TransposeOverChannels, tmp_path)
    group = next(g for g in channel_groups(model) if "conv1" in g.id)
    assert group.blocking_node == "/Transpose"
    assert "moves the channel axis" in group.blocked_by
    info = group.info()
    assert info["blocked_by"] == group.blocked_by and info["width"] == 8
    _, model = load_arch(pm.SoftmaxOverChannels, tmp_path)
    group = next(g for g in channel_groups(model) if "conv1" in g.id)
    assert group.blocking_node == "/Softmax" and "over the channel axis" in group.blocked_by


def test_api_for_response_readers(tmp_path):
    """What PFA needs: producer output tensors that exist in the graph, the width, the channel map."""
    _, model = load_arch(pm.Residual, tmp_path)
    values = {v.name for n in model.graph for v in n.outputs}
    group = channel_group(model, "group:/stem/stem.0/Conv")
    assert group.width == 8 and group.prunable
    assert group.producer_outputs == ["/stem/stem.0/Conv_output_0", "/b1/b1.3/Conv_output_0"]
    assert set(group.producer_outputs) <= values
    assert all(p.axis == 1 for p in group.producers)
    # The carriers include the residual sum and its ReLU: PFA may read responses after the nonlinearity.
    carriers = {c.tensor for c in group.carriers}
    assert "/Relu_output_0" in carriers and set(group.producer_outputs) <= carriers
    with pytest.raises(PycompressError, match="group:nope"):
        channel_group(model, "group:nope")


def test_analysis_is_cached_until_the_graph_changes(tmp_path):
    _, model = load_arch(pm.MLP, tmp_path)
    first = channel_groups(model)
    assert channel_groups(model) is first
    node = next(n for n in model.graph if n.op_type == "Gemm")
    node.replace_input_with(2, node.inputs[2])          # same value: nothing changed
    assert channel_groups(model) is first
    from pycompress.ir import add_initializer
    node.replace_input_with(2, add_initializer(model, "b", np.zeros(32, np.float32)))
    assert channel_groups(model) is not first


# ---- single-op rules on hand-written graphs --------------------------------------------------------

HEADER = '<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>\n'


def parsed(body: str, inits: dict[str, np.ndarray], tmp_path) -> object:
    proto = onnx.parser.parse_model(HEADER + body)
    for name, array in inits.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    return load_model(path)


def w(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def status(model):
    """Keyed by the first producer's output tensor (parsed graphs have generated node names)."""
    return {g.producers[0].output: (g.blocked_by or "ok") for g in channel_groups(model)}


def group_of(model, output):
    return next(g for g in channel_groups(model) if g.producers[0].output == output)


def test_concat_with_a_graph_input_keeps_its_channels_fixed(tmp_path):
    model = parsed("""
        g (float[1,3,4,4] x) => (float[1,5,4,4] y) {
            a = Conv(x, wa)
            c = Concat<axis=1>(x, a)
            y = Conv(c, wb)
        }""", {"wa": w(6, 3, 1, 1), "wb": w(5, 9, 1, 1)}, tmp_path)
    group = group_of(model, "a")
    assert group.prunable
    consumer = next(s for s in group.slices if s.role == "consumer weight")
    np.testing.assert_array_equal(consumer.positions, np.arange(3, 9))   # after the 3 input channels


def test_add_with_a_graph_input_blocks(tmp_path):
    model = parsed("""
        g (float[1,3,4,4] x) => (float[1,5,4,4] y) {
            a = Conv(x, wa)
            s = Add(a, x)
            y = Conv(s, wb)
        }""", {"wa": w(3, 3, 1, 1), "wb": w(5, 3, 1, 1)}, tmp_path)
    assert "cannot be pruned" in status(model)["a"]


@pytest.mark.parametrize("op,expect", [
    ("Slice(a, starts, ends, axes)", "slices the channel axis"),
    ("Gather<axis=1>(a, idx)", "gathers on the channel axis"),
    ("ReduceMean<axes=[1]>(a)", "reduces over the channel axis"),
    ("Pad(a, pads_c)", "pads the channel axis"),
    ("Pad(a, pads_hw)", "ok"),
    ("Resize(a, roi, scales)", "ok"),
    ("Transpose<perm=[0,1,3,2]>(a)", "ok"),
    ("LpNormalization<axis=1>(a)", "over the channel axis"),
    ("LRN<size=3>(a)", "LRN 'node_1' is not known to keep channels aligned"),
    ("com.example.Custom(a)", "com.example.Custom 'node_1' is an unknown op"),
])
def test_single_op_rules(op, expect, tmp_path):
    model = parsed(f"""
        g (float[1,3,4,4] x) => (float[1,2,?,?] y) {{
            a = Conv(x, wa)
            b = {op}
            y = Conv(b, wb)
        }}""", {"wa": w(4, 3, 1, 1), "wb": w(2, 4, 1, 1), "starts": np.array([0], np.int64),
                "ends": np.array([2], np.int64), "axes": np.array([1], np.int64), "idx": np.array([0, 1, 2, 3]),
                "pads_c": np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64),
                "pads_hw": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "roi": np.zeros(0, np.float32),
                "scales": np.array([1, 1, 2, 2], np.float32)}, tmp_path)
    got = status(model)["a"]
    assert expect in got, got


def test_matmul_tokens_and_layernorm(tmp_path):
    """Transformer-style MLP on [B, T, C]: MatMul + bias pass, LayerNorm over the channels blocks."""
    model = parsed("""
        g (float[2,5,8] x) => (float[2,5,8] y) {
            h = MatMul(x, w1)
            hb = Add(h, b1)
            r = Relu(hb)
            o = MatMul(r, w2)
            y = LayerNormalization<axis=-1>(o, gamma, beta)
        }""", {"w1": w(8, 16), "b1": w(16), "w2": w(16, 8), "gamma": w(8), "beta": w(8)}, tmp_path)
    groups = status(model)
    assert groups["h"] == "ok"
    assert "over the channel axis" in groups["o"]
    group = group_of(model, "h")
    roles = {(s.tensor, s.role, s.axis) for s in group.slices}
    assert ("w1", "producer weight", 1) in roles and ("b1", "per-channel constant", 0) in roles
    assert ("w2", "consumer weight", 0) in roles


@pytest.mark.slow
def test_efficientnet_lite0_groups(efficientnet_onnx, efficientnet_torch):
    raw = onnx.load(str(efficientnet_onnx))
    ops = {n.op_type for n in raw.graph.node}
    assert {"Pad", "ConstantOfShape", "Transpose"} <= ops     # the legacy exporter's "same" padding chains
    model = load_model(efficientnet_onnx)
    assert not {"Pad", "ConstantOfShape", "Transpose"} & {n.op_type for n in model.graph}
    assert_matches_table(model, efficientnet_torch, pm.efficientnet_table(efficientnet_torch),
                         {"_fc": "graph output"})
    # Without folding, computed pads hide the channel pass-through: groups are blocked, not guessed.
    unfolded = load_model(efficientnet_onnx, simplify=False)
    reasons = [g.blocked_by for g in channel_groups(unfolded) if not g.prunable]
    assert any("Pad" in r for r in reasons)


def _conv_relu_conv(tmp_path):
    return parsed("""
        g (float[1,3,4,4] x) => (float[1,2,?,?] y) {
            a = Conv(x, wa)
            b = Transpose<perm=[0,1,3,2]>(a)
            y = Conv(b, wb)
        }""", {"wa": w(4, 3, 1, 1), "wb": w(2, 4, 1, 1)}, tmp_path)


def test_a_bug_in_an_op_rule_is_not_swallowed(tmp_path, monkeypatch):
    """Only malformed nodes are reported as 'could not be analysed'; a rule that crashes is a bug."""
    from pycompress.ir.channels import rules

    def broken(walk, node, tracked):
        return 1 // 0

    monkeypatch.setitem(rules.RULES, "Transpose", broken)
    with pytest.raises(ZeroDivisionError):
        channel_groups(_conv_relu_conv(tmp_path), cache=False)


def test_a_malformed_node_blocks_its_group_with_the_reason(tmp_path):
    import onnx_ir as ir

    model = _conv_relu_conv(tmp_path)
    assert status(model)["a"] == "ok"
    transpose = next(n for n in model.graph if n.op_type == "Transpose")
    transpose.attributes["perm"] = ir.AttrInt64s("perm", [0, 2, 3, 3])     # not a permutation: no axis 1
    got = channel_groups(model, cache=False)[0].blocked_by
    assert got == "Transpose 'node_1' could not be analysed (has perm=[0, 2, 3, 3], which lacks axis 1)", got
    transpose.attributes["perm"] = ir.AttrString("perm", "oops")           # an attribute of the wrong type
    got = channel_groups(model, cache=False)[0].blocked_by
    assert got == "Transpose 'node_1' could not be analysed (has a malformed attribute 'perm')", got


def test_the_shape_evaluator_works_on_its_own():
    """Shape tensors computed from a symbolic batch dim (built without load_model, which folds them)."""
    import onnx_ir as ir

    from pycompress.ir.channels import shape_entries
    from pycompress.ir.channels.shapes import ShapeEvaluator

    proto = onnx.parser.parse_model(HEADER + """
        g (float[N,3,4,4] x) => (float[N,48] y) {
            zero = Constant<value=int64[1] {0}>()
            rest = Constant<value=int64[1] {48}>()
            s = Shape(x)
            n = Gather(s, zero)
            t = Concat<axis=0>(n, rest)
            y = Reshape(x, t)
        }""")
    model = ir.from_proto(proto)
    target = next(n for n in model.graph if n.op_type == "Reshape").inputs[1]
    assert shape_entries(model, target) == ["N", 48]
    assert ShapeEvaluator().shape_entries(target) == ["N", 48]


# ---- the cache kept valid across prunes (ir/channels/reuse.py) --------------------------

def _canonical(groups):
    """Everything a prune reads from the groups, by name (the records' node objects aside)."""
    return [(g.id, g.width, g.blocked_by,
             [(p.node, p.output, p.axis, p.channels.tolist()) for p in g.producers],
             sorted((s.role, s.node, s.input_index, s.tensor, s.axis, s.positions.tolist(), s.channels.tolist())
                    for s in g.slices),
             sorted((c.kind, c.node, c.input_index, c.entry, c.positions.tolist(), c.channels.tolist())
                    for c in g.counts),
             sorted((c.tensor, c.axis, c.positions.tolist(), c.channels.tolist()) for c in g.carriers))
            for g in groups]


def _prune_all_and_compare_with_a_walk(model, seed=0):
    """Prune every prunable group in a random order, each to a random subset of its channels; after
    each prune the updated cache must equal a fresh walk of the pruned graph, bound to its nodes."""
    from pycompress.ir.channels.groups import cached_channel_groups
    from pycompress.rewrites.prune_channels import prune_group

    rng = np.random.default_rng(seed)
    ids = [g.id for g in channel_groups(model) if g.prunable]
    assert ids
    for gid in rng.permutation(ids):
        group = channel_group(model, str(gid))
        count = int(rng.integers(2, group.width)) if group.width > 2 else 2
        keep = np.sort(rng.choice(group.width, size=count, replace=False))
        prune_group(model, group, keep)
        updated = cached_channel_groups(model)
        assert updated is not None, f"the cache was dropped after pruning {gid}"
        assert _canonical(updated) == _canonical(channel_groups(model, cache=False)), gid
        nodes = {id(n) for n in model.graph}
        assert all(id(s.ir_node) in nodes for g in updated for s in g.slices)
    return model


@pytest.mark.parametrize("cls", pm.ARCHITECTURES, ids=lambda c: c.__name__)
def test_pruning_updates_the_groups_exactly_as_a_new_walk_finds_them(cls, tmp_path):
    """Concat offsets (DenseBlock), residual couplings, flattened consumers, squeeze-excite."""
    _, model = load_arch(cls, tmp_path)
    _prune_all_and_compare_with_a_walk(model)


def test_pruning_efficientnet_lite0_and_a_transformer_updates_the_groups_exactly(efficientnet_onnx, tmp_path):
    from transformer_models import export_tiny_encoder

    _prune_all_and_compare_with_a_walk(load_model(efficientnet_onnx), seed=1)
    _prune_all_and_compare_with_a_walk(load_model(export_tiny_encoder(tmp_path / "enc.onnx")), seed=2)
