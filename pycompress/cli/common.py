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
