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

The DIMSE receivers and the pipeline are separate processes (gateway/dicom/receivers.py),
each with its own queue writer, so a pin must be seen across processes: besides the
in-process count, a pinned path holds a shared open-file-description lock
(``F_OFD_SETLKW``) on one byte of ``<spool>/pins.lock``, at an offset taken from the
path's hash.  A removal takes an exclusive lock on that byte without waiting; if it
gets it, no process is between a rename and its row, and, still holding it, it checks
that no committed row refers to the path before it unlinks (with one writer per
process, the check inside the remover's own transaction is no longer enough).

The spool keeps its directories open from :meth:`Spool.prepare` on, and creates,
renames and removes relative to those descriptors: if the directory is deleted, its
mount drops, or another directory appears under its path, nothing is ever written
into what is now at that path.  :meth:`Spool.check` compares the path's device and
inode with the ones seen at start; while they differ, :attr:`Spool.problem` says so,
C-STOREs are refused and ``/readyz`` fails.  The same directory coming back (a remount)
makes it usable again; a different one needs a restart, which prepares it afresh.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_SHARDS = [f"{i:02x}" for i in range(256)]
#: errno values meaning "no room": answered as 0xA700 (out of resources).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: The lock file of the cross-process pins, in the spool's root.
PINS_FILE = "pins.lock"
#: Held (exclusively) by one gateway and its receiver processes while they run.
INSTANCE_FILE = "gateway.lock"
_INSTANCE_POLL_S = 0.2


def _pin_offset(relpath: str) -> int:
    """The byte of ``pins.lock`` that stands for *relpath*: 60 bits of its content hash
    (its file name), or of the path's own hash for any other name."""
    name = relpath.rsplit("/", 1)[-1].removesuffix(".dcm")
    try:
        if len(name) == 64:
            return int(name[:15], 16)
    except ValueError:
        pass
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:15], 16)


def ofd_lock(fd: int, kind: int, offset: int, *, wait: bool) -> bool:
    """An open-file-description lock on one byte: owned by the descriptor, not the
    process, so two descriptors of one process conflict like two processes do.
    False when *wait* is off and another holder is in the way."""
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (Linux, 64-bit off_t).
    arg = struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, arg)
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class SpoolFull(Exception):
    """Free space on the spool filesystem is below the configured watermark."""


class SpoolInUse(OSError):
    """Another gateway, or receiver processes of one that was stopped or killed, still
    use this spool."""


class SpoolMissing(OSError):
    """The spool directory is gone or another directory is in its place."""


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

    def __init__(
        self,
        directory: Path,
        registry: dict[str, SpoolTempFile],
        dir_fd: int | None = None,
        refused: OSError | None = None,
    ) -> None:
        self._dir_fd = dir_fd
        # pynetdicom calls ``tmp.file.flush()`` after each fragment.
        self.file = self
        self.closed = False
        self._registry = registry
        self.error: OSError | None = refused
        self._refused = refused is not None
        if refused is not None:
            # No file at all: the data set is discarded as it arrives, and the handler
            # answers with the reason.  The name exists nowhere (pynetdicom unlinks it).
            self._basename = f"refused-{secrets.token_hex(8)}.dcm"
            self.name = str(directory / self._basename)
            self.closed = True
            return
        fd = -1
        for _ in range(100):
            self._basename = f"tmp{secrets.token_hex(8)}.dcm"
            self.name = str(directory / self._basename)
            try:
                fd = os.open(self._own_name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 100 random 64-bit names taken
            raise FileExistsError(errno.EEXIST, "no free temp file name", str(directory))
        self._f = os.fdopen(fd, "wb")
        registry[self.name] = self

    @property
    def _own_name(self) -> str:
        # Relative to the directory held open when there is one (see Spool).
        return self._basename if self._dir_fd is not None else self.name

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
            fd = os.open(self._own_name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=self._dir_fd)
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)

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
        if self._refused:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._own_name, dir_fd=self._dir_fd)


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_fd_dir(name: str, dir_fd: int) -> None:
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The Error Comment (and readiness reason) while the spool directory is not intact.
MISSING_COMMENT = "spool directory is missing or replaced"


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
        # pins.lock, twice: the pins of this process, and the probe of a removal.
        self._pin_fd = -1
        self._probe_fd = -1
        self._outputs: set[str] = set()
        # Set by prepare(): the directories held open, and (st_dev, st_ino) of each.
        self._fds: dict[Path, int] = {}
        self._identity: dict[Path, tuple[int, int]] = {}
        #: Why the spool cannot be used now (None: it can), as of the last check().
        self.problem: str | None = None
        self._check_lock = threading.Lock()
        # Log a change of problem (the gateway's spool); a receiver process's is quiet.
        self._report = True

    def temp_file_factory(self, *_args: Any, **_kwargs: Any) -> SpoolTempFile:
        """Called by pynetdicom where it would call ``NamedTemporaryFile``."""
        problem = self.check()
        with self._open_lock:
            refused: OSError
            if problem is not None:
                refused = SpoolMissing(errno.ENOENT, problem, str(self.root))
            else:
                try:
                    return SpoolTempFile(
                        self.tmp_dir, self._open_temp, dir_fd=self._fd(self.tmp_dir)
                    )
                except OSError as exc:  # no space even for the file, or tmp/ just went
                    log.error("cannot create a temp file in %s: %s", self.tmp_dir, exc)
                    refused = exc
            # An exception here would abort the association in pynetdicom's thread; a
            # refused file lets the C-STORE handler answer with the reason instead.
            return SpoolTempFile(self.tmp_dir, self._open_temp, refused=refused)

    def prepare(self) -> None:
        """Create the directory tree (idempotent), make it durable, and hold it open."""
        for d in (self.root, self.tmp_dir, self.objects_dir):
            d.mkdir(parents=True, exist_ok=True)
        for shard in _SHARDS:
            (self.objects_dir / shard).mkdir(exist_ok=True)
        fsync_dir(self.objects_dir)
        fsync_dir(self.root)
        fsync_dir(self.root.parent)
        self.close()
        self._open_dirs()
        for d, fd in self._fds.items():
            st = os.fstat(fd)
            self._identity[d] = (st.st_dev, st.st_ino)
        self.problem = None

    def identity(self) -> dict[str, tuple[int, int]]:
        """(st_dev, st_ino) of each directory as :meth:`prepare` found it."""
        return {str(d): ident for d, ident in self._identity.items()}

    def attach(self, identity: dict[str, tuple[int, int]]) -> None:
        """For a receiver process: open the tree the gateway prepared, and hold it to
        the identity the gateway saw at start (*identity*, from :meth:`identity`), so a
        directory replaced since is refused here too (:meth:`check`).  The gateway's
        own checks log the changes; this spool's are quiet."""
        self.close()
        self._report = False
        self._identity = {Path(d): (int(dev), int(ino)) for d, (dev, ino) in identity.items()}
        self._open_dirs()
        for d, fd in self._fds.items():
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._identity.get(d):
                self._identity[d] = (-1, -1)  # never matches: check() reports it
        self.check()

    def _open_dirs(self) -> None:
        for d in (self.root, self.tmp_dir, self.objects_dir):
            self._fds[d] = os.open(d, _DIR_FLAGS)
        self._pin_fd = self.open_lock_file(PINS_FILE)
        self._probe_fd = self.open_lock_file(PINS_FILE)

    def take_instance_lock(self, timeout: float) -> int:
        """An exclusive open-file-description lock on ``gateway.lock``: one gateway per
        spool.  The descriptor is inherited by the receiver processes (the lock lives
        as long as any of them holds it), so a gateway that starts after one was killed
        waits here until its receivers have drained and exited: nothing of a previous
        run may pin or write a spool file while the reconciler looks for orphans."""
        fd = self.open_lock_file(INSTANCE_FILE)
        deadline = time.monotonic() + timeout
        said = False
        while not ofd_lock(fd, fcntl.F_WRLCK, 0, wait=False):
            if time.monotonic() > deadline:
                os.close(fd)
                raise SpoolInUse(
                    errno.EBUSY,
                    f"{self.root} is in use by another gateway, or by receiver processes "
                    f"of one that stopped (waited {timeout:.0f} s)",
                )
            if not said:
                log.warning(
                    "%s is in use by another gateway, or by the receiver processes of one"
                    " that stopped; waiting up to %.0f s",
                    self.root,
                    timeout,
                )
                said = True
            time.sleep(_INSTANCE_POLL_S)
        return fd

    def open_lock_file(self, name: str) -> int:
        """A new descriptor (a new open file description) of the lock file *name* in
        the spool's root, the directory held open at start (never created elsewhere)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        return os.open(name, flags, 0o600, dir_fd=self._fd(self.root))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for fd in (self._pin_fd, self._probe_fd):
            if fd >= 0:
                os.close(fd)
        self._pin_fd = self._probe_fd = -1

    def _fd(self, directory: Path) -> int:
        try:
            return self._fds[directory]
        except KeyError:
            raise RuntimeError("Spool.prepare() was not called") from None

    def check(self) -> str | None:
        """Is the spool still the directory it was at start?  Sets :attr:`problem`.

        A few stat calls: cheap enough for every C-STORE.  A change is logged once.
        """
        problem = None
        for d, expected in self._identity.items():
            try:
                st = os.stat(d)
            except FileNotFoundError:
                problem = f"{MISSING_COMMENT}: {d} does not exist"
                break
            except OSError as exc:
                problem = f"{MISSING_COMMENT}: {d}: {exc.strerror or exc}"
                break
            if (st.st_dev, st.st_ino) != expected:
                problem = (
                    f"{MISSING_COMMENT}: {d} is not the directory the gateway started with"
                    " (device/inode changed); restart the gateway to use the new one"
                )
                break
        with self._check_lock:
            before, self.problem = self.problem, problem
        if not self._report:
            pass
        elif problem is not None and before is None:
            log.critical("%s: C-STOREs are refused until it is back", problem)
        elif problem is None and before is not None:
            log.warning("spool directory %s is back (same device and inode)", self.root)
        return problem

    def _require(self) -> None:
        problem = self.check()
        if problem is not None:
            raise SpoolMissing(errno.ENOENT, problem, str(self.root))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_room(self) -> None:
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise SpoolFull(
                f"spool free space {free} bytes is below min_free_bytes {self.min_free_bytes}"
            )

    def probe_write(self) -> None:
        """Create, write, fsync and remove a file in ``tmp/`` (the readiness check)."""
        self._require()
        tmp_fd = self._fd(self.tmp_dir)
        name = f"readyz-{secrets.token_hex(8)}"
        fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=tmp_fd)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name, dir_fd=tmp_fd)

    def path_of(self, relpath: str) -> Path:
        return self.root / relpath

    def commit_file(self, tmp_path: Path, pin: bool = True) -> SpooledFile:
        """Hash, fsync and rename *tmp_path* (a file in ``tmp/``) into ``objects/``;
        fsync the directory.

        On return the file survives power loss.  Both ends are taken relative to the
        directories opened at start, never to whatever is at their path now.

        The returned path is pinned (taken before the rename, so no removal can come
        between the rename and the row that refers to it): the caller calls
        :meth:`release` once the write recording it is resolved, whatever its outcome.
        ``pin=False`` is for callers with no row to commit.
        """
        if tmp_path.parent != self.tmp_dir:
            raise ValueError(f"{tmp_path} is not in {self.tmp_dir}")
        self._require()
        tmp_fd, objects_fd = self._fd(self.tmp_dir), self._fd(self.objects_dir)
        digest = hashlib.sha256()
        with open(os.open(tmp_path.name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=tmp_fd), "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
            size = f.tell()
            os.fsync(f.fileno())
        sha = digest.hexdigest()
        inside = f"{sha[:2]}/{sha}.dcm"
        relpath = f"objects/{inside}"
        if pin:
            self._pin(relpath)
        try:
            os.replace(tmp_path.name, inside, src_dir_fd=tmp_fd, dst_dir_fd=objects_fd)
            _fsync_fd_dir(sha[:2], objects_fd)
        except BaseException:
            if pin:
                self.release(relpath)
            raise
        return SpooledFile(relpath=relpath, sha256=sha, size=size)

    def _pin(self, relpath: str) -> None:
        with self._pin_lock:
            if self._pins[relpath] == 0:
                # Waits only for a removal in progress (it never waits for anyone).
                ofd_lock(self._pin_fd, fcntl.F_RDLCK, _pin_offset(relpath), wait=True)
            self._pins[relpath] += 1

    def release(self, relpath: str) -> None:
        """Drop one pin that :meth:`commit_file` took on *relpath*."""
        with self._pin_lock:
            self._pins[relpath] -= 1
            if self._pins[relpath] <= 0:
                del self._pins[relpath]
                if self._pin_fd >= 0:
                    ofd_lock(self._pin_fd, fcntl.F_UNLCK, _pin_offset(relpath), wait=False)

    def pinned(self, relpath: str) -> bool:
        """Pinned by this process, or by another one (a receiver, the pipeline)."""
        with self._pin_lock:
            if relpath in self._pins:
                return True
            offset = _pin_offset(relpath)
            if not ofd_lock(self._probe_fd, fcntl.F_WRLCK, offset, wait=False):
                return True
            ofd_lock(self._probe_fd, fcntl.F_UNLCK, offset, wait=False)
            return False

    def remove_unpinned(self, relpath: str, referenced: Callable[[], bool] | None = None) -> bool:
        """Unlink *relpath* unless it is pinned, here or in another process, or
        *referenced* says a committed row refers to it; False if it was kept.

        Only for a queue writer, after the commit that left no row of its own
        referring to it.  The pin check, *referenced* and the unlink all happen under
        the exclusive lock on the path's byte of ``pins.lock``: a C-STORE of the same
        content (in any process) either pinned it before (and it stays), or committed
        its row before (and *referenced* sees it), or renames after the unlink.
        """
        with self._pin_lock:
            if relpath in self._pins:
                return False
            offset = _pin_offset(relpath)
            if not ofd_lock(self._probe_fd, fcntl.F_WRLCK, offset, wait=False):
                return False
            try:
                if referenced is not None and referenced():
                    return False
                self.remove(relpath)
                return True
            finally:
                ofd_lock(self._probe_fd, fcntl.F_UNLCK, offset, wait=False)

    def remove(self, relpath: str) -> None:
        """Unlink unconditionally: only the start-up reconciler (nothing else runs then)
        and :meth:`remove_unpinned` call this."""
        inside = relpath.removeprefix("objects/")
        if inside == relpath or ".." in inside.split("/"):
            log.error("not removing %r: not a file of the spool's objects/", relpath)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(inside, dir_fd=self._fd(self.objects_dir))

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
                os.unlink(path.name, dir_fd=self._fd(self.tmp_dir))
            with self._open_lock:
                self._outputs.discard(str(path))

    def clean_tmp(self) -> int:
        """Remove every temp file: at start none of them belongs to a live C-STORE."""
        tmp_fd = self._fd(self.tmp_dir)
        removed = 0
        for entry in os.scandir(tmp_fd):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.name, dir_fd=tmp_fd)
                removed += 1
        return removed

    def sweep_tmp(self, older_than_s: float) -> int:
        """Remove temp files nothing has written to for *older_than_s* seconds.

        Aborted associations normally clean up after themselves; this catches what
        they miss, so that a box running for months does not fill up with fragments.
        Outputs still in use (:meth:`temp_output`) are kept, however old.
        A spool that is not intact is left alone (see :meth:`check`).
        """
        if self.check() is not None:
            return 0
        tmp_fd = self._fd(self.tmp_dir)
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in os.scandir(tmp_fd):
            try:
                stale = entry.stat(follow_symlinks=False).st_mtime < cutoff
            except FileNotFoundError:
                continue
            if stale:
                with self._open_lock:
                    open_file = self._open_temp.get(str(self.tmp_dir / entry.name))
                    in_use = str(self.tmp_dir / entry.name) in self._outputs
                if in_use:
                    continue
                if open_file is not None:
                    open_file.discard()
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=tmp_fd)
                removed += 1
        return removed

    def stored_relpaths(self) -> set[str]:
        found: set[str] = set()
        objects_fd = self._fd(self.objects_dir)
        for shard in _SHARDS:
            try:
                fd = os.open(shard, _DIR_FLAGS, dir_fd=objects_fd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                for entry in os.scandir(fd):
                    found.add(f"objects/{shard}/{entry.name}")
            finally:
                os.close(fd)
        return found
