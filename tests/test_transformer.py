"""Transformer encoders: recovery of MatMul + Add layers, FLAP pruning of the FFN width,
activation-aware low rank, token inputs, cosine for embeddings, MACs per sequence,
one block per encoder sub-layer. A small encoder built here (random weights:
structure and exactness checks against onnxruntime); the real all-MiniLM-L6-v2 in
the slow test at the end."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from transformer_models import FFN, HIDDEN, VOCAB, export_tiny_encoder, token_batch

from pycompress.data.synthetic import embedding_vocabulary, synthetic_inputs
from pycompress.fidelity import collect_activations, run_model
from pycompress.fidelity.compare import compare_outputs, is_embedding
from pycompress.ir import add_initializer, check_model, constant_array, load_model, model_cost
from pycompress.ir.blocks import block_labels
from pycompress.ir.channels import channel_groups
from pycompress.pipeline import recover, recovery_targets
from pycompress.plan import LayerDecision, Plan
from pycompress.recover.linear_view import LinearView
from pycompress.rewrites import ApplyContext, apply_plan
from pycompress.rewrites import factorization as fz
from pycompress.rewrites.prune_channels import channel_statistics

FFN_GROUP = "group:/layers.0/up/MatMul"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return export_tiny_encoder(tmp_path_factory.mktemp("encoder") / "encoder.onnx")


def close(a, b, tol=1e-4):
    return float(np.max(np.abs(a - b))) <= tol * max(1.0, float(np.max(np.abs(a))))


def source(model, data):
    return lambda names: collect_activations(model, names, [data])


def test_svd_on_a_3d_matmul_is_exact_at_full_rank_and_recovery_finds_the_renamed_pair(encoder):
    teacher, student = load_model(encoder), load_model(encoder)
    data = token_batch(40)
    plan = apply_plan(student, Plan([LayerDecision("/layers.0/up/MatMul", "svd", {"rank": HIDDEN})]))
    assert close(run_model(teacher, data)[0], run_model(student, data)[0])
    # Rename every node the rewrite created: recovery reads the tensor the pair produces, not names.
    for i, node in enumerate(n for n in student.graph if "svd" in n.name):
        node.name = f"renamed_{i}"
    targets, notes = recovery_targets(teacher, student, plan)
    assert not notes
    (target,) = targets
    assert target.nodes == ["renamed_0", "renamed_1"] and target.rank == HIDDEN
    assert target.target == "/layers.0/up/Add_output_0"       # after the bias Add: the bias is refitted too


def test_recovery_refits_a_factored_matmul_add_pair_and_lowers_the_error(encoder):
    teacher, student = load_model(encoder), load_model(encoder)
    calib, held = token_batch(200, seed=1), token_batch(100, seed=2)
    plan = apply_plan(student, Plan([LayerDecision("/layers.0/up/MatMul", "svd", {"rank": 4}),
                                     LayerDecision("/layers.1/down/MatMul", "svd", {"rank": 4})]))
    before = compare_outputs(run_model(teacher, held)[0], run_model(student, held)[0])
    report = recover(teacher, student, plan, calib)
    after = compare_outputs(run_model(teacher, held)[0], run_model(student, held)[0])
    assert [len(r["nodes"]) for r in report["layers"]] == [2, 2]
    assert all(r["kept"] and r["error_after"] < r["error_before"] for r in report["layers"])
    assert after.mean_sq_error < before.mean_sq_error and after.cosine > before.cosine
    check_model(student)


def test_linear_view_reads_and_writes_the_bias_add(encoder):
    model = load_model(encoder)
    node = next(n for n in model.graph if n.name == "/layers.0/up/MatMul")
    view = LinearView.of(node)
    assert view.bias_add is not None and view.has_bias and view.weight_matrix().shape == (HIDDEN, FFN)
    w, b = view.weight_matrix() * 2, view.bias() + 1
    view.set(w, b)
    assert np.allclose(LinearView.of(node).weight_matrix(), w) and np.allclose(LinearView.of(node).bias(), b)


def test_fluctuation_pruning_with_bias_compensation_is_exact_against_onnxruntime(encoder):
    """The pruned model equals the original with the removed FFN channels replaced by
    their calibration means (consumer rows zeroed, bias += E[x_R] W[R, :])."""
    teacher = load_model(encoder)
    data = token_batch(64, seed=3)
    groups = [g for g in channel_groups(teacher) if g.prunable]
    assert [g.id for g in groups] == [FFN_GROUP, "group:/layers.1/up/MatMul"]
    stats = channel_statistics(groups, source(teacher, data), token_mask="attention_mask")
    student = teacher.clone()
    plan = apply_plan(student, Plan([LayerDecision(FFN_GROUP, "prune", {"keep": 40})]),
                      ApplyContext(options={"channel_statistics": stats}))
    result = plan.decisions[0].result
    assert result["criterion"] == "fluctuation" and result["bias_compensated"] == ["/layers.0/down/MatMul"]
    kept = np.array(result["kept_indices"])
    removed = np.setdiff1d(np.arange(FFN), kept)
    # The fluctuation ranking: var(x_j) * ||W[j, :]||^2 of the consumer's input rows.
    down = next(n for n in teacher.graph if n.name == "/layers.0/down/MatMul")
    w = constant_array(down.inputs[1]).astype(np.float64)
    st = stats[down.inputs[0].name]
    score = st.var * (w ** 2).sum(axis=1)
    assert score[kept].min() >= score[removed].max()
    # The expected model: the original with the removed rows zeroed and the bias compensated.
    expected = teacher.clone()
    down_e = next(n for n in expected.graph if n.name == "/layers.0/down/MatMul")
    add = next(iter(down_e.outputs[0].uses())).node
    slot = 1 - next(iter(down_e.outputs[0].uses())).idx
    w_e = w.copy()
    w_e[removed] = 0
    bias = constant_array(add.inputs[slot]).astype(np.float64) + st.mean[removed] @ w[removed]
    down_e.replace_input_with(1, add_initializer(expected, "w_zeroed", w_e.astype(np.float32)))
    add.replace_input_with(slot, add_initializer(expected, "b_compensated", bias.astype(np.float32)))
    assert close(run_model(expected, data)[0], run_model(student, data)[0])
    assert model_cost(student).params < model_cost(teacher).params


def test_recovery_after_pruning_refits_producer_and_consumer_and_helps(encoder):
    teacher, student = load_model(encoder), load_model(encoder)
    calib, held = token_batch(300, seed=4), token_batch(100, seed=5)
    plan = apply_plan(student, Plan([LayerDecision(FFN_GROUP, "prune", {"keep": 24})]))
    before = compare_outputs(run_model(teacher, held)[0], run_model(student, held)[0]).cosine
    report = recover(teacher, student, plan, calib)
    after = compare_outputs(run_model(teacher, held)[0], run_model(student, held)[0]).cosine
    assert sorted(r["nodes"][0] for r in report["layers"]) == ["/layers.0/down/MatMul", "/layers.0/up/MatMul"]
    assert after > before


def test_activation_aware_low_rank_is_the_cholesky_whitened_svd():
    """ALGORITHMS.md 1.7: truncating the SVD of S^T W (C = S S^T the input's second moment)
    gives the same map as the data-aware svd's projection on the outputs' top directions."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))
    w = rng.standard_normal((12, 9))
    k = 3
    s = np.linalg.cholesky(x.T @ x)
    u, sigma, vt = np.linalg.svd(s.T @ w)
    asvd = np.linalg.solve(s.T, u[:, :k] * sigma[:k]) @ vt[:k]
    y = x @ w

    def activations(names):
        yield {names[0]: y}

    site = fz.Site("fc", "svd", ["fc"])
    proj = fz.output_projection(site, ApplyContext(activations), "y", 9, -1, k, centered=False)
    assert np.allclose(w @ proj.basis @ proj.basis.T, asvd, atol=1e-8)
    # and the truncation error on the data is the sum of the dropped sigma^2
    assert np.isclose(np.sum((x @ asvd - y) ** 2), np.sum(sigma[k:] ** 2))


def test_synthetic_inputs_for_a_token_model(encoder):
    model = load_model(encoder)
    assert embedding_vocabulary(model.graph.inputs[0]) == VOCAB
    feeds = synthetic_inputs(model, 5, seed=0, sequence_length=10)
    assert feeds["input_ids"].shape == (5, 10) and feeds["input_ids"].dtype == np.int64
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < VOCAB
    assert np.all(feeds["attention_mask"] == 1)
    assert run_model(model, feeds)[0].shape == (5, HIDDEN)


def test_apply_without_data_on_a_token_model_prints_cosine(encoder, tmp_path, capsys):
    from pycompress.cli import main

    plan = tmp_path / "plan.json"
    Plan([LayerDecision(FFN_GROUP, "prune", {"keep": 48})]).save(plan)
    assert main(["apply", str(encoder), str(plan), "-o", str(tmp_path / "small.onnx")]) == 0
    out = capsys.readouterr().out
    assert "mean cosine" in out and "top-1" not in out


def test_cosine_replaces_top1_for_embeddings():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert is_embedding(emb) and not is_embedding(emb * 3) and is_embedding(rng.standard_normal((4, 5, 8)))
    result = compare_outputs(emb, emb + 0.01 * rng.standard_normal(emb.shape))
    assert result.top1_agreement is None and 0.99 < result.cosine <= 1.0
    logits = compare_outputs(emb * 3, emb * 3)
    assert logits.cosine is None and logits.top1_agreement == 1.0


def test_macs_per_sequence_and_for_dynamic_int8(encoder, tmp_path):
    from pycompress.export.quantized import to_int8_dynamic

    model = load_model(encoder)
    per_token = model_cost(model).macs
    per_sequence = model_cost(model, sequence_length=16).macs
    linear = 2 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)      # the encoder's linear layers, per token
    assert per_token >= linear and per_sequence >= 16 * linear
    to_int8_dynamic(encoder, tmp_path / "int8.onnx")
    quantized = load_model(tmp_path / "int8.onnx")
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in quantized.graph)
    assert model_cost(quantized, sequence_length=16).macs >= 16 * linear


def test_int8_static_export_of_an_encoder_with_a_symbolic_sequence(encoder, tmp_path):
    from pycompress.export.quantized import to_int8_static

    result = to_int8_static(encoder, tmp_path / "int8s.onnx", token_batch(32, seed=6))
    assert result["calibration_samples"] == 32
    out = run_model(load_model(tmp_path / "int8s.onnx"), token_batch(4, t=20, seed=7))[0]
    assert out.shape == (4, HIDDEN)      # the sequence length stays free


def test_one_block_per_encoder_sublayer(encoder):
    labels = block_labels(load_model(encoder))
    blocks = [labels[f"/layers.{i}/{name}/MatMul"] for i in range(2) for name in ("query", "out", "up", "down")]
    assert blocks[0] == blocks[1] and blocks[2] == blocks[3] and blocks[4] == blocks[5] and blocks[6] == blocks[7]
    assert len(set(blocks)) == 4


def test_ir_of_encoder_unchanged_by_analysis(encoder):
    before = encoder.read_bytes()
    model = load_model(encoder)
    channel_groups(model)
    block_labels(model)
    assert encoder.read_bytes() == before
    assert isinstance(model, ir.Model)


def _zero_head_rows(model, o_name, rows):
    expected = model.clone()
    o = next(n for n in expected.graph if n.name == o_name)
    w = constant_array(o.inputs[1]).copy()
    w[rows] = 0
    o.replace_input_with(1, add_initializer(expected, "w_o_zeroed", w))
    return expected, o


def test_head_pruning_is_exact_against_onnxruntime_and_recovery_refits_it(encoder):
    """Removing heads = zeroing their rows of O (heads are independent), checked with onnxruntime;
    Q/K/V lose the heads' columns, the Reshapes their head count."""
    teacher = load_model(encoder)
    data = token_batch(32, seed=8)
    site = "heads:/layers.0/out/MatMul"
    from pycompress.rewrites import get_rewrite

    assert get_rewrite("prune").site(teacher, site).info["width"] == 4
    student = teacher.clone()
    plan = apply_plan(student, Plan([LayerDecision(site, "prune", {"keep_indices": [0, 2]})]))
    expected, _ = _zero_head_rows(teacher, "/layers.0/out/MatMul", np.r_[8:16, 24:32])
    assert close(run_model(expected, data)[0], run_model(student, data)[0])
    q = next(n for n in student.graph if n.name == "/layers.0/query/MatMul")
    assert constant_array(q.inputs[1]).shape == (HIDDEN, 16)
    assert run_model(student, token_batch(3, t=20, seed=9))[0].shape == (3, HIDDEN)    # any sequence length
    targets, notes = recovery_targets(teacher, student, plan)
    assert not notes and sorted(t.nodes[0].split("/")[-2] for t in targets) == ["key", "out", "query", "value"]
    assert next(t for t in targets if "query" in t.nodes[0]).target_channels == list(range(8)) + list(range(16, 24))
    report = recover(teacher, student, plan, token_batch(200, seed=10))
    assert all(r["error_after"] <= r["error_before"] for r in report["layers"])


def test_head_pruning_by_fluctuation_with_bias_compensation(encoder):
    teacher = load_model(encoder)
    data = token_batch(64, seed=11)
    from pycompress.ir.heads import attention_heads

    heads = attention_heads(teacher)
    assert [h.id for h in heads] == ["heads:/layers.0/out/MatMul", "heads:/layers.1/out/MatMul"]
    stats = channel_statistics(heads, source(teacher, data), token_mask="attention_mask")
    student = teacher.clone()
    plan = apply_plan(student, Plan([LayerDecision(heads[1].id, "prune", {"keep": 3})]),
                      ApplyContext(options={"channel_statistics": stats}))
    result = plan.decisions[0].result
    assert result["criterion"] == "fluctuation" and result["bias_compensated"] == ["/layers.1/out/MatMul"]
    removed = np.setdiff1d(np.arange(32), result["kept_channels"])
    expected, o = _zero_head_rows(teacher, "/layers.1/out/MatMul", removed)
    add = next(iter(o.outputs[0].uses())).node
    slot = 1 - next(iter(o.outputs[0].uses())).idx
    w = constant_array(next(n for n in teacher.graph if n.name == "/layers.1/out/MatMul").inputs[1]).astype(float)
    st = stats[o.inputs[0].name]
    b = constant_array(add.inputs[slot]) + (st.mean[removed] @ w[removed]).astype(np.float32)
    add.replace_input_with(slot, add_initializer(expected, "b_o_compensated", b))
    assert close(run_model(expected, data)[0], run_model(student, data)[0])


def test_global_allocation_prunes_the_layer_that_matters_least_and_meets_the_macs_ratio(encoder):
    """rewrites/allocation.py: one ranking of every head and FFN channel by fluctuation per
    MAC. With layer 1's FFN output scaled down 1000x its channels are the cheapest to
    remove, so that FFN is cut far more than layer 0's; the applied plan lands on the
    MACs ratio (within one unit) and runs in onnxruntime with the cosine kept high."""
    from pycompress.ir import SEQUENCE_LENGTH
    from pycompress.ir.heads import attention_heads
    from pycompress.rewrites.allocation import allocation_plan, search_seeds, site_units

    teacher = load_model(encoder)
    down = next(n for n in teacher.graph if n.name == "/layers.1/down/MatMul")
    down.replace_input_with(1, add_initializer(teacher, "w_small", constant_array(down.inputs[1]) * 1e-3))
    data = token_batch(64, seed=21)
    groups = [g for g in channel_groups(teacher) if g.prunable] + attention_heads(teacher)
    stats = channel_statistics(groups, source(teacher, data), token_mask="attention_mask")
    units = {u.site: u for u in site_units(teacher, stats)}
    assert set(units) == {FFN_GROUP, "group:/layers.1/up/MatMul", "heads:/layers.0/out/MatMul",
                          "heads:/layers.1/out/MatMul"}
    assert units[FFN_GROUP].unit_macs == SEQUENCE_LENGTH * 2 * HIDDEN      # up column + down row per token
    base = model_cost(teacher, SEQUENCE_LENGTH).macs
    plan = allocation_plan(teacher, stats, 0.75)
    keep = {d.site: d.params["keep"] for d in plan.decisions}
    assert keep["group:/layers.1/up/MatMul"] < keep.get(FFN_GROUP, FFN) - 16
    student = teacher.clone()
    applied = apply_plan(student, plan, ApplyContext(options={"channel_statistics": stats}))
    assert all(d.result["criterion"] == "fluctuation" for d in applied.decisions)
    ratio = model_cost(student, SEQUENCE_LENGTH).macs / base
    largest_unit = max(u.unit_macs for u in units.values()) / base
    assert 0.75 - largest_unit <= ratio <= 0.75 + 1e-9
    held = token_batch(50, seed=22)
    cos = compare_outputs(run_model(teacher, held)[0], run_model(student, held)[0]).cosine
    assert cos > 0.9
    # A search over a token model is seeded at the target ratio, else at a few ratios.
    assert len(search_seeds(teacher, stats, 0.6)) == 1 and len(search_seeds(teacher, stats)) == 3
    assert search_seeds(teacher, None) == []


def test_aligned_allocation_cuts_channel_groups_in_whole_chunks():
    """``allocate(..., align)``: channel groups keep multiples of ``align`` (onnxruntime pads other
    widths), chunks go by their mean score per MAC, heads stay single units, and the MACs
    removed reach the budget."""
    from pycompress.rewrites.allocation import SiteUnits, allocate

    rng = np.random.default_rng(0)
    cheap = SiteUnits("group:a", rng.random(100) * 0.1, 1.0, 7)      # width 100: not a multiple
    dear = SiteUnits("group:b", 1.0 + rng.random(64), 1.0, 4)
    heads = SiteUnits("heads:c", np.array([0.05, 0.06, 3.0, 4.0]), 20.0, 1)
    units = [cheap, dear, heads]
    free = allocate(units, 57.0)
    aligned = allocate(units, 57.0, align=16)
    assert free["group:a"] % 16 != 0
    assert aligned["group:a"] % 16 == 0 and aligned["group:b"] % 16 == 0 and aligned["group:a"] >= 16
    assert aligned["group:b"] == 64          # the dear group is not touched before the cheap one is spent
    assert aligned["heads:c"] < 4 and aligned["heads:c"] >= 1     # heads are units: not rounded to 16
    removed = sum((u.width - aligned[u.site]) * u.unit_macs for u in units)
    assert removed >= 57.0
    # at most one chunk beyond what one-at-a-time removal takes
    assert removed <= sum((u.width - free[u.site]) * u.unit_macs for u in units) + 16 + 20


def test_compress_seeds_a_token_model_search_with_the_global_allocation(encoder, tmp_path, capsys):
    """A search over a token model evaluates the allocation plans (MACs 0.9, 0.8, 0.7 without a
    target) before its own design."""
    import json

    from pycompress.cli import main

    data = tmp_path / "calib.npz"
    np.savez(data, **token_batch(64, seed=31))
    out = tmp_path / "small.onnx"
    code = main(["compress", str(encoder), "--data", str(data), "--actions", "prune", "--granularity", "block",
                 "--objective", "macs", "--gamma", "1", "--method", "random", "--max-evals", "4", "--initial", "1",
                 "--no-recover", "--heldout", "none", "-o", str(out), "--quiet", "--json"])
    assert code == 0
    trace = json.loads((tmp_path / "small.trace.json").read_text())["search"]["trace"]
    # (one head of this tiny encoder is 4% of its MACs: the ratios land within a head)
    assert [e["ratio"] for e in trace[:3]] == pytest.approx([0.9, 0.8, 0.7], abs=0.05)


def test_compress_reports_held_out_cosine_for_an_encoder(encoder, tmp_path, capsys):
    """An embedding model's held-out line is in cosine (the unit a user reads), measured on the
    held-out file, not an argmax agreement over embedding dimensions."""
    from pycompress.cli import main

    data, held = tmp_path / "calib.npz", tmp_path / "held.npz"
    np.savez(data, **token_batch(64, seed=41))
    np.savez(held, **token_batch(24, seed=42))
    out = tmp_path / "small.onnx"
    code = main(["compress", str(encoder), "--data", str(data), "--actions", "prune", "--objective", "macs",
                 "--gamma", "1", "--method", "random", "--max-evals", "2", "--initial", "1", "--no-recover",
                 "--heldout", str(held), "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    line = next(ln for ln in printed if ln.startswith("held-out"))
    # MACs per sequence, as `info` counts them (not per token)
    assert any(ln.lstrip("| ").startswith("MACs (sequence of") for ln in printed), printed
    assert "24 samples" in line and "mean cosine" in line and "agreement" not in line
    cosine = float(line.split("mean cosine ")[1].split(",")[0])
    assert 0.0 < cosine < 1.0


def test_linear_view_of_a_gemm_reads_and_writes_the_effective_weight_and_bias():
    """alpha * op(B) and beta * C are what the layer computes; read and write agree (onnxruntime)."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    b_w, c = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="fc", alpha=0.5, beta=2.0, transB=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 5])],
                              [numpy_helper.from_array(b_w, "B"), numpy_helper.from_array(c, "C")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    x = rng.standard_normal((4, 3)).astype(np.float32)
    view = LinearView.of(next(iter(model.graph)))
    w, b = view.weight_matrix(), view.bias()
    assert close(run_model(model, {"x": x})[0], x @ w + b, 1e-5)
    view.set(2 * w, b + 1)
    assert close(run_model(model, {"x": x})[0], x @ (2 * w) + b + 1, 1e-5)
    assert np.allclose(view.weight_matrix(), 2 * w) and np.allclose(view.bias(), b + 1)
