"""Atomic writes and content hashes: nothing half-written is ever trusted.

Every file the pipeline publishes (containers, unpacked models, bundles, reports, JUnit)
goes through :func:`atomic_open` / :func:`atomic_write`: the bytes go to a temp file
created exclusively (``O_CREAT | O_EXCL``, never through a symlink) with a unique name in
the destination's own folder, are fsync'ed, and only then renamed over the destination.
Two writers to one path therefore each publish a complete file (the last rename wins) and
never interleave; a crash or an error leaves the destination untouched and no temp file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from compress.errors import InputError


class OutputError(InputError):
    """An output could not be written (missing folder, permissions, disk full): exit 2."""


_UMASK: int | None = None


def _file_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give (mkstemp creates 0600)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def describe_os_error(path: Path, err: OSError, needed: int | None = None) -> str:
    """A one-line message naming ``path``, the OS reason and, for a full disk, the space."""
    msg = f"cannot write {path}: {err.strerror or err}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
            msg += f" ({free:,} bytes free" + (f", {needed:,} needed" if needed else "") + ")"
        except OSError:
            pass
    return msg


def check_output_path(dst: Path, *, force: bool = True, sources: tuple[Path, ...] = ()) -> Path:
    """Refuse outputs that cannot or must not be written, before any work starts.

    Args:
        dst: the file to publish.
        force: whether an existing file may be replaced.
        sources: inputs that ``dst`` must not be (same inode, whatever the spelling).

    Raises:
        OutputError: ``dst`` is a directory, its folder is missing or not a folder, it
            exists and ``force`` is false, or it is one of ``sources``.
    """
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {dst}: folder {parent} does not exist")
    if dst.is_dir():
        raise OutputError(f"cannot write {dst}: it is a directory")
    for src in sources:
        with contextlib.suppress(OSError):
            if dst.exists() and os.path.samefile(src, dst):
                raise OutputError(f"{dst} is the input file {src}; choose another output")
    if dst.exists() and not force:
        raise OutputError(f"{dst} exists; pass --force to replace it")
    return dst


def open_temp(dst: Path, *, mkdir: bool = False, size_hint: int | None = None) -> tuple[BinaryIO, Path]:
    """Create a unique temp file beside ``dst`` exclusively (``mkstemp``: ``O_EXCL``, mode
    0600, never follows a symlink); returns it open for binary writing, and its path.

    Raises:
        OutputError: the folder is missing, ``dst`` is a directory, or another OS error.
    """
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    try:
        if mkdir:
            parent.mkdir(parents=True, exist_ok=True)
        if dst.is_dir():
            raise OutputError(f"cannot write {dst}: it is a directory")
        fd, name = tempfile.mkstemp(prefix=f".{dst.name[:64]}.", suffix=".tmp", dir=parent)
    except (FileNotFoundError, NotADirectoryError):
        raise OutputError(f"cannot write {dst}: folder {parent} does not exist") from None
    except OSError as err:
        raise OutputError(describe_os_error(dst, err, size_hint)) from None
    return os.fdopen(fd, "wb", buffering=1 << 20), Path(name)


def publish_temp(f: BinaryIO, tmp: Path, dst: Path, size_hint: int | None = None) -> None:
    """Flush, fsync and close ``f``, then rename ``tmp`` over ``dst``; on failure the temp
    file is removed and an :class:`OutputError` naming ``dst`` raised."""
    try:
        f.flush()
        os.fchmod(f.fileno(), _file_mode())
        os.fsync(f.fileno())
        f.close()
        if Path(dst).is_dir():
            raise OutputError(f"cannot write {dst}: it is a directory")
        os.replace(tmp, dst)
    except OSError as err:
        discard_temp(f, tmp)
        raise OutputError(describe_os_error(Path(dst), err, size_hint)) from None
    except BaseException:
        discard_temp(f, tmp)
        raise


def discard_temp(f: BinaryIO | None, tmp: Path) -> None:
    """Close ``f`` (ignoring errors: a full disk makes the final flush fail) and remove ``tmp``."""
    if f is not None:
        with contextlib.suppress(OSError, ValueError):
            f.close()
    with contextlib.suppress(OSError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(dst: str | os.PathLike, *, mkdir: bool = False, size_hint: int | None = None) -> Iterator[BinaryIO]:
    """Open a unique temp file beside ``dst`` for binary writing; publish it on success.

    The temp file is created exclusively in ``dst``'s folder (so the final rename stays on
    one file system), fsync'ed and renamed over ``dst`` when the block ends without an
    exception; on any exception it is removed and ``dst`` is left as it was.

    Args:
        dst: destination path.
        mkdir: create missing parent folders first (stage folders); otherwise a missing
            folder is an :class:`OutputError`.
        size_hint: bytes about to be written, named in a disk-full message.

    Raises:
        OutputError: an OS error while creating, writing or publishing (names the path).
    """
    dst = Path(dst)
    f, tmp = open_temp(dst, mkdir=mkdir, size_hint=size_hint)
    try:
        yield f
    except OSError as err:
        discard_temp(f, tmp)
        raise OutputError(describe_os_error(dst, err, size_hint)) from None
    except BaseException:
        discard_temp(f, tmp)
        raise
    publish_temp(f, tmp, dst, size_hint)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *, mkdir: bool = True) -> Path:
    """Call ``write(tmp)`` on a fresh, exclusively created temp path, then publish it.

    ``write`` receives the temp file's path (it may reopen it, e.g. ``torch.save``);
    everything else is as in :func:`atomic_open`. ``mkdir`` (default, as before) creates
    missing parent folders; pass ``False`` for user-given outputs.
    """
    path = Path(path)
    f, tmp = open_temp(path, mkdir=mkdir)
    try:
        write(tmp)
    except OSError as err:
        discard_temp(f, tmp)
        raise OutputError(describe_os_error(path, err)) from None
    except BaseException:
        discard_temp(f, tmp)
        raise
    publish_temp(f, tmp, path)  # fsync through our handle syncs what ``write`` wrote
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mkdir: bool = True) -> Path:
    path = Path(path)
    with atomic_open(path, mkdir=mkdir, size_hint=len(data)) as f:
        f.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, mkdir: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mkdir=mkdir)


def atomic_write_json(path: str | os.PathLike, data: Any, *, mkdir: bool = True) -> Path:
    return atomic_write_text(
        path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n", mkdir=mkdir
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_hash(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


# The libraries whose behaviour a finished stage's files depend on (the exported graph, the
# quantized values, the measured outputs): a cached stage made under other versions is redone.
FINGERPRINT_LIBRARIES = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "brevitas", "zstandard", "isal")
# The packages shipped with compress (``compress.*`` maps to several folders, pyproject.toml)
_OWN_PACKAGES = ("compress", "compress.distill", "compress.prune", "compress.quantize", "compress.export")


def source_hash(roots: Iterable[Path]) -> str:
    """SHA-256 over every Python source file under ``roots``: each file's path relative
    to its root and its bytes, in sorted order (so the same tree hashes the same wherever
    it is installed)."""
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
        h.update(b"\1")
    return h.hexdigest()


def _own_roots() -> list[Path]:
    from importlib.util import find_spec

    roots: list[Path] = []
    for name in _OWN_PACKAGES:
        spec = find_spec(name)  # imports the parent package only, not ``name`` itself
        roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return roots


@functools.cache
def code_fingerprint() -> str:
    """What the code that makes a stage's files is: compress's version, a hash of its
    Python sources (so an editable install's edits count, not only releases) and the
    versions of :data:`FINGERPRINT_LIBRARIES`. Part of every stage's cache key: a re-run
    after an upgrade redoes the stages instead of serving files the old code made."""
    from importlib.metadata import PackageNotFoundError, version

    import compress

    versions = []
    for name in FINGERPRINT_LIBRARIES:
        try:
            versions.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name}=-")
    return text_hash(compress.__version__, source_hash(_own_roots()), *versions)


def module_fingerprint(target: str | Callable[..., Any]) -> str:
    """A hash of the source file of the module behind a stage or method's ``apply``
    (``"package.module:function"`` or the function), when it lies outside compress's own
    packages (a plugin: :func:`code_fingerprint` covers ours); ``""`` otherwise."""
    from importlib.util import find_spec

    name = target.partition(":")[0] if isinstance(target, str) else getattr(target, "__module__", "")
    if not name or name == "compress" or name.startswith("compress."):
        return ""
    try:
        spec = find_spec(name)
    except (ImportError, ValueError):
        return ""
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    if origin is None or not origin.is_file():
        return ""
    return hashlib.sha256(origin.read_bytes()).hexdigest()
