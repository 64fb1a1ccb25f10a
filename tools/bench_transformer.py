"""all-MiniLM-L6-v2 end to end (docs/transformers.md): ORT dynamic int8 alone vs FLAP pruning of
the FFN width + low rank of the attention projections + closed-form recovery, then dynamic int8.

Calibration: the first ``--calib`` standard-library docstring sentences; held-out: the last
``--held`` (other modules, never seen by the compression). Prints one JSON line per model:
MACs (per sequence of 64 tokens), bytes, batch-1 latency (median of interleaved runs), mean
cosine to the original's embeddings on the held-out sentences.

    python tools/bench_transformer.py --keep 1152 --rank 112 --out /tmp/minilm
    python tools/bench_transformer.py --allocate 0.70 --reuse --embedding-bits 4   # + 4-bit word embeddings
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pycompress.export.quantized import to_int8_dynamic
from pycompress.fidelity import run_model
from pycompress.fidelity.compare import cosine_similarities
from pycompress.fidelity.session import make_session
from pycompress.ir import SEQUENCE_LENGTH, load_model, model_cost, save_model
from pycompress.pipeline import recover, teacher_channel_statistics
from pycompress.pipeline.statistics import teacher_activations
from pycompress.plan import LayerDecision, Plan
from pycompress.pretrained import export_minilm, minilm_inputs, stdlib_sentences
from pycompress.recover.finetune import finetune
from pycompress.rewrites import ApplyContext, apply_plan, get_rewrite
from pycompress.rewrites.allocation import allocation_plan


def latency_ms(paths: list[Path], feeds: dict, runs: int) -> list[float]:
    """Median batch-1 latency per model, runs interleaved (shared-machine noise hits all alike)."""
    sessions = [make_session(load_model(p), threads=1) for p in paths]
    times = [[] for _ in paths]
    one = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(min(16, len(next(iter(feeds.values())))))]
    for s in sessions:
        s.run(None, one[0])
    for r in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, one[r % len(one)])
            times[i].append(time.perf_counter() - t0)
    return [1e3 * float(np.median(t)) for t in times]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--keep", type=int, default=1152, help="FFN channels kept per layer (of 1536)")
    p.add_argument("--rank", type=int, default=0, help="rank of the attention projections (0: not factored)")
    p.add_argument("--heads", type=int, default=12, help="attention heads kept per layer (of 12)")
    p.add_argument("--allocate", type=float, default=0.0,
                   help="instead of --heads/--keep: heads and FFN widths per layer from the global fluctuation "
                        "ranking (pycompress.rewrites.allocation) at this MACs ratio")
    p.add_argument("--qk-rank", type=int, default=0,
                   help="also keep this many query/key dimensions per head in every attention block (qk_rank, "
                        "whitened on the calibration sentences; 0: untouched)")
    p.add_argument("--lam", type=float, default=1e-3, help="recovery ridge (relative to the mean input variance)")
    p.add_argument("--calib", type=int, default=400)
    p.add_argument("--held", type=int, default=200)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--out", default="/tmp/minilm")
    p.add_argument("--reuse", action="store_true",
                   help="take the compressed model from --out if this setting already wrote it (no new compression)")
    p.add_argument("--embedding-bits", type=int, choices=[4], default=None,
                   help="also rows with the word-embedding table as 4-bit codes (pycompress.export.embedding) on top "
                        "of dynamic int8, for ORT int8 alone and for the compressed model")
    p.add_argument("--embedding-group", type=int, default=64, help="columns per 4-bit scale (0: per row)")
    p.add_argument("--finetune", type=int, default=0, metavar="N",
                   help="after recovery, fine-tune against the original on the first N sentences (they include "
                        "the calibration's; never the held-out modules at the end)")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="Adam learning rate for --finetune")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    original = out / "minilm.onnx"
    if not original.exists():
        export_minilm(original)
    sentences = stdlib_sentences()
    calib = minilm_inputs(sentences[:args.calib])
    held = minilm_inputs(sentences[-args.held:])
    teacher = load_model(original)
    reference = run_model(teacher, held)[0]

    def cosine(model) -> float:
        """Mean cosine of ``model``'s embeddings to the original's on the held-out sentences."""
        return float(cosine_similarities(reference, run_model(model, held)[0]).mean())

    if args.finetune and args.finetune > len(sentences) - args.held:
        raise SystemExit(f"--finetune {args.finetune}: only {len(sentences) - args.held} sentences are not held out")
    tag = f"a{args.allocate:g}_r{args.rank}" if args.allocate else \
        f"h{args.heads}_k{args.keep}_r{args.rank}_l{args.lam:g}"
    if args.qk_rank:
        tag += f"_qk{args.qk_rank}"
    if args.finetune:
        tag += f"_ft{args.finetune}"
    compressed = out / f"minilm_{tag}.onnx"
    t0 = time.perf_counter()
    decisions: list[LayerDecision] = []
    summary: dict = {"reused": str(compressed)}
    if args.reuse and compressed.exists():
        student = load_model(compressed)
    else:
        student = teacher.clone()

        def keep(site) -> int:
            return args.heads if site.name.startswith("heads:") else args.keep

        stats = teacher_channel_statistics(teacher, calib)
        if args.allocate:
            decisions = list(allocation_plan(teacher, stats, args.allocate).decisions)
        else:
            decisions = [LayerDecision(s.name, "prune", {"keep": keep(s)})
                         for s in get_rewrite("prune").sites(teacher) if s.ok and keep(s) < s.info["width"]]
        if args.rank:
            decisions += [LayerDecision(s.name, "svd", {"rank": args.rank}) for s in get_rewrite("svd").sites(teacher)
                          if s.ok and "/attention/" in s.name]
        options = {"channel_statistics": stats}
        if args.qk_rank:
            qk = [LayerDecision(s.name, "qk_rank", {"rank": args.qk_rank}) for s in get_rewrite("qk_rank").sites(teacher)
                  if s.ok]
            decisions += qk
            options.update(get_rewrite("qk_rank").prepare(teacher, qk, teacher_activations(teacher, calib), print))
        plan = apply_plan(student, Plan(decisions), ApplyContext(options=options))
        before = cosine(student)
        report = recover(teacher, student, plan, calib, samples=args.calib, lam=args.lam)
        summary = {"refitted": sum(r["kept"] for r in report["layers"]), "cosine_before_recovery": before}
        if args.finetune:
            summary["cosine_after_recovery"] = cosine(student)
            tuned = finetune(teacher, student, minilm_inputs(sentences[:args.finetune]), epochs=args.finetune_epochs,
                             lr=args.finetune_lr, optimizer="adam", batch_size=16, progress=print)
            summary["finetune"] = {"kept_epoch": tuned.best_epoch, "seconds": round(tuned.seconds, 1)}
        save_model(student, compressed)
    seconds = time.perf_counter() - t0
    int8 = out / "minilm_int8.onnx"
    to_int8_dynamic(original, int8)
    both = out / f"minilm_{tag}_int8.onnx"
    to_int8_dynamic(compressed, both)
    paths = [original, int8, compressed, both]
    if args.embedding_bits:
        group = args.embedding_group
        for source, target in ((original, out / f"minilm_int8_e4g{group}.onnx"),
                               (compressed, out / f"minilm_{tag}_int8_e4g{group}.onnx")):
            to_int8_dynamic(source, target, embedding_group=group)
            paths.insert(paths.index(source) + 2, target)

    lat = latency_ms(paths, held, args.runs)
    base = model_cost(teacher, SEQUENCE_LENGTH)
    setting = {"allocate": args.allocate,
               "widths": {d.site: d.params["keep"] for d in decisions if d.action == "prune"},
               "heads": args.heads, "keep": args.keep, "rank": args.rank, "calib": args.calib, "held": args.held,
               "lam": args.lam, "embedding_bits": args.embedding_bits, "embedding_group": args.embedding_group}
    print(json.dumps({"setting": setting, "compress_seconds": round(seconds, 1), **summary}))
    for path, ms in zip(paths, lat):
        model = load_model(path)
        cost = model_cost(model, SEQUENCE_LENGTH)
        cos = cosine_similarities(reference, run_model(model, held)[0])
        print(json.dumps({"model": path.name, "macs_ratio": round(cost.macs / base.macs, 4),
                          "bytes_ratio": round(path.stat().st_size / original.stat().st_size, 4),
                          "latency_ms": round(ms, 3), "latency_ratio": round(ms / lat[0], 3),
                          "mean_cosine": round(float(cos.mean()), 4), "min_cosine": round(float(cos.min()), 4)}))


if __name__ == "__main__":
    main()
