"""Small helpers shared by the subcommands: tables, JSON output, numbers."""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence


def human(n: float) -> str:
    """1234567 -> '1.23M' (for tables; JSON keeps exact integers)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.4g}" if isinstance(n, float) else str(n)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], file=None, align: str | None = None) -> None:
    """A plain-text table; ``align`` is one 'l'/'r' per column (default: first left, others right)."""
    file = file or sys.stdout
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        line = "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align))
        print(line.rstrip(), file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=file)


def emit_json(payload: Any, file=None) -> None:
    json.dump(payload, file or sys.stdout, indent=2, default=_jsonable)
    print(file=file or sys.stdout)


def _jsonable(obj: Any):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# -- numeric arguments ---------------------------------------------------------
# Every numeric flag is checked before any work: finite, in its range, with the
# flag named (argparse's ``type=float`` accepts nan and inf).

class Range:
    """An allowed interval for a flag, e.g. ``Range(0, 1, low_open=True)`` is (0, 1]."""

    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}")


POSITIVE = Range(0, low_open=True)
AT_LEAST_ONE = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, low_open=True)           # (0, 1]
PROBABILITY = Range(0, 1, low_open=True, high_open=True)


def check_numbers(args, **ranges: Range) -> None:
    """Refuse a non-finite or out-of-range numeric flag (``None``: not given, fine)."""
    import math

    from pycompress.errors import PycompressError

    for name, allowed in ranges.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise PycompressError(f"{flag} {value}: must be a finite number")
        if value not in allowed:
            raise PycompressError(f"{flag} {value}: must be {allowed}")


# -- inputs and outputs of a command (the policy itself is pycompress.files.OutputPolicy) --

def model_inputs(label: str, path: Any) -> dict[str, Any]:
    """A model and its external data files, as inputs an output must never replace."""
    if path is None:
        return {}
    from pycompress.ir.io import input_files

    files = input_files(path)
    return {label: files[0], **{f"{label}'s external data" + (f" ({i + 1})" if i else ""): f
                                for i, f in enumerate(files[1:])}}


def data_inputs(label: str, spec: Any) -> dict[str, Any]:
    """``--data`` as an input file (builtin sources are not files)."""
    if not spec or str(spec).startswith("builtin:"):
        return {}
    return {label: spec}


def output_policy(outputs: dict[str, Any], inputs: dict[str, Any], *, folders: dict[str, Any] | None = None,
                  lock: Sequence[Any] = (), keep_on_failure=None):
    """Check the outputs against the inputs and each other now; lock and clean up when entered."""
    from pycompress.files import OutputPolicy

    return OutputPolicy(outputs, inputs=inputs, folders=folders, keep_on_failure=keep_on_failure, lock=lock)
