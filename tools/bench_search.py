"""PAC-BO vs random search at equal wall time, on the digits MLP (64-1000-1000-10).

For each seed, PAC-BO runs until its certificate (or --max-evals); random
search then gets the same wall time in the same harness (same objective,
same initial design, same subsample size). Both answers are then measured the
same way: J on the whole calibration pool (1200 digits, not a subsample), the
size ratio of the compressed layers, and top-1 accuracy / agreement with the
original on the 597 held-out digits. gamma is fixed for all runs (--gamma, or
with --gamma 0, the default, chosen once for --target-size from seed 0's
initial design by the CLI's rule, pipeline.gamma_from_observations); delta
is absolute unless --relative-delta. PAC-BO evaluates the points its
acquisition picks to se(J) <= delta / 4, as the CLI does. No target band
here: the search is unconstrained (the CLI's --target-size restricts it).

    python tools/bench_search.py [--seeds 10] [--actions svd] [--gamma 0] [--samples 50] [--delta 0.05]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--actions", default="svd")
    parser.add_argument("--target-size", type=float, default=0.25)
    parser.add_argument("--gamma", type=float, default=0.0, help="fixed gamma (<= 0: choose for --target-size)")
    parser.add_argument("--max-evals", type=int, default=80)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--relative-delta", action="store_true", help="delta is a fraction of |J(incumbent)|")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--epsilon", type=float, default=0.005)
    parser.add_argument("--workdir", default=None, help="keep the trained model here (default: a temp folder)")
    args = parser.parse_args()

    import zoo
    from conftest import export
    from pycompress.data import load_data
    from pycompress.decisions.bo import PACBO, PACBOSettings, RandomSearch
    from pycompress.fidelity import FidelityEstimator, run_model
    from pycompress.ir import load_model
    from pycompress.pipeline import CompressionObjective, build_search_space, gamma_from_observations, quality_of

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_search_"))
    work.mkdir(parents=True, exist_ok=True)
    (xtr, ytr), (xte, yte) = zoo.digits()
    path = work / "digits_mlp.onnx"
    if not path.exists():
        import torch

        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)            # small batches: one thread trains 3x faster on 2 busy cores
        module = zoo.train(zoo.MLP((64, 1000, 1000, 10)), xtr, ytr, epochs=15)
        torch.set_num_threads(threads)
        export(module, (1, 64), path)
        print(f"trained and exported the MLP in {time.perf_counter() - t0:.0f}s")
    np.savez(work / "calib.npz", x=xtr)
    model = load_model(path)
    calib = load_data(str(work / "calib.npz"), model)
    name = next(iter(calib.inputs))
    teacher_test = run_model(model, {name: xte})[0]
    acc0 = float(np.mean(teacher_test.argmax(1) == yte))
    print(f"original held-out accuracy {acc0:.4f}; actions {args.actions}")

    def make_objective(seed):
        est = FidelityEstimator(model, calib.inputs, samples=args.samples, seed=seed)
        space, _ = build_search_space(model, args.actions.split(","))
        return est, CompressionObjective(model, space, est)

    est0, obj0 = make_objective(0)
    gamma = args.gamma
    if gamma <= 0:
        planner = PACBO(obj0.space.d, obj0, PACBOSettings(seed=0), snap=obj0.space.snap)
        points = planner.initial_design()
        ms = [obj0.measure(p, i) for i, p in enumerate(points)]
        gamma = gamma_from_observations([m.quality for m in ms], [m.ratio for m in ms], args.target_size).gamma
    print(f"gamma = {gamma:.6g}")
    full = np.arange(est0.pool)

    def judge(objective, theta):
        compressed, _ = objective.compress(theta)
        e = est0.evaluate_on(compressed, full)
        ratio = objective.ratio_of(compressed)
        out = run_model(compressed, {name: xte})[0]
        return {"J": gamma * quality_of(e, "norm", objective.quality_scale)[0] + 1 / ratio, "ratio": ratio,
                "accuracy": float(np.mean(out.argmax(1) == yte)),
                "agreement": float(np.mean(out.argmax(1) == teacher_test.argmax(1)))}

    rows = []
    for seed in range(args.seeds):
        settings = PACBOSettings(delta=args.delta, relative_delta=args.relative_delta, epsilon=args.epsilon,
                                 max_evals=args.max_evals, seed=seed, noise_target=0.25)
        _, objective = make_objective(seed)
        objective.gamma = gamma
        t0 = time.perf_counter()
        pac = PACBO(objective.space.d, objective, settings, snap=objective.space.snap).run()
        t_pac = time.perf_counter() - t0
        _, objective_r = make_objective(seed)
        objective_r.gamma = gamma
        settings_r = PACBOSettings(max_evals=10 ** 6, time_limit=t_pac, seed=seed)
        rnd = RandomSearch(objective_r.space.d, objective_r, settings_r, snap=objective_r.space.snap).run()
        a, b = judge(objective, pac.theta), judge(objective_r, rnd.theta)
        rows.append((seed, pac, t_pac, a, rnd, b))
        print(f"seed {seed}: PAC-BO {'certified' if pac.certified else 'no certificate'} after {pac.evaluations} "
              f"evals, {t_pac:.1f}s: J {a['J']:.4f} ratio {a['ratio']:.3f} acc {a['accuracy']:.4f} | "
              f"random {rnd.evaluations} evals: J {b['J']:.4f} ratio {b['ratio']:.3f} acc {b['accuracy']:.4f}",
              flush=True)

    def mean_sd(values):
        values = list(values)
        return f"{statistics.mean(values):.4f} +- {statistics.pstdev(values):.4f}"

    print(f"\n| method | J (full pool) | ratio | held-out accuracy (original {acc0:.4f}) | agreement | "
          "evaluations | seconds |")
    print("|---|---|---|---|---|---|---|")
    for label, k_res, k_judge in (("PAC-BO", 1, 3), ("random search", 4, 5)):
        print(f"| {label} | {mean_sd(r[k_judge]['J'] for r in rows)} | {mean_sd(r[k_judge]['ratio'] for r in rows)} "
              f"| {mean_sd(r[k_judge]['accuracy'] for r in rows)} | {mean_sd(r[k_judge]['agreement'] for r in rows)} "
              f"| {statistics.mean(r[k_res].evaluations for r in rows):.1f} | "
              f"{statistics.mean(r[2] for r in rows):.1f} |")
    certified = sum(r[1].certified for r in rows)
    wins = sum(r[3]["J"] > r[5]["J"] for r in rows)
    print(f"\nPAC-BO certified {certified}/{len(rows)} runs; higher full-pool J than random search in "
          f"{wins}/{len(rows)}; mean time to certificate "
          f"{statistics.mean([r[2] for r in rows if r[1].certified] or [float('nan')]):.1f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
