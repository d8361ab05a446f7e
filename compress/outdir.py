"""The output folder of a run: an exclusive lock, stale results removed at the start, and
the final set (artifacts plus reports) published together at the end, or not at all.

A run owns its output folder: a second run on the same folder is refused while the first
holds the lock. When a run starts, the previous run's final files are removed first
(report.json first), so a failed re-run never leaves an old ``passed: true`` report next
to new stage folders. At the end every final file is written into a private staging
folder inside the output folder, then renamed into place with ``report.json`` last: a
report exists only when every artifact it names is in place.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

from compress.errors import InputError

log = logging.getLogger(__name__)

LOCK_FILE = ".compress.lock"
REPORT_FILES = ("report.json", "report.md", "report.html")
FINAL_ARTIFACTS = ("model.onnx", "bundle.czip", "weights.czip", "model.ort")  # the usual ones
STAGING_PREFIX = ".publish-"
# OS errors that are the environment's fault (full disk, quota, read-only mount,
# permissions), not the program's: the user fixes them, so they are input errors.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def disk_error(err: OSError, fallback: Path) -> InputError:
    """An ``InputError`` naming the path and the free space for an OS error while writing."""
    path = Path(err.filename) if err.filename else fallback
    if path.parent.name.startswith(STAGING_PREFIX):  # name the file the user will look for
        path = path.parent.parent / path.name
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"; {shutil.disk_usage(where).free:,} bytes free there"
    except OSError:
        free = ""
    reason = err.strerror or str(err)
    need = " (free some space, or choose another folder with -o)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return InputError(f"cannot write {path}: {reason}{free}{need}")


class OutputFolder:
    """Lock, clean and publish ``path``; use as a context manager around a run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock: int | None = None

    def __enter__(self) -> OutputFolder:
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    def lock(self) -> None:
        import fcntl

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise InputError(f"output folder {self.path} is not writable: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(
                f"output folder {self.path} is in use by pid {holder} (another compress run); "
                "wait for it or choose another folder with -o"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing releases the flock; the file stays (unlinking would race)
            self._lock = None

    def remove_previous_results(self) -> None:
        """Remove the last run's reports and the final artifacts its report names."""
        names: set[str] = set(FINAL_ARTIFACTS)
        report = self.path / "report.json"
        try:
            recorded = json.loads(report.read_text()).get("artifacts", {}).values()
            # only files at the top of this folder, as a run publishes them
            here = self.path.resolve()
            names |= {Path(p).name for p in recorded if isinstance(p, str) and Path(p).parent.resolve() == here}
        except (OSError, ValueError, AttributeError):
            pass
        for name in (*REPORT_FILES, *sorted(names)):
            try:
                (self.path / name).unlink(missing_ok=True)
            except IsADirectoryError:
                pass
            except OSError as err:
                raise disk_error(err, self.path / name) from None
        for leftover in self.path.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def staging(self) -> Path:
        """A fresh private folder inside the output folder (same file system: renames are atomic)."""
        folder = self.path / f"{STAGING_PREFIX}{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir()
        except OSError as err:
            raise disk_error(err, folder) from None
        return folder

    def publish(self, staged: Path, order: list[str]) -> None:
        """Rename ``staged/<name>`` to ``<out>/<name>`` for each name in ``order`` (the report
        last); on failure undo the renames already done and remove the staging folder."""
        done: list[Path] = []
        try:
            for name in order:
                src = staged / name
                with open(src, "rb") as f:
                    os.fsync(f.fileno())
                dst = self.path / name
                os.replace(src, dst)
                done.append(dst)
            _fsync_dir(self.path)
        except OSError as err:
            for dst in reversed(done):
                dst.unlink(missing_ok=True)
            raise disk_error(err, self.path) from None
        finally:
            shutil.rmtree(staged, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
