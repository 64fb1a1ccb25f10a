"""Calibration data: one interface over .npz/.npy files, image folders and
built-in sources (``builtin:digits``, ``builtin:skimage[:COUNT]``, and
``builtin:skimage-heldout[:COUNT]``: crops of other photos, for held-out quality).

``load_data(spec, model)`` returns a ``Calibration``: arrays keyed by the
model's input names (first axis = samples), optional labels, checked against
the model's input shapes and dtypes with a clear error. Image sources are
lazy (``LazySamples``): samples are made batch by batch.
"""

from pycompress.data.images import LazySamples, Preprocess
from pycompress.data.sources import BUILTIN, BUILTIN_IMAGES, Calibration, default_heldout, load_data, sample_groups

__all__ = ["BUILTIN", "BUILTIN_IMAGES", "Calibration", "LazySamples", "Preprocess", "default_heldout", "load_data",
           "sample_groups"]
