"""`pycompress demo`: the whole product on a real model, end to end, offline.

``--model digits-mlp`` (default): trains the 64-1000-1000-10 MLP of the
PAC-BO paper's Table 3 analogue on scikit-learn's real handwritten digits
(1200 for training and calibration, 597 held out), exports it to ONNX,
compresses its three FC layers with PAC-BO + SVD to a certificate
(knowledge-distillation fidelity), refits them with the teacher (closed
form), and prints the before/after table from the report it writes.

``--model efficientnet-lite0``: the pretrained EfficientNet-Lite0 from its
pip package on scikit-image crops: a PFA plan (PFA-En) seeds PAC-BO over
channel pruning and low-rank convolutions, one coordinate per resolution
stage and action, R measured in MACs; closed-form recovery; then top-1
agreement on held-out crops and a latency benchmark of both models.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from pycompress.cli.common import emit_json, print_table

# PAC-BO settings of the demo: the defaults (delta 0.05, epsilon 0.005, m = 50) and a target size.
DEMO_SEARCH = ["--actions", "svd", "--target-size", "0.2", "--seed", "0"]


# EfficientNet-Lite0: PFA seeds the search; one coordinate per stage and action keeps d small.
EFFNET_CALIBRATION = "builtin:skimage:384"
EFFNET_ENERGY = 0.999
EFFNET_SEARCH = ["--actions", "prune,lowrank_conv", "--granularity", "stage", "--objective", "macs",
                 "--max-prune", "0.3", "--align", "16", "--target-size", "0.75", "--samples", "64", "--delta", "0.05", "--max-evals", "40", "--seed", "0",
                 "--recover-samples", "128"]
EFFNET_HELD_OUT = 128
# The deployable model (issue 14's command): structure and per-layer int8 searched together for latency.
# The search's all-int8 seed point is what wins on Lite0 today (docs/quantization.md).
EFFNET_DEPLOY = ["--actions", "prune,lowrank_conv,quant", "--objective", "latency", "--target-size", "0.5",
                 "--max-evals", "12", "--seed", "0"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="compress a real model end to end (digits MLP with PAC-BO + SVD, or "
                                    "EfficientNet-Lite0 with PFA + PAC-BO over pruning and low rank) and report")
    p.add_argument("--model", default="digits-mlp", choices=("digits-mlp", "efficientnet-lite0"),
                   help="digits-mlp (default, about a minute) or efficientnet-lite0 (needs the [models,data] "
                        "extras; under 10 minutes on 2 cores)")
    p.add_argument("-o", "--output-dir", default="pycompress-demo", help="folder for every file (default ./pycompress-demo)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs of the MLP (default 15)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def train_digits_mlp(x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def _compress_quietly(argv: list[str]) -> None:
    """Run `pycompress compress` with its stdout (the JSON summary) swallowed: the demo prints its own."""
    import contextlib
    import io

    from pycompress.cli.compress import run as compress_run
    from pycompress.cli.main import build_parser

    with contextlib.redirect_stdout(io.StringIO()):
        compress_run(build_parser().parse_args(argv))


def _fresh_run_dir(folder: Path) -> None:
    """The demo starts a fresh search each time it runs."""
    if (folder / "state.json").exists():
        import shutil

        shutil.rmtree(folder)


def _print_before_after(b: dict, a: dict, extra: list[str]) -> None:
    """The before/after table both demos print: sizes from the report, then the demo's own row."""
    print_table(["", "before", "after", "after/before"], [
        ["parameters", f"{b['params']:,}", f"{a['params']:,}", f"{a['params'] / b['params']:.3f}"],
        ["MACs", f"{b['macs']:,}", f"{a['macs']:,}", f"{a['macs'] / b['macs']:.3f}"],
        ["file bytes", f"{b['file_bytes']:,}", f"{a['file_bytes']:,}", f"{a['file_bytes'] / b['file_bytes']:.3f}"],
        extra,
    ])


def _certificate(search: dict) -> str:
    return (f"certified: P(J(t*) - J(t^) < {search['delta']}) = {search['probability']:.4f} >= "
            f"{1 - search['epsilon']:g}" if search["certificate"] else f"no certificate ({search['stop_reason']})")


def run(args) -> int:
    if args.model == "efficientnet-lite0":
        return run_efficientnet(args)
    return run_digits(args)


def run_digits(args) -> int:
    from pycompress.convert import export_to_onnx
    from pycompress.data.sources import BUILTIN
    from pycompress.fidelity import run_model
    from pycompress.ir import load_model
    from pycompress.report import write_report

    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    x, y = BUILTIN["digits"]()
    order = np.random.default_rng(0).permutation(len(x))
    train, held = order[:1200], order[1200:]
    log(f"training a 64-1000-1000-10 MLP on {len(train)} sklearn digits ({args.epochs} epochs)")
    module = train_digits_mlp(x[train], y[train], args.epochs)
    model_path = out / "digits_mlp.onnx"
    export_to_onnx(module, [(1, 64)], model_path)
    calib = out / "digits_calibration.npz"
    np.savez(calib, input=x[train], labels=y[train])
    small = out / "digits_mlp_small.onnx"
    report_dir = out / "report"
    _fresh_run_dir(out / "digits_mlp_small.run")
    log(f"compressing with PAC-BO + SVD: pycompress compress {model_path} --data {calib} {' '.join(DEMO_SEARCH)}")
    argv = ["compress", str(model_path), "--data", str(calib), *DEMO_SEARCH, "-o", str(small),
            "--report-dir", str(report_dir), "--json"] + (["--quiet"] if args.quiet else [])
    _compress_quietly(argv)
    report_path = report_dir / "report.json"
    report = json.loads(report_path.read_text())

    # Held-out accuracy (digits the teacher never trained on, the search never saw).
    teacher = run_model(load_model(model_path), {"input": x[held]})[0]
    student = run_model(load_model(small), {"input": x[held]})[0]
    heldout = {"samples": int(len(held)),
               "accuracy_before": float(np.mean(teacher.argmax(1) == y[held])),
               "accuracy_after": float(np.mean(student.argmax(1) == y[held])),
               "top1_agreement": float(np.mean(teacher.argmax(1) == student.argmax(1)))}
    report["heldout"] = heldout
    report["seconds"] = time.monotonic() - started
    write_report(report, report_dir)
    report = json.loads(report_path.read_text())  # print exactly what the report says

    if args.json:
        emit_json({"report": str(report_path), "before": report["before"], "after": report["after"],
                   "heldout": report["heldout"], "search": {k: report["search"][k] for k in
                                                            ("certificate", "probability", "gamma", "evaluations")}})
        return 0
    b, a, h, s = report["before"], report["after"], report["heldout"], report["search"]
    _print_before_after(b, a, ["held-out accuracy", f"{h['accuracy_before']:.4f}", f"{h['accuracy_after']:.4f}",
                               f"{h['accuracy_after'] - h['accuracy_before']:+.4f}"])
    cert = _certificate(s)
    print(f"PAC-BO: {s['evaluations']} evaluations, gamma {s['gamma']:g}, {cert}")
    print(f"top-1 agreement with the original on {h['samples']} held-out digits: {h['top1_agreement']:.4f}")
    print(f"report: {report_dir / 'report.html'} ({report['seconds']:.0f} s in all)")
    return 0


def run_efficientnet(args) -> int:
    from pycompress.analysis import pfa_plan
    from pycompress.bench.measure import bench_models
    from pycompress.data import load_data
    from pycompress.data.images import Preprocess, skimage_crops
    from pycompress.fidelity.compare import heldout_comparison
    from pycompress.ir import load_model
    from pycompress.pretrained import export_efficientnet_lite0
    from pycompress.report import write_report

    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model_path = out / "efficientnet_lite0.onnx"
    if not model_path.exists():
        log("exporting the pretrained EfficientNet-Lite0 (ImageNet weights from its pip package) to ONNX")
        export_efficientnet_lite0(model_path)
    model = load_model(model_path)

    log(f"PFA-En (energy {EFFNET_ENERGY}) on {EFFNET_CALIBRATION}: the search's seed plan")
    plan = pfa_plan(model, load_data(EFFNET_CALIBRATION, model), energy=EFFNET_ENERGY, progress=not args.quiet)
    seed_plan = out / "efficientnet_lite0_pfa.plan.json"
    plan.save(seed_plan)

    small = out / "efficientnet_lite0_small.onnx"
    report_dir = out / "efficientnet_report"
    _fresh_run_dir(out / "efficientnet_lite0_small.run")
    log(f"compressing: pycompress compress {model_path} --data {EFFNET_CALIBRATION} {' '.join(EFFNET_SEARCH)} "
        f"--seed-plan {seed_plan}")
    _compress_quietly(["compress", str(model_path), "--data", EFFNET_CALIBRATION, *EFFNET_SEARCH,
                       "--seed-plan", str(seed_plan), "-o", str(small), "--report-dir", str(report_dir), "--json"]
                      + (["--quiet"] if args.quiet else []))
    report_path = report_dir / "report.json"
    report = json.loads(report_path.read_text())

    # Held-out crops of other photos than the calibration's, never seen by
    # PFA, the search or the recovery.
    shape = [d if isinstance(d, int) else None for d in model.graph.inputs[0].shape]
    held = skimage_crops(EFFNET_HELD_OUT, shape, np.float32, Preprocess(), "held-out crops", seed=1,
                         split="heldout")[:]
    held_feeds = {model.graph.inputs[0].name: held}
    comparison = heldout_comparison(model, load_model(small), held_feeds)

    deploy = out / "efficientnet_lite0_int8.onnx"
    deploy_report_dir = out / "efficientnet_deploy_report"
    _fresh_run_dir(out / "efficientnet_lite0_int8.run")
    log(f"deployable model: pycompress compress {model_path} --data {EFFNET_CALIBRATION} {' '.join(EFFNET_DEPLOY)}")
    _compress_quietly(["compress", str(model_path), "--data", EFFNET_CALIBRATION, *EFFNET_DEPLOY, "-o", str(deploy),
                       "--report-dir", str(deploy_report_dir), "--json"] + (["--quiet"] if args.quiet else []))
    deploy_comparison = heldout_comparison(model, load_model(deploy), held_feeds)

    log("benchmarking the three models in onnxruntime (batch 1, one thread)")
    # bench_models times them interleaved (rounds over all models).
    bench = bench_models([model_path, small, deploy], warmup=10, iters=60, threads=1)
    keys = ("top1_agreement", "top5_containment", "kl_divergence", "relative_error")
    report["heldout"] = {"source": f"builtin:skimage-heldout:{EFFNET_HELD_OUT}", "samples": EFFNET_HELD_OUT,
                         **{k: comparison[k] for k in keys}}
    report["deployable"] = {"command": EFFNET_DEPLOY, "model": str(deploy), "report": str(deploy_report_dir),
                            "file_bytes": deploy.stat().st_size,
                            "heldout": {"samples": EFFNET_HELD_OUT, **{k: deploy_comparison[k] for k in keys}}}
    report["bench"] = [row.to_dict() for row in bench]
    report["seconds"] = time.monotonic() - started
    write_report(report, report_dir)
    report = json.loads(report_path.read_text())

    b, a, h, s = report["before"], report["after"], report["heldout"], report["search"]
    d = report["deployable"]
    p50 = [row["latency_ms"]["p50"] if row.get("latency_ms") else float("nan") for row in report["bench"]]
    if args.json:
        emit_json({"report": str(report_path), "before": b, "after": a, "heldout": h, "latency_p50_ms": p50,
                   "search": {k: s[k] for k in ("certificate", "probability", "gamma", "evaluations")},
                   "deployable": d})
        return 0
    _print_before_after(b, a, ["latency p50 (ms, batch 1)", f"{p50[0]:.2f}", f"{p50[1]:.2f}",
                               f"{p50[1] / p50[0]:.3f}"])
    cert = _certificate(s)
    print(f"PAC-BO: {s['evaluations']} evaluations, gamma {s['gamma']:.4g}, {cert}")
    print(f"top-1 agreement with the original on {h['samples']} held-out crops: {h['top1_agreement']:.4f} "
          f"(original top-1 in the top 5: {h['top5_containment']:.4f}, KL {h['kl_divergence']:.4g}; "
          f"photos no calibration crop came from)")
    dh = d["heldout"]
    print(f"deployable (structure + int8 searched for latency, {d['model']}): file "
          f"{d['file_bytes'] / b['file_bytes']:.3f}x, latency {p50[2]:.2f} ms = {p50[2] / p50[0]:.3f}x, "
          f"held-out top-1 agreement {dh['top1_agreement']:.4f} (top 5: {dh['top5_containment']:.4f}, "
          f"KL {dh['kl_divergence']:.4g})")
    print(f"report: {report_dir / 'report.html'} ({report['seconds']:.0f} s in all)")
    return 0
