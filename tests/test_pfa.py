"""PFA recipes, selection and footprint target (decisions.pfa), responses and sites on real graphs."""

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from scipy.stats import entropy

import pfa_models
from pycompress.analysis import analyze, find_sites, plan_from_analysis, site_cost_model
from pycompress.data import load_data
from pycompress.decisions import pfa
from pycompress.errors import PycompressError
from pycompress.fidelity import responses
from pycompress.fidelity.responses import collect_responses, response_tensor
from pycompress.ir import load_model, model_cost
from pycompress.kernels import CovarianceAccumulator
from pycompress.plan import LayerDecision, Plan

AUTHORS_MATRIX = np.array([[1, .7, .2, .3, .9],
                           [.7, 1, .1, .2, .6],
                           [.2, .1, 1, .8, .3],
                           [.3, .2, .8, 1, .3],
                           [.9, .6, .3, .3, 1]])


def planted(c=32, k=5, n=4000, noise=0.01, seed=0):
    """Responses with k strong random directions (variance 1 each) plus isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(c, c)))[0][:, :k]
    x = rng.normal(size=(n, k)) @ basis.T + noise * rng.normal(size=(n, c))
    return x + rng.uniform(-3, 3, size=c)  # a mean must not matter


def cov_of(x):
    return np.cov(x, rowvar=False)


# ---------------------------------------------------------------- selection

def test_reference_selection_check_through_a_covariance():
    # Scaling each unit's variance leaves the correlation, hence the order, unchanged.
    scale = np.array([1.0, 3.0, 0.5, 10.0, 2.0])
    cov = AUTHORS_MATRIX * np.outer(scale, scale)
    assert pfa.removal_order(cov, 4).tolist() == [0, 3, 4, 1]
    assert pfa.select_filters(cov, 1) == [2]
    assert pfa.select_filters(cov, 3) == [1, 2, 4]


def test_duplicated_filters_are_the_ones_removed():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3000, 6)) * rng.uniform(0.5, 2, size=6)
    # Filters 6, 7, 8 are exact (scaled) copies of filters 0, 2, 4.
    x = np.concatenate([base, base[:, [0, 2, 4]] * [2.0, 0.5, 3.0]], axis=1)
    layer = pfa.LayerSpectrum.from_covariance("dup", cov_of(x), len(x))
    assert layer.keep_energy(0.999) == 6          # the duplicates add no energy direction
    kept = layer.keep_indices(6)
    assert {1, 3, 5} <= set(kept)                  # the unique filters stay
    for a, b in ((0, 6), (2, 7), (4, 8)):          # one of each copy pair goes
        assert (a in kept) != (b in kept), kept


def test_inactive_units_are_removed_first_and_never_kept():
    x = planted(c=12, k=3, seed=2)
    x[:, [4, 9]] = 5.0                              # dead units: constant responses
    x[:, 7] = 1e-6 * np.random.default_rng(0).normal(size=len(x))  # variance ~1e-12 of the others
    layer = pfa.LayerSpectrum.from_covariance("dead", cov_of(x), len(x))
    assert sorted(layer.inactive.tolist()) == [4, 7, 9] and layer.active == 9
    assert set(pfa.removal_order(layer.cov, 3).tolist()) == {4, 7, 9}
    assert layer.keep_energy(1.0) == 9              # all energy, but never an inactive unit
    assert not {4, 7, 9} & set(layer.keep_indices(layer.keep_kl()))
    # A dead layer still keeps min_keep filters.
    dead = pfa.LayerSpectrum.from_covariance("all-dead", np.zeros((4, 4)), 100)
    assert dead.keep_kl() == 1 and dead.keep_energy(0.9, min_keep=2) == 2


# ---------------------------------------------------------------- recipes

def test_spectrum_is_sorted_normalized_and_clipped():
    x = planted(c=10, k=10, noise=0.0, seed=3)[:, :10]
    cov = cov_of(np.concatenate([x, x[:, :2]], axis=1))   # rank-deficient: eigh gives tiny negatives
    spec = pfa.spectrum(cov)
    assert spec.shape == (12,) and np.all(spec >= 0) and np.all(np.diff(spec) <= 0)
    assert spec.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(spec, np.sort(np.clip(np.linalg.eigvalsh(cov), 0, None))[::-1] /
                               np.clip(np.linalg.eigvalsh(cov), 0, None).sum(), atol=1e-15)
    assert not pfa.spectrum(np.zeros((3, 3))).any()


def test_planted_spectrum_energy_recipe_keeps_k():
    for k in (1, 3, 5, 9):
        layer = pfa.LayerSpectrum.from_covariance("p", cov_of(planted(k=k, seed=k)), 4000)
        assert layer.keep_energy(0.99) == k, (k, layer.cumulative_energy[:k + 1])
        assert layer.keep_energy(0.99, min_keep=k + 2) == k + 2
        assert layer.keep_energy(0.0) == 1 and layer.keep_energy(1.0) == 32


def test_kl_recipe_matches_the_closed_form():
    # By hand: lambda = (.7, .2, .1, 0): H = 0.8018 nats, C H / log C = 2.31 -> keep 3.
    spec = np.array([0.7, 0.2, 0.1, 0.0])
    assert pfa.kl_keep(spec) == 3
    for k in (2, 5, 11):
        spec = pfa.spectrum(cov_of(planted(k=k, noise=0.05, seed=10 + k)))
        c = len(spec)
        p = spec + np.finfo(float).eps
        kl = entropy(p, np.full(c, 1.0 / c))         # scipy, as the authors' code computes it
        expected = math.ceil(c * (1 - kl / math.log(c)))
        assert pfa.kl_keep(spec) == expected
        # ... which is ceil(C H(lambda) / log C) with the spectral entropy
        assert expected == math.ceil(c * pfa.spectral_entropy(spec) / math.log(c))
        assert pfa.kl_divergence(spec) == pytest.approx(kl, rel=1e-9)


def test_perfectly_correlated_layer_keeps_one_and_isotropic_keeps_all():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(2000, 1))
    correlated = z * rng.uniform(0.5, 3, size=16) + rng.normal(size=16)
    layer = pfa.LayerSpectrum.from_covariance("corr", cov_of(correlated), 2000)
    assert layer.keep_kl() == 1 and layer.keep_energy(0.999) == 1
    assert len(layer.keep_indices(1)) == 1
    iso = pfa.LayerSpectrum.from_covariance("iso", cov_of(rng.normal(size=(20000, 16))), 20000)
    assert iso.keep_kl() == 16
    assert pfa.kl_keep(np.full(7, 1 / 7)) == 7 and pfa.kl_keep(np.array([1.0])) == 1


@pytest.mark.parametrize("tau", [-0.1, 1.5, float("nan")])
def test_energy_outside_unit_interval_is_a_clear_error(tau):
    with pytest.raises(PycompressError, match=r"tau must be in \[0, 1\]"):
        pfa.energy_keep(np.array([0.5, 0.5]), tau)


# ---------------------------------------------------------------- footprint target

def chain_cost(layers):
    """Params of a chain of dense layers: layer i has k_{i-1} x k_i weights (k_{-1} = 10 inputs)."""
    def cost(keep):
        total, prev = 0.0, 10
        for layer in layers:
            k = keep.get(layer.site, layer.width)
            total += prev * k + k
            prev = k
        return total + prev * 3   # a fixed-width output layer counts the last layer's lost inputs
    return cost


def test_footprint_target_is_met_within_one_filter_per_layer():
    layers = [pfa.LayerSpectrum.from_covariance(f"l{i}", cov_of(planted(c=c, k=k, noise=0.2, seed=20 + i)), 4000)
              for i, (c, k) in enumerate([(16, 3), (48, 10), (32, 4), (64, 20)])]
    cost = chain_cost(layers)
    full = cost({})
    for fraction in (0.15, 0.3, 0.5, 0.8):
        recipe = pfa.recipe_for_target(layers, cost, fraction * full)
        assert recipe.cost == cost(recipe.keep) <= fraction * full
        one_more = {l.site: min(recipe.keep[l.site] + 1, l.width) for l in layers}
        assert cost(one_more) > fraction * full, fraction
        # The recipe is PFA-En at the chosen tau, for every layer.
        assert recipe.keep == pfa.recipe_energy(layers, recipe.tau).keep
    with pytest.raises(PycompressError, match="out of reach"):
        pfa.recipe_for_target(layers, cost, 0.001 * full)
    assert pfa.recipe_for_target(layers, cost, full).keep == {l.site: l.width for l in layers}


def test_pooled_covariance_of_a_group_centres_each_member():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(300, 6)) + 10.0
    b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) - 4.0
    accs = []
    for x in (a, b):
        acc = CovarianceAccumulator(6)
        acc.update(x.astype(np.float32))
        accs.append(acc)
    cov, n = pfa.pooled_covariance(accs)
    expected = ((a - a.mean(0)).T @ (a - a.mean(0)) + (b - b.mean(0)).T @ (b - b.mean(0))) / (500 - 2)
    assert n == 500
    np.testing.assert_allclose(cov, expected, rtol=1e-5, atol=1e-5)


def test_build_plan_has_explicit_sorted_indices_and_round_trips():
    layers = [pfa.LayerSpectrum.from_covariance("a", cov_of(planted(c=8, k=2, seed=6)), 4000),
              pfa.LayerSpectrum.from_covariance("b", cov_of(np.random.default_rng(7).normal(size=(5000, 4))), 5000)]
    recipe = pfa.recipe_kl(layers)
    assert recipe.keep["b"] == 4               # isotropic: kept whole -> no decision
    plan = pfa.build_plan(layers, recipe, meta={"data": "synthetic"})
    assert [d.site for d in plan.decisions] == ["a"]
    decision = plan.decisions[0]
    assert decision.action == "prune" and set(decision.params) == {"keep_indices"}
    assert decision.params["keep_indices"] == sorted(decision.params["keep_indices"])
    assert len(decision.params["keep_indices"]) == recipe.keep["a"] < 8
    again = Plan.from_json(plan.to_json())
    assert again.decisions[0].params == decision.params and again.meta["recipe"] == "kl"


# ---------------------------------------------------------------- graphs and responses

@pytest.fixture(scope="module")
def cnn():
    module, path, held_out = pfa_models.digits_cnn()
    return module, load_model(path), held_out


def test_sites_and_cost_model_on_the_cnn(cnn):
    _, model, _ = cnn
    sites, skipped = find_sites(model)
    assert [(s.op, s.width) for s in sites] == [("Conv", 12), ("Conv", 24), ("Gemm", 48)]
    assert [{(sh.node, sh.input_index, sh.axis, sh.count) for sh in s.shrinks} for s in sites] == [
        {("/c1/Conv", 1, 0, 12), ("/c1/Conv", 2, 0, 12), ("/c2/Conv", 1, 1, 12)},
        {("/c2/Conv", 1, 0, 24), ("/c2/Conv", 2, 0, 24), ("/fc1/Gemm", 1, 1, 24 * 16)},   # flattened: 4x4 per channel
        {("/fc1/Gemm", 1, 0, 48), ("/fc1/Gemm", 2, 0, 48), ("/fc2/Gemm", 1, 1, 48)}]
    assert [s.id for s in sites] == ["group:/c1/Conv", "group:/c2/Conv", "group:/fc1/Gemm"]
    assert [s.id for s in skipped] == ["group:/fc2/Gemm"] and "graph output" in skipped[0].reason
    cost, full = site_cost_model(model, sites, "params")
    assert full == model_cost(model).params
    c1, c2, f1 = (s.id for s in sites)
    keep = {c1: 5, c2: 10, f1: 20}
    by_hand = (5 * 1 * 9 + 5) + (10 * 5 * 9 + 10) + (20 * 10 * 16 + 20) + (10 * 20 + 10)
    assert cost(keep) == pytest.approx(by_hand)
    macs, full_macs = site_cost_model(model, sites, "macs")
    assert full_macs == model_cost(model).macs
    assert macs(keep) == pytest.approx(5 * 9 * 64 + 10 * 5 * 9 * 64 + 20 * 160 + 10 * 20)


def test_responses_are_max_pooled_and_independent_of_batching(cnn, monkeypatch):
    module, model, (x, _) = cnn
    names = ["/c2/Conv_output_0", "/fc1/Gemm_output_0"]
    monkeypatch.setattr(responses, "UPDATE_ROWS", 50)   # many accumulator updates of 49..56 rows
    one = collect_responses(model, names, ({"input": x[i:i + 7]} for i in range(0, len(x), 7)), progress=False)
    big = collect_responses(model, names, [{"input": x}], progress=False)
    with torch.no_grad():
        t = torch.from_numpy(x)
        c2 = module.c2(torch.relu(module.c1(t)))
        f1 = module.fc1(torch.flatten(torch.nn.functional.max_pool2d(torch.relu(c2), 2), 1))
    expected = {names[0]: c2.amax(dim=(2, 3)).numpy(), names[1]: f1.numpy()}
    for name in names:
        assert one.accumulators[name].count == big.accumulators[name].count == len(x)
        np.testing.assert_allclose(one.accumulators[name].cov, cov_of(expected[name].astype(np.float64)),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(one.accumulators[name].cov, big.accumulators[name].cov, rtol=1e-5, atol=1e-6)
    assert one.inputs == len(x) and one.inference_seconds > 0


def test_after_activation_follows_bn_activation_and_swish():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2, 4, 4] x) => (float[N, 2, 4, 4] y, float[N, 2, 4, 4] z, float[N, 2, 4, 4] r) {
        w = Constant <value = float[2, 2, 1, 1] {1, 0, 0, 1}> ()
        s = Constant <value = float[2] {1, 1}> ()
        b = Constant <value = float[2] {0, 0}> ()
        a = Conv (x, w)
        bn = BatchNormalization (a, s, b, b, s)
        y = Relu (bn)
        c = Conv (x, w)
        sg = Sigmoid (c)
        z = Mul (c, sg)
        d = Conv (x, w)
        r = Add (d, x)
    }
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    convs = [n.outputs[0].name for n in model.graph if n.op_type == "Conv"]
    assert [response_tensor(model, c, "activation") for c in convs] == ["y", "z", convs[2]]
    assert [response_tensor(model, c, "producer") for c in convs] == convs
    with pytest.raises(PycompressError, match="--after"):
        response_tensor(model, convs[0], "relu")


def test_analysis_and_plans_on_the_trained_cnn(cnn):
    _, model, _ = cnn
    calibration = load_data("builtin:digits", model)   # 64 features reshaped to 1x8x8
    assert calibration.inputs["input"].shape == (1797, 1, 8, 8)
    analysis = analyze(model, calibration, progress=False)
    assert [l.width for l in analysis.layers] == [12, 24, 48] and analysis.samples == 1797
    kl_plan, kl = plan_from_analysis(model, analysis)
    assert kl.method == "kl" and all(1 <= kl.keep[l.site] <= l.width for l in analysis.layers)
    assert sum(kl.keep.values()) < 12 + 24 + 48        # a trained CNN has redundant filters
    for d in kl_plan.decisions:
        assert len(d.params["keep_indices"]) == kl.keep[d.site]
    target_plan, target = plan_from_analysis(model, analysis, target_size=0.4)
    cost, full = site_cost_model(model, analysis.sites, "params")
    assert cost(target.keep) <= 0.4 * full
    assert target_plan.meta["target_size"] == 0.4 and target_plan.meta["recipe"] == "target"
    # Too few samples for the widest layer: it is skipped, with the reason.
    small = analyze(model, calibration.subset(np.arange(30)), progress=False)
    assert [l.width for l in small.layers] == [12, 24]
    assert any("30 samples for 48 filters" in s.reason for s in small.skipped)


def test_pfa_kl_plan_applied_gives_a_smaller_model_that_still_classifies(cnn):
    """End to end with the channel-pruning rewrite: analyze -> plan -> apply -> onnxruntime."""
    from pycompress.fidelity import run_model
    from pycompress.rewrites import apply_plan

    module, model, (x, y) = cnn
    analysis = analyze(model, load_data("builtin:digits", model), progress=False)
    plan, recipe = plan_from_analysis(model, analysis)
    expected = {m: site_cost_model(model, analysis.sites, m)[0](recipe.keep) for m in ("params", "macs")}
    before = model_cost(model)
    accuracy_before = float(np.mean(run_model(model, {"input": x})[0].argmax(1) == y))
    pruned = load_model(pfa_models.digits_cnn()[1])
    applied = apply_plan(pruned, plan)
    after = model_cost(pruned)
    assert len(applied.decisions) == len(plan.decisions) >= 2
    assert after.params < before.params and after.macs < before.macs
    # The footprint model used by --target-size is exact for this network.
    assert after.params == pytest.approx(expected["params"]) and after.macs == pytest.approx(expected["macs"])
    logits = run_model(pruned, {"input": x})[0]
    accuracy = float(np.mean(logits.argmax(1) == y))
    print(f"\nPFA-KL on the digits CNN: params {before.params} -> {after.params}, MACs {before.macs} -> "
          f"{after.macs}; held-out accuracy {accuracy_before:.3f} -> {accuracy:.3f} before any recovery")
    assert accuracy > 0.3          # chance is 0.1


@pytest.fixture(scope="module")
def residual(tmp_path_factory):
    import zoo
    from conftest import export

    module = zoo.randomize_bn(zoo.ResidualCNN(width=8))
    path = export(module, (1, 1, 8, 8), tmp_path_factory.mktemp("residual") / "residual.onnx")
    return module, path


def test_coupled_group_pools_its_members_responses(residual):
    module, path = residual
    model = load_model(path)
    x = load_data("builtin:digits", model).inputs["input"]
    analysis = analyze(model, load_data("builtin:digits", model), progress=False)
    group = next(l for l in analysis.layers if l.site == "group:/stem/stem.0/Conv")
    # Its members: the stem conv and the last conv of the identity block (added to it), BN folded.
    assert group.info["responses"] == ["/stem/stem.0/Conv_output_0", "/b1/b1.3/Conv_output_0"]
    with torch.no_grad():
        t = torch.from_numpy(x)
        stem = module.stem[1](module.stem[0](t))
        inner = torch.relu(module.b1[1](module.b1[0](torch.relu(stem))))
        last = module.b1[4](module.b1[3](inner))
    members = [r.amax(dim=(2, 3)).double().numpy() for r in (stem, last)]
    scatter = sum((m - m.mean(0)).T @ (m - m.mean(0)) for m in members)
    np.testing.assert_allclose(group.cov, scatter / (2 * len(x) - 2), rtol=1e-4, atol=1e-6)
    assert group.samples == 2 * len(x)
    assert not [n for n in model.graph if n.op_type == "BatchNormalization"]   # BN folded into the producers


@pytest.mark.parametrize("kind", ["residual", "depthwise"])
def test_footprint_cost_model_is_exact(residual, tmp_path, kind):
    """site_cost_model == model_cost of the model the prune rewrite produces, for random plans."""
    import zoo
    from conftest import export
    from pycompress.rewrites import apply_plan

    if kind == "residual":
        path = residual[1]
    else:   # depthwise convs and a global pool pass the channels through
        path = export(zoo.DepthwiseBlock(), (1, 3, 16, 16), tmp_path / "depthwise.onnx")
    model = load_model(path)
    sites, _ = find_sites(model)
    assert [len(s.responses) for s in sites] == ([2, 1, 2, 1] if kind == "residual" else [1, 1])
    rng = np.random.default_rng(0)
    for trial in range(3):
        keep = {s.id: int(rng.integers(1, s.width + 1)) for s in sites}
        plan = Plan([LayerDecision(s.id, "prune", {"keep_indices": sorted(rng.choice(s.width, keep[s.id],
                                                                                     replace=False).tolist())})
                     for s in sites if keep[s.id] < s.width])
        pruned = load_model(path)
        apply_plan(pruned, plan)
        after = model_cost(pruned)
        for measure, actual in (("params", after.params), ("macs", after.macs)):
            cost, full = site_cost_model(model, sites, measure)
            assert cost(keep) == pytest.approx(actual), (trial, measure, keep)


def test_responses_follow_a_site_channel_map(cnn):
    _, model, _ = cnn
    cal = load_data("builtin:digits", model)
    site = find_sites(model)[0][0]
    perm = np.array([3, 0, 1, 2] + list(range(4, site.width)))          # output channel i -> site channel perm[i]
    moved = type(site)(site.id, site.width, site.responses, site.shrinks, [perm], site.op)
    plain = analyze(model, cal, sites=[site], progress=False).layers[0].cov
    mapped = analyze(model, cal, sites=[moved], progress=False).layers[0].cov
    order = np.argsort(perm)
    np.testing.assert_allclose(mapped, plain[np.ix_(order, order)], rtol=1e-12)
    assert mapped[3, 3] == pytest.approx(plain[0, 0])                   # output channel 0 is site channel 3
