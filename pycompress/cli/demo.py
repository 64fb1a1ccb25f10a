"""`pycompress demo`: the whole product on a real model, end to end, offline.

Trains the 64-1000-1000-10 MLP of the PAC-BO paper's Table 3 analogue on
scikit-learn's real handwritten digits (1200 for training and calibration,
597 held out), exports it to ONNX, compresses its three FC layers with
PAC-BO + SVD to a certificate (knowledge-distillation fidelity), refits them
with the teacher (closed form), and prints the before/after table from the
report it writes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from pycompress.cli.common import emit_json, print_table

# PAC-BO settings of the demo (see docs/pacbo.md for why an absolute delta).
DEMO_SEARCH = ["--actions", "svd", "--gamma", "0.3", "--samples", "500", "--delta", "0.5", "--max-evals", "80",
               "--seed", "0"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a digits MLP, compress it with PAC-BO + SVD to a certificate, report")
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


def run(args) -> int:
    from pycompress.cli.compress import run as compress_run
    from pycompress.cli.main import build_parser
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
    for stale in (out / "digits_mlp_small.run",):
        if (stale / "state.json").exists():
            import shutil
            shutil.rmtree(stale)  # the demo starts a fresh search each time it runs
    log(f"compressing with PAC-BO + SVD: pycompress compress {model_path} --data {calib} {' '.join(DEMO_SEARCH)}")
    argv = ["compress", str(model_path), "--data", str(calib), *DEMO_SEARCH, "-o", str(small),
            "--report-dir", str(report_dir), "--json"] + (["--quiet"] if args.quiet else [])
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        compress_run(build_parser().parse_args(argv))
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
    print_table(["", "before", "after", "after/before"], [
        ["parameters", f"{b['params']:,}", f"{a['params']:,}", f"{a['params'] / b['params']:.3f}"],
        ["MACs", f"{b['macs']:,}", f"{a['macs']:,}", f"{a['macs'] / b['macs']:.3f}"],
        ["file bytes", f"{b['file_bytes']:,}", f"{a['file_bytes']:,}", f"{a['file_bytes'] / b['file_bytes']:.3f}"],
        ["held-out accuracy", f"{h['accuracy_before']:.4f}", f"{h['accuracy_after']:.4f}",
         f"{h['accuracy_after'] - h['accuracy_before']:+.4f}"],
    ])
    cert = (f"certified: P(J(t*) - J(t^) < {s['delta']}) = {s['probability']:.4f} >= {1 - s['epsilon']:g}"
            if s["certificate"] else f"no certificate ({s['stop_reason']})")
    print(f"PAC-BO: {s['evaluations']} evaluations, gamma {s['gamma']:g}, {cert}")
    print(f"top-1 agreement with the original on {h['samples']} held-out digits: {h['top1_agreement']:.4f}")
    print(f"report: {report_dir / 'report.html'} ({report['seconds']:.0f} s in all)")
    return 0
