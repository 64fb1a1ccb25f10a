"""Agents for the tests: started as real processes on loopback, always stopped."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-4f1c"


@contextlib.contextmanager
def running_agent(*args: str, port: int = 0, token: str = TOKEN, timeout: float = 60.0):
    """``python -m pycompress.agent`` on 127.0.0.1; yields (address, process); killed on exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYCOMPRESS_AGENT_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "pycompress.agent", "--port", str(port), "--token", token, *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    found: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        for line in proc.stderr:
            match = re.search(r"listening on (\S+)", line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        if not ready.wait(timeout) or not found:
            raise RuntimeError(f"the agent did not start (exit code {proc.poll()})")
        yield found[0], proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
