"""Calibration data: one interface over .npz/.npy files, image folders and
built-in sources (``builtin:digits``, ``builtin:skimage[:COUNT]``).

``load_data(spec, model)`` returns a ``Calibration``: arrays keyed by the
model's input names (first axis = samples), optional labels, checked against
the model's input shapes and dtypes with a clear error. Image sources are
lazy (``LazySamples``): samples are made batch by batch.
"""

from pycompress.data.images import LazySamples, Preprocess
from pycompress.data.sources import BUILTIN, BUILTIN_IMAGES, Calibration, load_data

__all__ = ["BUILTIN", "BUILTIN_IMAGES", "Calibration", "LazySamples", "Preprocess", "load_data"]
