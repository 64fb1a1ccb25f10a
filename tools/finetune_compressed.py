"""Fine-tune a compressed EfficientNet-Lite0 against its teacher; score it on unseen photos (issue 14).

The student (e.g. a per-layer shared model from tools/share_allocation.py,
or a pruned / low-rank one) is trained with ``pycompress.recover.finetune``
on random crops of the *calibration* photos (``builtin:skimage:N``), never on
the held-out photos; the settings are judged on the fine-tuning's own
validation split (part of those crops), and the held-out crops of other photos
(``builtin:skimage-heldout:H``: chelsea, retina, motorcycle) are scored once,
before and after. With ``--pack`` the result is packed (``export --to
packed``) and its size compared with the student's, which must not grow:
only codebook / scale / bias values change, the uint8 indices stay.
``--gray-crops N`` adds N crops of scikit-image's grayscale photos (none of
them held out) to the training data: more varied content than the 5 colour
calibration photos. ``--validate-by-photo``: the fine-tuning validates on a
whole calibration photo it does not train on.

    PYTHONPATH=. python tools/finetune_compressed.py --teacher lite0.onnx --student shared.onnx \
        --crops 1024 --epochs 2 --lr 1e-4 --out tuned.onnx --pack

Prints one JSON object (also written to OUT.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pycompress.data import load_data
from pycompress.export.packed import pack_file
from pycompress.fidelity.compare import compare_outputs
from pycompress.fidelity.session import run_model
from pycompress.ir import load_model, save_model
from pycompress.recover.finetune import finetune

# scikit-image's grayscale photos that load offline, none of them a held-out photo (chelsea, retina,
# stereo_motorcycle): more varied content than the 5 colour calibration photos, as 3 equal channels.
GRAY_PHOTOS = ("camera", "coins", "moon", "clock", "brick", "grass", "gravel", "cell")


def gray_crops(count: int, folder: Path, seed: int = 1) -> None:
    """Write ``count`` random square crops (a third of the short side to all of it) of GRAY_PHOTOS as RGB PNGs."""
    from PIL import Image
    from skimage import data as skdata

    photos = [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in GRAY_PHOTOS]
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        w, h = photo.size
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        photo.crop((x0, y0, x0 + side, y0 + side)).save(folder / f"gray_{i:05d}.png")


def heldout_quality(reference: np.ndarray, model, held: dict, threads: int) -> dict:
    q = compare_outputs(reference, run_model(model, held, threads=threads)[0])
    return {"agreement": q.top1_agreement, "top5": q.top5_containment, "kl": q.kl_divergence}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--crops", type=int, default=1024, help="crops of the calibration photos to train on")
    p.add_argument("--heldout", type=int, default=160, help="crops of unseen photos to score on")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", default="rmsprop")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--trainable", default="compressed",
                   help="compressed | all | codebooks (only the share rewrite's NAME_codebook initializers)")
    p.add_argument("--gray-crops", type=int, default=0,
                   help="add this many crops of scikit-image's grayscale photos (GRAY_PHOTOS) to the training data")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/onnxruntime threads (more than the free cores slows torch down many times)")
    p.add_argument("--validate-by-photo", action="store_true",
                   help="the fine-tuning's validation split is whole calibration photos, not random crops")
    p.add_argument("--out", required=True)
    p.add_argument("--pack", action="store_true", help="also pack student and result; compare sizes")
    a = p.parse_args(argv)

    teacher = load_model(a.teacher)
    student = load_model(a.student, simplify=False)
    name = teacher.graph.inputs[0].name
    samples = load_data(f"builtin:skimage:{a.crops}", teacher).inputs[name]
    calib = {name: np.asarray(samples[:])}
    groups = samples.groups if a.validate_by_photo else None     # the photo each crop came from
    if a.gray_crops:
        with tempfile.TemporaryDirectory() as folder:
            gray_crops(a.gray_crops, Path(folder))
            extra = np.asarray(load_data(folder, teacher).inputs[name][:])
        calib[name] = np.concatenate([calib[name], extra])
        if groups is not None:      # the grayscale photos validate as one more group
            groups = np.concatenate([groups, np.full(len(extra), groups.max() + 1)])
    held = {name: np.asarray(load_data(f"builtin:skimage-heldout:{a.heldout}", teacher).inputs[name][:])}
    reference = run_model(teacher, held, threads=a.threads)[0]
    result: dict = {"student": a.student, "crops": a.crops, "heldout": a.heldout, "trainable": a.trainable,
                    "validate_by_photo": a.validate_by_photo,
                    "gray_crops": a.gray_crops,
                    "before": heldout_quality(reference, student, held, a.threads)}
    print("held-out before", result["before"], flush=True)
    trainable = a.trainable
    if trainable == "codebooks":    # the share rewrite names them WEIGHT_codebook (rewrites/weight_sharing.py)
        trainable = {n for n in student.graph.initializers if n.endswith("_codebook")}
    t = time.monotonic()
    report = finetune(teacher, student, calib, epochs=a.epochs, lr=a.lr, optimizer=a.optimizer,
                      batch_size=a.batch_size, trainable=trainable, threads=a.threads, groups=groups,
                      progress=lambda line: print(line, flush=True))
    seconds = time.monotonic() - t
    train_images = report.train_samples * len(report.epochs)
    result["finetune"] = {"seconds": seconds, "kept": report.kept, "best_epoch": report.best_epoch,
                          "settings": report.settings, "trainable_params": report.trainable_params,
                          "train_samples": report.train_samples,
                          "validation": [{"epoch": 0, "loss": report.before.loss if report.before else None}]
                          + [{"epoch": e.epoch, "train_loss": e.train_loss, "loss": e.heldout.loss,
                              "agreement": e.heldout.agreement, "seconds": e.seconds} for e in report.epochs],
                          "train_images_per_s": train_images / sum(e.seconds for e in report.epochs)
                          if report.epochs else None}
    result["after"] = heldout_quality(reference, student, held, a.threads)
    print("held-out after", result["after"], flush=True)
    out = Path(a.out)
    save_model(student, out)
    if a.pack:
        before = pack_file(Path(a.student), out.with_name(out.stem + ".student.pcz"))
        after = pack_file(out, out.with_suffix(".pcz"))
        original = Path(a.teacher).stat().st_size
        result["packed"] = {"student_bytes": before.packed_bytes, "tuned_bytes": after.packed_bytes,
                            "original_bytes": original,
                            "student_ratio": before.packed_bytes / original,
                            "tuned_ratio": after.packed_bytes / original}
    text = json.dumps(result, indent=1, default=float)
    out.with_suffix(".json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
