"""The durable spool: received files land in ``tmp/``, are fsynced, then renamed into
``objects/``, and the directory is fsynced before anything is acknowledged.

File names are the SHA-256 of the file's own bytes (``objects/ab/abcdef….dcm``), so no
value a peer sent ever becomes part of a path, the same content always lands on the
same name, and a file that was renamed but never committed to the queue is an orphan
the reconciler can recognise and remove.

Because of that, a path can be shared: by two rows, or by a row and a C-STORE that has
renamed the same content onto it but not yet committed its row.  A spool file is
therefore pinned from just before its rename until its row's write is resolved
(:meth:`Spool.commit_file`, :meth:`Spool.release`), and the queue's writer removes a
file no row refers to only through :meth:`Spool.remove_unpinned` (gateway/store.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_SHARDS = [f"{i:02x}" for i in range(256)]
#: errno values meaning "no room": answered as 0xA700 (out of resources).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class SpoolFull(Exception):
    """Free space on the spool filesystem is below the configured watermark."""


@dataclass(frozen=True)
class SpooledFile:
    relpath: str
    sha256: str
    size: int


class SpoolTempFile:
    """The file pynetdicom streams one C-STORE data set into.

    It stands in for the ``NamedTemporaryFile`` pynetdicom would create (see
    :meth:`Spool.temp_file_factory`), with two differences: it is created in the
    spool's ``tmp/`` (same filesystem, so the final rename is atomic), and a write
    error does not escape into pynetdicom's network thread, which would abort the
    association and leave a partial file behind.  The error is kept instead, the
    partial data is dropped to give the space back, the rest of the data set is
    discarded as it arrives, and the C-STORE handler answers with a failure status.
    """

    def __init__(self, directory: Path, registry: dict[str, SpoolTempFile]) -> None:
        fd, name = tempfile.mkstemp(suffix=".dcm", dir=directory)
        self.name = name
        self.error: OSError | None = None
        self.closed = False
        self._f = os.fdopen(fd, "wb")
        self._registry = registry
        registry[name] = self
        # pynetdicom calls ``tmp.file.flush()`` after each fragment.
        self.file = self

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                self._f.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._f.flush()
            except OSError as exc:
                self._fail(exc)

    def fileno(self) -> int:
        return self._f.fileno()

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        log.error("writing C-STORE data to %s failed: %s", self.name, exc)
        # close() flushes and may fail again; it closes the descriptor regardless.
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            os.truncate(self.name, 0)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._registry.pop(self.name, None)
        try:
            self._f.close()
        except OSError as exc:
            if self.error is None:
                self._fail(exc)

    def discard(self) -> None:
        """Close and delete: the C-STORE it belonged to will never complete."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.name)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.tmp_dir = root / "tmp"
        self.objects_dir = root / "objects"
        self._open_temp: dict[str, SpoolTempFile] = {}
        self._open_lock = threading.Lock()
        # Content paths between rename and row commit; outputs the compress stage is
        # still writing in tmp/ (sweep_tmp leaves those alone).
        self._pins: Counter[str] = Counter()
        self._pin_lock = threading.Lock()
        self._outputs: set[str] = set()

    def temp_file_factory(self, *_args: Any, **_kwargs: Any) -> SpoolTempFile:
        """Called by pynetdicom where it would call ``NamedTemporaryFile``."""
        with self._open_lock:
            return SpoolTempFile(self.tmp_dir, self._open_temp)

    def prepare(self) -> None:
        """Create the directory tree (idempotent) and make it durable."""
        for d in (self.root, self.tmp_dir, self.objects_dir):
            d.mkdir(parents=True, exist_ok=True)
        for shard in _SHARDS:
            (self.objects_dir / shard).mkdir(exist_ok=True)
        fsync_dir(self.objects_dir)
        fsync_dir(self.root)
        fsync_dir(self.root.parent)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_room(self) -> None:
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise SpoolFull(
                f"spool free space {free} bytes is below min_free_bytes {self.min_free_bytes}"
            )

    def path_of(self, relpath: str) -> Path:
        return self.root / relpath

    def commit_file(self, tmp_path: Path, pin: bool = True) -> SpooledFile:
        """Hash, fsync and rename *tmp_path* into ``objects/``; fsync the directory.

        On return the file survives power loss.  *tmp_path* must be on the spool
        filesystem (the receiver points ``tempfile.tempdir`` at :attr:`tmp_dir`).

        The returned path is pinned (taken before the rename, so no removal can come
        between the rename and the row that refers to it): the caller calls
        :meth:`release` once the write recording it is resolved, whatever its outcome.
        ``pin=False`` is for callers with no row to commit.
        """
        digest = hashlib.sha256()
        with open(tmp_path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
            size = f.tell()
            os.fsync(f.fileno())
        sha = digest.hexdigest()
        relpath = f"objects/{sha[:2]}/{sha}.dcm"
        final = self.root / relpath
        if pin:
            with self._pin_lock:
                self._pins[relpath] += 1
        try:
            os.replace(tmp_path, final)
            fsync_dir(final.parent)
        except BaseException:
            if pin:
                self.release(relpath)
            raise
        return SpooledFile(relpath=relpath, sha256=sha, size=size)

    def release(self, relpath: str) -> None:
        """Drop one pin that :meth:`commit_file` took on *relpath*."""
        with self._pin_lock:
            self._pins[relpath] -= 1
            if self._pins[relpath] <= 0:
                del self._pins[relpath]

    def pinned(self, relpath: str) -> bool:
        with self._pin_lock:
            return relpath in self._pins

    def remove_unpinned(self, relpath: str) -> bool:
        """Unlink *relpath* unless it is pinned; False if it was kept.

        Only for the queue's writer, after the commit that left no row referring to
        it.  The check and the unlink hold the pin lock, so a C-STORE of the same
        content either pinned it before (and it stays) or renames after the unlink.
        """
        with self._pin_lock:
            if relpath in self._pins:
                return False
            self.remove(relpath)
            return True

    def remove(self, relpath: str) -> None:
        """Unlink unconditionally: only the start-up reconciler (nothing else runs then)
        and :meth:`remove_unpinned` call this."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / relpath)

    @contextlib.contextmanager
    def temp_output(self, prefix: str) -> Iterator[Path]:
        """A new path in ``tmp/`` for an output being written (a J2K encode), which
        :meth:`sweep_tmp` leaves alone however long the work takes; whatever is still
        there at the end (the work failed or was cancelled) is removed."""
        path = self.tmp_dir / f"{prefix}{uuid.uuid4().hex}.dcm"
        with self._open_lock:
            self._outputs.add(str(path))
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            with self._open_lock:
                self._outputs.discard(str(path))

    def clean_tmp(self) -> int:
        """Remove every temp file: at start none of them belongs to a live C-STORE."""
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        return removed

    def sweep_tmp(self, older_than_s: float) -> int:
        """Remove temp files nothing has written to for *older_than_s* seconds.

        Aborted associations normally clean up after themselves; this catches what
        they miss, so that a box running for months does not fill up with fragments.
        Outputs still in use (:meth:`temp_output`) are kept, however old.
        """
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in os.scandir(self.tmp_dir):
            try:
                stale = entry.stat(follow_symlinks=False).st_mtime < cutoff
            except FileNotFoundError:
                continue
            if stale:
                with self._open_lock:
                    open_file = self._open_temp.get(entry.path)
                    in_use = entry.path in self._outputs
                if in_use:
                    continue
                if open_file is not None:
                    open_file.discard()
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                removed += 1
        return removed

    def stored_relpaths(self) -> set[str]:
        found: set[str] = set()
        for shard in _SHARDS:
            d = self.objects_dir / shard
            if not d.is_dir():
                continue
            for entry in os.scandir(d):
                found.add(f"objects/{shard}/{entry.name}")
        return found
