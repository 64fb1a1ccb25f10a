"""Benchmark PFA on EfficientNet-Lite0: responses + spectra of every Conv/Gemm layer.

For each sample count N (default 500 and 2000 random crops of scikit-image's
photos, 224x224, ImageNet-normalized) one streaming pass collects the
max-pooled responses of all 50 Conv/Gemm outputs into float64 covariance
accumulators, then every layer with at least as many samples as filters
gets its spectrum (eigh), PFA-KL count and L1-max filter selection.

Reported, from one run (the machine is shared: compare ratios, not seconds):
* time split: making the crops / onnxruntime inference / analysis
  (accumulate + eigh + recipes + selection);
* per layer: analysis time against the PFA paper's per-layer figures (VGG-16
  on ImageNet, 1.2 M samples, one CPU @ 2.3 GHz: 64 filters 1.24 s, 128 2.8 s,
  256 4.6 s, 512 9.3 s, 4096 127.5 s; interpolated log-log in the width).
  The paper's time is O(N C^2) (covariance) + O(C^3) (eigen-decomposition);
  at 1.2 M samples the first dominates, so it is scaled linearly to N and
  compared with our streaming covariance ("accum"); the N-independent parts
  (eigh + KL, selection) are shown apart, and our total is also projected
  to 1.2 M samples (accum x 1.2M / N + the rest) against the paper's figure;
* L1-max selection: compiled kernel vs numpy reference on the widest layer;
* peak RSS of each N's run (its own process; memory must not grow with N).

    PYTHONPATH=. python tools/bench_pfa.py [--samples 500,2000] [--model effnet.onnx]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import benchenv  # noqa: E402  (tools/ is on sys.path: this script's folder)

CHECKOUT = "--checkout" in sys.argv  # measure this source tree, not the installed package
if CHECKOUT:
    sys.argv.remove("--checkout")
    benchenv.use_checkout()

from pycompress import kernels  # noqa: E402
from pycompress.data import load_data  # noqa: E402
from pycompress.decisions import pfa  # noqa: E402
from pycompress.fidelity.responses import collect_responses  # noqa: E402
from pycompress.ir import load_model  # noqa: E402
from pycompress.pretrained import export_efficientnet_lite0  # noqa: E402

PAPER_SECONDS = {64: 1.24, 128: 2.8, 256: 4.6, 512: 9.3, 4096: 127.5}
PAPER_SAMPLES = 1.2e6


def paper_seconds(width: int, samples: int) -> float:
    """The paper's per-layer time for ``width`` filters, log-log interpolated, scaled to ``samples``."""
    widths = np.log(sorted(PAPER_SECONDS))
    times = np.log([PAPER_SECONDS[w] for w in sorted(PAPER_SECONDS)])
    x = math.log(width)
    if x <= widths[0]:   # extrapolate with the first segment's slope
        slope = (times[1] - times[0]) / (widths[1] - widths[0])
        t = times[0] + slope * (x - widths[0])
    else:
        t = float(np.interp(x, widths, times))
    return math.exp(t) * samples / PAPER_SAMPLES


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(model_path: Path, n: int, batch_size: int, threads: int | None) -> dict:
    """One sample count, in its own process (so that its peak RSS is its own)."""
    model = load_model(model_path)
    rss_loaded = peak_rss_mb()
    producers = [node for node in model.graph if node.op_type in ("Conv", "Gemm")]
    names = [node.outputs[0].name for node in producers]
    calibration = load_data(f"builtin:skimage:{n}", model)
    stats = collect_responses(model, names, calibration.batches(batch_size), total=n, threads=threads,
                              desc=f"N={n}")
    rows = []
    widest = None
    for node, name in zip(producers, names):
        acc = stats.accumulators[name]
        width = acc.dim
        row = {"layer": node.name, "width": width, "samples": acc.count,
               "accumulate": stats.accumulate_seconds[name]}
        if acc.count < width:
            row["skipped"] = True
            rows.append(row)
            continue
        start = time.perf_counter()
        layer = pfa.LayerSpectrum.from_covariance(node.name, acc.cov, acc.count)
        keep = layer.keep_kl()
        row["spectrum"] = time.perf_counter() - start
        start = time.perf_counter()
        layer.keep_indices(keep)
        row["select"] = time.perf_counter() - start
        row["keep_kl"], row["entropy"] = keep, layer.normalized_entropy
        rows.append(row)
        if widest is None or width > widest[1]:
            widest = (node.name, width, pfa.correlation(acc.cov))
    select = {}
    if widest is not None:
        for label, impl in (("native", kernels), ("reference", kernels.reference)):
            start = time.perf_counter()
            impl.l1max_removal_order(widest[2], widest[1] - 1)
            select[label] = time.perf_counter() - start
        select["layer"], select["width"] = widest[0], widest[1]
    return {"n": n, "rows": rows, "rss": peak_rss_mb(), "rss_loaded": rss_loaded, "select": select,
            "data": stats.data_seconds, "inference": stats.inference_seconds,
            "accumulate": stats.analysis_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default="500,2000", help="sample counts, comma-separated")
    parser.add_argument("--model", default=None, help="EfficientNet-Lite0 .onnx (default: export it now)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one N, JSON to stdout
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(run(Path(args.model), args.worker, args.batch_size, args.threads)))
        return 0
    if benchenv.describe(require_compiled=True):
        return 2
    counts = [int(v) for v in args.samples.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else export_efficientnet_lite0(Path(tmp) / "efficientnet_lite0.onnx")
        print(f"kernels backend: {kernels.BACKEND}; model {path.name}; OPENBLAS_NUM_THREADS="
              f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; onnxruntime threads {args.threads or 'default'}")
        results = []
        for n in counts:
            cmd = [sys.executable, __file__, *(["--checkout"] if CHECKOUT else []), "--worker", str(n), "--model", str(path),
                   "--batch-size", str(args.batch_size)] + (["--threads", str(args.threads)] if args.threads else [])
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print("\n== time split (seconds) ==")
    print(f"{'N':>6} {'crops':>8} {'inference':>10} {'analysis':>9} {'analysis/inference':>19} "
          f"{'layers analysed':>16} {'RSS after load MB':>18} {'peak RSS MB':>12}")
    for r in results:
        analysed = [row for row in r["rows"] if not row.get("skipped")]
        analysis = r["accumulate"] + sum(row["spectrum"] + row["select"] for row in analysed)
        print(f"{r['n']:>6} {r['data']:>8.2f} {r['inference']:>10.2f} {analysis:>9.3f} "
              f"{analysis / r['inference']:>19.4f} {len(analysed):>10}/{len(r['rows'])} {r['rss_loaded']:>18.0f} "
              f"{r['rss']:>12.0f}")

    for r in results:
        n = r["n"]
        print(f"\n== per layer, N = {n} ==")
        print("accum: streaming covariance, O(N C^2), against the paper's time scaled to N samples;")
        print("eigh+KL and select do not depend on N; 'at 1.2M': ours projected to the paper's sample count")
        print(f"{'layer':<32} {'C':>5} {'accum ms':>9} {'paper ms':>9} {'ratio':>6} {'eigh+KL ms':>10} "
              f"{'select ms':>9} {'ours@1.2M s':>11} {'paper s':>8} {'ratio':>6} {'KL keeps':>9}")
        sums = dict.fromkeys(("accum", "paper_n", "ours_full", "paper_full"), 0.0)
        for row in r["rows"]:
            name = row["layer"].strip("/").replace("/Conv", "").replace("/Gemm", "")
            if row.get("skipped"):
                print(f"{name:<32} {row['width']:>5} {1e3 * row['accumulate']:>9.2f}   not analysed: "
                      f"{row['samples']} samples < {row['width']} filters")
                continue
            paper_n = paper_seconds(row["width"], row["samples"])
            paper_full = paper_seconds(row["width"], int(PAPER_SAMPLES))
            ours_full = row["accumulate"] * PAPER_SAMPLES / row["samples"] + row["spectrum"] + row["select"]
            for key, value in (("accum", row["accumulate"]), ("paper_n", paper_n), ("ours_full", ours_full),
                               ("paper_full", paper_full)):
                sums[key] += value
            print(f"{name:<32} {row['width']:>5} {1e3 * row['accumulate']:>9.2f} {1e3 * paper_n:>9.2f} "
                  f"{paper_n / row['accumulate']:>6.1f} {1e3 * row['spectrum']:>10.2f} {1e3 * row['select']:>9.2f} "
                  f"{ours_full:>11.2f} {paper_full:>8.2f} {paper_full / ours_full:>6.1f} "
                  f"{row['keep_kl']:>4}/{row['width']}")
        print(f"{'all analysed layers':<32} {'':>5} {1e3 * sums['accum']:>9.1f} {1e3 * sums['paper_n']:>9.1f} "
              f"{sums['paper_n'] / sums['accum']:>6.1f} {'':>10} {'':>9} {sums['ours_full']:>11.1f} "
              f"{sums['paper_full']:>8.1f} {sums['paper_full'] / sums['ours_full']:>6.1f}")

    select = results[-1]["select"]
    if select:
        print(f"\nL1-max selection, full removal order on {select['layer']} (C = {select['width']}): "
              f"native {1e3 * select['native']:.1f} ms, numpy reference {1e3 * select['reference']:.1f} ms "
              f"(x{select['reference'] / select['native']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
