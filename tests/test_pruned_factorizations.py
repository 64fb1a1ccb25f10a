"""Layers both pruned and factored: the predicted ratio is the rewritten graph's, and a rank skipped
because pruning narrowed its layer snaps to the untouched coordinate (one search point per model)."""

import numpy as np
import pytest
import zoo
from conftest import export

from pycompress.data import load_data
from pycompress.fidelity import FidelityEstimator
from pycompress.ir import load_model
from pycompress.pipeline import CompressionObjective, build_search_space
from pycompress.rewrites import ApplyContext


@pytest.fixture(scope="module")
def cnn_objective(tmp_path_factory):
    folder = tmp_path_factory.mktemp("joint")
    path = export(zoo.randomize_bn(zoo.ResidualCNN(width=8)), (1, 1, 8, 8), folder / "cnn.onnx")
    model = load_model(path)
    x = np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32)
    np.savez(folder / "x.npz", x=x)
    estimator = FidelityEstimator(model, load_data(str(folder / "x.npz"), model).inputs, samples=16, seed=0)

    def make(objective="size"):
        space, _ = build_search_space(model, ["prune", "lowrank_conv"])
        return CompressionObjective(model, space, estimator, objective=objective,
                                    context=ApplyContext(options={"skip_rank_beyond_r_max": True}))
    return make


@pytest.mark.parametrize("objective", ["size", "macs"])
def test_predicted_ratio_is_the_rewritten_graphs_for_pruned_and_factored_layers(cnn_objective, objective):
    obj = cnn_objective(objective)
    assert len(obj.joint.layers) == 5          # every 3x3 conv reads or writes a pruned group
    space = obj.space
    points = space.snap(np.random.default_rng(3).random((40, space.d)))
    actual = np.array([obj.ratio_of(obj._apply(space.decisions(p))[0]) for p in points])
    # The product of the separate factors (the previous prediction) missed by up to ~0.09 here.
    np.testing.assert_allclose(obj.predicted_ratio(points), actual, atol=1e-12)


def test_a_rank_skipped_after_pruning_snaps_to_the_untouched_coordinate(cnn_objective):
    obj = cnn_objective()
    space = obj.space
    names = space.coordinate_names()
    b2 = names.index("/b2/b2.3/Conv (lowrank_conv)")
    group = next(j for j, n in enumerate(names) if n.startswith("group:/b2/b2.0/Conv"))   # its input channels
    theta = np.ones(space.d)
    theta[group] = 0.0          # keep 1 of 16 input channels: r_max(1*3, 16*3) = 2
    theta[b2] = 0.5             # rank 12 > 2: the layer stays whole
    snapped = space.snap(theta)
    assert snapped[b2] == 1.0
    assert "/b2/b2.3/Conv" not in [d.site for d in space.decisions(snapped) if d.action == "lowrank_conv"]
    # The rank-12 plan, applied, is that same model: the skip rule leaves the layer whole.
    lattice = space.snap(np.where(np.arange(space.d) == b2, 1.0, theta)).copy()
    lattice[b2] = space.dimensions[space.members[b2][0]].encode(12)
    with_rank = obj._apply(space.decisions(lattice))[0]
    assert obj.ratio_of(with_rank) == pytest.approx(obj.ratio_of(obj._apply(space.decisions(snapped))[0]))
    assert obj.predicted_ratio(lattice[None])[0] == pytest.approx(obj.ratio_of(with_rank))
    # A rank the pruned layer can still take is kept.
    theta[b2] = 0.04            # rank 1
    assert space.snap(theta)[b2] < 1.0


@pytest.mark.parametrize("objective", ["size", "macs"])
def test_pruned_and_factored_matrices_are_exact_too(tmp_path, objective):
    """``prune,svd`` on an MLP: a hidden layer's width is both its producer's output and its
    consumer's input, and each Gemm is factored."""
    path = export(zoo.MLP((64, 48, 32, 10)), (1, 64), tmp_path / "mlp.onnx")
    model = load_model(path)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32))
    estimator = FidelityEstimator(model, load_data(str(tmp_path / "x.npz"), model).inputs, samples=16, seed=0)
    space, _ = build_search_space(model, ["prune", "svd"])
    obj = CompressionObjective(model, space, estimator, objective=objective,
                               context=ApplyContext(options={"skip_rank_beyond_r_max": True}))
    assert len(obj.joint.layers) == 3
    points = obj.space.snap(np.random.default_rng(4).random((30, obj.space.d)))
    actual = np.array([obj.ratio_of(obj._apply(obj.space.decisions(p))[0]) for p in points])
    np.testing.assert_allclose(obj.predicted_ratio(points), actual, atol=1e-12)
