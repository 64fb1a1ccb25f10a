"""Gradient fine-tuning of compressed ONNX graphs: how much it recovers, per optimizer / rate.

Digits MLP 64-128-64-10 (trained here), its two hidden layers factored by svd
at rank 6; fine-tuned 3 epochs on the 1200 training digits (10% held out
inside), scored on the 597 test digits never seen: MSE of the logits to the
teacher's and top-1 accuracy. With ``--efficientnet N``: EfficientNet-Lite0
with two prune groups halved, the closed-form recovery, then fine-tuned 2
epochs on N skimage crops, scored on 48 other crops.

    PYTHONPATH=. python tools/bench_finetune.py [--efficientnet 96] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import zoo  # noqa: E402
from pycompress.convert import export_to_onnx  # noqa: E402
from pycompress.fidelity.session import run_model  # noqa: E402
from pycompress.ir import load_model  # noqa: E402
from pycompress.plan import LayerDecision, Plan  # noqa: E402
from pycompress.recover.finetune import finetune  # noqa: E402
from pycompress.rewrites import apply_plan, get_rewrite  # noqa: E402


def _row(name, teacher, student, tuned, feeds, labels, seconds):
    t = run_model(teacher, feeds)[0]
    s0, s1 = run_model(student, feeds)[0], run_model(tuned, feeds)[0]
    agree = lambda a: float(np.mean(a.argmax(1) == t.argmax(1)))  # noqa: E731
    acc = "" if labels is None else f"  acc {zoo.accuracy(s0, labels):.3f} -> {zoo.accuracy(s1, labels):.3f}"
    print(f"{name:28s} mse {np.mean((s0 - t) ** 2):8.4f} -> {np.mean((s1 - t) ** 2):8.4f}  "
          f"agree {agree(s0):.3f} -> {agree(s1):.3f}{acc}  {seconds:6.1f} s", flush=True)


def digits(threads: int, folder: Path) -> None:
    (xtr, ytr), (xte, yte) = zoo.digits()
    torch.manual_seed(0)
    module = zoo.train(zoo.MLP((64, 128, 64, 10)), xtr, ytr, epochs=15)
    export_to_onnx(module.eval(), [(1, 64)], folder / "mlp.onnx")
    teacher = load_model(folder / "mlp.onnx")
    gemms = [n.name for n in teacher.graph if n.op_type == "Gemm"]
    student = teacher.clone()
    apply_plan(student, Plan([LayerDecision(g, "svd", {"rank": 6}) for g in gemms[:2]]))
    name = teacher.graph.inputs[0].name
    print(f"digits MLP, svd rank 6 on 2 layers; teacher test accuracy "
          f"{zoo.accuracy(run_model(teacher, {name: xte})[0], yte):.3f}")
    for optimizer, lr, labels in [("rmsprop", 1e-4, None), ("rmsprop", 1e-3, None), ("rmsprop", 1e-3, ytr),
                                  ("adam", 1e-3, None), ("sgd", 1e-2, None)]:
        tuned = student.clone()
        t0 = time.perf_counter()
        finetune(teacher, tuned, {name: xtr}, labels, epochs=3, lr=lr, optimizer=optimizer, threads=threads)
        _row(f"{optimizer} lr={lr:g}{' +labels' if labels is not None else ''}", teacher, student, tuned,
             {name: xte}, yte, time.perf_counter() - t0)


def efficientnet(n: int, threads: int, folder: Path) -> None:
    from pycompress.pipeline import recover

    export_to_onnx(zoo.efficientnet_lite0(), [(1, 3, 224, 224)], folder / "eff.onnx")
    teacher = load_model(folder / "eff.onnx")
    prune = [s for s in get_rewrite("prune").sites(teacher) if s.ok][1:3]
    student = teacher.clone()
    plan = apply_plan(student, Plan([LayerDecision(s.name, "prune", {"keep": s.info["width"] // 2})
                                     for s in prune]))
    name = teacher.graph.inputs[0].name
    train, test = zoo.skimage_crops(n, seed=0), zoo.skimage_crops(48, seed=1)
    print(f"EfficientNet-Lite0, prune {[s.name for s in prune]} to half; {n} training crops, 48 test crops")
    recovered = student.clone()
    t0 = time.perf_counter()
    recover(teacher, recovered, plan, {name: train}, samples=n)
    _row("closed-form recovery", teacher, student, recovered, {name: test}, None, time.perf_counter() - t0)
    tuned = recovered.clone()
    t0 = time.perf_counter()
    finetune(teacher, tuned, {name: train}, None, epochs=2, batch_size=16, threads=threads,
             progress=lambda line: print("  " + line, flush=True))
    _row("+ finetune rmsprop, 2 epochs", teacher, recovered, tuned, {name: test}, None, time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--efficientnet", type=int, default=0, metavar="N", help="also EfficientNet on N crops")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        digits(args.threads, Path(tmp))
        if args.efficientnet:
            efficientnet(args.efficientnet, args.threads, Path(tmp))


if __name__ == "__main__":
    main()
