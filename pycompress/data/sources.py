"""Calibration data sources (see package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import onnx_ir as ir

from pycompress.data.images import (SKIMAGE_CALIBRATION_PHOTOS, SKIMAGE_DEFAULT_COUNT, SKIMAGE_HELDOUT_DEFAULT_COUNT,
                                    SKIMAGE_HELDOUT_PHOTOS, LazySamples, Preprocess, image_folder, skimage_crops)
from pycompress.errors import PycompressError


@dataclass
class Calibration:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int = 64) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.inputs.items()}

    def subset(self, index: np.ndarray) -> "Calibration":
        return Calibration({k: v[index] for k, v in self.inputs.items()},
                           None if self.labels is None else self.labels[index], self.source)


def sample_groups(inputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The source of each sample (the photo of a built-in crop, ``LazySamples.groups``), or None."""
    return next((np.asarray(v.groups) for v in inputs.values() if getattr(v, "groups", None) is not None), None)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 real 8x8 handwritten digits, flattened, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


# name -> () -> (inputs for a single-input model, labels or None). Reshaped to
# the model's input when the sizes agree (digits: 64 -> 1x8x8 for a CNN).
BUILTIN: dict[str, Callable[[], tuple[np.ndarray, np.ndarray | None]]] = {"digits": _digits}
# Built-in sources made for the model's input shape (images), lazily:
# builtin:NAME or builtin:NAME:COUNT.
# skimage and skimage-heldout crop disjoint photos: held-out quality is
# measured on images no calibration crop came from.
BUILTIN_IMAGES = {
    "skimage": (f"random crops of scikit-image's colour photos {', '.join(SKIMAGE_CALIBRATION_PHOTOS)} "
                f"(default {SKIMAGE_DEFAULT_COUNT}; builtin:skimage:COUNT)"),
    "skimage-heldout": (f"random crops of other photos, {', '.join(SKIMAGE_HELDOUT_PHOTOS)} "
                        f"(default {SKIMAGE_HELDOUT_DEFAULT_COUNT}; builtin:skimage-heldout:COUNT)"),
}
_IMAGE_SPLIT = {"skimage": ("calibration", SKIMAGE_DEFAULT_COUNT),
                "skimage-heldout": ("heldout", SKIMAGE_HELDOUT_DEFAULT_COUNT)}


def default_heldout(spec: str | None) -> str | None:
    """The held-out source that goes with calibration SPEC: other photos for builtin:skimage, else None."""
    if spec and spec.startswith("builtin:skimage") and not spec.startswith("builtin:skimage-heldout"):
        return f"builtin:skimage-heldout:{SKIMAGE_HELDOUT_DEFAULT_COUNT}"
    return None


def _single_image_input(model: ir.Model, source: str) -> ir.Value:
    graph_inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    if len(graph_inputs) != 1:
        raise PycompressError(f"{source}: image data feeds single-input models; this one has inputs "
                              f"{[v.name for v in graph_inputs]}")
    value = graph_inputs[0]
    if value.shape is None:
        raise PycompressError(f"{source}: the model input '{value.name}' has no shape")
    return value


def _input_dtype(value: ir.Value, source: str) -> np.dtype:
    dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
    if dtype.kind != "f":
        raise PycompressError(f"{source}: images give float inputs, model input '{value.name}' is {dtype}")
    return dtype


def _reshape_builtin(arrays: dict[str, np.ndarray], model: ir.Model) -> dict[str, np.ndarray]:
    graph_inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    if len(arrays) != 1 or len(graph_inputs) != 1 or graph_inputs[0].shape is None:
        return arrays
    array = next(iter(arrays.values()))
    dims = list(graph_inputs[0].shape)[1:]
    if all(isinstance(d, int) for d in dims) and list(array.shape[1:]) != dims \
            and int(np.prod(dims)) == int(np.prod(array.shape[1:])):
        return {"__single__": array.reshape(len(array), *dims)}
    return arrays


def _check_against_model(inputs: dict[str, np.ndarray], model: ir.Model, source: str) -> dict[str, np.ndarray]:
    graph_inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    names = [v.name for v in graph_inputs]
    if set(inputs) != set(names):
        if len(inputs) == 1 and len(names) == 1:
            inputs = {names[0]: next(iter(inputs.values()))}
        else:
            raise PycompressError(f"{source}: arrays {sorted(inputs)} do not match the model's inputs {names}")
    out = {}
    for value in graph_inputs:
        array = inputs[value.name]
        expected = value.dtype.numpy() if value.dtype is not None else np.float32
        if isinstance(array, LazySamples) and array.dtype != expected:
            raise PycompressError(f"{source}: input '{value.name}' has dtype {array.dtype}, model expects "
                                  f"{np.dtype(expected)}")
        if array.dtype != expected:
            if array.dtype.kind == "f" and np.dtype(expected).kind == "f":
                array = array.astype(expected)
            else:
                raise PycompressError(f"{source}: input '{value.name}' has dtype {array.dtype}, model expects {np.dtype(expected)}")
        shape = value.shape
        if shape is not None:
            want = [d if isinstance(d, int) else None for d in shape]
            got = list(array.shape)
            if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want[1:], got[1:])):
                raise PycompressError(f"{source}: input '{value.name}' has shape {tuple(got)}, model expects "
                                      f"{tuple('?' if w is None else w for w in want)} (first axis = samples)")
        out[value.name] = array
    return out


def load_data(spec: str, model: ir.Model, *, labels: str | None = None,
              preprocess: Preprocess | str | None = None) -> Calibration:
    """Load calibration data for ``model`` from SPEC.

    SPEC is ``file.npz`` (arrays keyed by input name, optional ``labels``),
    ``file.npy`` (single-input models), a folder of images (read lazily,
    ``preprocess`` says how; see ``pycompress.data.images``), ``builtin:digits``
    or ``builtin:skimage[:COUNT]``.
    """
    explicit_preprocess = preprocess is not None
    if not isinstance(preprocess, Preprocess):
        preprocess = Preprocess.parse(preprocess)
    label_array = None
    if spec.startswith("builtin:"):
        name, _, count = spec.split(":", 1)[1].partition(":")
        if name in BUILTIN_IMAGES:
            split, default_count = _IMAGE_SPLIT[name]
            try:
                n = int(count) if count else default_count
            except ValueError:
                n = 0
            if n <= 0:
                raise PycompressError(f"--data {spec}: COUNT must be a positive integer (builtin:{name}:COUNT)")
            value = _single_image_input(model, spec)
            arrays = {value.name: skimage_crops(n, [d if isinstance(d, int) else None for d in value.shape],
                                                _input_dtype(value, spec), preprocess, spec,
                                                seed=1 if split == "heldout" else 0, split=split)}
        elif name in BUILTIN and not count:
            if explicit_preprocess:
                raise PycompressError(f"--data {spec}: --preprocess applies to image folders and builtin:skimage")
            x, label_array = BUILTIN[name]()
            arrays = _reshape_builtin({"__single__": x}, model)
        else:
            known = sorted(BUILTIN) + [f"{k}[:COUNT]" for k in sorted(BUILTIN_IMAGES)]
            raise PycompressError(f"--data {spec}: unknown built-in source; known: {', '.join(known)}")
    elif Path(spec).is_dir():
        value = _single_image_input(model, spec)
        arrays = {value.name: image_folder(Path(spec), [d if isinstance(d, int) else None for d in value.shape],
                                           _input_dtype(value, spec), preprocess, spec)}
    else:
        path = Path(spec)
        if not path.exists():
            raise PycompressError(f"{spec}: no such data file or folder")
        _check_regular_file(path, spec)
        if explicit_preprocess:
            raise PycompressError(f"{spec}: --preprocess applies to image folders and builtin:skimage, "
                                  "not to arrays (they are fed as they are)")
        try:
            _check_array_file_size(path, spec)
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
                if "labels" in arrays:
                    label_array = arrays.pop("labels")
            elif path.suffix == ".npy":
                arrays = {"__single__": np.load(path, allow_pickle=False)}
            else:
                raise PycompressError(f"{spec}: unsupported data format (use .npz, .npy, a folder of images "
                                      "or builtin:NAME)")
        except PycompressError:
            raise
        except Exception as exc:  # pickled object arrays are refused by allow_pickle=False
            raise PycompressError(f"{spec}: cannot read data ({type(exc).__name__}: {exc})") from exc
    if labels is not None:
        if not Path(labels).exists():
            raise PycompressError(f"{labels}: no such labels file")
        _check_regular_file(Path(labels), labels)
        _check_array_file_size(Path(labels), labels)
        try:
            label_array = np.load(labels, allow_pickle=False)
        except Exception as exc:
            raise PycompressError(f"{labels}: cannot read labels ({type(exc).__name__})") from exc
        if not isinstance(label_array, np.ndarray):
            raise PycompressError(f"{labels}: expected one .npy array of labels")
    for name, array in arrays.items():
        _check_samples(array, spec if name == "__single__" else f"{spec}: array '{name}'")
    inputs = _check_against_model(arrays, model, spec)
    counts = {name: len(array) for name, array in inputs.items()}
    if len(set(counts.values())) > 1:
        raise PycompressError(f"{spec}: the inputs hold different numbers of samples {counts}")
    cal = Calibration(inputs, label_array, spec)
    if label_array is not None:
        where = labels or f"{spec}: labels"
        if label_array.ndim != 1 or label_array.dtype.kind not in "iu":
            raise PycompressError(f"{where}: labels must be a 1-D integer array, got shape "
                                  f"{label_array.shape} dtype {label_array.dtype}")
        if len(label_array) != len(cal):
            raise PycompressError(f"{where}: {len(label_array)} labels for {len(cal)} samples of {spec}")
    return cal


def _check_regular_file(path: Path, where: str) -> None:
    """A FIFO or device would block the read forever (or never end): only regular files are data."""
    if not path.is_file():
        raise PycompressError(f"{where}: not a regular file (a FIFO, device or socket); refused")


def _memory_bytes() -> int:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def _check_array_file_size(path: Path, where: str) -> None:
    """Refuse an array file whose arrays would not fit in memory (read from the headers, nothing loaded)."""
    import zipfile

    limit = _memory_bytes() // 2
    sizes: list[tuple[str, int]] = []
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                sizes = [(info.filename, info.file_size) for info in archive.infolist()]
        elif path.suffix == ".npy":
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(fh))
                count = 1
                for d in shape:
                    count *= int(d)
                sizes = [(path.name, count * dtype.itemsize)]
                expected_end = fh.tell() + count * dtype.itemsize
            if dtype.kind != "O" and path.stat().st_size < expected_end:
                raise PycompressError(f"{where}: truncated .npy file (its header promises {count} values)")
    except PycompressError:
        raise
    except Exception as exc:
        raise PycompressError(f"{where}: cannot read data ({type(exc).__name__}: {exc})") from None
    total = sum(size for _, size in sizes)
    if total > limit:
        raise PycompressError(f"{where}: its arrays need {total / 2**30:.1f} GiB, more than half of this "
                              f"machine's memory ({limit * 2 / 2**30:.1f} GiB); pass fewer samples")


def _check_samples(array, where: str) -> None:
    """Samples a model can be fed: at least one, along a first axis, with finite values."""
    if isinstance(array, LazySamples):
        return
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise PycompressError(f"{where}: expected a numeric array, got dtype {getattr(array, 'dtype', None)}")
    if array.ndim == 0:
        raise PycompressError(f"{where}: a scalar; expected samples along the first axis")
    if len(array) == 0:
        raise PycompressError(f"{where}: holds no samples (the first axis is empty)")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise PycompressError(f"{where}: holds {bad} NaN/Inf value(s); calibration data must be finite")
