"""End to end on EfficientNet-Lite0: pfa, pacbo, pacbo + recovery and ORT int8 at several target sizes.

For each target size T (fraction of the searched layers' cost kept), runs

- ``pfa``: ``compress --method pfa --target-size T --no-recover`` (PFA footprint recipe, one shot);
- ``pfa+recovery``: that plan applied again with the closed-form recovery (``--method PLAN.json``);
- ``pacbo``: ``compress --method pacbo --target-size T --no-recover`` seeded with the PFA plan;
- ``pacbo+recovery``: the same search followed by the closed-form recovery (the search is run
  once and reused: ``--resume`` of its run folder replays the evaluations);

plus ``ort int8`` (``export --to int8``, static, on the same calibration crops) once, and
prints one Markdown table: search time and certificate, parameters / MACs / latency ratios to
the original (latency: onnxruntime CPU, batch 1, the models timed in the same run), top-1
agreement with the original and relative L2 error of the logits on held-out crops (another
seed, never seen by any method).

    PYTHONPATH=. python tools/bench_end_to_end.py [--targets 0.75 0.5 0.35] [--max-evals 40] [--max-prune 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pycompress.analysis import pfa_plan  # noqa: E402
from pycompress.bench.measure import bench_models  # noqa: E402
from pycompress.cli.main import main  # noqa: E402
from pycompress.data import load_data  # noqa: E402
from pycompress.data.images import Preprocess, skimage_crops  # noqa: E402
from pycompress.fidelity import run_model  # noqa: E402
from pycompress.ir import load_model, model_cost  # noqa: E402
from pycompress.pretrained import export_efficientnet_lite0  # noqa: E402

CALIBRATION = "builtin:skimage:384"


def cli(*argv) -> dict:
    """Run a pycompress command in-process; its --json output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*map(str, argv), "--json"])
    if code != 0:
        raise SystemExit(f"pycompress {' '.join(map(str, argv))} failed ({code})")
    return json.loads(out.getvalue())


def held_out_scores(original: Path, compressed: Path, crops: np.ndarray) -> tuple[float, float]:
    name = load_model(original).graph.inputs[0].name
    teacher = run_model(load_model(original), {name: crops})[0]
    student = run_model(load_model(compressed), {name: crops})[0]
    return (float(np.mean(teacher.argmax(1) == student.argmax(1))),
            float(np.linalg.norm(student - teacher) / np.linalg.norm(teacher)))


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="EfficientNet-Lite0 .onnx (default: export it)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5, 0.35])
    parser.add_argument("--max-evals", type=int, default=40)
    parser.add_argument("--max-prune", type=float, default=0.5,
                        help="pacbo: largest fraction of a channel group removed (unbounded, the fidelity "
                             "without recovery saturates and the gamma choice has nothing to go on)")
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--iters", type=int, default=50, help="timed runs per model")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    original = Path(args.model) if args.model else export_efficientnet_lite0(work / "efficientnet_lite0.onnx")
    model = load_model(original)
    shape = [d if isinstance(d, int) else None for d in model.graph.inputs[0].shape]
    crops = skimage_crops(args.held_out, shape, np.float32, Preprocess(), "held-out", seed=1, split="heldout")[:]
    before = model_cost(model)
    search = ["--actions", "prune,lowrank_conv", "--granularity", "stage", "--objective", "size",
              "--max-prune", args.max_prune, "--align", "16", "--samples", "64", "--delta", "0.05",
              "--max-evals", args.max_evals, "--seed", "0", "--quiet"]

    rows = []   # (method, target, path, seconds, certificate)
    for target in args.targets:
        tag = f"{target:g}"
        t0 = time.monotonic()
        pfa = work / f"pfa_{tag}.onnx"
        cli("compress", original, "--data", CALIBRATION, "--method", "pfa", "--target-size", target, "--no-recover",
            "--quiet", "-o", pfa)
        pfa_seconds = time.monotonic() - t0
        rows.append(("pfa", target, pfa, pfa_seconds, "-"))
        t0 = time.monotonic()
        pfa_rec = work / f"pfa_rec_{tag}.onnx"
        cli("compress", original, "--data", CALIBRATION, "--method", work / f"pfa_{tag}.plan.json", "--quiet",
            "-o", pfa_rec)
        rows.append(("pfa+recovery", target, pfa_rec, pfa_seconds + time.monotonic() - t0, "-"))
        plan = pfa_plan(model, load_data(CALIBRATION, model), target_size=target, progress=False)
        seed_plan = work / f"pfa_{tag}.seed.json"
        plan.save(seed_plan)
        bo = work / f"pacbo_{tag}.onnx"
        run_dir = work / f"pacbo_{tag}.run"
        result = cli("compress", original, "--data", CALIBRATION, "--method", "pacbo", "--target-size", target,
                     *search, "--seed-plan", seed_plan, "--no-recover", "--run-dir", run_dir, "-o", bo)
        cert = f"{'yes' if result['certified'] else 'no'} ({result['evaluations']} evals)"
        rows.append(("pacbo", target, bo, result["search_seconds"], cert))
        t0 = time.monotonic()
        rec = work / f"pacbo_rec_{tag}.onnx"
        cli("compress", original, "--resume", run_dir, "--max-evals", args.max_evals, "--quiet", "-o", rec)
        rows.append(("pacbo+recovery", target, rec, result["search_seconds"] + time.monotonic() - t0, cert))
    int8 = work / "int8.onnx"
    t0 = time.monotonic()
    cli("export", original, "--to", "int8", "--data", CALIBRATION, "-o", int8)
    rows.append(("ort int8 (static)", None, int8, time.monotonic() - t0, "-"))

    bench = bench_models([original] + [r[2] for r in rows], warmup=5, iters=args.iters)
    base = bench[0]
    print(f"EfficientNet-Lite0: {before.params:,} params, {before.macs:,} MACs, latency p50 "
          f"{base.latency_ms['p50']:.2f} ms; held-out crops: {args.held_out}")
    print("| method | target | seconds | certificate | params | MACs | latency | top-1 agreement | rel. L2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (method, target, path, seconds, cert), row in zip(rows, bench[1:]):
        agreement, rel = held_out_scores(original, path, crops)
        macs = f"{row.macs / before.macs:.3f}" if row.macs else "-"
        params = f"{row.params / before.params:.3f}" if row.params else "-"
        print(f"| {method} | {'-' if target is None else f'{target:g}'} | {seconds:.0f} | {cert} | {params} | "
              f"{macs} | {row.latency_ms['p50'] / base.latency_ms['p50']:.3f} | {agreement:.3f} | {rel:.3f} |")
    print(f"(files in {work})")


if __name__ == "__main__":
    main_()
