"""Images as calibration data: a folder of image files, or crops of scikit-image's photos.

Both are read lazily: ``LazySamples`` looks like an ``(N, ...)`` array to
``Calibration`` (``len``, ``shape``, ``dtype``, slicing), but makes each
sample only when a batch asks for it, so a folder of 50,000 images or 2,000
crops at 224x224 never sits in memory at once.

Preprocessing (``Preprocess``; CLI ``--preprocess size=224,mean=imagenet,std=imagenet,layout=nchw``):
pixels are scaled to [0, 1] (``scale``), resized (``resize=crop``: shorter
side to the target, then a centre crop; ``resize=stretch``: straight to the
target), normalized ``(x - mean) / std`` per channel and laid out as the
model wants. Unset fields come from the model's input: its size, its layout
(the axis of size 1 or 3 after the batch axis: NCHW, else NHWC), and
ImageNet mean/std for 3 channels (mean 0, std 1 for grayscale).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pycompress.errors import PycompressError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
# scikit-image's colour photographs shipped inside the package (no download;
# the pooch-backed ones fail offline), split by photo so that held-out quality
# is measured on images no calibration crop came from (crops of the same photo
# overlap and share its statistics: they flatter a model fitted on them).
# Calibration: a portrait, a drink, a launch, a telescope field, a stained tissue.
SKIMAGE_CALIBRATION_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
# Held out: a cat, a fundus photograph, a motorcycle (left view of the stereo pair).
SKIMAGE_HELDOUT_PHOTOS = ("chelsea", "retina", "stereo_motorcycle")
SKIMAGE_PHOTOS = SKIMAGE_CALIBRATION_PHOTOS + SKIMAGE_HELDOUT_PHOTOS
SKIMAGE_SPLITS = {"calibration": SKIMAGE_CALIBRATION_PHOTOS, "heldout": SKIMAGE_HELDOUT_PHOTOS}
SKIMAGE_DEFAULT_COUNT = 2000
SKIMAGE_HELDOUT_DEFAULT_COUNT = 160


class LazySamples:
    """A read-only ``(n, *sample_shape)`` array whose samples are made on demand by ``make(i)``."""

    def __init__(self, n: int, sample_shape: Sequence[int], dtype: np.dtype, make: Callable[[int], np.ndarray],
                 description: str = "", groups: np.ndarray | None = None):
        self._n = int(n)
        # The source of each sample (e.g. the photo a crop came from), when known: recovery
        # validates on whole sources left out (recover/layerwise.py). None: unknown.
        self.groups = None if groups is None else np.asarray(groups, np.int64)
        self._sample_shape = tuple(int(d) for d in sample_shape)
        self.dtype = np.dtype(dtype)
        self._make = make
        self.description = description

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n, *self._sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self._sample_shape)

    def __len__(self) -> int:
        return self._n

    def _indices(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(self._n)[key]
        index = np.asarray(key)
        if index.dtype == bool:
            return np.flatnonzero(index)
        index = index.astype(np.int64)
        if np.any((index < -self._n) | (index >= self._n)):
            raise IndexError(f"index out of range for {self._n} samples")
        return np.where(index < 0, index + self._n, index)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        indices = self._indices(key)
        out = np.empty((len(indices), *self._sample_shape), self.dtype)
        for row, i in enumerate(indices):
            out[row] = self._make(int(i))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"LazySamples({self.description or 'samples'}, shape={self.shape}, dtype={self.dtype})"


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(",", ":").split(":") if v)
    except ValueError:
        raise PycompressError(f"--preprocess {name}={text!r}: expected numbers separated by ':'") from None


@dataclass
class Preprocess:
    """How image files become model inputs (see the module docstring); None = from the model."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None          # "nchw" | "nhwc"
    resize: str = "crop"               # "crop" | "stretch"
    scale: float = 1.0 / 255.0

    @classmethod
    def parse(cls, text: str | None) -> "Preprocess":
        """``"size=224,mean=imagenet,std=0.229:0.224:0.225,layout=nchw,resize=crop,scale=0.00392"``."""
        spec = cls()
        if not text:
            return spec
        for item in text.split(","):
            if not item.strip():
                continue
            key, sep, val = item.partition("=")
            key, val = key.strip().lower(), val.strip()
            if not sep or not val:
                raise PycompressError(f"--preprocess {item!r}: expected key=value")
            if key == "size":
                try:
                    dims = tuple(int(v) for v in val.lower().replace("x", ":").split(":"))
                except ValueError:
                    raise PycompressError(f"--preprocess size={val!r}: expected N or HxW") from None
                if len(dims) not in (1, 2) or min(dims) <= 0:
                    raise PycompressError(f"--preprocess size={val!r}: expected N or HxW, positive")
                spec.size = (dims[0], dims[-1])
            elif key in ("mean", "std"):
                if val.lower() == "imagenet":
                    values = IMAGENET_MEAN if key == "mean" else IMAGENET_STD
                elif val.lower() == "none":
                    values = (0.0,) if key == "mean" else (1.0,)
                else:
                    values = _floats(val, key)
                if key == "std" and any(v <= 0 for v in values):
                    raise PycompressError(f"--preprocess std={val!r}: must be positive")
                setattr(spec, key, values)
            elif key == "layout":
                if val.lower() not in ("nchw", "nhwc"):
                    raise PycompressError(f"--preprocess layout={val!r}: expected nchw or nhwc")
                spec.layout = val.lower()
            elif key == "resize":
                if val.lower() not in ("crop", "stretch"):
                    raise PycompressError(f"--preprocess resize={val!r}: expected crop or stretch")
                spec.resize = val.lower()
            elif key == "scale":
                spec.scale = _floats(val, key)[0]
            else:
                raise PycompressError(f"--preprocess: unknown key {key!r}; known: size, mean, std, layout, resize, scale")
        return spec

    def resolve(self, input_shape: Sequence[int | None], where: str) -> "_Resolved":
        """Fill the unset fields from a model input shape ``(N, C, H, W)`` or ``(N, H, W, C)``."""
        shape = list(input_shape)
        if len(shape) != 4:
            raise PycompressError(f"{where}: images need a 4-D model input (N, C, H, W or N, H, W, C), "
                                  f"got {len(shape)}-D {tuple('?' if d is None else d for d in shape)}")
        layout = self.layout
        if layout is None:
            if shape[1] in (1, 3):
                layout = "nchw"
            elif shape[3] in (1, 3):
                layout = "nhwc"
            else:
                raise PycompressError(f"{where}: cannot tell the channel axis of input shape "
                                      f"{tuple('?' if d is None else d for d in shape)}; give --preprocess layout=...")
        channels, h, w = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
        if channels not in (1, 3):
            raise PycompressError(f"{where}: images give 1 or 3 channels, the model input has {channels}")
        if self.size is not None:
            if (h is not None and h != self.size[0]) or (w is not None and w != self.size[1]):
                raise PycompressError(f"{where}: --preprocess size={self.size[0]}x{self.size[1]} but the model "
                                      f"input is {h}x{w}")
            h, w = self.size
        if h is None or w is None:
            raise PycompressError(f"{where}: the model input's height/width are symbolic; give --preprocess size=HxW")
        default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.0,), (1.0,))
        mean = np.array(self.mean if self.mean is not None else default_mean, np.float32)
        std = np.array(self.std if self.std is not None else default_std, np.float32)
        for name, arr in (("mean", mean), ("std", std)):
            if arr.size not in (1, channels):
                raise PycompressError(f"--preprocess {name}: {arr.size} values for {channels} channel(s)")
        return _Resolved(channels, h, w, layout, mean, std, self.resize, float(self.scale))


@dataclass
class _Resolved:
    channels: int
    height: int
    width: int
    layout: str
    mean: np.ndarray
    std: np.ndarray
    resize: str
    scale: float

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c, h, w = self.channels, self.height, self.width
        return (c, h, w) if self.layout == "nchw" else (h, w, c)

    def describe(self) -> str:
        def fmt(a):
            return ":".join(f"{v:g}" for v in a)
        return (f"size={self.height}x{self.width},layout={self.layout},resize={self.resize},"
                f"scale={self.scale:g},mean={fmt(self.mean)},std={fmt(self.std)}")

    def finish(self, image) -> np.ndarray:
        """A PIL image (any mode/size) -> one normalized model sample."""
        from PIL import Image

        image = image.convert("RGB" if self.channels == 3 else "L")
        w0, h0 = image.size
        if self.resize == "stretch":
            image = image.resize((self.width, self.height), Image.BILINEAR)
        else:
            s = max(self.height / h0, self.width / w0)
            nw, nh = max(self.width, round(w0 * s)), max(self.height, round(h0 * s))
            image = image.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - self.width) // 2, (nh - self.height) // 2
            image = image.crop((left, top, left + self.width, top + self.height))
        x = np.asarray(image, dtype=np.float32) * self.scale
        if x.ndim == 2:
            x = x[:, :, None]
        x = (x - self.mean) / self.std
        return x.transpose(2, 0, 1) if self.layout == "nchw" else x


# An image above this is refused before decoding (a calibration photo never needs it;
# a decompression bomb would fill the memory).
MAX_IMAGE_PIXELS = 64_000_000


def image_folder(folder: Path, input_shape: Sequence[int | None], dtype: np.dtype, preprocess: Preprocess,
                 where: str) -> LazySamples:
    """Every image file under ``folder`` (recursively, sorted by path), preprocessed lazily."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PycompressError(f"{where}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    spec = preprocess.resolve(input_shape, where)

    def make(i: int) -> np.ndarray:
        import warnings

        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                # PIL only warns between its limit and twice it: refused here, as an error.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(files[i]) as image:
                    if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
                        raise PycompressError(f"{files[i]}: {image.size[0]}x{image.size[1]} pixels is above the "
                                              f"limit of {MAX_IMAGE_PIXELS:,} pixels per image; refused")
                    image.load()
                    return spec.finish(image)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning, EOFError, SyntaxError) as exc:
            raise PycompressError(f"{files[i]}: cannot read the image ({type(exc).__name__}: {exc})") from None

    # Fail now, not in the middle of a long pass, if the first file is unreadable.
    make(0)
    return LazySamples(len(files), spec.sample_shape, dtype, make, f"{folder} [{spec.describe()}]")


def _skimage_photo(name: str) -> np.ndarray:
    from skimage import data as skdata

    image = getattr(skdata, name)()
    if isinstance(image, tuple):      # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    return np.ascontiguousarray(image[..., :3])


def skimage_crops(count: int, input_shape: Sequence[int | None], dtype: np.dtype, preprocess: Preprocess,
                  where: str, seed: int = 0, split: str = "calibration") -> LazySamples:
    """``count`` random square crops of scikit-image's colour photos of ``split``, resized and normalized lazily.

    ``split``: "calibration" (SKIMAGE_CALIBRATION_PHOTOS) or "heldout"
    (SKIMAGE_HELDOUT_PHOTOS, disjoint photos). Crop ``i`` depends only on
    ``(seed, i)``: any batch order gives the same data.
    """
    from PIL import Image

    if split not in SKIMAGE_SPLITS:
        raise PycompressError(f"{where}: unknown image split {split!r}; known: {', '.join(SKIMAGE_SPLITS)}")
    spec = preprocess.resolve(input_shape, where)
    photos = [Image.fromarray(_skimage_photo(name)) for name in SKIMAGE_SPLITS[split]]

    def make(i: int) -> np.ndarray:
        rng = np.random.default_rng([seed, i])
        photo = photos[int(rng.integers(len(photos)))]   # the first draw: ``groups`` below repeats it
        w, h = photo.size
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        return spec.finish(photo.crop((x0, y0, x0 + side, y0 + side)))

    groups = np.array([int(np.random.default_rng([seed, i]).integers(len(photos))) for i in range(count)], np.int64)
    return LazySamples(count, spec.sample_shape, dtype, make,
                       f"skimage {split} crops of {', '.join(SKIMAGE_SPLITS[split])} [{spec.describe()}]", groups)
