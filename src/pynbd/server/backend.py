"""Backends: where an export's bytes live, and what they can do.

A backend declares what it can do once, in a frozen :class:`Capabilities`, and
implements blocking (:class:`Backend`) or async (:class:`AsyncBackend`) methods. The
server never calls a method the capabilities do not promise, and requests reach a
backend only after the protocol core validated them (range, alignment, flags,
read-only), so a backend needs no checks of its own.

Some features can be emulated by the server (:class:`Support`): FUA by a flush after
the write, WRITE_ZEROES by writing zeroes, CACHE by reading and dropping the data.

Errors: a backend raises :class:`OSError` with an errno; :func:`errno_to_nbd` maps it
onto the few error values the protocol allows (one table, :data:`ERRNO_TO_NBD`).
Any other exception is reported as EIO.

:func:`run_request` and :func:`run_request_async` turn one validated request into
backend calls, emulations included. Where the server calls them (its event loop, a
connection's thread, its thread pool) is its own decision, drawn from what the
capabilities say (see :mod:`pynbd.server.policy`).

Writing your own backend
------------------------
Subclass :class:`Backend` (blocking methods) or :class:`AsyncBackend` (coroutines).
Required: a ``size`` property and ``pread_into(buf, offset)``, which fills the whole
``buf`` (it may hold stale bytes: the server reuses its buffers). ``buf`` in
``pread_into`` and ``pwrite`` is valid only during the call: keep a copy
(``bytes(buf)``), never the view. Optional, each one promised by a field of
``capabilities``: ``pwrite(buf, offset, fua)`` (``can_write``, the default), ``flush()``
(``can_flush``), ``trim(length, offset, fua)`` (``can_trim``), ``zero(length, offset,
may_trim, fast, fua)`` (``can_zero=Support.NATIVE``; the default EMULATE writes zeroes
with ``pwrite``), ``cache(length, offset)`` and ``extents(length, offset)``
(``can_extents``: a list of ``(length, StateFlag bits)``), and the zero-copy calls
(``zero_copy``: see :class:`Backend`). Arguments are always in range and multiples of
``minimum_block``.

A :class:`Backend` also says how its calls behave, and the server schedules them
accordingly: ``thread_safe`` (the default: calls may overlap, in several threads;
False: one at a time) and ``blocking`` (:class:`Blocking`: whether a call may wait for
a disk or the network; the default YES keeps every call out of the server's event
loop). ``close()`` is yours to call. A device kept in a dict::

    from pynbd.server import Backend, Blocking, Capabilities

    class DictDevice(Backend):
        # A sparse RAM disk: one dict entry per written 4 KiB block. Requests are
        # aligned to 4 KiB; the methods never wait (and may overlap: thread_safe).
        capabilities = Capabilities(minimum_block=4096, can_trim=True, blocking=Blocking.NEVER)

        def __init__(self, size: str = "67108864") -> None:  # pynbd serve passes str
            self._size = int(size)
            self.blocks: dict[int, bytes] = {}

        @property
        def size(self) -> int:
            return self._size

        def pread_into(self, buf: memoryview, offset: int) -> None:
            for i in range(0, len(buf), 4096):
                buf[i : i + 4096] = self.blocks.get((offset + i) // 4096, bytes(4096))

        def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
            for i in range(0, len(buf), 4096):
                self.blocks[(offset + i) // 4096] = bytes(buf[i : i + 4096])

        def trim(self, length: int, offset: int, fua: bool) -> None:
            for block in range(offset // 4096, (offset + length) // 4096):
                self.blocks.pop(block, None)

Serve it with ``pynbd serve --python mydevice:DictDevice size=1073741824 --unix S``
(``mydevice`` importable from the current directory or ``PYTHONPATH``), or name the
file: ``--python ./mydevice.py:DictDevice``. ``KEY=VALUE`` arguments become keyword
arguments, as strings; any callable that returns a backend will do
(:func:`pynbd.server.user.load_backend`). In Python: ``serve(DictDevice(), unix=S)``.
"""

from __future__ import annotations

import abc
import enum
import errno
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeAlias

from ..proto.constants import DEFAULT_MAX_PAYLOAD, Cmd, CmdFlag, Err
from ..proto.server import ExportSpec, RequestReceived, check_block_sizes

__all__ = [
    "ERRNO_TO_NBD",
    "AsyncBackend",
    "Backend",
    "Blocking",
    "Capabilities",
    "Export",
    "Support",
    "errno_to_nbd",
    "exception_to_nbd",
    "run_request",
    "run_request_async",
]

#: One extent of block status: (length, ``StateFlag`` bits).
Extent: TypeAlias = tuple[int, int]
Result: TypeAlias = bytearray | list[Extent] | None

#: errno -> NBD error (spec "Error values"). EROFS and EACCES are permission errors;
#: the spec asks for EDQUOT and EFBIG to become ENOSPC. Everything else is EIO.
ERRNO_TO_NBD: dict[int, Err] = {
    errno.EPERM: Err.EPERM,
    errno.EACCES: Err.EPERM,
    errno.EROFS: Err.EPERM,
    errno.EIO: Err.EIO,
    errno.ENOMEM: Err.ENOMEM,
    errno.EINVAL: Err.EINVAL,
    errno.ENOSPC: Err.ENOSPC,
    errno.EDQUOT: Err.ENOSPC,
    errno.EFBIG: Err.ENOSPC,
    errno.EOVERFLOW: Err.EOVERFLOW,
    errno.ENOTSUP: Err.ENOTSUP,
    errno.EOPNOTSUPP: Err.ENOTSUP,
    errno.ESHUTDOWN: Err.ESHUTDOWN,
}

_READ = Cmd.READ
_FUA = int(CmdFlag.FUA)

#: Largest buffer of zeroes written at once when WRITE_ZEROES or CACHE is emulated.
_EMULATION_CHUNK = 1 << 20


def errno_to_nbd(value: int | None) -> Err:
    """The NBD error for a local errno value (EIO for anything unlisted)."""
    return ERRNO_TO_NBD.get(value or 0, Err.EIO)


def exception_to_nbd(exc: BaseException) -> tuple[Err, str]:
    """The NBD error and a message for the client, for an exception a backend raised."""
    if isinstance(exc, OSError):
        return errno_to_nbd(exc.errno), exc.strerror or "I/O error"
    if isinstance(exc, MemoryError):
        return Err.ENOMEM, "out of memory"
    # A bug in a backend: say nothing about its internals to the client.
    return Err.EIO, "internal server error"


class Support(enum.Enum):
    """How a backend supports an optional feature."""

    NONE = "none"  # not advertised
    EMULATE = "emulate"  # advertised; the server emulates it with other calls
    NATIVE = "native"  # advertised; the backend's own method is called


class Blocking(enum.Enum):
    """Whether a :class:`Backend`'s calls wait (for a disk, the network, a lock held
    long): what the server may call them from (its event loop serves every connection
    that has no thread of its own, and a call that waits there holds them all up)."""

    #: Never: they compute and copy memory (a RAM disk).
    NEVER = "never"
    #: READ and WRITE without FUA copy from or to a cache that usually has room and
    #: the data (the page cache): they wait only when it misses or is full. FUA,
    #: FLUSH and the other calls may wait.
    CACHED = "cached"
    #: Any call may wait (a block device, a remote store).
    YES = "yes"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do (nbdkit's ``can_*`` callbacks, gathered).

    Attributes:
        can_write: writes are possible (else every export of it is read-only).
        can_flush: ``flush`` persists completed writes (NBD_CMD_FLUSH).
        can_fua: FUA: NATIVE passes ``fua=True`` to the write methods; EMULATE
            flushes after the write (needs ``can_flush``).
        can_trim: ``trim`` is implemented (NBD_CMD_TRIM).
        can_zero: WRITE_ZEROES: NATIVE calls ``zero``; EMULATE writes zeroes.
        can_fast_zero: advertise NBD_FLAG_SEND_FAST_ZERO. An emulated zero answers
            fast requests with ENOTSUP at once; a native ``zero`` gets ``fast=True``
            and must raise ENOTSUP unless it is faster than writing.
        can_cache: NBD_CMD_CACHE: NATIVE calls ``cache``; EMULATE reads and drops.
        can_extents: ``extents`` reports allocation (else all is reported as data).
        can_multi_conn: every connection sees the same data and a flush on one covers
            writes completed on all (NBD_FLAG_CAN_MULTI_CONN).
        is_rotational: advertise NBD_FLAG_ROTATIONAL.
        minimum_block, preferred_block, maximum_payload: size constraints.
        thread_safe: calls may run at once, in different threads; when False the
            server makes one call at a time (:class:`Backend` only).
        blocking: whether a call may wait (:class:`Blocking`; :class:`Backend` only).
        zero_copy: the backend lends views of its own memory (:class:`Backend` only): the
            server sends READ replies from :meth:`Backend.pread_views` without a
            copy, and may receive a WRITE straight into the buffers of
            :meth:`Backend.receive_pages`. These calls never wait.
    """

    can_write: bool = True
    can_flush: bool = False
    can_fua: Support = Support.NONE
    can_trim: bool = False
    can_zero: Support = Support.EMULATE
    can_fast_zero: bool = True
    can_cache: Support = Support.NONE
    can_extents: bool = False
    can_multi_conn: bool = False
    is_rotational: bool = False
    minimum_block: int = 1
    preferred_block: int = 4096
    maximum_payload: int = DEFAULT_MAX_PAYLOAD
    thread_safe: bool = True
    blocking: Blocking = Blocking.YES
    zero_copy: bool = False

    def __post_init__(self) -> None:
        if self.can_fua is Support.EMULATE and not self.can_flush:
            raise ValueError("emulated FUA needs can_flush")
        check_block_sizes(self.minimum_block, self.preferred_block, self.maximum_payload)


class _Common:
    capabilities: Capabilities = Capabilities()

    def close(self) -> None:
        """Release the backend's resources (the server never calls this)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Backend(_Common, abc.ABC):
    """A backend with blocking methods.

    Subclasses set ``capabilities`` and implement ``size`` and :meth:`pread_into`, plus
    the methods their capabilities promise. Offsets and lengths are always inside
    the export and aligned as the capabilities ask. Errors are raised as OSError.
    """

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The export's size in bytes."""

    @abc.abstractmethod
    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        """Write ``buf`` at ``offset``; with ``fua``, persist it before returning.

        ``buf`` is reused by the server after the call: copy what you keep.
        """
        raise OSError(errno.EROFS, "read-only backend")

    def flush(self) -> None:
        """Persist every write that has completed."""
        raise OSError(errno.ENOTSUP, "flush is not supported")

    def trim(self, length: int, offset: int, fua: bool) -> None:
        """Discard the range (a hint: the contents afterwards are unspecified)."""
        raise OSError(errno.ENOTSUP, "trim is not supported")

    def zero(self, length: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None:
        """Make the range read as zeroes; ``may_trim``: a hole is fine; ``fast``:
        raise ENOTSUP rather than be as slow as writing."""
        raise OSError(errno.ENOTSUP, "zero is not supported")

    def cache(self, length: int, offset: int) -> None:
        """Prefetch the range."""

    def extents(self, length: int, offset: int) -> list[Extent]:
        """Allocation from ``offset``: ``(length, StateFlag bits)`` pairs, in order.

        They may cover less than ``length`` (the client asks again), never nothing.
        """
        return [(length, 0)]

    # -- zero copy (``Capabilities.zero_copy``) ------------------------------------------

    def pread_views(self, length: int, offset: int) -> list[memoryview]:
        """The bytes at ``offset`` as views of the backend's memory, lent to the server
        until :meth:`return_views`.

        They may show later changes to the range: the server sends or copies them
        before the connection's next request that is not a READ.
        """
        raise OSError(errno.ENOTSUP, "zero-copy reads are not supported")

    def return_views(self, count: int = 1) -> None:
        """The views of ``count`` :meth:`pread_views` calls are sent, copied or dropped."""

    def receive_pages(self, length: int, offset: int) -> Sequence[memoryview] | None:
        """Buffers to receive the payload of a WRITE of ``length`` bytes at ``offset``
        into, for :meth:`adopt_pages`; None: the payload goes to :meth:`pwrite`.

        Called as the request arrives: the write may never complete (the client
        disconnects), so the buffers must not be part of the export yet.
        """
        return None

    def adopt_pages(self, pages: Sequence[memoryview], offset: int) -> None:
        """Perform the write of ``pages`` (from :meth:`receive_pages`, now full of the
        data) at ``offset``."""
        raise OSError(errno.ENOTSUP, "zero-copy writes are not supported")


class AsyncBackend(_Common, abc.ABC):
    """A backend with coroutine methods; see :class:`Backend` for their meaning."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The export's size in bytes."""

    @abc.abstractmethod
    async def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""

    async def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        raise OSError(errno.EROFS, "read-only backend")

    async def flush(self) -> None:
        raise OSError(errno.ENOTSUP, "flush is not supported")

    async def trim(self, length: int, offset: int, fua: bool) -> None:
        raise OSError(errno.ENOTSUP, "trim is not supported")

    async def zero(self, length: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None:
        raise OSError(errno.ENOTSUP, "zero is not supported")

    async def cache(self, length: int, offset: int) -> None:
        pass

    async def extents(self, length: int, offset: int) -> list[Extent]:
        return [(length, 0)]


AnyBackend: TypeAlias = Backend | AsyncBackend


@dataclass(frozen=True)
class Export:
    """A backend as one export of a server.

    Attributes:
        backend: where the bytes are.
        description: shown to clients by NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
        read_only: refuse writes even if the backend can write.
        block_size_required: refuse clients that do not promise to obey the block
            sizes (NBD_REP_ERR_BLOCK_SIZE_REQD).
        multi_conn: override the backend's ``can_multi_conn`` (None: keep it).
        block_sizes: ``(minimum, preferred, maximum payload)`` to advertise instead of
            the backend's; the minimum may only grow and the maximum only shrink
            (None: the backend's).
    """

    backend: AnyBackend
    description: str = ""
    read_only: bool = False
    block_size_required: bool = False
    multi_conn: bool | None = None
    block_sizes: tuple[int, int, int] | None = None

    def spec(self, name: str) -> ExportSpec:
        """The protocol's view of this export under ``name``.

        Raises:
            ValueError: bad block sizes, or a name or description over 4096 bytes.
        """
        caps = self.backend.capabilities
        read_only = self.read_only or not caps.can_write
        minimum, preferred, maximum = self.block_sizes or (
            caps.minimum_block,
            caps.preferred_block,
            caps.maximum_payload,
        )
        if self.block_sizes is not None:
            check_block_sizes(minimum, preferred, maximum)
            # The core enforces these on clients; the backend's own limits must hold.
            if minimum < caps.minimum_block:
                raise ValueError(
                    f"minimum block size {minimum} is below the backend's {caps.minimum_block}"
                )
            if maximum > caps.maximum_payload:
                raise ValueError(
                    f"maximum payload {maximum} is above the backend's {caps.maximum_payload}"
                )
        return ExportSpec(
            name=name,
            size=self.backend.size,
            description=self.description,
            read_only=read_only,
            can_flush=caps.can_flush,
            can_fua=caps.can_fua is not Support.NONE,
            can_trim=caps.can_trim,
            can_zero=caps.can_zero is not Support.NONE,
            can_fast_zero=caps.can_fast_zero and caps.can_zero is not Support.NONE,
            can_cache=caps.can_cache is not Support.NONE,
            can_multi_conn=caps.can_multi_conn if self.multi_conn is None else self.multi_conn,
            rotational=caps.is_rotational,
            minimum_block=minimum,
            preferred_block=preferred,
            maximum_payload=maximum,
            block_size_required=self.block_size_required,
        )


def _zero_chunks(length: int, offset: int) -> list[tuple[int, int]]:
    pieces = []
    end = offset + length
    while offset < end:
        n = min(_EMULATION_CHUNK, end - offset)
        pieces.append((offset, n))
        offset += n
    return pieces


def _clean_extents(extents: list[Extent], length: int) -> list[Extent]:
    good = [(n, flags) for n, flags in extents if n > 0]
    return good or [(length, 0)]


def run_request(backend: Backend, request: RequestReceived, buf: bytearray | None = None) -> Result:
    """Perform one validated request on a blocking backend.

    Returns the data of a READ (``buf`` if given, of ``request.length`` bytes, else a
    new bytearray), the extents of a BLOCK_STATUS, or None. Raises whatever the backend
    raises (OSError, mapped by errno_to_nbd).
    """
    cmd, offset, length = request.command, request.offset, request.length
    if cmd is _READ:  # first, and before any IntFlag arithmetic: the common case
        if buf is None:
            buf = bytearray(length)
        backend.pread_into(memoryview(buf), offset)
        return buf
    caps = backend.capabilities
    fua = bool(int(request.flags) & _FUA)
    native_fua = fua and caps.can_fua is Support.NATIVE
    if cmd is Cmd.WRITE:
        assert request.payload is not None
        backend.pwrite(request.payload, offset, native_fua)
    elif cmd is Cmd.FLUSH:
        backend.flush()
        return None
    elif cmd is Cmd.TRIM:
        backend.trim(length, offset, native_fua)
    elif cmd is Cmd.WRITE_ZEROES:
        may_trim = not request.flags & CmdFlag.NO_HOLE
        fast = bool(request.flags & CmdFlag.FAST_ZERO)
        if caps.can_zero is Support.NATIVE:
            backend.zero(length, offset, may_trim, fast, native_fua)
        elif fast:
            raise OSError(errno.ENOTSUP, "zeroing is not faster than writing here")
        else:
            zeroes = memoryview(bytearray(min(length, _EMULATION_CHUNK)))
            for off, n in _zero_chunks(length, offset):
                backend.pwrite(zeroes[:n], off, native_fua)
    elif cmd is Cmd.CACHE:
        if caps.can_cache is Support.NATIVE:
            backend.cache(length, offset)
        else:
            scratch = memoryview(bytearray(min(length, _EMULATION_CHUNK)))
            for off, n in _zero_chunks(length, offset):
                backend.pread_into(scratch[:n], off)
        return None
    elif cmd is Cmd.BLOCK_STATUS:
        if not caps.can_extents:
            return [(length, 0)]
        return _clean_extents(backend.extents(length, offset), length)
    else:  # pragma: no cover - the core hands out no other command
        raise OSError(errno.EINVAL, f"unexpected command {cmd!r}")
    if fua and caps.can_fua is Support.EMULATE:
        backend.flush()
    return None


async def run_request_async(
    backend: AsyncBackend, request: RequestReceived, buf: bytearray | None = None
) -> Result:
    """Perform one validated request on an async backend (see :func:`run_request`)."""
    caps = backend.capabilities
    cmd, offset, length = request.command, request.offset, request.length
    fua = bool(request.flags & CmdFlag.FUA)
    native_fua = fua and caps.can_fua is Support.NATIVE
    if cmd is Cmd.READ:
        if buf is None:
            buf = bytearray(length)
        await backend.pread_into(memoryview(buf), offset)
        return buf
    if cmd is Cmd.WRITE:
        assert request.payload is not None
        await backend.pwrite(request.payload, offset, native_fua)
    elif cmd is Cmd.FLUSH:
        await backend.flush()
        return None
    elif cmd is Cmd.TRIM:
        await backend.trim(length, offset, native_fua)
    elif cmd is Cmd.WRITE_ZEROES:
        may_trim = not request.flags & CmdFlag.NO_HOLE
        fast = bool(request.flags & CmdFlag.FAST_ZERO)
        if caps.can_zero is Support.NATIVE:
            await backend.zero(length, offset, may_trim, fast, native_fua)
        elif fast:
            raise OSError(errno.ENOTSUP, "zeroing is not faster than writing here")
        else:
            zeroes = memoryview(bytearray(min(length, _EMULATION_CHUNK)))
            for off, n in _zero_chunks(length, offset):
                await backend.pwrite(zeroes[:n], off, native_fua)
    elif cmd is Cmd.CACHE:
        if caps.can_cache is Support.NATIVE:
            await backend.cache(length, offset)
        else:
            scratch = memoryview(bytearray(min(length, _EMULATION_CHUNK)))
            for off, n in _zero_chunks(length, offset):
                await backend.pread_into(scratch[:n], off)
        return None
    elif cmd is Cmd.BLOCK_STATUS:
        if not caps.can_extents:
            return [(length, 0)]
        return _clean_extents(await backend.extents(length, offset), length)
    else:  # pragma: no cover
        raise OSError(errno.EINVAL, f"unexpected command {cmd!r}")
    if fua and caps.can_fua is Support.EMULATE:
        await backend.flush()
    return None
