"""Small file helpers shared by the writers: content hashes, atomic writes, output-folder locks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

from synthgen.errors import LockError

log = logging.getLogger("synthgen")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on any
    failure (full disk, an exception, Ctrl-C) it is removed, so nothing partial is left.

    ``suffix`` keeps an extension writers infer the format from (e.g. ``".png"``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}{suffix}")  # one per writer
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename is None:  # ENOSPC from write(): name the file
            e.filename = str(path)
        raise


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the finished folder ``tmp`` at ``path``. An existing ``path`` is moved aside first and
    deleted only once the new folder is in place, so an interruption leaves the old or the new."""
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path``
    (:func:`replace_dir`), on any failure it is removed, so no half-written folder is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it: readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write_text` for bytes (PNGs and other binary files)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_save_png(image, path: str | os.PathLike) -> None:
    """Write a PIL image or a uint8 (H, W[, 3]) array as a PNG, atomically."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# -- output-folder locks ----------------------------------------------------------------------
LOCK_NAME = ".synthgen.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class OutputLock:
    """An advisory lock on an output folder: ``<folder>/.synthgen.lock`` holds the owner's pid,
    host and command; it is created with ``O_EXCL``, so of two writers only one gets it.

    A lock left by a dead process of this host is taken over (with a warning); a lock of a live
    process, or of another host (whose pids cannot be checked), raises :class:`LockError`
    unless ``force`` (the CLI's ``--force``). Multi-process jobs (torchrun / accelerate ranks)
    take the lock on rank 0 only: pass ``enabled=False`` on the other ranks.

    Example:
        >>> with OutputLock("outputs/gen", "generate"):
        ...     ...  # write into outputs/gen
    """

    def __init__(self, folder: str | os.PathLike, what: str = "synthgen", *, force: bool = False,
                 enabled: bool = True, path: str | os.PathLike | None = None):
        self.folder, self.what, self.force, self.enabled = Path(folder), what, force, enabled
        self.path = Path(path) if path is not None else self.folder / LOCK_NAME  # beside a folder not made yet
        self._held = False
        self._made_folder = False  # the lock made its folder: removed again if nothing was written

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> OutputLock:
        if not self.enabled:
            return self
        self._made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.what}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                stale = host == me["host"] and isinstance(pid, int) and not _alive(pid)
                if not (stale or self.force or not owner):
                    raise LockError(
                        f"{self.folder}: in use by {owner.get('command', 'synthgen')} (pid {pid} on {host}; lock "
                        f"{self.path}); wait for it to finish, or pass --force if that process is gone") from None
                why = ("the stale lock of dead process" if stale else
                       "an unreadable lock" if not owner else "(--force) the lock of process")
                log.warning("%s: taking over %s %s on %s", self.path, why, pid, host)
                print(f"note: {self.folder}: taking over {why} {pid} on {host}", file=sys.stderr)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise LockError(f"{self.folder}: could not take the lock {self.path} (another writer keeps taking it)")

    def release(self) -> None:
        if self._held:
            self._held = False
            if self._owner().get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            if self._made_folder:  # a command that failed before writing leaves no empty folder behind
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
