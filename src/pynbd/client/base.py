"""What the blocking and the asyncio client share: options, getters, request planning.

Both clients are thin drivers over :class:`~pynbd.proto.handshake.ClientHandshake` and
:class:`~pynbd.proto.transmission.ClientTransmission`. Everything that is not I/O lives
here once: turning the caller's arguments into core requests (split at the server's
maximum payload), the ``can_*`` getters, and merging block status replies.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from ..errors import (
    InvalidRequest,
    UnsupportedError,
    URIError,
)
from ..proto.constants import BASE_ALLOCATION, Cmd, CmdFlag, Opt, TransmissionFlag
from ..proto.handshake import HandshakeConfig, Negotiated, TLSMode
from ..proto.limits import DEFAULT_LIMITS, ClientLimits
from ..proto.transmission import U32_MAX, ClientTransmission, Reply, split_range
from ..transport.tls import TLSConfig
from ..transport.uri import NBDURI, parse_uri

Buffer: TypeAlias = bytes | bytearray | memoryview

#: Default time limit of every call, in seconds.
DEFAULT_TIMEOUT = 60.0
#: Largest effect length sent for TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS in one
#: request (compact headers carry 32 bits; stay aligned to any minimum block size).
MAX_EFFECT = 1 << 31


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect: a TCP address, a unix socket, or an already connected socket."""

    host: str | None = None
    port: int | None = None
    path: str | None = None
    tls: TLSConfig | None = None

    def describe(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host is not None:
            return f"{self.host}:{self.port or 10809}"
        return "socket"


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """How to connect and negotiate; shared by :class:`Client` and :class:`AsyncClient`.

    ``limits`` bounds what the server may make the client hold (see
    :class:`~pynbd.proto.limits.ClientLimits`).
    """

    export_name: str = ""
    tls: TLSConfig | None = None
    structured_replies: bool = True
    extended_headers: bool = True
    meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,)
    request_block_size: bool = True
    timeout: float | None = DEFAULT_TIMEOUT
    limits: ClientLimits = DEFAULT_LIMITS

    def handshake_config(
        self,
        *,
        go: bool = True,
        list_exports: bool = False,
        list_meta_contexts: bool = False,
        info: bool = True,
    ) -> HandshakeConfig:
        """The handshake core's settings for these options (the arguments: see
        :class:`~pynbd.proto.handshake.HandshakeConfig`)."""
        tls = TLSMode.DISABLE
        if self.tls is not None:
            tls = TLSMode.REQUIRE if self.tls.required else TLSMode.ALLOW
        return HandshakeConfig(
            export_name=self.export_name,
            tls=tls,
            structured_replies=self.structured_replies,
            extended_headers=self.extended_headers,
            meta_contexts=self.meta_contexts,
            request_block_size=self.request_block_size,
            go=go,
            list_exports=list_exports,
            list_meta_contexts=list_meta_contexts,
            info=info,
            limits=self.limits,
        )


def resolve_target(
    uri: str | NBDURI | None,
    *,
    host: str | None,
    port: int | None,
    path: str | None,
    export_name: str | None,
    tls: TLSConfig | None,
) -> tuple[Target, str]:
    """Combine a URI and keyword arguments into a :class:`Target` and an export name.

    Keyword arguments win over the URI's parts. Raises URIError for a bad URI and
    ValueError for contradictory arguments.
    """
    name = ""
    if uri is not None:
        parsed = parse_uri(uri) if isinstance(uri, str) else uri
        if host is not None or path is not None:
            raise URIError("give a URI or host/path, not both")
        host, port, path = parsed.host, parsed.port, parsed.socket_path
        name = parsed.export_name
        if tls is None:
            tls = TLSConfig.from_uri(parsed)
    if export_name is not None:
        name = export_name
    return Target(host, port, path, tls), name


def resolve(
    uri: str | NBDURI | None,
    *,
    host: str | None = None,
    port: int | None = None,
    path: str | None = None,
    export_name: str | None = None,
    tls: TLSConfig | None = None,
    structured_replies: bool = True,
    extended_headers: bool = True,
    meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,),
    request_block_size: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
    limits: ClientLimits = DEFAULT_LIMITS,
) -> tuple[Target, ConnectOptions]:
    """:func:`resolve_target`, then the :class:`ConnectOptions` for that export and TLS
    setting: what every way of connecting (both clients, the CLI) starts from."""
    target, name = resolve_target(
        uri, host=host, port=port, path=path, export_name=export_name, tls=tls
    )
    options = ConnectOptions(
        export_name=name,
        tls=target.tls,
        structured_replies=structured_replies,
        extended_headers=extended_headers,
        meta_contexts=tuple(meta_contexts),
        request_block_size=request_block_size,
        timeout=timeout,
        limits=limits,
    )
    return target, options


class ClientBase:
    """Getters and request planning shared by both clients (no I/O here)."""

    _core: ClientTransmission | None
    negotiated: Negotiated
    #: The largest payload one request carries (set once negotiation is done).
    _maxp: int

    # -- getters -------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The export's size in bytes."""
        return self.negotiated.size or 0

    def get_size(self) -> int:
        """The export's size in bytes (libnbd's name)."""
        return self.size

    @property
    def export_name(self) -> str:
        return self.negotiated.export_name

    @property
    def flags(self) -> TransmissionFlag:
        """The transmission flags the server sent."""
        return self.negotiated.flags

    def is_read_only(self) -> bool:
        return self.negotiated.is_read_only()

    def is_rotational(self) -> bool:
        return self.negotiated.is_rotational()

    def can_flush(self) -> bool:
        return self.negotiated.can_flush()

    def can_fua(self) -> bool:
        return self.negotiated.can_fua()

    def can_trim(self) -> bool:
        return self.negotiated.can_trim()

    def can_zero(self) -> bool:
        return self.negotiated.can_zero()

    def can_fast_zero(self) -> bool:
        return self.negotiated.can_fast_zero()

    def can_df(self) -> bool:
        return self.negotiated.can_df()

    def can_multi_conn(self) -> bool:
        return self.negotiated.can_multi_conn()

    def can_cache(self) -> bool:
        return self.negotiated.can_cache()

    def can_block_status_payload(self) -> bool:
        return self.negotiated.can_block_status_payload()

    def can_meta_context(self, name: str = BASE_ALLOCATION) -> bool:
        """True when ``name`` was negotiated, so :meth:`block_status` may ask for it."""
        return self.negotiated.can_meta_context(name)

    @property
    def meta_contexts(self) -> tuple[str, ...]:
        """The meta contexts negotiated for block status."""
        return tuple(self.negotiated.meta_contexts)

    @property
    def structured_replies(self) -> bool:
        return self.negotiated.structured_replies

    @property
    def extended_headers(self) -> bool:
        return self.negotiated.extended_headers

    @property
    def tls(self) -> bool:
        return self.negotiated.tls

    def get_block_size(self, which: str = "preferred") -> int:
        """The server's block size constraint: ``"minimum"``, ``"preferred"`` or
        ``"maximum"`` (payload). Defaults apply when the server advertised none."""
        n = self.negotiated
        sizes = {
            "minimum": n.minimum_block,
            "preferred": n.preferred_block,
            "maximum": n.maximum_payload,
        }
        try:
            return sizes[which]
        except KeyError:
            raise ValueError(f"block size kind must be one of {sorted(sizes)}") from None

    # -- planning -------------------------------------------------------------------

    def _max_payload(self) -> int:
        """The largest READ/WRITE payload, a multiple of the minimum block size."""
        n = self.negotiated
        limit = min(n.maximum_payload, U32_MAX)
        return max(n.minimum_block, limit - limit % n.minimum_block)

    def _single(self, buf: Buffer) -> memoryview | None:
        """``buf`` as a byte view when one request can carry it (the fast path of a
        read into the caller's buffer), else None (empty, too big: plan and split)."""
        view = buf if type(buf) is memoryview else memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if 0 < len(view) <= self._maxp:
            return view
        return None

    def _plan_read(self, buf: Buffer, offset: int, df: bool) -> list[Op]:
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise InvalidRequest("pread_into needs a writable buffer")
        flags = CmdFlag.DF if df else 0
        if len(view) <= self._max_payload():
            return [Op(Cmd.READ, offset, len(view), flags, buffer=view)] if len(view) else []
        return [
            Op(Cmd.READ, off, n, flags, buffer=view[off - offset : off - offset + n])
            for off, n in split_range(offset, len(view), self._max_payload(), self._align())
        ]

    def _plan_write(self, data: Buffer, offset: int, fua: bool) -> list[Op]:
        view = memoryview(data).cast("B")
        flags = CmdFlag.FUA if fua else 0
        if len(view) <= self._max_payload():
            return [Op(Cmd.WRITE, offset, len(view), flags, payload=view)] if len(view) else []
        return [
            Op(Cmd.WRITE, off, n, flags, payload=view[off - offset : off - offset + n])
            for off, n in split_range(offset, len(view), self._max_payload(), self._align())
        ]

    def _plan_reads(self, reads: Iterable[tuple[Buffer, int]]) -> list[Op]:
        return [op for buf, offset in reads for op in self._plan_read(buf, offset, False)]

    def _plan_writes(self, writes: Iterable[tuple[Buffer, int]], fua: bool) -> list[Op]:
        return [op for data, offset in writes for op in self._plan_write(data, offset, fua)]

    def _plan_effect(self, command: Cmd, offset: int, length: int, flags: int = 0) -> list[Op]:
        """TRIM, WRITE_ZEROES, CACHE: split at 2 GiB so compact headers can carry them."""
        if length == 0:
            return [Op(command, offset, 0, flags)]
        return [
            Op(command, off, n, flags)
            for off, n in split_range(offset, length, MAX_EFFECT, self._align())
        ]

    def _plan_flush(self) -> list[Op]:
        return [Op(Cmd.FLUSH, 0, 0)]

    def _plan_block_status(self, start: int, end: int, names: tuple[str, ...], req_one: bool) -> Op:
        length = min(end - start, MAX_EFFECT - MAX_EFFECT % self._align())
        return Op(
            Cmd.BLOCK_STATUS,
            start,
            length,
            CmdFlag.REQ_ONE if req_one else 0,
            # Without NBD_CMD_FLAG_PAYLOAD_LEN the server answers for every negotiated
            # context: expect them all (ExtentCollector keeps only ``names``).
            contexts=names if self.can_block_status_payload() else None,
        )

    def _block_status_names(self, contexts: tuple[str, ...] | None) -> tuple[str, ...]:
        names = contexts if contexts is not None else self.meta_contexts
        if not names:
            raise UnsupportedError("no meta context was negotiated")
        for name in names:
            if name not in self.negotiated.meta_contexts:
                raise UnsupportedError(f"meta context {name!r} was not negotiated")
        return names

    def _align(self) -> int:
        return self.negotiated.minimum_block if self.negotiated.block_size_advertised else 1

    @staticmethod
    def _zero_flags(*, fua: bool, no_hole: bool, fast: bool) -> int:
        return (
            (CmdFlag.FUA if fua else 0)
            | (CmdFlag.NO_HOLE if no_hole else 0)
            | (CmdFlag.FAST_ZERO if fast else 0)
        )


class ExtentCollector:
    """Gathers block status replies into clipped extents over [offset, end).

    The server may answer less than asked (or more, for the last extent); the client
    asks again from the lowest position any context reached.
    """

    def __init__(self, offset: int, end: int, names: tuple[str, ...], req_one: bool) -> None:
        self.end = end
        self.names = names
        self.req_one = req_one
        self.pos = dict.fromkeys(names, offset)
        self.extents: dict[str, list[MappedExtent]] = {name: [] for name in names}
        self.finished = offset >= end

    def next_start(self) -> int:
        return min(self.pos.values())

    def add(self, start: int, reply: Reply) -> None:
        progressed = False
        for name in self.names:
            at = start
            for ext in (reply.extents or {}).get(name, ()):
                if at >= self.end:
                    break
                stop = min(at + ext.length, self.end)
                if at >= self.pos[name]:
                    self.extents[name].append(MappedExtent(at, stop - at, ext.flags))
                    self.pos[name] = stop
                    progressed = True
                at += ext.length
        self.finished = self.req_one or not progressed or self.next_start() >= self.end


def submit_all(core: ClientTransmission, ops: list[Op]) -> list[int]:
    """Queue every op, or none: when a later piece of a split call is refused, the
    pieces before it are taken back before anything is sent."""
    mark = core.savepoint()
    cookies: list[int] = []
    try:
        for op in ops:
            cookies.append(op.submit(core))
    except BaseException:
        core.rollback(mark, cookies)
        raise
    return cookies


def with_export_info(result: Negotiated) -> Negotiated:
    """``result``, unless the server refused to tell about the export (NBD_OPT_INFO in
    negotiation mode): then raise that refusal (ExportNotFound, OptionError)."""
    refusal = result.refused.get(Opt.INFO)
    if refusal is not None:
        raise refusal
    return result


def raise_first_error(replies: list[Reply]) -> None:
    """Raise the error of the first failed reply, if any (in request order)."""
    for reply in replies:
        if reply.error is not None:
            raise reply.error


class UseDefault(enum.Enum):
    """The type of :data:`DEFAULT`."""

    DEFAULT = "default"


#: "Use the client's timeout" (the default of every call's ``timeout``).
DEFAULT = UseDefault.DEFAULT
Timeout: TypeAlias = float | UseDefault | None


class Op(NamedTuple):
    """One request for the core, as a client call plans it."""

    command: Cmd
    offset: int
    length: int
    flags: int = 0
    payload: Buffer | None = None
    buffer: memoryview | None = None
    contexts: tuple[str, ...] | None = None

    def submit(self, core: ClientTransmission) -> int:
        return core.request(
            self.command,
            self.offset,
            self.length,
            self.flags,
            payload=self.payload,
            buffer=self.buffer,
            contexts=self.contexts,
        )


class MappedExtent(NamedTuple):
    """One extent of a block status answer, placed in the export."""

    offset: int
    length: int
    flags: int


__all__ = [
    "DEFAULT",
    "DEFAULT_TIMEOUT",
    "Buffer",
    "ClientBase",
    "ConnectOptions",
    "MappedExtent",
    "Op",
    "Target",
    "Timeout",
    "raise_first_error",
    "resolve",
    "resolve_target",
    "submit_all",
]
