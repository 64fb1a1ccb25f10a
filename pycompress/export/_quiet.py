"""Silence onnxruntime's tools while they run (they print progress and dump
tensors through print and logging); our CLI prints its own one-line summary."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterator


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        logging.disable(previous)
