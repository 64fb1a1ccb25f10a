"""qk_rank: fewer query/key dimensions per attention head, checked against onnxruntime on a small encoder."""

from __future__ import annotations

import numpy as np
import pytest
from transformer_models import HEADS, HIDDEN, export_tiny_encoder, token_batch

from pycompress.errors import PycompressError
from pycompress.fidelity import collect_activations, run_model
from pycompress.ir import (
    SEQUENCE_LENGTH,
    add_initializer,
    constant_array,
    load_model,
    model_cost,
)
from pycompress.pipeline import recover
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import ApplyContext, apply_plan, get_rewrite
from pycompress.rewrites.qk_rank import augmented_moments, factor_scores

D = HIDDEN // HEADS
SITE0, SITE1 = "qk:/layers.0/out/MatMul", "qk:/layers.1/out/MatMul"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return export_tiny_encoder(tmp_path_factory.mktemp("qk") / "encoder.onnx")


def node(model, name):
    return next(n for n in model.graph if n.name == name)


def source(model, data):
    return lambda names: collect_activations(model, names, [data])


def rank_limited(path, rank):
    """The encoder with every head's query using only its first ``rank`` of ``D`` dimensions
    (later query columns and biases zeroed): its score forms have rank ``rank`` exactly."""
    model = load_model(path)
    for layer in (0, 1):
        q = node(model, f"/layers.{layer}/query/MatMul")
        cols = np.concatenate([np.arange(h * D + rank, (h + 1) * D) for h in range(HEADS)])
        w = constant_array(q.inputs[1]).copy()
        w[:, cols] = 0
        q.replace_input_with(1, add_initializer(model, "wq_limited", w))
        add = next(iter(q.outputs[0].uses())).node
        slot = 1 - next(iter(q.outputs[0].uses())).idx
        b = constant_array(add.inputs[slot]).copy()
        b[cols] = 0
        add.replace_input_with(slot, add_initializer(model, "bq_limited", b))
    return model


def share_split_shapes(model):
    """Q, K and V of each block read one shape tensor (Q's), as loading MiniLM merges them."""
    from pycompress.ir.heads import attention_heads

    for block in attention_heads(model):
        for split in block.splits[1:]:
            split.replace_input_with(1, block.splits[0].inputs[1])
    return model


@pytest.mark.parametrize("data_aware, shared", [(False, False), (True, False), (True, True)])
def test_rank_r_scores_are_kept_exactly_against_onnxruntime(encoder, data_aware, shared):
    """When every head's score form has rank r, qk_rank at r changes nothing the attention sees:
    the key bias (softmax-invariant per query) is dropped, Q and K shrink to H*r columns, a
    shape Concat V shares is copied for Q and K only, and any sequence length still runs."""
    teacher = rank_limited(encoder, 3)
    if shared:
        share_split_shapes(teacher)
    student = teacher.clone()
    calib, held = token_batch(48, seed=1), token_batch(32, seed=2)
    ctx = ApplyContext(activations=source(teacher, calib), options={"data_aware": data_aware,
                                                                     "token_mask": "attention_mask"})
    plan = apply_plan(student, Plan([LayerDecision(s, "qk_rank", {"rank": 3}) for s in (SITE0, SITE1)]), ctx)
    assert [d.result["data_aware"] for d in plan.decisions] == [data_aware] * 2
    assert all(d.result["score_energy_kept"] == pytest.approx(1.0) for d in plan.decisions)
    expected, got = run_model(teacher, held)[0], run_model(student, held)[0]
    assert np.max(np.abs(expected - got)) < 1e-4
    for layer in (0, 1):
        assert constant_array(node(student, f"/layers.{layer}/query/MatMul").inputs[1]).shape == (HIDDEN, HEADS * 3)
        assert constant_array(node(student, f"/layers.{layer}/key/MatMul").inputs[1]).shape == (HIDDEN, HEADS * 3)
        assert constant_array(node(student, f"/layers.{layer}/value/MatMul").inputs[1]).shape == (HIDDEN, HIDDEN)
    assert run_model(student, token_batch(3, t=20, seed=3))[0].shape == (3, HIDDEN)
    cost = model_cost(student, SEQUENCE_LENGTH).macs / model_cost(teacher, SEQUENCE_LENGTH).macs
    assert cost < 0.97


def test_whitened_truncation_has_the_smaller_score_error_on_the_calibration_tokens():
    """Data-aware qk_rank minimises E (x~ (M - M_r) x~'^T)^2 over the calibration rows; plain SVD
    minimises ||M - M_r||_F. On correlated inputs the first is smaller on those rows, the second
    in the Frobenius norm (Eckart-Young both ways)."""
    rng = np.random.default_rng(0)
    n, d_in, heads, d, r = 2000, 12, 2, 6, 2
    mix = rng.normal(size=(d_in, d_in)) * np.linspace(3, 0.1, d_in)[:, None]
    x = rng.normal(size=(n, d_in)) @ mix + 0.5
    wq, wk = rng.normal(size=(d_in, heads * d)), rng.normal(size=(d_in, heads * d))
    bq, bk = rng.normal(size=heads * d), rng.normal(size=heads * d)
    xa = np.hstack([x, np.ones((n, 1))])
    moment = xa.T @ xa / n

    def score_error_and_frobenius(new):
        nwq, nbq, nwk, nbk, _ = new
        err = fro = 0.0
        for h in range(heads):
            old_m = np.vstack([wq[:, h * d:(h + 1) * d], bq[None, h * d:(h + 1) * d]]) @ \
                np.vstack([wk[:, h * d:(h + 1) * d], bk[None, h * d:(h + 1) * d]]).T
            old_m[:, -1] = 0                        # the softmax-invariant column is not approximated
            m = np.vstack([nwq[:, h * r:(h + 1) * r], nbq[None, h * r:(h + 1) * r]]) @ \
                np.vstack([nwk[:, h * r:(h + 1) * r], nbk[None, h * r:(h + 1) * r]]).T
            diff = old_m - m
            err += float(((xa[:500] @ diff @ xa[500:1000].T) ** 2).mean())
            fro += float((diff ** 2).sum())
        return err, fro

    plain = score_error_and_frobenius(factor_scores(wq, bq, wk, bk, heads, r))
    white = score_error_and_frobenius(factor_scores(wq, bq, wk, bk, heads, r, moment, moment))
    assert white[0] < 0.8 * plain[0] and plain[1] < white[1]
    # The new key has no bias: its query-only terms were dropped.
    assert np.allclose(factor_scores(wq, bq, wk, bk, heads, r, moment, moment)[3], 0)
    # Projections without biases get none (up to rounding), whitened or not.
    for m in (None, moment):
        _, nbq, _, nbk, _ = factor_scores(wq, None, wk, None, heads, r, m, m)
        assert np.abs(nbq).max() < 1e-9 and np.abs(nbk).max() < 1e-9


def test_augmented_moments_leave_padding_out(encoder):
    teacher = load_model(encoder)
    data = token_batch(16, seed=4)
    name = node(teacher, "/layers.0/query/MatMul").inputs[0].name
    moment = augmented_moments([name], source(teacher, data), "attention_mask")[name]
    x = collect_activations(teacher, [name], [data])
    rows = next(iter(x))[name][data["attention_mask"] != 0]
    assert moment[-1, -1] == pytest.approx(1.0)
    assert np.allclose(moment[:-1, -1], rows.mean(0), atol=1e-5)


def test_after_head_pruning_in_one_plan_and_recovery(encoder):
    """Heads are pruned first (order), then the kept heads lose query/key dimensions; recovery
    refits the layers after them and says why Q and K are not refitted."""
    teacher = load_model(encoder)
    student = teacher.clone()
    calib = token_batch(200, seed=5)
    plan = apply_plan(student, Plan([LayerDecision(SITE0, "qk_rank", {"rank": 4}),
                                     LayerDecision("heads:/layers.0/out/MatMul", "prune", {"keep": 3})]),
                      ApplyContext(activations=source(teacher, calib), options={"data_aware": True}))
    assert plan.decisions[0].result["heads"] == 3
    assert constant_array(node(student, "/layers.0/query/MatMul").inputs[1]).shape == (HIDDEN, 3 * 4)
    held = token_batch(40, seed=6)
    before = np.linalg.norm(run_model(teacher, held)[0] - run_model(student, held)[0])
    report = recover(teacher, student, plan, calib)
    assert any("qk:/layers.0/out/MatMul" in note for note in report["notes"])
    after = np.linalg.norm(run_model(teacher, held)[0] - run_model(student, held)[0])
    assert after < before


def test_refusals_name_the_site(encoder):
    model = load_model(encoder)
    with pytest.raises(PycompressError, match=r"site 'qk:/layers.0/out/MatMul': 'rank' must be an integer in \[1, 8\]"):
        apply_plan(model, Plan([LayerDecision(SITE0, "qk_rank", {"rank": D + 1})]))
    same = model.clone()
    applied = apply_plan(same, Plan([LayerDecision(SITE0, "qk_rank", {"rank": D})]))
    assert applied.decisions[0].result["skipped"] and constant_array(
        node(same, "/layers.0/query/MatMul").inputs[1]).shape == (HIDDEN, HIDDEN)
    with pytest.raises(PycompressError, match="site 'qk:nope'"):
        apply_plan(model, Plan([LayerDecision("qk:nope", "qk_rank", {"rank": 2})]))
    with pytest.raises(PycompressError, match="needs calibration data"):
        apply_plan(model, Plan([LayerDecision(SITE0, "qk_rank", {"rank": 2, "data_aware": True})]))


def test_combined_seeds_prune_less_where_query_key_ranks_save(encoder):
    from pycompress.ir.channels import channel_groups
    from pycompress.ir.heads import attention_heads
    from pycompress.rewrites.allocation import qk_seeds
    from pycompress.rewrites.prune_channels import channel_statistics

    teacher = load_model(encoder)
    data = token_batch(64, seed=7)
    groups = [g for g in channel_groups(teacher) if g.prunable] + attention_heads(teacher)
    stats = channel_statistics(groups, source(teacher, data), token_mask="attention_mask")
    seeds = qk_seeds(teacher, {"channel_statistics": stats}, 0.7, [SITE0, SITE1])
    assert len(seeds) == 2
    base = model_cost(teacher, SEQUENCE_LENGTH).macs
    for seed, rank in zip(seeds, (D // 2, 3)):
        assert sorted(d.params["rank"] for d in seed.decisions if d.action == "qk_rank") == [rank, rank]
        student = teacher.clone()
        apply_plan(student, seed, ApplyContext(options={"channel_statistics": stats}))
        assert model_cost(student, SEQUENCE_LENGTH).macs / base == pytest.approx(0.7, abs=0.06)
    assert qk_seeds(teacher, {}, 0.7, [SITE0]) == []
    assert get_rewrite("qk_rank").starting_decision(teacher, get_rewrite("qk_rank").site(teacher, SITE0)) \
        .params == {"rank": D // 2}


def test_compress_searches_query_key_ranks_with_pruning_from_the_combined_seeds(encoder, tmp_path):
    """`compress --actions prune,qk_rank` on a token model: one coordinate per attention block for
    the rank (--granularity block), the moments measured once, the combined seeds evaluated early."""
    import json

    from pycompress.cli import main

    data = tmp_path / "calib.npz"
    np.savez(data, **token_batch(64, seed=31))
    out = tmp_path / "small.onnx"
    code = main(["compress", str(encoder), "--data", str(data), "--actions", "prune,qk_rank", "--granularity",
                 "block", "--objective", "macs", "--target-size", "0.7", "--method", "random", "--max-evals", "5",
                 "--initial", "1", "--no-recover", "--heldout", "none", "-o", str(out), "--quiet", "--json"])
    assert code == 0
    trace = json.loads((tmp_path / "small.trace.json").read_text())["search"]["trace"]
    ranks = [[e["decisions"].get(s) for s in (SITE0, SITE1)] for e in trace]
    assert [D // 2, D // 2] in ranks[:4] and [3, 3] in ranks[:4]
    small = load_model(out)
    assert run_model(small, token_batch(4, seed=32))[0].shape == (4, HIDDEN)



def test_plan_with_pruning_writes_query_key_ranks_apply_accepts(encoder, tmp_path):
    """`plan --actions prune,qk_rank`: the ranks are planned on the pruned model (its shapes
    re-inferred first) and the plan composes; apply without data runs it."""
    import json

    from pycompress.cli import main

    plan = tmp_path / "plan.json"
    assert main(["plan", str(encoder), "--actions", "prune,qk_rank", "-o", str(plan)]) == 0
    actions = [d["action"] for d in json.loads(plan.read_text())["decisions"]]
    assert actions.count("qk_rank") == 2 and "prune" in actions
    assert main(["apply", str(encoder), str(plan), "-o", str(tmp_path / "small.onnx")]) == 0
