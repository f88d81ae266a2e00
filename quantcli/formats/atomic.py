"""Outputs appear whole or not at all: temp file in the output's directory, fsync, os.replace."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from quantcli.errors import OutputError


def check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse to write over an input (same inode, even with --force) or an existing file without force."""
    out = Path(out)
    if not out.parent.is_dir():
        raise OutputError(f"{out}: directory {out.parent} does not exist")
    if out.exists():
        for src in inputs:
            with contextlib.suppress(OSError):
                if Path(src).is_file() and os.path.samefile(src, out):
                    raise OutputError(f"{out}: is the input file; write the output elsewhere")
        if out.is_dir():
            raise OutputError(f"{out}: is a directory")
        if not force:
            raise OutputError(f"{out}: already exists", hint="pass --force to overwrite it")


def describe(exc: OSError) -> str:
    """An OSError in a few words: 'disk full', 'disk quota exceeded', or the system's message."""
    if exc.errno == errno.ENOSPC:
        return "disk full"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)


_LIVE: set[str] = set()  # temp files made and not yet renamed or removed (see remove_stray_temps)


def create_temp(out: Path) -> tuple[int, str]:
    """A new file beside `out` (`.NAME.tmp-XXXX`, normal permissions): (fd, path). A Ctrl-C while
    it is made is held until the file is known (and then it is removed); the file stays listed for
    `remove_stray_temps` until it is renamed or removed."""
    out = Path(out)
    with _sigint_held() as interrupted:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        except OSError as exc:
            raise OutputError(f"{out}: cannot create a file in {out.parent}: {describe(exc)}") from None
        _LIVE.add(tmp)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        except BaseException:
            os.close(fd)
            remove_temp(tmp)
            raise
        if interrupted:
            os.close(fd)
            remove_temp(tmp)
    return fd, tmp


def remove_stray_temps() -> None:
    """Remove the temp files this process made and did not finish: what a Ctrl-C that came between
    a temp file's creation and the code that cleans it up would leave (the CLI calls it)."""
    for tmp in sorted(_LIVE):
        remove_temp(tmp)


@contextlib.contextmanager
def _sigint_held() -> Iterator[list[int]]:
    """Hold a SIGINT that arrives inside the block and raise it (KeyboardInterrupt, as Python's
    default handler does) when the block ends; the block sees the list non-empty when one came.
    Only in the main thread with Python's default handler installed; otherwise nothing changes."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield held
        return
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def publish(done: Path, out: Path, durable: bool = True) -> None:
    """Move a finished, fsynced file onto `out` and make the rename durable; from another file
    system (EXDEV), copy it atomically instead and remove it."""
    out = Path(out)
    try:
        os.replace(done, out)
        _LIVE.discard(str(done))
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise OutputError(f"{out}: cannot move the finished file into place: {describe(exc)}") from None
        with atomic_write(out, durable) as dst, open(done, "rb") as src:
            shutil.copyfileobj(src, dst, 16 << 20)
        remove_temp(str(done))
        return
    if durable:
        fsync_dir(out.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (where the system allows it)."""
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def atomic_write(out: Path, durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a file in out's directory; on success fsync and rename it to `out`, on any error
    or interrupt remove it so nothing appears under the final name. durable=False skips the fsyncs:
    still all-or-nothing if the process dies, not across a power cut (for checkpoint bookkeeping,
    which is verified by hash before use anyway)."""
    out = Path(out)
    fd, tmp = create_temp(out)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield _WriteBehind(fh) if durable else fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, out)
        _LIVE.discard(tmp)
    except OSError as exc:
        remove_temp(tmp)
        raise OutputError(f"{out}: write failed: {describe(exc)}") from None
    except BaseException:
        remove_temp(tmp)
        raise
    if durable:
        fsync_dir(out.parent)


class _WriteBehind:
    """The file being written, with each 32 MB handed to `start_writeback` as it passes (a 1 GB
    output's fsync took 0.35 s, measured). Everything else goes to the file itself."""

    STEP = 32 << 20

    def __init__(self, fh: BinaryIO) -> None:
        self._fh, self._written, self._mark = fh, 0, 0

    def write(self, data: Any) -> int:
        n = self._fh.write(data)
        self._written += n
        if self._written - self._mark >= self.STEP:
            self._fh.flush()
            start_writeback(self._fh.fileno(), self._mark, self._written - self._mark)
            self._mark = self._written
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Have the kernel start writing [offset, offset + nbytes) of `fd` to disk now, without waiting
    (Linux `sync_file_range`): the fsync before an output is published then finds little left to
    write. Advisory: where the call is missing or fails, nothing happens."""
    call = _sync_file_range()
    if call is not None and nbytes > 0:
        call(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; the result does not matter


@functools.cache
def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range  # releases the GIL while it runs
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_temp(path: str) -> None:
    """Remove a temp file of `create_temp` that will not be published (a missing one is fine)."""
    _LIVE.discard(path)
    with contextlib.suppress(OSError):
        os.unlink(path)
