"""Copy between NBD exports, files, block devices and streams: ``pynbd copy``.

::

    import pynbd

    result = pynbd.copy("nbd+unix:///?socket=/tmp/src", "disk.img", connections=4)
    print(result.read_bytes, result.zeroed_bytes)

    # from asyncio, with a progress callback
    await pynbd.copy_async(src, dst, progress=lambda done, total: ...)

Each end is an NBD URI, a file or block device path, ``-`` (standard input or output)
or, as a destination, ``null:``. The source's ``base:allocation`` decides what is read:
zero ranges become WRITE_ZEROES (or holes, or nothing where the destination is known to
read as zeroes). With ``dirty_bitmap=NAME`` only the extents that
``qemu:dirty-bitmap:NAME`` marks dirty are copied, onto a destination that holds the
previous copy: an incremental backup. See :mod:`.engine` for how the work is cut and
run, :mod:`.endpoints` for what each kind of end does.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..proto.constants import BASE_ALLOCATION
from ..transport.tls import TLSConfig
from .endpoints import End, NBDEnd, open_end
from .engine import (
    Copier,
    CopyError,
    CopyInterrupted,
    CopyOptions,
    CopyResult,
    Progress,
    zero_runs,
)

__all__ = [
    "CopyError",
    "CopyInterrupted",
    "CopyOptions",
    "CopyResult",
    "Job",
    "Progress",
    "copy",
    "copy_async",
    "zero_runs",
]

#: The default time limit (seconds) of connecting and of each request.
DEFAULT_TIMEOUT = 60.0


def copy(src: str, dst: str, **options: Any) -> CopyResult:
    """Copy ``src`` to ``dst`` and return what was done.

    ``src`` is an NBD URI, a file or block device path, or ``-`` (standard input);
    ``dst`` the same, ``-`` being standard output, or ``null:``. The keywords are those
    of :class:`Job` (``connections``, ``requests``, ``dirty_bitmap``, ``progress``...).

    Raises:
        CopyError: the copy failed (the message names the end and the offset).
        CopyInterrupted: Ctrl-C (KeyboardInterrupt) stopped it; the requests in flight
            were finished and the destination flushed.
        ValueError: an option is out of range.
        NBDError, OSError: an end cannot be opened.
    """
    return Job(src, dst, **options).run()


async def copy_async(src: str, dst: str, **options: Any) -> CopyResult:
    """:func:`copy` for asyncio: the same arguments; the copy runs in a thread.

    ``progress`` is called in the event loop. Cancelling the awaiting task stops the
    copy as Ctrl-C does: the requests in flight are finished, the destination flushed,
    and CopyInterrupted raised.
    """
    import asyncio  # here: a blocking copy does not need it

    loop = asyncio.get_running_loop()
    user = options.pop("progress", None)
    if user is not None:

        def progress(done: int, total: int | None) -> None:
            loop.call_soon_threadsafe(user, done, total)

        options["progress"] = progress
    job = Job(src, dst, **options)
    future = loop.run_in_executor(None, job.run)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        job.stop()
        return await future


class Job:
    """One copy, to :meth:`run` in some thread and :meth:`stop` from any other.

    Args:
        src: an NBD URI, a file or block device path, or ``-`` (standard input).
        dst: the same (``-``: standard output), or ``null:`` (discard). A missing file
            is created; a regular file is cut to the source's size.
        connections: connections to each NBD end (default 4 where both ends allow
            multi-conn, else 1).
        threads: at most this many connections, each with its reader and writer
            thread (default: the number of processors, as nbdcopy's ``-T``).
        requests: requests per connection (default 64): the buffers its reader may
            fill ahead of its writer; each side sends up to 16 at once, pipelined.
        request_size: the largest read or write (default 256 KiB).
        queue_size: bytes in flight per connection (default 16 MiB).
        sparse: find all-zero blocks of this size in the data read and zero them
            instead of writing them (0: off; default 4096).
        flush: flush the destination at the end.
        destination_is_zero: the destination already reads as zeroes: write nothing
            for zero ranges.
        allocated: leave no holes: zero ranges are written (NBD_CMD_FLAG_NO_HOLE).
        extents: use the source's block status (default); False reads everything.
        dirty_bitmap: copy only what ``qemu:dirty-bitmap:NAME`` marks dirty, onto a
            destination that holds the previous copy (an NBD source that offers it).
        progress: called with (bytes done, total bytes or None) as the copy advances,
            from the copying threads.
        tls: TLS settings for both NBD ends (default: each URI's own).
        timeout: seconds for connecting and for each request (None: no limit).

    Raises:
        ValueError: an option is out of range.
    """

    def __init__(
        self,
        src: str,
        dst: str,
        *,
        connections: int | None = None,
        threads: int | None = None,
        requests: int = 64,
        request_size: int = 256 * 1024,
        queue_size: int | None = None,
        sparse: int = 4096,
        flush: bool = False,
        destination_is_zero: bool = False,
        allocated: bool = False,
        extents: bool = True,
        dirty_bitmap: str | None = None,
        progress: Progress | None = None,
        tls: TLSConfig | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self.options = CopyOptions(
            connections=connections,
            threads=threads,
            requests=requests,
            request_size=request_size,
            queue_size=max(16 << 20, request_size) if queue_size is None else queue_size,
            sparse=sparse,
            flush=flush,
            destination_is_zero=destination_is_zero,
            allocated=allocated,
            extents=extents,
            dirty_bitmap=dirty_bitmap,
        )
        self.options.check()
        self.words = (src, dst)
        self.progress = progress
        self.tls = tls
        self.timeout = timeout
        self._copier: Copier | None = None
        self._stopped = False

    def stop(self) -> None:
        """Stop the copy: :meth:`run` raises CopyInterrupted once it has drained."""
        self._stopped = True
        if self._copier is not None:
            self._copier.stop()

    def run(self) -> CopyResult:
        """Open both ends, copy, close them; returns what was done (raises as
        :func:`copy`)."""
        options = self.options
        contexts: tuple[str, ...] = (BASE_ALLOCATION,) if options.extents else ()
        if options.bitmap_context is not None:
            contexts += (options.bitmap_context,)
        with contextlib.ExitStack() as stack:
            src = self._open(stack, self.words[0], False, contexts)
            dst = self._open(stack, self.words[1], True, ())
            _check(src, dst, options)
            self._copier = Copier(src, dst, options, self.progress)
            if self._stopped:
                self._copier.stop()
            return self._copier.run()
        raise AssertionError("unreachable")  # pragma: no cover (the stack never swallows)

    def _open(
        self, stack: contextlib.ExitStack, word: str, destination: bool, contexts: tuple[str, ...]
    ) -> End:
        end = open_end(
            word, destination=destination, contexts=contexts, tls=self.tls, timeout=self.timeout
        )
        stack.callback(end.close)
        return end


def _check(src: End, dst: End, options: CopyOptions) -> None:
    """Refuse what cannot work, before anything is written."""
    bitmap = options.bitmap_context
    if bitmap is not None:
        if not isinstance(src, NBDEnd):
            raise CopyError("--dirty-bitmap needs an NBD source")
        if not src.clients[0].can_meta_context(bitmap):
            raise CopyError(f"the source {src.label} does not offer {bitmap}")
        if dst.stream:
            raise CopyError("an incremental copy needs a destination it can seek in")
    if isinstance(dst, NBDEnd) and dst.readonly():
        raise CopyError(f"the destination {dst.label} is read-only")
    if src.size is not None and dst.size is not None and not dst.grows and dst.size < src.size:
        raise CopyError(
            f"the destination {dst.label} ({dst.size} bytes) is smaller than "
            f"the source {src.label} ({src.size} bytes)"
        )
