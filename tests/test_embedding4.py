"""4-bit embedding tables (pycompress.export.embedding): exact against onnxruntime, error bounds,
onnxruntime's int8 lookups, and the export path (`export --to int8 --dynamic --embedding-bits 4`)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from pycompress.export import export_model
from pycompress.export.embedding import CLIP_FACTORS, pack_embedding_lookups, pack_table
from pycompress.fidelity import run_model
from pycompress.ir import SEQUENCE_LENGTH, load_model, model_cost

VOCAB, DIM, OUT = 1500, 128, 16


def lookup_model(table: np.ndarray, positions: np.ndarray | None = None, head: np.ndarray | None = None,
                 rank: int = 2) -> onnx.ModelProto:
    """ids [batch, sequence] (rank 2; rank 1: [tokens]) -> Gather(table) [+ positions[0:T]] [@ head]."""
    dims = ["batch", "sequence"][:rank]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="word_lookup")]
    inits = [nh.from_array(table, "table")]
    last = "emb"
    if positions is not None:  # position ids from the sequence length, not from a graph input: left alone
        nodes += [helper.make_node("Shape", ["ids"], ["shape"], start=1, end=2),
                  helper.make_node("Squeeze", ["shape"], ["length"]),
                  helper.make_node("Range", ["zero", "length", "one"], ["pos_ids"]),
                  helper.make_node("Gather", ["positions", "pos_ids"], ["pos"], name="position_lookup"),
                  helper.make_node("Add", ["emb", "pos"], ["summed"])]
        inits += [nh.from_array(positions, "positions"), nh.from_array(np.array(0, np.int64), "zero"),
                  nh.from_array(np.array(1, np.int64), "one")]
        last = "summed"
    width = table.shape[1]
    if head is not None:
        nodes.append(helper.make_node("MatMul", [last, "head"], ["projected"], name="head"))
        inits.append(nh.from_array(head, "head"))
        last, width = "projected", head.shape[1]
    nodes.append(helper.make_node("Identity", [last], ["out"], name="out"))
    graph = helper.make_graph(nodes, "lookup", [helper.make_tensor_value_info("ids", TensorProto.INT64, dims)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, dims + [width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (VOCAB, DIM)).astype(np.float32)
    w[7] = 0.25          # a constant row: every code 0, exact
    w[9, :5] = 0.9       # outliers: clipping must not make this row worse than min/max
    return w


@pytest.mark.parametrize("group", [64, 0, 48])  # 48 does not divide 128: one scale per row
def test_packed_lookup_equals_the_dequantized_table_in_onnxruntime(table, group):
    model = ir.serde.deserialize_model(lookup_model(table))
    lookups, added = pack_embedding_lookups(model, group=group)
    expected_group = group if group == 64 else DIM
    assert [(t.table, t.rows, t.dim, t.group) for t in lookups] == [("table", VOCAB, DIM, expected_group)]
    assert "BitShift" in {n.op_type for n in model.graph} and set(added) == {n.name for n in model.graph} - {"out"}
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    packed = pack_table(table, lookups[0].group)
    assert packed.packed.shape == (VOCAB, DIM // 2) and packed.packed.dtype == np.uint8
    assert model.graph.initializers["table_packed4"].const_value.numpy().nbytes == VOCAB * DIM // 2
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (3, 7), (2, 33)]:  # one session, symbolic batch and sequence
        ids = rng.integers(0, VOCAB, shape)
        ids[0, 0] = VOCAB - 1
        got = run_model(model, {"ids": ids})[0]
        np.testing.assert_allclose(got, packed.dequantize(ids), rtol=0, atol=1e-7)
        assert np.abs(got - table[ids]).max() < 0.05
    assert np.array_equal(packed.dequantize(np.array([7]))[0], np.full(DIM, 0.25, np.float32))


def test_rank1_ids():
    w = np.random.default_rng(2).normal(0, 1, (2048, 64)).astype(np.float32)
    model = ir.serde.deserialize_model(lookup_model(w, rank=1))
    assert pack_embedding_lookups(model)[0]
    ids = np.array([0, 5, 2047, 5])
    np.testing.assert_allclose(run_model(model, {"ids": ids})[0], pack_table(w).dequantize(ids), rtol=0, atol=1e-6)


def test_ids_of_unknown_rank_through_a_cast(table):
    """int32 ids cast to int64 (the Cast's output has no shape without shape inference): the group
    Reshapes take their shape from the ids at run time."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids32"], ["ids"], to=TensorProto.INT64),
         helper.make_node("Gather", ["table", "ids"], ["out"], name="word_lookup")], "cast",
        [helper.make_tensor_value_info("ids32", TensorProto.INT32, ["batch", "sequence"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [nh.from_array(table, "table")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert pack_embedding_lookups(model)[0]
    assert "Shape" in {n.op_type for n in model.graph}
    ids = np.random.default_rng(7).integers(0, VOCAB, (2, 5)).astype(np.int32)
    np.testing.assert_allclose(run_model(model, {"ids32": ids})[0], pack_table(table).dequantize(ids),
                               rtol=0, atol=1e-7)


def test_error_is_bounded_by_the_min_max_grid(table):
    assert CLIP_FACTORS[-1] == 1.0  # min/max is among the candidates
    packed = pack_table(table, 64)
    got = packed.dequantize().reshape(VOCAB, DIM // 64, 64)
    x = table.reshape(VOCAB, DIM // 64, 64)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / 15, 1.0)
    min_max = np.clip(np.round((x - lo) / step), 0, 15) * step + lo
    err, bound = ((got - x) ** 2).sum(-1), ((min_max - x) ** 2).sum(-1)
    # float16 step and offset move a code's value by at most (15 step + |lo|) 2^-11 <= 3 max|x| / 2048;
    # over a group of 64 (triangle inequality): 8 times that
    assert np.all(np.sqrt(err) <= np.sqrt(bound) * (1 + 1e-5) + 8 * 3 * np.abs(x).max(-1) / 2048)
    assert np.all(np.abs(got - x) <= (hi - lo) / 2 + 1e-6)   # never outside the group's range by more
    rel = np.linalg.norm(got - x) / np.linalg.norm(x)
    assert rel < 0.1   # 16 uniform levels over a Gaussian group: about 0.09 with min/max
    assert rel < np.linalg.norm(min_max - x) / np.linalg.norm(x)


def test_small_and_position_tables_are_left_alone(table):
    positions = np.random.default_rng(3).normal(0, 1, (4096, DIM)).astype(np.float32)
    model = ir.serde.deserialize_model(lookup_model(table, positions=positions))
    lookups, _ = pack_embedding_lookups(model)
    assert [t.node for t in lookups] == ["word_lookup"]
    assert "positions" in model.graph.initializers   # indexed by a Range, not by a graph input
    small = ir.serde.deserialize_model(lookup_model(table[:1000]))
    assert pack_embedding_lookups(small) == ([], [])
    tied = lookup_model(table)   # the table is also the (transposed) output projection: a copy would add bytes
    tied.graph.node.extend([helper.make_node("Transpose", ["table"], ["tableT"]),
                            helper.make_node("MatMul", ["emb", "tableT"], ["logits"])])
    tied.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    assert pack_embedding_lookups(ir.serde.deserialize_model(tied)) == ([], [])


def test_onnxruntime_int8_lookup_is_repacked(table, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = tmp_path / "fp32.onnx"
    onnx.save(lookup_model(table), fp32)
    quantize_dynamic(str(fp32), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    model = load_model(tmp_path / "q.onnx", simplify=False)
    int8 = next(n for n in model.graph if n.op_type == "Gather")
    assert int8.outputs[0].uses()[0].node.op_type == "DequantizeLinear"
    dq = int8.outputs[0].uses()[0].node
    q, scale, zero = (model.graph.initializers[v.name].const_value.numpy() for v in (int8.inputs[0], *dq.inputs[1:3]))
    assert q.dtype in (np.int8, np.uint8) and scale.size == 1   # one scale for the whole table
    ids = np.random.default_rng(4).integers(0, VOCAB, (2, 9))
    lookups, _ = pack_embedding_lookups(model)
    assert len(lookups) == 1 and "DequantizeLinear" not in {n.op_type for n in model.graph}
    # what is packed is the int8 table as onnxruntime dequantizes it
    expected = pack_table((q.astype(np.float32) - np.float32(zero.item())) * scale.reshape(()), 64).dequantize(ids)
    np.testing.assert_allclose(run_model(model, {"ids": ids})[0], expected, rtol=0, atol=1e-7)
    assert np.abs(expected - table[ids]).max() < 0.05


def test_export_int8_dynamic_with_4bit_embeddings(table, tmp_path, capsys):
    from pycompress.cli.main import main

    head = np.random.default_rng(5).normal(0, 0.2, (DIM, OUT)).astype(np.float32)
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(lookup_model(table, head=head), fp32)
    ids = np.random.default_rng(6).integers(0, VOCAB, (4, 11))
    plain = export_model(fp32, "int8", tmp_path / "int8.onnx", dynamic=True, sample_inputs={"ids": ids})
    small = export_model(fp32, "int8", tmp_path / "e4.onnx", dynamic=True, sample_inputs={"ids": ids},
                         embedding_bits=4)
    assert "embedding_tables" in small.details and "embedding_tables" not in plain.details
    # int8 table (1 byte a weight) -> 4 bits + a float16 step and offset per 64 columns
    assert plain.output_bytes - small.output_bytes > VOCAB * DIM * (1 / 2 - 4 / 64) - 4096
    proto = onnx.load(tmp_path / "e4.onnx")
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert {"BitShift", "MatMulInteger"} <= ops   # the head is int8, the lookup is not re-quantized
    assert not any(n.op_type == "DynamicQuantizeLinear" and "packed" in n.input[0] for n in proto.graph.node)
    exported = load_model(tmp_path / "e4.onnx")
    reference = run_model(load_model(fp32), {"ids": ids})[0]
    got = run_model(exported, {"ids": ids})[0]
    assert got.shape == reference.shape and np.abs(got - reference).max() < 0.1 * np.abs(reference).max()
    # accounting: MACs of the head as in the float model, bytes = what the file stores, 2 codes a byte
    cost, base = model_cost(exported, SEQUENCE_LENGTH), model_cost(load_model(fp32), SEQUENCE_LENGTH)
    assert cost.macs == base.macs
    stored = sum(v.const_value.numpy().nbytes for v in exported.graph.initializers.values()
                 if v.const_value is not None and v.const_value.numpy().ndim >= 1
                 and v.const_value.numpy().dtype != np.int64)
    assert cost.bytes == stored
    assert cost.params >= base.params   # the packed table counts its VOCAB x DIM codes (+ scales)

    calibration = {"ids": np.random.default_rng(8).integers(0, VOCAB, (16, 11))}
    static = export_model(fp32, "int8", tmp_path / "s4.onnx", calibration=calibration, sample_inputs={"ids": ids},
                          embedding_bits=4, embedding_group=0)
    static_ops = {n.op_type for n in onnx.load(tmp_path / "s4.onnx").graph.node}
    assert {"BitShift", "QuantizeLinear"} <= static_ops and "Reshape" not in static_ops  # per row: no group Reshape
    assert static.verification["outputs"][0]["relative_error"] < 0.2

    assert main(["export", str(fp32), "--to", "fp16", "--embedding-bits", "4", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "--embedding-bits" in capsys.readouterr().err
    lonely = tmp_path / "nolookup.onnx"
    onnx.save(lookup_model(table[:100], head=head), lonely)
    assert main(["export", str(lonely), "--to", "int8", "--dynamic", "--embedding-bits", "4",
                 "-o", str(tmp_path / "z.onnx")]) != 0
    assert "no embedding lookup found" in capsys.readouterr().err
