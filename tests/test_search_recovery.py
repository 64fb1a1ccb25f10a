"""`compress --search-recovery N`: each candidate is refitted on N reserved calibration samples
before it is scored on the others (pipeline/recovery.py ``SearchRecovery``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import zoo
from conftest import export
from pycompress.cli.main import main
from pycompress.data import load_data
from pycompress.errors import PycompressError
from pycompress.fidelity import FidelityEstimator
from pycompress.ir import load_model
from pycompress.pipeline import CompressionObjective, build_search_space
from pycompress.pipeline.recovery import SearchRecovery, recover
from pycompress.plan import LayerDecision, Plan
from pycompress.rewrites import ApplyContext, apply_plan


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    """A 64-64-48-10 MLP trained on digits, exported, with its calibration data."""
    folder = tmp_path_factory.mktemp("search_recovery")
    (xtr, ytr), _ = zoo.digits()
    module = zoo.train_one_thread(zoo.MLP((64, 64, 48, 10)), xtr, ytr, epochs=20)
    path = export(module, (1, 64), folder / "mlp.onnx")
    np.savez(folder / "calib.npz", x=xtr)
    return path, folder / "calib.npz"


def _estimator(path, data, samples=50):
    model = load_model(path)
    calib = load_data(str(data), model)
    return model, calib, FidelityEstimator(model, calib.inputs, samples=samples, seed=0)


def test_reserved_samples_are_never_drawn_and_the_rest_is_estimated_exactly(digits_mlp):
    path, data = digits_mlp
    model, calib, estimator = _estimator(path, data)
    reserved = np.arange(0, 1200, 3)
    estimator.reserve(reserved)
    assert estimator.drawable == 800
    for index in range(5):
        assert not np.isin(estimator.subsample(index), reserved).any()
    # Grown to the whole drawable pool: exact (no sampling variance), the mean over the other samples.
    student = model.clone()
    apply_plan(student, Plan([LayerDecision(next(n.name for n in model.graph if n.op_type == "Gemm"), "svd",
                                            {"rank": 4})]), ApplyContext())
    grown = estimator.evaluate(student, 0, target_se=0.0)
    rest = np.setdiff1d(np.arange(1200), reserved)
    assert grown.samples == 800 and grown.variance == pytest.approx(0.0, abs=1e-12)
    assert grown.mean == pytest.approx(estimator.evaluate_on(student, rest).mean, rel=1e-9)
    with pytest.raises(PycompressError, match="fewer than --samples 50"):
        estimator.reserve(np.arange(1200)[:1170])


def test_the_search_scores_each_candidate_after_its_refit(digits_mlp):
    from pycompress.recover.layerwise import FOLDS

    path, data = digits_mlp
    model, calib, estimator = _estimator(path, data)
    space, _ = build_search_space(model, ["svd"])
    plain = CompressionObjective(model, space, estimator)
    theta = plain.space.snap(np.full((1, space.d), 0.15))[0]
    before = plain.measure(theta, 4)

    refit = SearchRecovery(model, calib.inputs, 128, seed=0)
    estimator2 = FidelityEstimator(model, calib.inputs, samples=50, seed=0)
    estimator2.reserve(refit.reserved)
    objective = CompressionObjective(model, space, estimator2, search_recovery=refit)
    after = objective.measure(theta, 4)
    assert after.ratio == pytest.approx(before.ratio)
    # The same as refitting the applied candidate by hand on the reserved samples (in FOLDS batches:
    # the ridge by cross-validation) and scoring it on evaluation 4's subsample, which holds none of them.
    student, plan = objective._apply(objective.space.decisions(theta))
    recover(model, student, plan, {k: np.asarray(v)[refit.indices] for k, v in calib.inputs.items()},
            samples=128, batch_size=128 // FOLDS, seed=0)
    by_hand = estimator2.evaluate(student, 4)
    assert after.estimate.mean == pytest.approx(by_hand.mean, rel=1e-6)
    assert not np.isin(estimator2.subsample(4), refit.indices).any()
    # The refit repairs much of what the truncation broke, on samples it never saw.
    assert after.estimate.mean < 0.7 * estimator2.evaluate(objective._apply(objective.space.decisions(theta))[0],
                                                           4).mean


def test_compress_with_search_recovery_runs_saves_the_setting_and_refuses_what_cannot_work(digits_mlp, tmp_path,
                                                                                             capsys):
    path, data = digits_mlp
    out = tmp_path / "s.onnx"
    args = ["compress", str(path), "--data", str(data), "--actions", "svd", "--target-size", "0.3",
            "--initial", "8", "--max-evals", "10", "--seed", "0", "-o", str(out)]
    assert main(args + ["--search-recovery", "64", "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["evaluations"] == 10
    assert summary["search_recovery"] == {"samples": 64, "sources": [], "scored_on": 1200 - 64}
    config = json.loads((tmp_path / "s.run" / "compress.json").read_text())
    assert config["search_recovery"] == 64
    # A resumed search keeps how it scores candidates.
    assert main(args[:2] + ["-o", str(out), "--resume", str(tmp_path / "s.run"), "--search-recovery", "32"]) == 2
    assert "a resumed search keeps it" in capsys.readouterr().err
    assert main(args[:2] + ["-o", str(out), "--resume", str(tmp_path / "s.run"), "--max-evals", "11", "--quiet",
                            "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["evaluations"] == 11
    for extra, message in ((["--method", "pfa", "--actions", "prune"], "does not search"),
                           (["--no-recover"], "--no-recover turns off"),
                           (["--search-recovery", "1200"], "give 2 to 1199 samples")):
        other = tmp_path / "o.onnx"
        argv = args[:-1] + [str(other), "--search-recovery", "64", *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not other.exists()


def test_a_remote_worker_builds_the_same_refitting_objective(digits_mlp):
    """Ray workers rebuild the objective from a recipe: the refit and the reserved samples come with it."""
    import onnx_ir as ir

    from pycompress.executor import ObjectiveRecipe, evaluate_recipe

    path, data = digits_mlp
    model, calib, estimator = _estimator(path, data)
    refit = SearchRecovery(model, calib.inputs, 96, seed=5)
    estimator = FidelityEstimator(model, calib.inputs, samples=50, seed=5)
    estimator.reserve(refit.reserved)
    space, _ = build_search_space(model, ["svd"])
    host = CompressionObjective(model, space, estimator, search_recovery=refit)
    recipe = ObjectiveRecipe(ir.to_proto(model).SerializeToString(), calib.inputs, None,
                             {"loss": "norm", "samples": 50, "outputs": None, "seed": 5, "threads": None},
                             {"actions": ["svd"]}, search_recovery=96)
    theta = host.space.snap(np.full((1, space.d), 0.3))[0]
    assert evaluate_recipe(recipe, 1.0, theta, 2)[:2] == pytest.approx(host(theta, 2)[:2], rel=1e-9)
    plain = ObjectiveRecipe(recipe.model, calib.inputs, None, recipe.estimator, recipe.space)
    assert evaluate_recipe(plain, 1.0, theta, 2)[0] != pytest.approx(host(theta, 2)[0], rel=1e-3)


def test_with_known_sources_the_refit_takes_whole_sources_and_scoring_never_sees_them():
    """Crops of a few photos: the refit's photos are kept out of the scoring altogether."""
    from pycompress.data import LazySamples

    groups = np.repeat(np.arange(6), 20)
    crops = LazySamples(120, (3,), np.float32, lambda i: np.full(3, i, np.float32), groups=groups)
    refit = SearchRecovery(None, {"x": crops}, 30, seed=0)
    assert len(refit.sources) == 2 and len(refit.indices) == 30 and len(refit.reserved) == 40
    assert set(groups[refit.reserved]) == {int(s) for s in refit.sources} == set(groups[refit.indices])
    np.testing.assert_array_equal(refit.inputs["x"][:, 0], refit.indices)
    # At most all sources but two: a request for more takes what four photos hold.
    assert len(SearchRecovery(None, {"x": crops}, 110, seed=0).indices) == 80
    # Without sources: exactly the refit samples are reserved.
    plain = SearchRecovery(None, {"x": np.zeros((120, 3), np.float32)}, 30, seed=0)
    assert plain.sources == [] and np.array_equal(plain.reserved, plain.indices) and len(plain.indices) == 30
