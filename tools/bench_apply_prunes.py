"""Applying a plan of prunes: channel groups updated after each prune against walked again (one run).

Every prunable group of the model is pruned to a random 50-95% of its channels (seeded), on a fresh
clone each time, as a search does for every candidate. "walk" disables the update after each prune
(``prune_channels.remember_channel_groups``), so each prune walks the graph again, as before
``ir/channels/reuse.py``. Prints the median seconds of each and their ratio.

    python tools/bench_apply_prunes.py MODEL.onnx [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from pycompress.ir import load_model
    from pycompress.ir.channels import channel_groups
    from pycompress.plan import LayerDecision, Plan
    from pycompress.rewrites import apply_plan, prune_channels

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = load_model(args.model)
    rng = np.random.default_rng(0)
    decisions = [LayerDecision(g.id, "prune", {"keep": max(2, int(g.width * rng.uniform(0.5, 0.95)))})
                 for g in channel_groups(model) if g.prunable]
    remember = prune_channels.remember_channel_groups
    seconds: dict[str, list[float]] = {"update": [], "walk": []}
    for _ in range(args.repeats):            # interleaved, so load changes hit both alike
        for mode in seconds:
            prune_channels.remember_channel_groups = remember if mode == "update" else (lambda *a: None)
            t0 = time.perf_counter()
            apply_plan(model.clone(), Plan(decisions), check=False)
            seconds[mode].append(time.perf_counter() - t0)
    prune_channels.remember_channel_groups = remember
    update, walk = (statistics.median(seconds[m]) for m in ("update", "walk"))
    print(f"{len(decisions)} prunes: groups updated {update:.3f} s, walked again {walk:.3f} s "
          f"(median of {args.repeats}); update / walk = {update / walk:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
