"""Writing files safely, for every layer: atomic writes and the output-path policy.

Atomic writes (temp file in the same folder + rename): a reader never sees a
half-written file, and a crash leaves the old file in place. ``OutputPolicy``:
what every command checks about its outputs before any work, the lock per
output, and the clean-up of a failed run (see its comment below). No
dependency beyond the standard library, so the planners (``decisions``) can
save their state without importing the ONNX layer.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to ``path`` via a temp file in the same folder + rename."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp makes the file owner-only; give it the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# -- the output-path policy ----------------------------------------------------
# Every command names its inputs and outputs once (``OutputPolicy``); before any
# work the policy refuses an output that is (after symlinks and hard links) an
# input or another output, a folder where a file goes, a missing or read-only
# folder; it takes a lock per output so a second run on the same path refuses;
# and on failure it removes what this run created (``OUT.run`` only when it
# holds no search state worth resuming).

def _error(message: str) -> Exception:
    from pycompress.errors import (
        PycompressError,  # standard-library-only module: no import cycle
    )

    return PycompressError(message)


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def lock_path(path: Path) -> Path:
    """The lock file of an output: ``.NAME.lock`` beside it (removed when the run ends)."""
    return path.parent / f".{path.name}.lock"


class OutputPolicy:
    """Checks, locks and cleans up the outputs of one command run.

    ``outputs`` maps a label (the flag, e.g. ``-o``) to a file path; ``folders``
    the same for output folders; ``inputs`` maps a label to each input file.
    Use as a context manager around the command's work.
    """

    def __init__(self, outputs: dict[str, Any] | None = None, *, inputs: dict[str, Any] | None = None,
                 folders: dict[str, Any] | None = None, keep_on_failure: Callable[[Path], bool] | None = None,
                 lock: Iterable[Any] = ()):
        self.outputs = {k: Path(v) for k, v in (outputs or {}).items() if v is not None}
        self.folders = {k: Path(v) for k, v in (folders or {}).items() if v is not None}
        self.inputs = {k: Path(v) for k, v in (inputs or {}).items() if v is not None}
        self.keep_on_failure = keep_on_failure or (lambda path: False)
        self.lock_targets = [Path(p) for p in lock]
        self._existed: dict[Path, bool] = {}
        self._locks: list[tuple[Path, int]] = []
        self.check()

    def check(self) -> None:
        everything = [(label, path, False) for label, path in self.outputs.items()] + \
                     [(label, path, True) for label, path in self.folders.items()]
        for label, path, is_folder in everything:
            name = f"{label} {path}"
            if not str(path) or str(path).endswith(os.sep) and not is_folder:
                raise _error(f"{name}: not a file name")
            # A large model is saved with its weights in ``NAME.data`` beside it.
            sidecar = path.with_name(path.name + ".data") if path.suffix == ".onnx" else None
            for in_label, source in self.inputs.items():
                if _same_file(path, source):
                    raise _error(f"{name}: refusing to overwrite the input {in_label} {source}; choose another "
                                 "output path")
                if sidecar is not None and _same_file(sidecar, source):
                    raise _error(f"{name}: its external data file {sidecar.name} would overwrite the input "
                                 f"{in_label} {source}; choose another output path")
            if path.is_symlink() and not path.exists():
                raise _error(f"{name}: a dangling symbolic link; refused")
            if not is_folder and path.is_dir():
                raise _error(f"{name}: is a folder, expected a file path")
            if not is_folder and path.exists() and not path.is_file():
                raise _error(f"{name}: not a regular file (a device, FIFO or socket); refused")
            if is_folder and path.exists() and not path.is_dir():
                raise _error(f"{name}: exists and is not a folder")
            parent = path.parent if str(path.parent) else Path(".")
            if not parent.is_dir():
                raise _error(f"{name}: the folder {parent} does not exist")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise _error(f"{name}: cannot write in the folder {parent} (permission denied)")
        seen: list[tuple[str, Path]] = []
        for label, path, _ in everything:
            for other_label, other in seen:
                if _same_file(path, other) or os.path.realpath(path) == os.path.realpath(other):
                    raise _error(f"{label} {path}: the same path as {other_label} {other}; give each output "
                                 "its own path")
            seen.append((label, path))

    def __enter__(self) -> OutputPolicy:  # noqa: PYI034 (typing.Self needs 3.11; 3.10 is supported)
        import fcntl

        for path in [*self.outputs.values(), *self.folders.values()]:
            self._existed[Path(os.path.abspath(path))] = os.path.lexists(path)
        for path in self.outputs.values():   # save_model's external data beside a model
            sidecar = Path(os.path.abspath(path.with_name(path.name + ".data")))
            self._existed.setdefault(sidecar, os.path.lexists(sidecar))
        try:
            for target in self.lock_targets:
                real = Path(os.path.realpath(target))
                lock = lock_path(real)
                while True:
                    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        os.close(fd)
                        raise _error(f"{target}: another pycompress run is writing this output (lock {lock}); "
                                     "wait for it to finish or choose another output") from None
                    # The holder before us may have removed the lock file after we opened it:
                    # only a lock on the file still at that path counts.
                    try:
                        if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                            break
                    except FileNotFoundError:
                        pass
                    os.close(fd)
                self._locks.append((lock, fd))
        except BaseException:
            self._release()
            raise
        return self

    def _release(self) -> None:
        for lock, fd in reversed(self._locks):
            try:
                os.unlink(lock)   # unlink before unlocking: a waiter then sees a new inode and retries
            except FileNotFoundError:
                pass
            os.close(fd)
        self._locks.clear()

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is not None:
                self.remove_created()
        finally:
            self._release()

    def remove_created(self) -> None:
        """Remove every output this run created (a failed run leaves nothing behind)."""
        import shutil

        for path, existed in self._existed.items():
            if existed or not os.path.lexists(path) or self.keep_on_failure(path):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
