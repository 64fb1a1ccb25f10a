"""Per-layer share bits on EfficientNet-Lite0 under a packed-bytes budget (issue 14).

1. Per shareable layer: k-means at each bit width (packed bytes from the index
   entropy) and the model's output error with only that layer shared at the
   probe width (bias correction included), on calibration crops
   (``builtin:skimage``) only: ``rewrites.share_allocation.layer_costs``.
2. For each target ratio: the greedy allocation under the budget
   (``allocate_bits``), applied as ``pycompress apply --data`` would (bias
   correction on calibration crops, read from the model being rewritten),
   packed (``export --to packed``), and measured on held-out crops of *other*
   photos (``builtin:skimage-heldout``): top-1 agreement, top-5 containment,
   KL against the original.

    PYTHONPATH=. python tools/share_allocation.py --targets 0.19,0.2 [--heldout 160] [--costs costs.json]

Writes each plan to WORK/share_alloc_T.plan.json (usable with `pycompress apply`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from pycompress.cli.apply import upstream_of
from pycompress.data import load_data, sample_groups
from pycompress.data.images import SKIMAGE_CALIBRATION_PHOTOS
from pycompress.export.onnx_spans import initializer_spans
from pycompress.export.packed import pack_file
from pycompress.fidelity import collect_activations
from pycompress.fidelity.compare import compare_outputs
from pycompress.fidelity.session import run_model
from pycompress.ir import load_model, save_model
from pycompress.pretrained import export_efficientnet_lite0
from pycompress.rewrites import ApplyContext, apply_plan, get_rewrite
from pycompress.rewrites.share_allocation import LayerCost, allocation_plan, layer_costs


def data_context(model, calibration: np.ndarray, name: str, reference=None) -> ApplyContext:
    """As `apply --data`: activations of ``model`` (as it is being rewritten) and of ``reference`` (the
    original) on the calibration crops."""
    batches = [{name: calibration[i:i + 16]} for i in range(0, len(calibration), 16)]

    def source(m):
        return lambda names: collect_activations(upstream_of(m, names), names, batches)

    return ApplyContext(activations=source(model), reference_activations=source(reference or model))


def fixed_packed_bytes(onnx_bytes: bytes, shared: set[str]) -> int:
    """What the container spends on everything but the shared layers: the file without their weights, deflated.

    The packed container deflates its skeleton (graph, biases, small float
    layers); the shared layers' codebooks and scales are counted per layer
    by the allocation, uncompressed.
    """
    parts, cursor = [], 0
    for span in sorted((s for s in initializer_spans(onnx_bytes) if s.name in shared), key=lambda s: s.offset):
        parts.append(onnx_bytes[cursor:span.offset])
        cursor = span.offset + span.length
    parts.append(onnx_bytes[cursor:])
    return len(zlib.compress(b"".join(parts), 9))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="EfficientNet-Lite0 .onnx (default: export the pretrained one)")
    parser.add_argument("--calibration", type=int, default=256, help="builtin:skimage crops (bias correction)")
    parser.add_argument("--probe-samples", type=int, default=32, help="calibration crops behind each probe")
    parser.add_argument("--probe-bits", default="6",
                        help="width of each layer's probe, or two (e.g. 5,7): the error measured at both")
    parser.add_argument("--bits", default="4,5,6,7,8", help="widths a layer may get")
    parser.add_argument("--heldout", type=int, default=160, help="builtin:skimage-heldout crops")
    parser.add_argument("--targets", default="0.2", help="packed size targets, fraction of the fp32 file")
    parser.add_argument("--costs", default=None, help="JSON of layer costs: read if it exists, else written")
    parser.add_argument("--compensate", action="store_true",
                        help="share with error_compensation (GPTQ-style index choice on Gemm and Conv)")
    parser.add_argument("--weighted", action="store_true",
                        help="share with activation_weighting (k-means weighted by the inputs' E[x_i^2])")
    parser.add_argument("--drift", action="store_true",
                        help="share with drift_correction (bias correction toward the original's output mean)")
    parser.add_argument("--levels", choices=("kmeans", "uniform"), default="kmeans",
                        help="share's codebook: 2^bits k-means values, or an evenly spaced grid of the same error")
    parser.add_argument("--validation", type=int, default=160,
                        help="new builtin:skimage crops after the calibration ones (calibration photos; the "
                             "figure to choose configurations by, never the held-out one)")
    parser.add_argument("--validate-photo", default=None,
                        help="leave this calibration photo out (e.g. rocket): layer costs and apply use crops of the "
                             "other four, validation is crops of this one (a photo the compression never saw)")
    parser.add_argument("--work", default=None, help="folder for the models (default: a new temporary one)")
    args = parser.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="share_alloc_"))
    work.mkdir(parents=True, exist_ok=True)
    original = Path(args.model) if args.model else export_efficientnet_lite0(work / "efficientnet_lite0.onnx")
    fp32_bytes = original.stat().st_size
    model = load_model(original)
    name = model.graph.inputs[0].name
    # Crop i depends only on (seed, i): crops calibration..calibration+validation-1 are new crops of the same
    # photos, seen by neither the layer costs nor the apply.
    if args.validate_photo is None:
        crops = np.asarray(load_data(f"builtin:skimage:{args.calibration + args.validation}", model).inputs[name][:])
        calibration, validation = crops[:args.calibration], crops[args.calibration:]
    else:
        if args.validate_photo not in SKIMAGE_CALIBRATION_PHOTOS:
            parser.error(f"--validate-photo: one of {', '.join(SKIMAGE_CALIBRATION_PHOTOS)}")
        pool = load_data(f"builtin:skimage:{4 * (args.calibration + args.validation)}", model).inputs
        left_out = sample_groups(pool) == SKIMAGE_CALIBRATION_PHOTOS.index(args.validate_photo)
        calibration = np.asarray(pool[name][np.flatnonzero(~left_out)[:args.calibration]])
        validation = np.asarray(pool[name][np.flatnonzero(left_out)[:args.validation]])
    held = np.asarray(load_data(f"builtin:skimage-heldout:{args.heldout}", model).inputs[name][:])
    share = get_rewrite("share")
    sites = [s.name for s in share.sites(model) if share.starting_decision(model, s, bits=8) is not None]
    bits = tuple(int(b) for b in args.bits.split(","))
    params = {**({"error_compensation": True} if args.compensate else {}),
              **({"activation_weighting": True} if args.weighted else {}),
              **({"levels": args.levels} if args.levels != "kmeans" else {}),
              **({"drift_correction": True} if args.drift else {})}

    costs_path = Path(args.costs) if args.costs else None
    if costs_path is not None and costs_path.exists():
        costs = []
        for c in json.loads(costs_path.read_text()):
            costs.append(LayerCost(c["site"], c["params"], {int(b): v for b, v in c["bytes"].items()},
                                   {int(b): v for b, v in c["error"].items()},
                                   {int(b): v for b, v in c["weight_error"].items()}, c["probe_error"]))
    else:
        # Probe errors are measured on other calibration crops than the bias correction and error
        # compensation read, so that a layer that fits its crops does not look better than it is.
        probe = calibration[:args.probe_samples]
        reference = run_model(model, {name: probe})[0]

        def measure(candidate) -> float:
            out = run_model(candidate, {name: probe})[0]
            return float(np.mean(np.sum(np.square(out - reference), axis=1)))

        t0 = time.monotonic()
        probe_bits = tuple(int(b) for b in args.probe_bits.split(","))
        costs = layer_costs(model, sites, measure, bits=bits,
                            probe_bits=probe_bits[0] if len(probe_bits) == 1 else probe_bits,
                            ctx=data_context(model, calibration[args.probe_samples:args.probe_samples + 64], name),
                            params=params,
                            progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"layer costs: {time.monotonic() - t0:.0f} s", file=sys.stderr)
        if costs_path is not None:
            costs_path.write_text(json.dumps([c.to_dict() for c in costs], indent=1))

    # Everything the allocation does not choose (graph, biases, unshared small layers) is deflated:
    # the packed file ~ deflate(fp32 file without the shared layers' weights) + sum of the layers' packed bytes.
    weight_names = {s.info["weight"] for s in share.sites(model) if s.name in set(sites)}
    fixed = fixed_packed_bytes(original.read_bytes(), weight_names)
    print(f"fixed part of the container (deflated): {fixed:,} bytes", file=sys.stderr)
    reference_held = run_model(model, {name: held})[0]
    reference_validation = run_model(model, {name: validation})[0] if len(validation) else None
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        budget = target * fp32_bytes - fixed
        plan = allocation_plan(costs, budget, params)
        flags = [args.validate_photo if args.validate_photo else "", "comp" if args.compensate else "",
                 "weighted" if args.weighted else "", "uniform" if args.levels == "uniform" else "",
                 "drift" if args.drift else ""]
        tag = "_".join([str(target)] + [f for f in flags if f])
        plan_path = work / f"share_alloc_{tag}.plan.json"
        plan.save(plan_path)
        candidate = load_model(original)
        t0 = time.monotonic()
        apply_plan(candidate, plan, data_context(candidate, calibration, name, reference=model))
        seconds = time.monotonic() - t0
        out = work / f"share_alloc_{tag}.onnx"
        save_model(candidate, out)
        packed = pack_file(out, out.with_suffix(".pcz"))
        shared = load_model(out, simplify=False)
        q = compare_outputs(reference_held, run_model(shared, {name: held})[0])
        v = (compare_outputs(reference_validation, run_model(shared, {name: validation})[0])
             if reference_validation is not None else None)
        histogram = {b: sum(1 for d in plan.decisions if d.params["bits"] == b) for b in bits}
        row = {"target": target, "packed_ratio": packed.packed_bytes / fp32_bytes, "packed_bytes": packed.packed_bytes,
               "onnx_ratio": out.stat().st_size / fp32_bytes, "apply_seconds": seconds,
               "bits_histogram": histogram, **q.to_dict(), "plan": str(plan_path),
               "validation": v.to_dict() if v is not None else None}
        rows.append(row)
        if v is not None:
            print(f"target {target}: validation (calibration photos) agreement {v.top1_agreement:.4f}, "
                  f"KL {v.kl_divergence:.4g}", file=sys.stderr, flush=True)
        print(f"target {target}: packed {row['packed_ratio']:.4f}x, held-out agreement {q.top1_agreement:.4f} "
              f"± {q.top1_agreement_se:.4f}, top-5 {q.top5_containment:.4f}, KL {q.kl_divergence:.4g}, "
              f"bits {histogram}", file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
