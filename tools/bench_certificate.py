"""Is the PAC-BO certificate honest? Fraction certified, wall time, and delta-optimality
against a random search with 10x the evaluations (issue 13).

Cases (the defaults: delta 0.05, epsilon 0.005, m = 50, nothing else set):
  a  the digits MLP 64-1000-1000-10 (the paper's FC3), --actions svd --target-size 0.2
  b  a residual digits CNN (tests/zoo.ResidualCNN), --actions prune,lowrank_conv --target-size 0.3
  c  EfficientNet-Lite0 on skimage crops, --granularity stage --actions prune,lowrank_conv
     --objective macs --target-size 0.75, within 10 minutes (--time-limit 600, --max-evals 1000;
     no random search: one exact evaluation costs seconds; each certified answer is compared with
     the other seeds' answers instead, ``cross_check``)

Per seed: `pycompress compress ... --seed S --no-recover` (the search alone; wall time of the
whole command in this process), then the certified answer t^ is evaluated exactly (on the whole
calibration pool, where J has no noise) and compared with the best J, on the same objective (the
run's gamma, the same target band), of 10x as many uniform random points of that band, also
evaluated exactly. "within delta" means J(t^) >= J(best random) - delta, with delta in units of J
as the run certified it (delta * max(1, gamma), docs/pacbo.md "The unit of delta"). The random
points are the same for every seed; their exact (Q, R) are cached per case, and per seed where the CLI prunes by
statistics drawn with the seed (case b).

Also prints the cost of one GP hyperparameter fit at n = 100, d = 16.

    python tools/bench_certificate.py [--cases a,b] [--seeds 20] [--workdir DIR]
    python tools/bench_certificate.py --cross-check-only --workdir DIR [--compare-with OLDDIR]
    python tools/bench_certificate.py --random-probe 600 --probe-seed 0 --workdir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CASES = {
    "a": ["--actions", "svd", "--target-size", "0.2"],
    "b": ["--actions", "prune,lowrank_conv", "--target-size", "0.3"],
    # The issue asks (c) for a certificate "within 10 minutes", not within 100 evaluations.
    "c": ["--granularity", "stage", "--actions", "prune,lowrank_conv", "--objective", "macs",
          "--target-size", "0.75", "--max-evals", "1000", "--time-limit", "600"],
}


def gp_fit_timing() -> None:
    from pycompress.decisions.bo import GaussianProcess

    rng = np.random.default_rng(0)
    x = rng.random((100, 16))
    y = np.sin(3 * x[:, 0]) + x[:, 1] ** 2 + 0.1 * rng.normal(size=100)
    noise = np.full(100, 0.01)
    GaussianProcess.fit(x[:20, :2], y[:20], noise[:20], restarts=0)   # one-time threadpool setup
    t0 = time.perf_counter()
    cold = GaussianProcess.fit(x, y, noise, restarts=2, rng=rng)
    t1 = time.perf_counter()
    GaussianProcess.fit(x, y + 0.01, noise, init=cold.hyper, restarts=0, rng=rng)
    t2 = time.perf_counter()
    print(f"GP fit, n=100, d=16: {t1 - t0:.3f} s with 2 random restarts (3 starts), "
          f"{t2 - t1:.3f} s warm-started (the search's usual fit)")


def prepare(case: str, folder: Path) -> tuple[Path, str]:
    """The model and the --data argument of a case."""
    import torch
    import zoo
    from conftest import export

    folder.mkdir(parents=True, exist_ok=True)
    if case == "c":
        from pycompress.pretrained import export_efficientnet_lite0

        path = folder / "efficientnet_lite0.onnx"
        if not path.exists():
            export_efficientnet_lite0(path)
        return path, "builtin:skimage:384"
    (xtr, ytr), _ = zoo.digits()
    path = folder / f"{case}.onnx"
    data = folder / f"{case}_calib.npz"
    if not path.exists():
        torch.manual_seed(0)
        if case == "a":
            from pycompress.cli.demo import train_digits_mlp

            module = train_digits_mlp(xtr, ytr, 15)
            export(module, (1, 64), path)
            np.savez(data, input=xtr, labels=ytr)
        else:
            module = zoo.train(zoo.ResidualCNN(), xtr.reshape(-1, 1, 8, 8), ytr, epochs=15)
            export(module, (1, 1, 8, 8), path)
            np.savez(data, x=xtr.reshape(-1, 1, 8, 8), labels=ytr)
    return path, str(data)


class ExactPoints:
    """Exact (Q, R) of points of a case's search (whole pool), cached.

    With pruning, the CLI prunes by FLAP statistics measured on a subsample drawn by the run's seed
    (``teacher_channel_statistics``), so the objective, and the cache, are per seed.
    """

    def __init__(self, model_path: Path, data: str, flags: list[str]):
        from pycompress.cli.main import build_parser
        from pycompress.data import load_data
        from pycompress.fidelity import FidelityEstimator
        from pycompress.ir import load_model

        self.args = build_parser().parse_args(["compress", str(model_path), "--data", data, "-o", "unused.onnx",
                                               *flags])
        self.model = load_model(model_path)
        self.calib = load_data(data, self.model)
        self.estimator = FidelityEstimator(self.model, self.calib.inputs, loss="norm", samples=50, seed=0)
        self.objectives: dict[int, object] = {}
        self.space = self.objective(0).space
        self.target = self.args.target_size
        self.cache: dict[tuple, tuple[float, float]] = {}
        self.random: list[np.ndarray] = []
        self.rng = np.random.default_rng(12345)

    def objective(self, seed: int):
        """The objective the CLI searches with ``--seed seed`` (the same apply options)."""
        if seed not in self.objectives:
            from pycompress.pipeline import (
                CompressionObjective,
                build_search_space,
                teacher_channel_statistics,
            )
            from pycompress.rewrites import ApplyContext

            actions = self.args.actions.split(",")
            options = {"skip_rank_beyond_r_max": True}
            if "prune" in actions:
                options["channel_statistics"] = teacher_channel_statistics(self.model, self.calib.inputs, seed=seed)
            space, _ = build_search_space(self.model, actions, self.args.granularity)
            self.objectives[seed] = CompressionObjective(self.model, space, self.estimator,
                                                         objective=self.args.objective,
                                                         context=ApplyContext(options=options))
        return self.objectives[seed]

    def exact(self, theta: np.ndarray, seed: int) -> tuple[float, float]:
        objective = self.objective(seed if "prune" in self.args.actions.split(",") else 0)
        key = (id(objective),) + tuple(float(v) for v in theta)
        if key not in self.cache:
            m = objective.measure(np.asarray(theta), 0, target_sd=0.0)
            self.cache[key] = (m.quality, m.ratio)
        return self.cache[key]

    def random_points(self, count: int, band: float) -> list[np.ndarray]:
        """The first ``count`` uniform lattice points within ``band`` of the target ratio."""
        while len(self.random) < count:
            cand = np.unique(self.space.snap(self.rng.random((4096, self.space.d))), axis=0)
            cand = cand[self.rng.permutation(len(cand))]
            ok = np.abs(self.objective(0).predicted_ratio(cand) - self.target) <= band
            self.random.extend(cand[ok])
        return self.random[:count]


def run_case(case: str, seeds: list[int], folder: Path, factor: int) -> dict:
    from pycompress.cli.main import main
    from pycompress.pipeline.planners import TARGET_BAND

    model_path, data = prepare(case, folder)
    flags = CASES[case]
    exact = ExactPoints(model_path, data, flags) if case != "c" else None
    rows = []
    for seed in seeds:
        out = folder / f"{case}_seed{seed}.onnx"
        for suffix in (".run", ".report"):
            run_dir = out.with_name(out.stem + suffix)
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
        argv = ["compress", str(model_path), "--data", data, *flags, "--seed", str(seed), "-o", str(out),
                "--no-recover", "--quiet", "--json"]
        buf = io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(buf):
            code = main(argv)
        wall = time.monotonic() - t0
        if code != 0:
            rows.append({"seed": seed, "error": code})
            continue
        summary = json.loads(buf.getvalue())
        state = json.loads((out.with_name(out.stem + ".run") / "state.json").read_text())
        row = {"seed": seed, "certified": summary["certified"], "evaluations": summary["evaluations"],
               "seconds": wall, "ratio": summary["ratio"], "gamma": summary["gamma"]}
        if exact is not None:
            gamma = summary["gamma"]
            q, r = exact.exact(np.asarray(state["history"][-1]["incumbent"]), seed)
            j_hat = gamma * q + 1 / r
            best = max(gamma * qq + 1 / rr for qq, rr in
                       (exact.exact(p, seed) for p in exact.random_points(factor * summary["evaluations"],
                                                                          TARGET_BAND)))
            row.update(J_hat=j_hat, J_random=best, within_delta=bool(j_hat >= best - summary["delta"]))
        row.update(incumbent=list(state["history"][-1]["incumbent"]), delta=summary["delta"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if case == "c":
        cross_check(rows, ExactPoints(model_path, data, flags))
    return {"case": case, "rows": rows}


def cross_check(rows: list[dict], exact: ExactPoints, others: list[dict] = ()) -> None:
    """Case c has no random search (an exact evaluation costs seconds): instead, each certified answer
    is compared, exactly and on its own run's objective, with the answers of all the other seeds
    (each the result of a few hundred evaluations), and with ``others`` (answers of earlier runs, e.g.
    of another version of the search). ``within_delta``: J(t^) >= their best - delta."""
    done = [r for r in rows if "error" not in r]
    rivals = {str(r["seed"]): r["incumbent"] for r in done}
    rivals.update({f"{r['folder']}:{r['seed']}": r["incumbent"] for r in others})
    for row in done:
        if not row["certified"]:
            continue
        gamma, seed = row["gamma"], row["seed"]
        values = {}
        for name, incumbent in rivals.items():
            q, r = exact.exact(np.asarray(incumbent), seed)
            values[name] = gamma * q + 1 / r
        best_seed = max(values, key=values.get)
        row.update(J_hat=values[str(seed)], J_best_other_seed=values[best_seed], best_seed=best_seed,
                   within_delta=bool(values[str(seed)] >= values[best_seed] - row["delta"]))
        print(json.dumps({k: row[k] for k in ("seed", "J_hat", "J_best_other_seed", "best_seed", "within_delta")}),
              flush=True)


def random_probe(folder: Path, count: int, seed: int, top: int) -> int:
    """Case c's random search, scaled down: ``count`` uniform lattice points of the band on seed
    ``seed``'s objective at m = 50 (~1 s each), the ``top`` best of them evaluated again exactly; then,
    for each finished seed in ``folder``, how many of the exactly evaluated points beat its answer
    by more than delta (on this objective, at that run's gamma; the random points are ranked at
    gamma 1, the gamma of every case c run so far). J here is on the calibration pool (the search's
    objective), not a held-out figure. The issue's 10x random search (~2,000-3,000
    exact evaluations a seed) costs hours here; this says how often a random point of the band beats
    a certified answer, from which what the full random search would find follows."""
    from pycompress.pipeline.planners import TARGET_BAND

    model_path, data = prepare("c", folder)
    exact = ExactPoints(model_path, data, CASES["c"])
    objective = exact.objective(seed)
    t0 = time.monotonic()
    cheap = []
    for i, theta in enumerate(exact.random_points(count, TARGET_BAND)):
        m = objective.measure(theta, 10_000 + i)
        cheap.append((m.quality + 1 / m.ratio, theta))
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{count} random points, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    cheap.sort(key=lambda item: -item[0])
    top_exact = [exact.exact(theta, seed) for _, theta in cheap[:top]]
    values = np.array([v for v, _ in cheap])
    print(json.dumps({"seed_objective": seed, "points": count, "J_m50_quantiles (gamma 1)": {
        str(p): float(np.percentile(values, p)) for p in (50, 90, 99, 100)},
        "J_exact_of_the_top (gamma 1)": sorted((q + 1 / r for q, r in top_exact), reverse=True)}), flush=True)
    for row in saved_answers(folder):
        gamma = row["gamma"]
        q, r = exact.exact(np.asarray(row["incumbent"]), seed)
        j = gamma * q + 1 / r
        better = sum(gamma * qq + 1 / rr > j + row["delta"] for qq, rr in top_exact)
        print(json.dumps({"answer_of_seed": row["seed"], "certified": row["certified"], "J": j,
                          "random_points_better_by_delta": int(better)}), flush=True)
    return 0


def table(results: list[dict]) -> None:
    print("\n| case | seeds | certified | median s | max s | certified within delta (a, b: of 10x random; "
          "c: of the other seeds' answers) |")
    print("|---|---|---|---|---|---|")
    for res in results:
        rows = [r for r in res["rows"] if "error" not in r]
        cert = [r for r in rows if r["certified"]]
        secs = [r["seconds"] for r in rows]
        within = [r for r in cert if r.get("within_delta")]
        honest = f"{len(within)}/{len(cert)}" if cert and "within_delta" in cert[0] else "n/a"
        print(f"| {res['case']} | {len(res['rows'])} | {len(cert)}/{len(res['rows'])} | "
              f"{statistics.median(secs):.1f} | {max(secs):.1f} | {honest} |")


def main_() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="a,b")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--only", default=None, help="comma-separated seeds to run instead of 0..seeds-1")
    parser.add_argument("--factor", type=int, default=10, help="random search evaluations per PAC-BO evaluation")
    parser.add_argument("--workdir", default="bench-certificate")
    parser.add_argument("--cross-check-only", action="store_true",
                        help="case c: only the cross-check of the finished seeds' answers in --workdir")
    parser.add_argument("--compare-with", action="append", default=[], metavar="DIR",
                        help="with --cross-check-only: also compare with the answers of case c's runs in DIR")
    parser.add_argument("--random-probe", type=int, default=0, metavar="N",
                        help="case c: N random band points on --probe-seed's objective against the answers "
                             "in --workdir")
    parser.add_argument("--probe-seed", type=int, default=0)
    parser.add_argument("--probe-top", type=int, default=20, help="random points re-evaluated exactly")
    args = parser.parse_args()
    if args.random_probe:
        return random_probe(Path(args.workdir), args.random_probe, args.probe_seed, args.probe_top)
    if args.cross_check_only:
        return cross_check_saved(Path(args.workdir), [Path(d) for d in args.compare_with])
    gp_fit_timing()
    folder = Path(args.workdir)
    seeds = [int(s) for s in args.only.split(",")] if args.only else list(range(args.seeds))
    results = [run_case(c, seeds, folder, args.factor) for c in args.cases.split(",")]
    table(results)
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    return 0


def saved_answers(folder: Path) -> list[dict]:
    """Case c's finished seeds in ``folder``, from their saved search states (stopped runs left out)."""
    from pycompress.decisions.bo.pacbo import FINISHED

    rows = []
    for state_path in sorted(folder.glob("c_seed*.run/state.json")):
        state = json.loads(state_path.read_text())
        if state["status"] not in FINISHED:
            continue
        rows.append({"seed": int(state_path.parent.name[len("c_seed"):-len(".run")]), "folder": str(folder),
                     "certified": state["status"] == "certificate", "gamma": float(state["meta"]["gamma"]),
                     "incumbent": state["history"][-1]["incumbent"], "delta": state["history"][-1]["delta"]})
    return rows


def cross_check_saved(folder: Path, compare_with: list[Path] = ()) -> int:
    """The cross-check of case c's seeds already run in ``folder``, optionally against the answers of
    the runs in ``compare_with`` too."""
    model_path, data = prepare("c", folder)
    rows = saved_answers(folder)
    others = [r for other in compare_with for r in saved_answers(other)]
    cross_check(rows, ExactPoints(model_path, data, CASES["c"]), others)
    honest = [r for r in rows if r.get("within_delta")]
    print(f"certified {sum(r['certified'] for r in rows)}/{len(rows)}; within delta of the other seeds' best: "
          f"{len(honest)}/{sum(r['certified'] for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
