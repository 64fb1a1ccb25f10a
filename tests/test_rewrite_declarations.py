"""What rewrites declare about themselves, and the pipeline reading only that:
recovery finds factored pairs by the tensor they produce, not by the names the
rewrite gave its nodes; search dimensions, exclusions and costs come from the
rewrites; plans whose actions may share a site compose."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import export
from zoo import MLP

from pycompress.cli import main
from pycompress.errors import PycompressError
from pycompress.ir import load_model
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import REGISTRY, apply_plan
from pycompress.rewrites.base import SearchSettings
from pycompress.rewrites.compose import check_plan_composes
from pycompress.rewrites.svd import SVD

LAYERS = ["/net/net.0/Gemm", "/net/net.2/Gemm"]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decl")
    torch.manual_seed(0)
    path = export(MLP(), (1, 64), folder / "mlp.onnx")
    np.savez(folder / "calib.npz", x=np.random.default_rng(0).standard_normal((200, 64)).astype(np.float32))
    return path, folder / "calib.npz"


class RenamingSVD(SVD):
    """svd whose created nodes get names that say nothing about svd or the site."""

    def apply(self, model, decision, ctx):
        before = {id(n) for n in model.graph}
        result = super().apply(model, decision, ctx)
        for i, node in enumerate(n for n in model.graph if id(n) not in before):
            node.name = f"renamed_{decision.site.count('/')}_{len(before)}_{i}"
        return result


def test_compress_refits_the_svd_pairs_when_the_created_nodes_are_renamed(mlp, tmp_path, monkeypatch, capsys):
    path, data = mlp
    plan_path = tmp_path / "svd.plan.json"
    Plan([LayerDecision(site, "svd", {"rank": 4}) for site in LAYERS], str(path)).save(plan_path)
    monkeypatch.setitem(REGISTRY, "svd", RenamingSVD())
    out = tmp_path / "out.onnx"
    assert main(["compress", str(path), "--data", str(data), "--method", str(plan_path), "-o", str(out),
                 "--quiet", "--json"]) == 0
    capsys.readouterr()
    names = {n.name for n in load_model(out).graph}
    assert not any("svd" in name for name in names) and sum(name.startswith("renamed_") for name in names) == 4
    recovery = json.loads((tmp_path / "out.report" / "report.json").read_text())["recovery"]
    assert not [note for note in recovery["notes"] if "not refitted" in note], recovery["notes"]
    pairs = [layer["nodes"] for layer in recovery["layers"]]
    assert len(pairs) == 2 and all(len(p) == 2 and all(n.startswith("renamed_") for n in p) for p in pairs)
    assert all(layer["error_after"] <= layer["error_before"] for layer in recovery["layers"])


def test_search_dimensions_exclusions_and_predicted_costs_are_the_rewrites(mlp):
    model = load_model(mlp[0])
    svd, share, quant, prune = (REGISTRY[a] for a in ("svd", "share", "quant", "prune"))
    site = svd.site(model, LAYERS[0])
    found = svd.search_dimension(model, site, SearchSettings())
    assert (found.param, found.kind, found.low, found.high) == ("rank", "rank", 1, site.info["r_max"])
    positions = found.positions()
    assert len(positions) == found.high and positions[0] == 0.0 and positions[-1] == 1.0
    assert share.excluded_after(svd) == "factored by svd; not shared"
    assert quant.excluded_after(share) == "weights shared (no constant left to quantize)"
    assert quant.excluded_after(svd) is None and svd.excluded_after(prune) is None
    assert quant.predicted_cost("bytes") == 0.25 and svd.predicted_cost("bytes") is None
    group = next(s for s in prune.sites(model) if s.ok)
    assert isinstance(prune.search_dimension(model, group, SearchSettings(max_prune=0.01)), str)


def test_a_factored_layer_may_be_quantized_but_not_shared(mlp):
    """The search space puts svd and quant on one layer; the plan it writes must compose."""
    model = load_model(mlp[0])
    svd_quant = Plan([LayerDecision(LAYERS[0], "svd", {"rank": 4}), LayerDecision(LAYERS[0], "quant", {"bits": 32})])
    check_plan_composes(model, svd_quant)
    applied = apply_plan(model.clone(), svd_quant)
    assert [d.action for d in applied.decisions] == ["svd", "quant"]
    svd_share = Plan([LayerDecision(LAYERS[0], "svd", {"rank": 4}), LayerDecision(LAYERS[0], "share", {"bits": 4})])
    with pytest.raises(PycompressError, match="two actions cannot rewrite one layer"):
        check_plan_composes(model, svd_share)


@pytest.mark.parametrize("action, params", [("svd", {"rank": 4}), ("share", {"bits": 4})])
def test_created_names_declare_what_apply_creates(mlp, action, params):
    """The scan in test_import_contracts.py looks for these fragments: they must be the real ones."""
    model = load_model(mlp[0])
    before = {n.name for n in model.graph} | set(model.graph.initializers)
    apply_plan(model, Plan([LayerDecision(LAYERS[0], action, params)]))
    created = ({n.name for n in model.graph} | set(model.graph.initializers)) - before
    fragments = REGISTRY[action].created_names
    assert created and all(any(f in name for f in fragments) for name in created), (created, fragments)


def test_compress_hands_the_rewrites_activations_where_a_decision_asks_for_data(mlp, tmp_path, capsys):
    """A given plan's data-aware svd and bias-corrected sharing get the calibration data inside
    compress; decisions that do not ask stay weight-only (the default, as before)."""
    path, data = mlp
    plan_path = tmp_path / "given.plan.json"
    Plan([LayerDecision(LAYERS[0], "svd", {"rank": 4, "data_aware": True}),
          LayerDecision(LAYERS[1], "svd", {"rank": 4}),
          LayerDecision("/net/net.4/Gemm", "share", {"bits": 3, "bias_correction": True})], str(path)).save(plan_path)
    out = tmp_path / "data.onnx"
    assert main(["compress", str(path), "--data", str(data), "--method", str(plan_path), "-o", str(out),
                 "--no-recover", "--quiet", "--json"]) == 0
    capsys.readouterr()
    results = {d.site: d.result for d in Plan.load(tmp_path / "data.plan.json").decisions}
    assert results[LAYERS[0]]["data_aware"] is True and results[LAYERS[0]]["calibration_rows"] == 200
    assert results[LAYERS[1]]["data_aware"] is False
    assert results["/net/net.4/Gemm"]["bias_corrected"] is True
