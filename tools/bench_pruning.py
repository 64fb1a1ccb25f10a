"""Realized speed of channel pruning on EfficientNet-Lite0 (onnxruntime, CPU).

Prunes every prunable channel group by each fraction (keeping the channels of
largest weight L1 norm) and prints, measured in one run (the machine is shared
and noisy: compare ratios, not times): the MACs ratio, the parameter ratio and
the latency ratio pruned/original at 1 and 2 intra-op threads (medians over
interleaved single-image runs). The goal for realized speed is
``latency ratio <= MACs ratio / 0.83``.

Each fraction is run twice: with exact counts (``align 1``) and with kept
counts rounded to a multiple of 16, the channel block of onnxruntime's NCHWc
convolutions on AVX-512 (8 on AVX2): unaligned widths are padded to the block
inside onnxruntime, so their MACs saving is not all realized.

    python tools/bench_pruning.py [--model eff.onnx] [--prune 0.25 0.5] [--align 1 16] [--rounds 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pycompress.fidelity.session import make_session
from pycompress.ir import load_model, model_cost
from pycompress.plan import Plan
from pycompress.pretrained import export_efficientnet_lite0
from pycompress.rewrites import REGISTRY, apply_plan

EFFICIENCY = 0.83


def pruned(path: Path, fraction: float, align: int):
    """The model with every prunable group keeping (1 - fraction) of its channels (by L1), aligned."""
    model = load_model(path)
    rewrite = REGISTRY["prune"]
    decisions = [d for site in rewrite.sites(model)
                 if (d := rewrite.starting_decision(model, site, keep=1 - fraction, align=align)) is not None]
    apply_plan(model, Plan(decisions))
    return model, len(decisions)


def median_latencies(models, threads: int, rounds: int) -> list[float]:
    """Median seconds per single-image run, models interleaved round by round."""
    sessions = [make_session(m, threads=threads) for m in models]
    feed_name = sessions[0].get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for s in sessions:                       # warm up
        for _ in range(3):
            s.run(None, {feed_name: x})
    times = [[] for _ in sessions]
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            s.run(None, {feed_name: x})
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="EfficientNet-Lite0 ONNX (default: export it now)")
    parser.add_argument("--prune", type=float, nargs="+", default=[0.25, 0.5], help="fractions of channels to remove")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--align", type=int, nargs="+", default=[1, 16],
                        help="round kept channel counts to a multiple of this (one row each)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or export_efficientnet_lite0(Path(tmp) / "efficientnet_lite0.onnx")
        original = load_model(path)
        base = model_cost(original)
        variants = []
        for fraction in args.prune:
            for align in args.align:
                model, groups = pruned(path, fraction, align)
                variants.append((fraction, align, groups, model, model_cost(model)))
        latencies = {t: median_latencies([original] + [v[3] for v in variants], t, args.rounds) for t in (1, 2)}
    print(f"EfficientNet-Lite0: {base.params / 1e6:.2f} M params, {base.macs / 1e6:.0f} M MACs; "
          f"original latency {latencies[1][0] * 1e3:.1f} ms (1 thread), {latencies[2][0] * 1e3:.1f} ms (2 threads)")
    print(f"{'pruned':>7} {'align':>5} {'groups':>6} {'MACs':>6} {'params':>6} {'lat 1T':>7} {'lat 2T':>7} "
          f"{'goal <=':>8} {'met':>4}")
    for i, (fraction, align, groups, _, cost) in enumerate(variants, start=1):
        macs = cost.macs / base.macs
        lat1, lat2 = latencies[1][i] / latencies[1][0], latencies[2][i] / latencies[2][0]
        goal = macs / EFFICIENCY
        met = "yes" if max(lat1, lat2) <= goal else "no"
        print(f"{fraction:>7.0%} {align:>5} {groups:>6} {macs:>6.3f} {cost.params / base.params:>6.3f} {lat1:>7.3f} {lat2:>7.3f} "
              f"{goal:>8.3f} {met:>4}")


if __name__ == "__main__":
    main()
