"""pycompress against other compression tools on EfficientNet-Lite0, in one run (issue 14's table).

Every configuration starts from the same pretrained EfficientNet-Lite0, uses the
same calibration crops (``builtin:skimage:N``: photos astronaut, coffee, rocket,
hubble_deep_field, immunohistochemistry) and is measured on the same held-out
crops of *other* photos (``builtin:skimage-heldout:M``: chelsea, retina,
motorcycle), against the original: top-1 agreement, top-5 containment, KL.
Latency: onnxruntime CPU, batch 1, all models timed interleaved (rounds over
all models) at 1 and at 2 intra-op threads.

Configurations:

- ``ort static``: ``onnxruntime.quantization.quantize_static``, QDQ, per-channel
  int8 weights, uint8 activations (U8S8), MinMax (what ``pycompress export --to
  int8`` runs);
- ``ort dynamic``: ``quantize_dynamic``, per-channel int8 weights;
- ``nncf``: ``nncf.quantize`` on the ONNX model (when ``nncf`` is installed;
  ``pip install 'pycompress[peers]'``; else the row says skipped);
- ``pycompress quant``: ``plan --actions quant`` + ``apply --data`` (every layer
  int8, cross-layer equalization, bias correction, onnxruntime's QDQ);
- ``pycompress share 8 / 6 bits``: weight sharing with bias correction; size =
  the Huffman-packed container (``export --to packed``);
- ``--extra PATH:LABEL``: any other model (e.g. a ``compress`` result).

    PYTHONPATH=. python tools/bench_vs_peers.py [--calibration 256] [--heldout 160] [--iters 40] \\
        [--extra small.onnx:"compress prune,lowrank_conv,quant"] [--markdown docs/bench_vs_peers.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pycompress.bench.measure import bench_models
from pycompress.cli.main import main
from pycompress.data import load_data
from pycompress.export import export_model
from pycompress.export.quantized import to_int8_dynamic, to_int8_static
from pycompress.fidelity.compare import compare_outputs
from pycompress.fidelity.session import run_model
from pycompress.ir import atomic_write_text, load_model
from pycompress.pretrained import export_efficientnet_lite0


def cli(*argv) -> None:
    """Run a pycompress command in-process, quietly; fail loudly."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main([*map(str, argv)])
    if code != 0:
        raise SystemExit(f"pycompress {' '.join(map(str, argv))} failed ({code})")


def nncf_quantize(source: Path, output: Path, calibration: np.ndarray) -> str | None:
    """NNCF's post-training quantization of the ONNX model; None when nncf is missing."""
    try:
        import nncf
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(source))
    name = model.graph.input[0].name
    dataset = nncf.Dataset([{name: calibration[i:i + 1]} for i in range(len(calibration))])
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
    onnx.save(quantized, str(output))
    return getattr(nncf, "__version__", "?")


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="EfficientNet-Lite0 .onnx (default: export the pretrained one)")
    parser.add_argument("--calibration", type=int, default=256, help="calibration crops (default 256)")
    parser.add_argument("--heldout", type=int, default=160, help="held-out crops of other photos (default 160)")
    parser.add_argument("--iters", type=int, default=40, help="timed runs per model and thread count")
    parser.add_argument("--extra", action="append", default=[], metavar="PATH:LABEL", help="another model to add")
    parser.add_argument("--skip", default="", help="comma-separated configurations to leave out (e.g. nncf)")
    parser.add_argument("--markdown", default=None, help="also write the table here")
    parser.add_argument("--work", default=None,
                        help="folder for the models (default: a new temporary one); models already there are reused")
    args = parser.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_peers_"))
    work.mkdir(parents=True, exist_ok=True)
    original = Path(args.model) if args.model else export_efficientnet_lite0(work / "efficientnet_lite0.onnx")
    model = load_model(original)
    name = model.graph.inputs[0].name
    calib_spec = f"builtin:skimage:{args.calibration}"
    calibration = np.asarray(load_data(calib_spec, model).inputs[name][:])
    held = np.asarray(load_data(f"builtin:skimage-heldout:{args.heldout}", model).inputs[name][:])
    skip = set(filter(None, args.skip.split(",")))

    rows: list[tuple[str, Path, Path | None, float]] = [("fp32 (original)", original, None, 0.0)]  # label, run, size

    def step(label: str, make) -> None:
        if label.split()[0] in skip or label in skip:
            return
        t0 = time.monotonic()
        print(f"{label} ...", file=sys.stderr, flush=True)
        made = make()
        if made is None:
            print(f"{label}: skipped (not installed)", file=sys.stderr)
            return
        run, size = made if isinstance(made, tuple) else (made, None)
        rows.append((label, run, size, time.monotonic() - t0))

    def ort_static():
        out = work / "ort_static.onnx"
        if out.exists():
            return out
        to_int8_static(original, out, {name: calibration})
        return out

    def ort_dynamic():
        out = work / "ort_dynamic.onnx"
        if out.exists():
            return out
        to_int8_dynamic(original, out)
        return out

    def nncf():
        out = work / "nncf.onnx"
        if out.exists():
            return out
        return out if nncf_quantize(original, out, calibration) else None

    def ours_quant():
        plan, out = work / "quant.plan.json", work / "pycompress_quant.onnx"
        if out.exists():
            return out
        cli("plan", original, "--actions", "quant", "-o", plan)
        cli("apply", original, plan, "-o", out, "--data", calib_spec)
        return out

    def ours_share(bits: int):
        def make():
            # (apply writes OUT.plan.json: the input plan must be named otherwise)
            plan, out, packed = (work / f"share{bits}_input.plan.json", work / f"share{bits}.onnx",
                                 work / f"share{bits}.pcz")
            if out.exists() and packed.exists():
                return out, packed
            cli("plan", original, "--actions", "share", "--bits", bits, "-o", plan)
            cli("apply", original, plan, "-o", out, "--data", calib_spec)
            export_model(out, "packed", packed)
            return out, packed
        return make

    step("ort static (QDQ U8S8 per-channel)", ort_static)
    step("ort dynamic", ort_dynamic)
    step("nncf quantize", nncf)
    step("pycompress quant (CLE + bias correction + ORT QDQ)", ours_quant)
    step("pycompress share 8 bits (packed)", ours_share(8))
    step("pycompress share 6 bits (packed)", ours_share(6))
    for item in args.extra:
        path, _, label = item.partition(":")
        rows.append((label or Path(path).name, Path(path), None, 0.0))

    reference = run_model(model, {name: held})[0]
    quality = [compare_outputs(reference, run_model(load_model(run, simplify=False), {name: held})[0])
               for _, run, _, _ in rows]
    latency = {}
    for threads in (1, 2):
        print(f"timing at {threads} thread(s), interleaved ...", file=sys.stderr, flush=True)
        benched = bench_models([run for _, run, _, _ in rows], threads=threads, warmup=5, iters=args.iters)
        latency[threads] = [b.latency_ms for b in benched]
    size0 = original.stat().st_size
    lines = [(f"EfficientNet-Lite0; calibration {calib_spec}; held-out: {args.heldout} crops of other photos "
              f"(builtin:skimage-heldout); latency p50 ms at batch 1, onnxruntime CPU, timed interleaved "
              f"({args.iters} runs per model in 10 rounds; spread = lowest-highest per-round median)."), "",
             ("| configuration | size vs fp32 | latency 1 thread (ratio; spread) | latency 2 threads (ratio) | "
              "top-1 agreement | top-5 containment | KL | seconds to make |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {t: latency[t][0]["p50"] for t in latency}
    records = []
    for (label, run, size_path, seconds), q, l1, l2 in zip(rows, quality, latency[1], latency[2]):
        size = (size_path or run).stat().st_size / size0
        lines.append(f"| {label} | {size:.3f} | {l1['p50']:.2f} ({l1['p50'] / base[1]:.2f}; "
                     f"{l1['round_p50_min']:.2f}-{l1['round_p50_max']:.2f}) | {l2['p50']:.2f} "
                     f"({l2['p50'] / base[2]:.2f}) | {q.top1_agreement:.3f} | {q.top5_containment:.3f} | "
                     f"{q.kl_divergence:.4f} | {seconds:.0f} |")
        records.append({"label": label, "size": size, "latency_1": l1, "latency_2": l2, **q.to_dict()})
    table = "\n".join(lines) + "\n"
    print(table)
    print(json.dumps(records, indent=1), file=sys.stderr)
    if args.markdown:
        atomic_write_text(args.markdown, table)


if __name__ == "__main__":
    main_()
