"""Live resize of an attached nbd device: the export changes size, the device follows.

How the kernel learns a new size (Linux 6.1, drivers/block/nbd.c; checked in the test
guest):

- A device attached by netlink: NBD_CMD_RECONFIGURE with NBD_ATTR_SIZE_BYTES (the
  driver's "netlink reconfigure resize support", 2019; verified on 6.1). The driver
  calls set_capacity_and_notify(): the new size shows in sysfs at once and a change
  uevent says ``RESIZE=1``. The ioctls are refused on such a device ("Cannot use
  ioctl interface on a netlink controlled device", EINVAL), NBD_SET_SIZE included.
- A device attached by ioctls (NBD_DO_IT running in some process): netlink RECONFIGURE
  is refused ("not configured, cannot reconfigure", EINVAL), but NBD_SET_SIZE on any
  open descriptor of the device works while it runs.

:func:`set_device_size` tries netlink first and falls back to the ioctl on EINVAL.

What changes the export's size:

- An in-process backend (:func:`~pynbd.kernel.attach.attach_backend`):
  :func:`resize_backend` resizes the backend (``MemoryBackend.resize``,
  ``FileBackend.resize``), makes the server report the new size to later handshakes
  and accept requests up to it on the live connections, then resizes the device. When
  growing, the backend grows first; when shrinking, the device shrinks first (the
  filesystem must have been shrunk before: resize2fs), so no request ever reaches
  past the backend's end.
- Any other server (the size changed there, by its own means): :func:`reread_size`
  asks the server again, with the URI that attach recorded in the device's state file
  (:func:`write_state`, ``/run/pynbd/nbdX.json``), and resizes the device;
  ``pynbd resize DEVICE``.

The in-process path needs the :class:`~pynbd.server.aio.Server` and its event loop of
the attachment: ``Attachment._serve`` (a ``(server, loop)`` pair recorded by
attach_backend), or the ``server=``/``loop=`` arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest
from .device import NetlinkControl, device_index, device_path, open_device, sysfs_state
from .errors import FamilyNotFound, KernelError
from .netlink import DeviceConfig, encode_reconfigure

__all__ = [
    "STATE_DIR",
    "open_state_dir",
    "read_state",
    "remove_state",
    "reread_size",
    "resize_backend",
    "set_device_size",
    "state_path",
    "write_state",
]

#: Where attach records what resize needs (``$PYNBD_STATE_DIR`` overrides).
STATE_DIR = "/run/pynbd"
#: The most of a state file read (a record is a few hundred bytes).
_MAX_STATE = 64 * 1024
#: Seconds given to the server's event loop to apply a new size.
_LOOP_TIMEOUT = 30.0


# --------------------------------------------------------------------------- the kernel


def set_device_size(device: str | int, size: int) -> str:
    """Set the capacity of an attached device to ``size`` bytes (rounded down to its
    logical block size); returns how: ``"netlink"`` or ``"ioctl"``.

    Raises:
        InvalidRequest: not an nbd device, a size below one block.
        KernelError: the device is not attached (EINVAL from both interfaces), EPERM.
    """
    index = device_index(device)
    state = sysfs_state(index)
    if not state.exists:
        raise KernelError(errno.ENODEV, "no such nbd device", device=device_path(index))
    block = state.block_size or 512
    size = size // block * block
    if size <= 0:
        raise InvalidRequest(f"a size of {size} bytes is below one block ({block})")
    try:
        _reconfigure_size(index, size, state.backend)
        return "netlink"
    except FamilyNotFound:
        pass
    except KernelError as exc:
        if exc.errno != errno.EINVAL:
            raise
    _ioctl_size(index, size)
    return "ioctl"


def _reconfigure_size(index: int, size: int, backend_id: str | None) -> None:
    # device.NetlinkControl.reconfigure has no size argument (yet): encode it here.
    config = DeviceConfig(index=index, size_bytes=size, backend_identifier=backend_id)
    with NetlinkControl() as nl:
        data = encode_reconfigure(nl.family.id, config, seq=nl._sock.next_seq())
        nl._request(data, "NBD_CMD_RECONFIGURE", index)


def _ioctl_size(index: int, size: int) -> None:
    from . import ioctl

    path = device_path(index)
    try:
        fd, _ = open_device(path, os.O_RDONLY)
    except OSError as exc:
        raise KernelError(exc.errno or errno.EIO, call="open", device=path) from exc
    try:
        ioctl.set_size(fd, size, device=path)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- in-process


def _apply_export_size(server: Any, backend: Any, size: int) -> int:
    """In the server's loop: later handshakes report ``size``, live connections accept
    requests up to it. Returns how many live connections were updated."""
    specs = server.config.exports  # the dict Server built; the config holds it
    for name, export in server.exports.items():
        if export.backend is backend:
            specs[name] = dataclasses.replace(specs[name], size=size)
    live = 0
    for session in list(server.sessions):
        export = session.export
        transmission = session.core.transmission
        if export is not None and export.backend is backend and transmission is not None:
            transmission.size = size
            live += 1
    return live


def _in_loop(loop: asyncio.AbstractEventLoop, func: Any, *args: Any) -> Any:
    async def call() -> Any:
        return func(*args)

    return asyncio.run_coroutine_threadsafe(call(), loop).result(_LOOP_TIMEOUT)


def resize_backend(
    attachment: Any,
    new_size: int,
    *,
    backend: Any = None,
    server: Any = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> int:
    """Resize the in-process backend of an :func:`attach_backend` attachment, and the
    device with it; returns the device's new size in bytes.

    Args:
        attachment: the :class:`~pynbd.kernel.attach.Attachment`.
        new_size: the export's new size in bytes (the device gets it rounded down to
            its block size).
        backend: the backend to resize (default: the server's only backend).
        server, loop: the in-process server and its loop (default:
            ``attachment._serve``).

    Raises:
        InvalidRequest: not an in-process attachment, a backend that cannot resize,
            a size below one block.
        OSError: the backend refused (a block device cannot grow).
        KernelError: the kernel refused the new size.
    """
    if server is None or loop is None:
        serve = getattr(attachment, "_serve", None)
        if serve is None:
            raise InvalidRequest(f"{attachment.device} is not served by this process")
        server, loop = serve
    if backend is None:
        backends = {id(e.backend): e.backend for e in server.exports.values()}
        if len(backends) != 1:
            raise InvalidRequest("the server has several backends: say which one")
        (backend,) = backends.values()
    if not callable(getattr(backend, "resize", None)):
        raise InvalidRequest(f"{type(backend).__name__} cannot be resized")
    block = int(attachment.block_size)
    device_size = new_size // block * block
    if device_size <= 0:
        raise InvalidRequest(f"a size of {new_size} bytes is below one block ({block})")
    if new_size >= backend.size:
        _in_loop(loop, backend.resize, new_size)
        _in_loop(loop, _apply_export_size, server, backend, new_size)
        set_device_size(attachment.index, device_size)
    else:
        set_device_size(attachment.index, device_size)
        _in_loop(loop, _apply_export_size, server, backend, new_size)
        _in_loop(loop, backend.resize, new_size)
    attachment.size = device_size
    return device_size


# --------------------------------------------------------------------------- state file


def state_path(device: str | int) -> Path:
    """``$PYNBD_STATE_DIR/nbdX.json`` (default ``/run/pynbd``)."""
    base = os.environ.get("PYNBD_STATE_DIR") or STATE_DIR
    return Path(base) / f"nbd{device_index(device)}.json"


def write_state(device: str | int, uri: str, **extra: Any) -> Path:
    """Record the server of an attached device, for ``pynbd resize`` (and anyone who
    wants to know): ``{"device", "uri", "pid", ...extra}``. Written atomically, mode
    0600 (a URI may name key files). Returns the path.

    The record goes to a new file of a random name (``O_EXCL|O_NOFOLLOW``) that is
    renamed over the state file: a symlink planted at either name is replaced, never
    followed. As root, the directory is checked first (see :func:`open_state_dir`).

    Raises:
        OSError: the state directory cannot be written; PermissionError: it is not safe.
    """
    path = state_path(device)
    record = {"device": device_path(device_index(device)), "uri": uri, "pid": os.getpid()}
    record.update(extra)
    dir_fd = open_state_dir(path.parent, create=True)
    try:
        tmp = f".{path.name}.{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.write("\n")
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)
    return path


def read_state(device: str | int) -> dict[str, Any] | None:
    """The record :func:`write_state` left for a device, or None (no file, or a bad one:
    not a regular file, a symlink, not JSON).

    Raises:
        PermissionError: running as root, the state directory is not safe (see
            :func:`open_state_dir`): its records cannot be trusted.
    """
    path = state_path(device)
    try:
        dir_fd = open_state_dir(path.parent)
    except PermissionError:
        raise
    except OSError:
        return None
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(path.name, flags, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            data = json.loads(f.read(_MAX_STATE))
    except (OSError, ValueError):
        return None
    finally:
        os.close(dir_fd)
    return data if isinstance(data, dict) and isinstance(data.get("uri"), str) else None


def remove_state(device: str | int) -> None:
    """Remove a device's state file (detach calls this). Never fails: a missing file
    or an unwritable directory is left as it is."""
    with contextlib.suppress(OSError):
        state_path(device).unlink()  # unlink removes a symlink, never its target


def open_state_dir(directory: Path, *, create: bool = False) -> int:
    """A descriptor of the state directory, made (mode 0755) when ``create``.

    As root, the directory must not be a symlink, must be owned by root and must not be
    writable by group or others (sticky or not: anyone could plant a record there,
    which ``pynbd resize`` would follow as root). Another user's state directory is
    theirs to choose and is not checked.

    Raises:
        PermissionError: as root, the directory is not safe (the message says why).
        OSError: it cannot be made or opened.
    """
    if create:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    root = _running_as_root()
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if root else 0)
    try:
        fd = os.open(directory, flags)
    except OSError as exc:
        if root and os.path.islink(directory):  # ELOOP or ENOTDIR
            raise PermissionError(
                errno.EPERM, f"state directory {directory} is a symlink; set PYNBD_STATE_DIR"
            ) from exc
        raise
    why = _unsafe_dir(os.fstat(fd)) if root else None
    if why is not None:
        os.close(fd)
        raise PermissionError(
            errno.EPERM, f"state directory {directory} is {why}; fix it or set PYNBD_STATE_DIR"
        )
    return fd


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _unsafe_dir(st: os.stat_result) -> str | None:
    """Why a directory of this status may not hold root's records, or None."""
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by root"
    if st.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):04o}: chmod go-w)"
    return None


# --------------------------------------------------------------------------- other servers


def server_size(uri: str) -> int:
    """Ask the server of ``uri`` (any scheme, TLS included) for the export's size.

    Raises:
        URIError, ConnectionClosed, NBDTimeout, TLSError, OptionError: as the client.
    """
    from ..client.sync import Client

    with Client(uri, structured_replies=False, extended_headers=False, meta_contexts=()) as c:
        size: int = c.size
    return size


def reread_size(device: str | int, *, uri: str | None = None, size: int | None = None) -> int:
    """Make an attached device's capacity follow its server; returns the new size.

    Args:
        device: ``/dev/nbdX``, ``nbdX`` or X.
        uri: the server (default: the one recorded by attach in the state file).
        size: the size to set instead of asking the server (it may not exceed what
            the server reports, when the server is known).

    Raises:
        InvalidRequest: no URI known and no size given, ``size`` larger than the
            export, or (as root) a state directory others can write to.
        KernelError, and the client's errors (see :func:`server_size`).
    """
    if uri is None:
        try:
            state = read_state(device)
        except PermissionError as exc:
            raise InvalidRequest(f"not reading the recorded server: {exc.strerror}") from exc
        uri = state["uri"] if state is not None else None
    if uri is None and size is None:
        raise InvalidRequest(
            f"no server recorded for {device_path(device_index(device))}: give --uri or --size"
        )
    if uri is not None:
        export_size = server_size(uri)
        if size is not None and size > export_size:
            raise InvalidRequest(f"{size} bytes is more than the export's {export_size}")
        size = export_size if size is None else size
    assert size is not None
    set_device_size(device, size)
    return sysfs_state(device).size
