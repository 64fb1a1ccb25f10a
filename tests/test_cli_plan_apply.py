"""`pycompress plan` and `pycompress apply`: sites, starting plans, applying, reports, bad plans."""

import json
import re
import subprocess
import sys
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import zoo
from conftest import export
from pycompress.cli import main
from pycompress.ir import constant_array, load_model, model_cost, node_by_name
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import REGISTRY, Rewrite, Site

SIZES = (64, 48, 32, 10)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """An MLP whose first two layers have geometric spectra (0.7^i, 0.8^i); the last is random."""
    torch.manual_seed(0)
    module = zoo.MLP(SIZES)
    rng = np.random.default_rng(0)
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer, decay in zip(linears[:2], (0.7, 0.8)):
            n_out, n_in = layer.weight.shape
            k = min(n_out, n_in)
            u, _ = np.linalg.qr(rng.normal(size=(n_out, k)))
            v, _ = np.linalg.qr(rng.normal(size=(n_in, k)))
            layer.weight.copy_(torch.from_numpy((u * 4 * decay ** np.arange(k)) @ v.T).float())
    return export(module, (1, 64), tmp_path_factory.mktemp("cli") / "mlp.onnx")


def energy_ranks(path, energy):
    """site -> (rank keeping `energy` of the weight's squared singular values, r_max), by numpy's SVD."""
    model = load_model(path)
    out = {}
    for site in REGISTRY["svd"].sites(model):
        w = constant_array(node_by_name(model, site.name).inputs[1])
        power = np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2
        rank = int(np.argmax(np.cumsum(power) / power.sum() >= energy)) + 1
        out[site.name] = (rank, w.shape[0] * w.shape[1] // (w.shape[0] + w.shape[1]))
    return out


def explain_blocks(out: str) -> dict[tuple[str, str], str]:
    """(action, site) -> the lines `plan --explain` printed for it."""
    blocks: dict[tuple[str, str], str] = {}
    key = None
    for line in out.splitlines():
        if line and not line.startswith(" ") and "  " in line:
            action, site = line.split()[:2]
            key = (action, site)
            blocks[key] = line
        elif key and line.startswith("    "):
            blocks[key] += "\n" + line
    return blocks


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("energy", [0.9, 0.5])
def test_plan_explains_every_site_and_writes_a_starting_plan(tmp_path, capsys, mlp, energy):
    plan_path = tmp_path / "plan.json"
    code, out, err = cli(capsys, "plan", mlp, "--actions", "svd,lowrank_conv", "--explain", "-o", plan_path,
                         "--energy", energy)
    assert code == 0, err
    expected = energy_ranks(mlp, energy)
    shrinking = sum(rank < r_max for rank, r_max in expected.values())
    assert shrinking == {0.9: 2, 0.5: 3}[energy]  # at 90% the random last layer cannot shrink
    plan = Plan.load(plan_path)
    decided = {d.site: d.params["rank"] for d in plan.decisions}
    assert decided == {name: rank for name, (rank, r_max) in expected.items() if rank < r_max}
    assert all(d.action == "svd" for d in plan.decisions)
    assert plan.meta["options"]["energy"] == energy
    blocks = explain_blocks(out)
    for name, (rank, r_max) in expected.items():
        block = blocks[("svd", name)]
        assert f"r_max {r_max};" in block
        assert f"decision: rank={rank} " in block if rank < r_max else "no decision: " in block
        assert rank < r_max or f"needs rank {rank} >= r_max {r_max}" in block
    assert f"{shrinking} decisions over 3 applicable sites" in out


def test_plan_json_and_unknown_actions(tmp_path, capsys, mlp):
    code, out, _ = cli(capsys, "plan", mlp, "--actions", "svd", "--json")
    assert code == 0
    payload = json.loads(out)
    first = payload["sites"][0]
    assert first["info"]["r_max"] == 64 * 48 // 112 and first["info"]["params"] == 64 * 48 + 48
    assert first["info"]["macs"] == 64 * 48 and first["decision"]["rank"] < first["info"]["r_max"]
    assert payload["decisions"] == len(payload["plan"]["decisions"]) == 2
    code, _, err = cli(capsys, "plan", mlp, "--actions", "svd,tucker")
    assert code == 2 and "unknown action 'tucker'" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "plan", mlp, "--actions", "svd", "--energy", "1.5")
    assert code == 2 and "--energy" in err


class RecordingRewrite(Rewrite):
    """A stand-in for rewrites developed elsewhere (prune, share): records what plan forwards."""

    action = "fake_prune"
    summary = "test double"
    params = {"keep": "fraction kept"}
    seen: list[dict[str, Any]] = []

    def sites(self, model):
        nodes = [n for n in model.graph if n.op_type == "Gemm"]
        return [Site(nodes[0].name, self.action, [nodes[0].name], info={"width": 48}),
                Site(nodes[-1].name, self.action, [nodes[-1].name], ok=False, reason="feeds the graph output")]

    def apply(self, model, decision, ctx):
        raise AssertionError("not applied in this test")

    def starting_decision(self, model, site, **options):
        self.seen.append(options)
        return LayerDecision(site.name, self.action, {"keep": options["keep"]}, note=f"bits={options['bits']}")


def test_plan_is_generic_over_the_registry(tmp_path, capsys, monkeypatch, mlp):
    fake = RecordingRewrite()
    monkeypatch.setitem(REGISTRY, fake.action, fake)
    plan_path = tmp_path / "plan.json"
    code, out, err = cli(capsys, "plan", mlp, "--actions", "fake_prune", "--keep", "0.5", "--bits", "4",
                         "--explain", "-o", plan_path)
    assert code == 0, err
    assert fake.seen == [{"energy": 0.9, "keep": 0.5, "bits": 4, "align": 1, "data_aware": False}]
    assert [(d.action, d.params) for d in Plan.load(plan_path).decisions] == [("fake_prune", {"keep": 0.5})]
    blocks = list(explain_blocks(out).values())
    assert "width 48" in blocks[0] and "decision: keep=0.5 (bits=4)" in blocks[0]
    assert "not applicable: feeds the graph output" in blocks[1]


def test_prune_and_svd_plan_and_apply_together(tmp_path, capsys, mlp):
    """Rewrites from different issues meet in one plan: pruning first (order), then factorization."""
    plan_path, out_path = tmp_path / "plan.json", tmp_path / "small.onnx"
    code, _, err = cli(capsys, "plan", mlp, "--actions", "prune,svd", "--keep", "0.75", "-o", plan_path)
    assert code == 0, err
    actions = [d.action for d in Plan.load(plan_path).decisions]
    assert actions.count("prune") == 2 and actions.count("svd") == 2
    code, out, err = cli(capsys, "apply", mlp, plan_path, "-o", out_path, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["after"]["params"] == model_cost(load_model(out_path)).params < report["before"]["params"]
    svd_results = [d["result"] for d in report["decisions"] if d["action"] == "svd"]
    assert all(r["params_after"] < r["params_before"] for r in svd_results)


def test_apply_reports_before_after_and_writes_the_results(tmp_path, capsys, mlp):
    plan_path, out_path = tmp_path / "plan.json", tmp_path / "small.onnx"
    assert cli(capsys, "plan", mlp, "--actions", "svd", "-o", plan_path)[0] == 0
    x = np.random.default_rng(3).normal(size=(20, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    code, out, err = cli(capsys, "apply", mlp, plan_path, "-o", out_path, "--data", "builtin:digits",
                         "--weight-only", "--eval-data", tmp_path / "x.npz", "--samples", 20)
    assert code == 0, err
    assert "output difference on first 20 samples of " + str(tmp_path / "x.npz") in out
    assert "params" in out and "macs" in out and "file_bytes" in out and "relative L2" in out
    results = json.loads((tmp_path / "small.plan.json").read_text())
    applied = results["meta"]["applied"]
    before, after = model_cost(load_model(mlp)), model_cost(load_model(out_path))
    assert (applied["before"]["params"], applied["after"]["params"]) == (before.params, after.params)
    assert after.params < before.params and applied["after"]["file_bytes"] == out_path.stat().st_size
    ranks = [d["params"]["rank"] for d in results["decisions"]]
    assert sum(d["result"]["params_before"] - d["result"]["params_after"] for d in results["decisions"]) == \
        before.params - after.params
    assert all(not d["result"]["data_aware"] for d in results["decisions"]) and len(ranks) == 2
    # The reported difference is what onnxruntime gives on the written files.
    y0 = ort.InferenceSession(str(mlp)).run(None, {"input": x})[0]
    y1 = ort.InferenceSession(str(out_path)).run(None, {"input": x})[0]
    reported = applied["output_difference"][0]
    assert reported["max_abs_diff"] == pytest.approx(float(np.abs(y0 - y1).max()), rel=1e-4)
    assert reported["top1_agreement"] == pytest.approx(float(np.mean(y0.argmax(1) == y1.argmax(1))))


def test_apply_with_data_fits_data_aware_and_beats_weight_only(tmp_path, capsys, mlp):
    model = load_model(mlp)
    last = REGISTRY["svd"].sites(model)[-1].name  # its output is the logits: the guarantee is end to end
    plan_path = tmp_path / "plan.json"
    Plan([LayerDecision(last, "svd", {"rank": 3})]).save(plan_path)
    reports = {}
    for flag in ("", "--weight-only"):
        args = ["apply", mlp, plan_path, "-o", tmp_path / f"m{flag}.onnx", "--data", "builtin:digits",
                "--samples", 1797, "--json"] + ([flag] if flag else [])
        code, out, err = cli(capsys, *args)
        assert code == 0, err
        reports[flag] = json.loads(out)
    aware, plain = reports[""], reports["--weight-only"]
    assert aware["decisions"][0]["result"]["data_aware"] and not plain["decisions"][0]["result"]["data_aware"]
    assert aware["decisions"][0]["result"]["calibration_rows"] == 1797
    assert aware["output_difference"][0]["relative_l2"] < 0.9 * plain["output_difference"][0]["relative_l2"]


@pytest.mark.parametrize("decision,message", [
    ({"site": "SITE", "action": "svd", "params": {"rank": 0}}, "site 'SITE': rank 0 is below 1"),
    ({"site": "SITE", "action": "svd", "params": {"rank": 49}}, "site 'SITE': rank 49 is above the full rank 48"),
    ({"site": "/nowhere/Gemm", "action": "svd", "params": {"rank": 2}}, "site '/nowhere/Gemm': no node"),
    ({"site": "RELU", "action": "svd", "params": {"rank": 2}}, "site 'RELU': 'svd' applies to Gemm"),
    ({"site": "SITE", "action": "lowrank_conv", "params": {"rank": 2}}, "site 'SITE': 'lowrank_conv' applies to Conv"),
    ({"site": "SITE", "action": "svd", "params": {"rank": 2, "data_aware": True}},
     "site 'SITE': data_aware needs calibration data"),
    ({"site": "SITE", "action": "svd", "params": {"rank": 2}, "ranks": 3}, "site 'SITE'.*unknown key"),
])
def test_bad_plans_fail_in_one_line_and_write_nothing(tmp_path, capsys, mlp, decision, message):
    model = load_model(mlp)
    site = REGISTRY["svd"].sites(model)[0].name
    relu = next(n.name for n in model.graph if n.op_type == "Relu")
    decision = json.loads(json.dumps(decision).replace("SITE", site).replace("RELU", relu))
    good = {"site": REGISTRY["svd"].sites(model)[1].name, "action": "svd", "params": {"rank": 2}}
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps({"version": 1, "model": str(mlp), "decisions": [good, decision]}))
    code, out, err = cli(capsys, "apply", mlp, plan_path, "-o", tmp_path / "out.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message.replace("SITE", re.escape(site)).replace("RELU", re.escape(relu)), err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_apply_refuses_to_overwrite_its_plan(tmp_path, capsys, mlp):
    plan_path = tmp_path / "out.plan.json"
    assert cli(capsys, "plan", mlp, "--actions", "svd", "-o", plan_path)[0] == 0
    code, _, err = cli(capsys, "apply", mlp, plan_path, "-o", tmp_path / "out.onnx")
    assert code == 2 and "overwrite the input plan" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.plan.json"]


def test_console_entry_point_plan_then_apply(tmp_path, mlp):
    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "pycompress", *map(str, args)], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    plan = run("plan", mlp, "--actions", "svd,lowrank_conv", "-o", tmp_path / "p.json", "--json")
    report = run("apply", mlp, tmp_path / "p.json", "-o", tmp_path / "small.onnx", "--json", "--samples", 8)
    assert len(report["decisions"]) == plan["decisions"] == 2
    assert report["after"]["params"] < report["before"]["params"]
    assert report["output_difference"][0]["relative_l2"] < 0.5  # 90% of the energy kept in the shrunk layers


@pytest.mark.slow
def test_efficientnet_plan_and_apply(tmp_path, capsys, efficientnet_onnx):
    plan_path, out_path = tmp_path / "plan.json", tmp_path / "small.onnx"
    code, out, err = cli(capsys, "plan", efficientnet_onnx, "--actions", "svd,lowrank_conv", "--energy", "0.99",
                         "--explain", "-o", plan_path)
    assert code == 0, err
    blocks = explain_blocks(out)
    assert "not applicable: depthwise conv (group=32)" in blocks[("lowrank_conv", "/_blocks.0/_depthwise_conv/Conv")]
    assert "not applicable: 1x1 conv: a matrix, factored by action 'svd'" in \
        blocks[("lowrank_conv", "/_conv_head/Conv")]
    assert "r_max 561;" in blocks[("svd", "/_fc/Gemm")]
    plan = Plan.load(plan_path)
    assert plan.decisions and all(d.params["rank"] < REGISTRY[d.action].site(load_model(efficientnet_onnx),
                                                                             d.site).info["r_max"]
                                  for d in plan.decisions[:3])
    code, out, err = cli(capsys, "apply", efficientnet_onnx, plan_path, "-o", out_path, "--samples", 2, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["params"] == model_cost(load_model(out_path)).params
