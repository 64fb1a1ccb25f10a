"""Low-rank starting plans on real models: size, MACs, latency and fidelity, weight-only vs data-aware.

For each ``--energies`` value, builds the starting plan of ``pycompress plan``
(svd + lowrank_conv, each rank keeping that fraction of the weight spectral
energy, only ranks below r_max), applies it weight-only and data-aware (the
same svd ranks; convs in the channel structure), and prints, measured in one
run (the machine is shared: compare ratios, not absolute times):

- EfficientNet-Lite0 (real ImageNet weights) calibrated on scikit-image crops:
  params / MACs / file-size ratios, latency ratio (onnxruntime CPU, batch 1,
  ``--threads``), top-1 agreement with the original and relative L2 of the
  logits on *held-out* crops;
- a 64-256-256-10 MLP trained on 1200 sklearn digits: accuracy on the 597
  held-out digits (calibration = the 1200 training digits).

    python tools/bench_lowrank.py [--energies 0.99 0.95 0.9] [--calibration 32] [--eval 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import zoo  # noqa: E402  (test models and data: EfficientNet-Lite0, crops, digits)

from pycompress.cli.apply import upstream_of  # noqa: E402
from pycompress.convert import export_to_onnx  # noqa: E402
from pycompress.fidelity import collect_activations, make_session, run_model  # noqa: E402
from pycompress.ir import load_model, model_cost  # noqa: E402
from pycompress.plan import Plan  # noqa: E402
from pycompress.rewrites import ApplyContext, apply_plan, get_rewrite  # noqa: E402


def starting_plan(model: ir.Model, energy: float, data_aware: bool) -> Plan:
    plan = Plan()
    for action in ("svd", "lowrank_conv"):
        rewrite = get_rewrite(action)
        for site in rewrite.sites(model):
            decision = rewrite.starting_decision(model, site, energy=energy, data_aware=data_aware)
            if decision is not None:
                plan.add(decision)
    return plan


def compress(path: Path, energy: float, calibration: np.ndarray | None, batch: int = 16):
    model = load_model(path)
    ctx = ApplyContext()
    if calibration is not None:
        name = model.graph.inputs[0].name

        def activations(names):
            feeds = ({name: calibration[i:i + batch]} for i in range(0, len(calibration), batch))
            return collect_activations(upstream_of(model, names), names, feeds)

        ctx = ApplyContext(activations)
    plan = starting_plan(model, energy, data_aware=calibration is not None)
    start = time.perf_counter()
    apply_plan(model, plan, ctx)
    return model, len(plan.decisions), time.perf_counter() - start


def latency_ratio(base: ir.Model, model: ir.Model, x: np.ndarray, threads: int, repeats: int = 30):
    """(median ms of ``model``, median of ``model`` / median of ``base``), runs interleaved.

    Interleaving the two sessions cancels most of the drift of a shared machine.
    """
    sessions = [make_session(m, threads=threads) for m in (base, model)]
    feeds = {sessions[0].get_inputs()[0].name: x}
    times: list[list[float]] = [[], []]
    for i in range(repeats + 3):
        for j, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feeds)
            if i >= 3:
                times[j].append(time.perf_counter() - start)
    base_ms, model_ms = (1e3 * statistics.median(t) for t in times)
    return model_ms, model_ms / base_ms


def nbytes(model: ir.Model) -> int:
    return len(ir.to_proto(model).SerializeToString())


def bench_efficientnet(args, folder: Path) -> None:
    path = folder / "efficientnet_lite0.onnx"
    export_to_onnx(zoo.efficientnet_lite0(), [(1, 3, 224, 224)], path)
    calibration = zoo.skimage_crops(args.calibration, seed=11)
    held_out = zoo.skimage_crops(args.eval, seed=12)
    original = load_model(path)
    reference = run_model(original, {"input": held_out})[0]
    base = model_cost(original)
    base_ms, _ = latency_ratio(original, original, held_out[:1], args.threads)
    base_bytes = nbytes(original)
    print(f"EfficientNet-Lite0: {base.params:,} params, {base.macs:,} MACs, {base_ms:.2f} ms/image "
          f"({args.threads} thread); calibration {len(calibration)} crops, held-out {len(held_out)} crops")
    print(f"{'energy':>6} {'mode':>11} {'sites':>5} {'params':>7} {'MACs':>6} {'bytes':>6} {'latency':>7} "
          f"{'top-1 agr':>9} {'rel L2':>7} {'apply s':>7}")
    for energy in args.energies:
        for mode, data in (("weight-only", None), ("data-aware", calibration)):
            model, sites, seconds = compress(path, energy, data)
            cost = model_cost(model)
            got = run_model(model, {"input": held_out})[0]
            agreement = float(np.mean(got.argmax(1) == reference.argmax(1)))
            rel = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
            _, latency = latency_ratio(original, model, held_out[:1], args.threads)
            print(f"{energy:>6} {mode:>11} {sites:>5} {cost.params / base.params:>7.3f} {cost.macs / base.macs:>6.3f} "
                  f"{nbytes(model) / base_bytes:>6.3f} {latency:>7.3f} {agreement:>9.1%} {rel:>7.3f} "
                  f"{seconds:>7.1f}")


def bench_digits(args, folder: Path) -> None:
    import torch

    (x_train, y_train), (x_test, y_test) = zoo.digits()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = zoo.train(zoo.MLP((64, 256, 256, 10)), x_train, y_train, epochs=30)
    path = folder / "digits_mlp.onnx"
    export_to_onnx(module, [(1, 64)], path)
    original = load_model(path)
    base = model_cost(original)
    print(f"\ndigits MLP 64-256-256-10: {base.params:,} params, held-out accuracy "
          f"{zoo.accuracy(run_model(original, {'input': x_test})[0], y_test):.1%}")
    print(f"{'energy':>6} {'mode':>11} {'sites':>5} {'params':>7} {'accuracy':>8}")
    for energy in args.energies + [0.7, 0.5]:
        for mode, data in (("weight-only", None), ("data-aware", x_train)):
            model, sites, _ = compress(path, energy, data, batch=256)
            accuracy = zoo.accuracy(run_model(model, {"input": x_test})[0], y_test)
            print(f"{energy:>6} {mode:>11} {sites:>5} {model_cost(model).params / base.params:>7.3f} {accuracy:>8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--energies", type=float, nargs="+", default=[0.99, 0.95, 0.9])
    parser.add_argument("--calibration", type=int, default=32, help="calibration crops (data-aware fit)")
    parser.add_argument("--eval", type=int, default=64, help="held-out crops (agreement, relative L2)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the latency")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_efficientnet(args, Path(tmp))
        bench_digits(args, Path(tmp))


if __name__ == "__main__":
    main()
