"""``python -m tests.guest [OPTIONS] -- CMD...``: run CMD as root in the test guest.

Exits with CMD's exit status, or 125 when the guest could not be prepared, booted, or
did not report a status (the reason, with the guest's console log, goes to stderr). The
command's stdin is /dev/null. ``PATH`` and ``PYTHONPATH`` are passed to the guest, and
``--env NAME[=VALUE]`` passes more. When ``--timeout`` expires the command gets SIGINT
(then SIGKILL) and a message says so. With ``--keep`` the xfer folder (the guest's
``/xfer``: the command script, its exit status, anything the command wrote there) is
kept and named on stderr.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.guest import boot, qemu
from tests.guest.host import VMError

PROG = "python -m tests.guest"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run CMD as root in a qemu guest booting Debian's kernel (which has the "
        "nbd driver), with the host's / shared read-only under a tmpfs overlay. Exits with "
        "CMD's status, or 125 when the guest could not run it.",
    )
    parser.add_argument(
        "--prepare", action="store_true", help="only fetch the kernel and build the initramfs"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="cache folder (default: $PYNBD_VM_CACHE or ~/.cache/pynbd/kernel)",
    )
    parser.add_argument("-C", "--cwd", type=Path, help="where CMD runs (default: here)")
    parser.add_argument(
        "-e", "--env", action="append", default=[], metavar="NAME[=VALUE]",
        help="export NAME to CMD (its host value without =VALUE); PATH and PYTHONPATH always are",
    )  # fmt: skip
    parser.add_argument("-m", "--memory", default="1G", help="guest memory (default 1G)")
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=qemu.RUN_TIMEOUT,
        help=f"seconds CMD may run before SIGINT (default {qemu.RUN_TIMEOUT:.0f})",
    )  # fmt: skip
    parser.add_argument(
        "--boot-timeout", type=float, default=qemu.BOOT_TIMEOUT,
        help=f"seconds the guest may take to boot (default {qemu.BOOT_TIMEOUT:.0f})",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the xfer folder and name it")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="say what happens and how long it took"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.prepare and not args.command:
        parser.error(f"no command: {PROG} [OPTIONS] -- CMD [ARGS...]")
    return args


def _log(text: str) -> None:
    print(f"tests.guest: {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line *argv* (default: ``sys.argv[1:]``).

    Returns:
        CMD's exit status in the guest, or 125 when the guest could not run it.
    """
    args = _parse_args(argv)
    env = {name: os.environ[name] for name in ("PATH", "PYTHONPATH") if name in os.environ}
    for item in args.env:
        name, eq, value = item.partition("=")
        if eq:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    try:
        guest = boot.prepare(args.cache, log=_log)
        if args.prepare:
            print(f"kernel {guest.kver}\nimage {guest.kernel}\ninitrd {guest.initrd}")
            return 0
        if args.verbose:
            _log(f"booting {guest.kver} (TCG) to run {shlex.join(args.command)}")
        sys.stdout.flush()
        result = qemu.run(
            guest,
            args.command,
            cwd=args.cwd,
            env=env,
            timeout=args.timeout,
            boot_timeout=args.boot_timeout,
            memory=args.memory,
            cpus=args.cpus,
            keep=args.keep,
        )
    except (VMError, ValueError) as exc:
        _log(str(exc))
        return 125
    if result.timed_out:
        _log(f"the command ran out of time ({args.timeout:.0f} s) and was interrupted")
    if args.verbose:
        _log(
            f"exit status {result.returncode}; boot {result.boot_seconds:.1f} s, "
            f"command {result.command_seconds:.1f} s, total {result.total_seconds:.1f} s"
        )
    if result.xfer is not None:
        _log(f"xfer folder kept: {result.xfer}")
    return result.returncode
