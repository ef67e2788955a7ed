"""``pynbd copy`` beyond plain data: progress, failures, signals, zeroing, options.

Every test runs ``python -m pynbd copy`` as a subprocess (or ``pynbd.copy_async`` in
process) against nbdkit servers started through tests/peers.py, which stop them by pid
at teardown. The servers are made to misbehave with nbdkit's own pieces:

- reads that fail from an offset on: the ddrescue filter with a map marking the rest
  bad (EIO there, deterministically);
- writes and zeroes that fail: the error filter at 100%, or the protect filter over a
  range (EPERM where a write would change it);
- a copy caught mid-way: the eval plugin serving an image whose reads past an offset
  wait for a gate file, so that the test signals the copy while requests are in flight
  and opens the gate afterwards (no sleep, no race: it waits for events it can see);
- FAST_ZERO refused and WRITE_ZEROES missing: the nozero filter.

What went over the wire is read from the log filter placed outermost on the
destination (it sees the client's requests as sent), and a clean end of each
connection (NBD_CMD_DISC) from nbdkit's ``-v`` output.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import pty
import random
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

import pynbd
from pynbd import Client
from tests.peers import Server
from tests.serve_launcher import child_env

Factory = Callable[..., Server]

KiB = 1024
MiB = 1024 * KiB
#: The size of most sources; the default request size cuts it into 16 reads.
SIZE = 4 * MiB
REQUEST = 256 * KiB
#: Seconds to wait for an event that should come at once: only a hang waits this long.
WAIT = 60.0

#: A source with data in [0, 1M) and [2M, 3M), holes elsewhere.
SPARSE = ((0, 1 * MiB), (2 * MiB, 1 * MiB))
SPARSE_ZERO = ((1 * MiB, 1 * MiB), (3 * MiB, 1 * MiB))


SUMMARY = re.compile(
    r"pynbd copy: (?P<size>\d+) bytes: read (?P<read>\d+), written (?P<written>\d+), "
    r"zeroed (?P<zeroed>\d+), skipped (?P<skipped>\d+), in [0-9.]+ s \([0-9.]+ MB/s\)"
)


# --------------------------------------------------------------------------- helpers


def make_image(path: Path, size: int = SIZE, data: Iterable[tuple[int, int]] = ()) -> bytes:
    """Write a file of ``size`` bytes: random bytes in the ``data`` ranges (all of it
    when none are given), holes elsewhere. Returns its content."""
    ranges = list(data) or [(0, size)]
    rng = random.Random(f"{path.name}:{size}")
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in ranges:
            chunk = rng.randbytes(length)
            content[offset : offset + length] = chunk
            f.seek(offset)
            f.write(chunk)
    return bytes(content)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_export(uri: str, size: int) -> bytes:
    with Client(uri) as c:
        return bytes(c.pread(size, 0))


def pynbd_copy(
    *args: str,
    input: bytes | None = None,
    stdin: int | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m pynbd copy ARGS`` to its end (stdout kept as bytes)."""
    if input is None and stdin is None:
        stdin = subprocess.DEVNULL
    return subprocess.run(
        [sys.executable, "-m", "pynbd", "copy", *args],
        input=input,
        stdin=stdin,
        capture_output=True,
        env=child_env(),
        pass_fds=pass_fds,
        timeout=WAIT * 2,
        check=False,
    )


def copy_ok(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m pynbd copy ARGS`` and check that it succeeded."""
    done = pynbd_copy(*args, input=input)
    assert done.returncode == 0, done.stderr.decode()
    return done


def error_line(done: subprocess.CompletedProcess[bytes], status: int = 1) -> str:
    """The one ``pynbd: ...`` line a failed copy wrote, after checking it is alone."""
    err = done.stderr.decode()
    assert done.returncode == status, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pynbd: "), err
    assert done.stdout == b""
    return lines[0]


def summary(done: subprocess.CompletedProcess[bytes]) -> dict[str, int]:
    """The numbers of the ``-v`` summary line, the last line on stderr."""
    err = done.stderr.decode()
    assert done.returncode == 0, err
    found = SUMMARY.match(err.splitlines()[-1])
    assert found, err
    return {k: int(v) for k, v in found.groupdict().items()}


def _default_sigint() -> None:
    # A child inherits an ignored SIGINT from a parent run in the background of a
    # non-interactive shell; Python then leaves it ignored (as shells expect of
    # background jobs). These tests deliver SIGINT on purpose: restore its default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(what: str, ready: Callable[[], bool], *logs: Server) -> None:
    """Poll ``ready`` until it holds; fail after :data:`WAIT` s with the servers' logs."""
    deadline = time.monotonic() + WAIT
    while not ready():
        if time.monotonic() > deadline:
            detail = "\n".join(f"--- {s.kind} log\n{s.log()[-4000:]}" for s in logs)
            pytest.fail(f"waited {WAIT} s for {what}\n{detail}")
        time.sleep(0.02)


def read_lines(fd: int, count: int | None = None) -> list[str]:
    """Read from a pipe until ``count`` whole lines came, or (None) to its end; fail
    after :data:`WAIT` s."""
    data = b""
    deadline = time.monotonic() + WAIT
    while count is None or data.count(b"\n") < count:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            pytest.fail(f"no more lines on the progress descriptor in {WAIT} s: {data!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()


# --------------------------------------------------------------------------- nbdkit logs


@dataclass
class Request:
    """One request in nbdkit's log filter output, with its reply when one was logged."""

    connection: int
    act: str
    id: int
    fields: dict[str, str]
    position: int  # where its line starts in the log file
    reply: dict[str, str] | None = None
    replied: int = -1  # where its reply's line starts

    @property
    def offset(self) -> int:
        return int(self.fields["offset"], 16)

    @property
    def count(self) -> int:
        return int(self.fields["count"], 16)

    @property
    def ok(self) -> bool:
        return self.reply is not None and self.reply.get("return") == "0"


_LOG_LINE = re.compile(r"\S+ \S+ connection=(\d+) (\.\.\.)?(\w+) ?(.*)")
_FIELD = re.compile(r"(\w+)=(\S+)")


@dataclass
class Logged:
    """An nbdkit server run with ``-v`` and the log filter outermost."""

    server: Server
    log_path: Path

    @property
    def uri(self) -> str:
        return self.server.uri

    def text(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def requests(self, *acts: str) -> list[Request]:
        """The requests logged (of the kinds ``acts``, or all), in the order sent."""
        pending: dict[tuple[int, int], Request] = {}
        out: list[Request] = []
        position = 0
        for line in self.text().splitlines(keepends=True):
            found = _LOG_LINE.match(line)
            start, position = position, position + len(line.encode())
            if not line.endswith("\n"):
                break  # being written
            if not found or found.group(3) in ("Connect", "Disconnect"):
                continue
            conn, leave, act, rest = found.groups()
            fields = dict(_FIELD.findall(rest))
            key = (int(conn), int(fields["id"]))
            if leave:
                request = pending.pop(key)
                request.reply, request.replied = fields, start
            else:
                pending[key] = Request(int(conn), act, key[1], fields, start)
                out.append(pending[key])
        return [r for r in out if not acts or r.act in acts]

    def count(self, act: str) -> int:
        """How many ``act`` lines (Connect, Disconnect) the log holds."""
        return len(re.findall(rf"^\S+ \S+ connection=\d+ {act}\b", self.text(), re.M))

    def wait_closed(self) -> int:
        """Wait until every connection's Disconnect was logged; returns how many."""
        wait_for(
            "every connection to end",
            lambda: self.count("Connect") > 0 and self.count("Disconnect") == self.count("Connect"),
            self.server,
        )
        return self.count("Connect")

    def assert_clean_end(self) -> None:
        """Every request got its reply and every connection ended with NBD_CMD_DISC."""
        connections = self.wait_closed()
        unanswered = [r for r in self.requests() if r.reply is None]
        assert not unanswered, unanswered
        assert clean_disconnects(self.server) == connections, self.server.log()[-4000:]


def clean_disconnects(server: Server) -> int:
    """How many connections of an nbdkit run with ``-v`` ended with NBD_CMD_DISC."""
    return server.log().count("client sent NBD_CMD_DISC, closing connection")


def logged(
    nbdkit: Factory,
    tmp_path: Path,
    plugin: str,
    *args: str,
    filters: Sequence[str] = (),
    extra: Sequence[str] = (),
    name: str = "dst",
) -> Logged:
    """Start nbdkit with the log filter outermost, then ``filters``, and ``-v``."""
    log_path = tmp_path / f"{name}.log"
    server = nbdkit(
        plugin,
        *args,
        f"logfile={log_path}",
        filters=["log", *filters],
        extra=["-v", *extra],
    )
    return Logged(server, log_path)


def covered(requests: Iterable[Request]) -> list[tuple[int, int]]:
    """The ranges the requests cover, merged, as (offset, length)."""
    out: list[tuple[int, int]] = []
    for start, end in sorted((r.offset, r.offset + r.count) for r in requests):
        if out and out[-1][0] + out[-1][1] >= start:
            last = out[-1]
            out[-1] = (last[0], max(last[0] + last[1], end) - last[0])
        else:
            out.append((start, end - start))
    return out


# --------------------------------------------------------------------------- stalls


@dataclass
class Gate:
    """Reads of a stalling source at or past ``at`` wait for :meth:`open`.

    Each read held appends its offset to ``stalled`` first, so the test sees which
    requests are in flight. A read that comes past ``at`` after the gate opened is
    slow (a second): a copy that went on instead of stopping would take long.
    """

    at: int
    path: Path
    stalled: Path

    def held(self) -> list[int]:
        try:
            return [int(x) for x in self.stalled.read_text().split()]
        except FileNotFoundError:
            return []

    def open(self) -> None:
        self.path.touch()


def stalling_source(nbdkit: Factory, tmp_path: Path, image: Path, at: int) -> tuple[Logged, Gate]:
    """Serve ``image`` (multi-conn, parallel) through nbdkit's eval plugin, with the
    log filter; reads at or past ``at`` wait (at most two minutes) for the gate."""
    gate = Gate(at, tmp_path / "gate", tmp_path / "stalled")
    stalled, opened, img = (shlex.quote(str(p)) for p in (gate.stalled, gate.path, image))
    # pread COUNT OFFSET FLAGS come as $3 $4 $5 (nbdkit-sh-plugin(3)).
    pread = (
        f'if [ "$4" -ge {at} ]; then if [ -e {opened} ]; then sleep 1; else '
        f'echo "$4" >> {stalled}; i=0; '
        f'while [ ! -e {opened} ] && [ "$i" -lt 600 ]; do sleep 0.2; i=$((i + 1)); done; '
        f'fi; fi; exec dd if={img} bs="$3" count=1 skip="$4" iflag=skip_bytes,fullblock '
        "status=none"
    )
    source = logged(
        nbdkit,
        tmp_path,
        "eval",
        f"get_size=echo {image.stat().st_size}",
        "thread_model=echo parallel",
        "can_multi_conn=exit 0",
        f"pread={pread}",
        name="src",
    )
    return source, gate


def written_prefix(dst: Logged) -> int:
    """How far from offset 0 the destination's answered writes reach without a gap."""
    ranges = covered(q for q in dst.requests("Write") if q.ok)
    return ranges[0][1] if ranges and ranges[0][0] == 0 else 0


def spawn_copy(
    *args: str,
    stdin: int = subprocess.DEVNULL,
    stdout: int = subprocess.DEVNULL,
    stderr: int = subprocess.PIPE,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start ``python -m pynbd copy ARGS``, with SIGINT at its default (see below)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pynbd", "copy", *args],
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        pass_fds=pass_fds,
        env=child_env(),
        preexec_fn=_default_sigint,
    )


def finish(proc: subprocess.Popen[bytes]) -> None:
    """Kill a copy that a failed test left running (by its pid), reap it, close its
    standard input and error (a :class:`Drain` closes the output it reads)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stderr):
        if pipe is not None:
            pipe.close()


class Drain(threading.Thread):
    """Reads a pipe to its end, so that the writer never blocks on it; ``data`` is
    what came so far."""

    def __init__(self, pipe: IO[bytes] | None) -> None:
        super().__init__(daemon=True)
        assert isinstance(pipe, io.BufferedReader)
        self.pipe = pipe
        self.data = bytearray()

    def run(self) -> None:
        with self.pipe:
            while chunk := self.pipe.read1(1 << 16):
                self.data += chunk

    def result(self) -> bytes:
        self.join(WAIT)
        assert not self.is_alive(), "the pipe is still open"
        return bytes(self.data)


# --------------------------------------------------------------------------- progress


def test_progress_fd_writes_percent_lines(tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img")
    r, w = os.pipe()
    try:
        done = pynbd_copy(
            f"--progress={w}",
            str(tmp_path / "src.img"),
            str(tmp_path / "dst.img"),
            pass_fds=(w,),
        )
        os.close(w)
        w = -1
        lines = read_lines(r)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    assert lines and all(re.fullmatch(r"\d{1,3}/100", line) for line in lines), lines
    percents = [int(line.split("/")[0]) for line in lines]
    assert percents == sorted(percents), lines
    assert len(set(percents)) == len(percents), lines  # a line only when N changes
    assert percents[-1] == 100
    assert (tmp_path / "dst.img").read_bytes() == src


def test_progress_fd_of_a_stream_says_100_only_at_its_end(tmp_path: Path) -> None:
    # nbdcopy writes 0/100 while the size of a stream is unknown, 100/100 at its end.
    src = make_image(tmp_path / "src.img")
    r, w = os.pipe()
    proc = spawn_copy(
        f"--progress={w}", "-", str(tmp_path / "dst.img"), stdin=subprocess.PIPE, pass_fds=(w,)
    )
    os.close(w)
    stdin, proc.stdin = proc.stdin, None  # written here, closed here
    assert stdin is not None
    try:
        stdin.write(src[: 1 * MiB])
        stdin.flush()
        first = read_lines(r, 1)  # written while the stream is still open
        stdin.write(src[1 * MiB :])
        stdin.close()
        _, err = proc.communicate(timeout=WAIT)
        rest = read_lines(r)
    finally:
        finish(proc)
        os.close(r)
    assert proc.returncode == 0, err
    assert first == ["0/100"]
    assert rest[-1] == "100/100" and set(rest[:-1]) <= {"0/100"}, rest
    assert (tmp_path / "dst.img").read_bytes() == src


@pytest.mark.parametrize("option", ["-p", "--progress"])
def test_progress_plain_lines_when_stderr_is_not_a_terminal(tmp_path: Path, option: str) -> None:
    src = make_image(tmp_path / "src.img")
    done = pynbd_copy(option, str(tmp_path / "src.img"), str(tmp_path / "dst.img"))
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith("pynbd copy: ") for line in lines), err
    assert re.match(r"pynbd copy: +100\.0% +4\.0 MiB / 4\.0 MiB .* in \d+:\d\d$", lines[-1]), err
    assert (tmp_path / "dst.img").read_bytes() == src


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img")
    master, slave = pty.openpty()
    tty.setraw(slave)  # no \n -> \r\n translation: the bytes read are the bytes written
    try:
        proc = spawn_copy("-p", str(tmp_path / "src.img"), str(tmp_path / "dst.img"), stderr=slave)
        os.close(slave)
        slave = -1
        out = b""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the last writer of the terminal went away
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(WAIT) == 0, out
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = out.decode()
    assert text.startswith("\r") and text.endswith("\n"), text
    frames = text[1:-1].split("\r")
    assert all(f.endswith("\x1b[K") for f in frames), frames
    last = frames[-1]
    assert last.startswith("[" + "#" * 30 + "] "), last
    assert "100.0%" in last and "4.0 MiB / 4.0 MiB" in last, last
    assert "\n" not in text[:-1]  # the bar is redrawn in place, one line in all
    assert (tmp_path / "dst.img").read_bytes() == src


def test_verbose_summary(nbdkit: Factory, tmp_path: Path) -> None:
    make_image(tmp_path / "src.img", data=SPARSE)
    dst = nbdkit("memory", str(SIZE))
    done = pynbd_copy("-v", str(tmp_path / "src.img"), dst.uri)
    assert summary(done) == {
        "size": SIZE,
        "read": 2 * MiB,
        "written": 2 * MiB,
        "zeroed": 2 * MiB,
        "skipped": 0,
    }
    assert len(done.stderr.decode().splitlines()) == 1


# --------------------------------------------------------------------------- failures


def bad_from_2m(nbdkit: Factory, tmp_path: Path) -> tuple[bytes, Server]:
    """A SIZE-byte image served by nbdkit whose reads fail (EIO) from 2 MiB on: the
    ddrescue filter, with a map that says the second half is bad."""
    src = make_image(tmp_path / "src.img")
    (tmp_path / "src.map").write_text(
        "# Mapfile\n0x0 +\n#  pos  size  status\n0x0 0x200000 +\n0x200000 0x200000 -\n"
    )
    source = nbdkit(
        "file",
        str(tmp_path / "src.img"),
        f"ddrescue-mapfile={tmp_path / 'src.map'}",
        filters=["ddrescue"],
    )
    return src, source


@pytest.mark.parametrize("lanes", [["-C", "1", "-R", "1"], []], ids=["one-request", "default"])
def test_source_that_fails_from_an_offset_on(
    nbdkit: Factory, tmp_path: Path, lanes: list[str]
) -> None:
    src, source = bad_from_2m(nbdkit, tmp_path)
    dst = logged(nbdkit, tmp_path, "memory", str(SIZE))
    line = error_line(pynbd_copy(*lanes, source.uri, dst.uri))
    found = re.fullmatch(
        rf"pynbd: reading {re.escape(source.uri)} at offset (\d+): .*Input/output error", line
    )
    assert found, line
    offset = int(found.group(1))
    assert 2 * MiB <= offset < SIZE and offset % REQUEST == 0, line
    dst.assert_clean_end()
    written = dst.requests("Write")
    assert all(r.ok and r.offset + r.count <= 2 * MiB for r in written), written
    if lanes:  # one request at a time: everything before the bad range was copied
        assert offset == 2 * MiB
        assert covered(written) == [(0, 2 * MiB)]
        assert read_export(dst.uri, SIZE)[: 2 * MiB] == src[: 2 * MiB]


def test_source_whose_every_read_fails(nbdkit: Factory, tmp_path: Path) -> None:
    source = nbdkit(
        "memory", str(SIZE), "error-pread=EPERM", "error-pread-rate=100%", filters=["error"]
    )
    # The memory plugin reports all of itself a hole: without --no-extents, no read.
    line = error_line(pynbd_copy("--no-extents", source.uri, str(tmp_path / "dst.img")))
    assert re.fullmatch(
        rf"pynbd: reading {re.escape(source.uri)} at offset \d+: .*Operation not permitted", line
    ), line


@pytest.mark.parametrize(
    ("filters", "args", "offset", "why"),
    [
        (["error"], ["error-pwrite=ENOSPC", "error-pwrite-rate=100%"], 0, "No space left"),
        (["protect"], ["protect=0x200000-0x3fffff"], 2 * MiB, "Operation not permitted"),
    ],
    ids=["every-write", "from-2M-on"],
)
def test_destination_whose_writes_fail(
    nbdkit: Factory,
    tmp_path: Path,
    filters: list[str],
    args: list[str],
    offset: int,
    why: str,
) -> None:
    src = make_image(tmp_path / "src.img")
    dst = logged(nbdkit, tmp_path, "memory", str(SIZE), *args, filters=filters)
    line = error_line(pynbd_copy("-C", "1", "-R", "1", str(tmp_path / "src.img"), dst.uri))
    assert line.startswith(f"pynbd: writing {dst.uri} at offset {offset}: "), line
    assert why in line, line
    dst.assert_clean_end()
    writes = dst.requests("Write")
    assert [r.offset for r in writes if not r.ok] == [offset]
    assert read_export(dst.uri, SIZE)[:offset] == src[:offset]


def test_destination_whose_zeroes_fail(nbdkit: Factory, tmp_path: Path) -> None:
    make_image(tmp_path / "src.img", data=SPARSE)
    dst = logged(
        nbdkit,
        tmp_path,
        "memory",
        str(SIZE),
        "error-zero=ENOSPC",
        "error-zero-rate=100%",
        filters=["error"],
    )
    line = error_line(pynbd_copy("-C", "1", "-R", "1", str(tmp_path / "src.img"), dst.uri))
    assert line.startswith(f"pynbd: zeroing {dst.uri} at offset {1 * MiB}: "), line
    assert "No space left on device" in line, line
    dst.assert_clean_end()
    assert [(r.offset, r.ok) for r in dst.requests("Zero")] == [(1 * MiB, False)]


def test_destination_smaller_than_the_source_is_left_alone(nbdkit: Factory, tmp_path: Path) -> None:
    make_image(tmp_path / "src.img")
    before = sha256(make_image(tmp_path / "dst.img", 2 * MiB))
    dst = logged(nbdkit, tmp_path, "file", str(tmp_path / "dst.img"))
    line = error_line(pynbd_copy(str(tmp_path / "src.img"), dst.uri))
    assert "smaller than" in line and str(2 * MiB) in line and str(SIZE) in line, line
    dst.assert_clean_end()
    assert dst.requests("Write", "Zero", "Trim") == []
    assert sha256((tmp_path / "dst.img").read_bytes()) == before


def test_stream_larger_than_the_destination(nbdkit: Factory, tmp_path: Path) -> None:
    # A stream's size is unknown up front: the copy stops where the destination ends
    # (what it holds then is the source's first bytes, maybe not all that would fit).
    src = make_image(tmp_path / "src.img")
    dst = logged(nbdkit, tmp_path, "memory", str(2 * MiB))
    line = error_line(pynbd_copy("-", dst.uri, input=src))
    assert "the source is larger than the destination" in line and str(2 * MiB) in line, line
    dst.assert_clean_end()
    written = covered(dst.requests("Write"))
    assert len(written) <= 1 and all(offset == 0 for offset, _ in written), written
    n = written[0][1] if written else 0
    assert read_export(dst.uri, 2 * MiB)[:n] == src[:n]


def test_read_only_destination(nbdkit: Factory, tmp_path: Path) -> None:
    make_image(tmp_path / "src.img")
    dst = logged(nbdkit, tmp_path, "memory", str(SIZE), extra=["-r"])
    line = error_line(pynbd_copy(str(tmp_path / "src.img"), dst.uri))
    assert f"the destination {dst.uri} is read-only" in line, line
    dst.assert_clean_end()
    assert dst.requests() == []


BAD_OPTIONS = [
    (["-C", "0"], 2, "argument -C/--connections: must be at least 1: '0'"),
    (["-R", "0"], 2, "argument -R/--requests: must be at least 1: '0'"),
    (["--request-size", "lots"], 2, "argument --request-size: not a byte count: 'lots'"),
    (["--request-size", "1"], 1, "request size must be between 512 bytes and 32 MiB"),
    (["--request-size", "64M"], 1, "request size must be between 512 bytes and 32 MiB"),
    (["-S", "3000"], 1, "sparse block size must divide the request size"),
    (["--request-size", "64K", "-S", "48K"], 1, "sparse block size must divide the request size"),
    (["--queue-size", "4K"], 1, "queue size must hold at least one request"),
    (["--progress=99"], 1, "--progress=99: descriptor 99 is not open"),
    (["--progress=x"], 1, "--progress takes a file descriptor number, not 'x'"),
]


@pytest.mark.parametrize(
    ("args", "status", "message"), BAD_OPTIONS, ids=[" ".join(b[0]) for b in BAD_OPTIONS]
)
def test_bad_option_values(tmp_path: Path, args: list[str], status: int, message: str) -> None:
    make_image(tmp_path / "src.img", 64 * KiB)
    done = pynbd_copy(*args, str(tmp_path / "src.img"), str(tmp_path / "dst.img"))
    err = done.stderr.decode()
    assert done.returncode == status, err
    assert "Traceback" not in err and done.stdout == b""
    if status == 2:  # argparse: the usage, then one error line
        assert err.splitlines()[-1] == f"pynbd copy: error: {message}", err
    else:
        assert message in error_line(done), err
    assert not (tmp_path / "dst.img").exists()  # refused before anything was opened


def test_missing_source_file(tmp_path: Path) -> None:
    line = error_line(pynbd_copy(str(tmp_path / "nope.img"), str(tmp_path / "dst.img")))
    assert line == f"pynbd: No such file or directory: {tmp_path / 'nope.img'}"
    assert not (tmp_path / "dst.img").exists()


def test_null_is_no_source(tmp_path: Path) -> None:
    line = error_line(pynbd_copy("null:", str(tmp_path / "dst.img")))
    assert line == "pynbd: null: can only be a destination"
    assert not (tmp_path / "dst.img").exists()


def test_unreachable_server(tmp_path: Path) -> None:
    make_image(tmp_path / "src.img", 64 * KiB)
    uri = f"nbd+unix:///?socket={tmp_path / 'none.sock'}"
    line = error_line(pynbd_copy(str(tmp_path / "src.img"), uri))
    assert line.startswith("pynbd: cannot connect"), line
    assert str(tmp_path / "none.sock") in line and "No such file or directory" in line, line


# --------------------------------------------------------------------------- signals

#: The stalled copies: 8 MiB, whose reads from 2 MiB on are held. Two requests per
#: connection: each read is written before the next but one goes out, so all that comes
#: before the gate is written while the reads past it are held.
STALL_SIZE = 8 * MiB
STALL_AT = 2 * MiB
STALL_REQUESTS = 2
INTERRUPTED = re.compile(
    r"pynbd: copy interrupted after (\d+) of (\d+) bytes; "
    r"the requests in flight were finished and (.+) flushed"
)


def interrupted(err: str, dst: str) -> int:
    """The bytes copied that the one line of an interrupted copy names."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    found = INTERRUPTED.fullmatch(lines[0])
    assert found and int(found.group(2)) == STALL_SIZE and found.group(3) == dst, err
    return int(found.group(1))


def assert_drained(
    source: Logged, dst: Logged, gate: Gate, mark: int, copied: int, src: bytes
) -> None:
    """The requests in flight at the stop were finished, the destination flushed
    after them (past ``mark`` in its log), every connection closed with NBD_CMD_DISC,
    and what was written is ``copied`` bytes of ``src``, its first ``STALL_AT`` at
    least."""
    source.assert_clean_end()
    dst.assert_clean_end()
    answered = {q.offset for q in source.requests("Read") if q.ok}
    assert gate.held() and set(gate.held()) <= answered  # held at the stop, then answered
    requests = dst.requests()
    assert all(q.ok for q in requests), requests
    writes = [q for q in requests if q.act == "Write"]
    flush = requests[-1]
    assert flush.act == "Flush" and flush.position >= mark, requests[-3:]
    assert all(flush.position > q.replied for q in writes)  # after every write's reply
    assert [q.act for q in requests].count("Flush") == 1
    assert sum(q.count for q in writes) == copied  # random data: no zero block
    assert written_prefix(dst) >= STALL_AT
    got = read_export(dst.uri, STALL_SIZE)
    for offset, length in covered(writes):
        assert got[offset : offset + length] == src[offset : offset + length]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_copy_drains_and_flushes(nbdkit: Factory, tmp_path: Path, signum: int) -> None:
    src = make_image(tmp_path / "src.img", STALL_SIZE)
    source, gate = stalling_source(nbdkit, tmp_path, tmp_path / "src.img", STALL_AT)
    dst = logged(nbdkit, tmp_path, "memory", str(STALL_SIZE))
    r, w = os.pipe()
    proc = spawn_copy(
        "-R", str(STALL_REQUESTS), f"--progress={w}", source.uri, dst.uri, pass_fds=(w,)
    )
    os.close(w)
    try:
        first = read_lines(r, 1)[0]  # the copy has started
        assert re.fullmatch(r"\d+/100", first) and first != "100/100", first
        # Requests in flight that cannot finish before the gate opens, and everything
        # before them copied: the copy can go no further.
        wait_for(
            "reads held past the gate, and all before it written",
            lambda: bool(gate.held()) and written_prefix(dst) >= STALL_AT,
            source.server,
            dst.server,
        )
        mark = dst.log_path.stat().st_size
        proc.send_signal(signum)
        gate.open()
        _, stderr = proc.communicate(timeout=WAIT)
    finally:
        finish(proc)
        os.close(r)
    err = stderr.decode()
    assert proc.returncode == 130, err
    copied = interrupted(err, dst.uri)
    # Exactly STALL_AT unless the reads held came back before the copy saw the signal.
    assert STALL_AT <= copied < STALL_SIZE, err
    assert_drained(source, dst, gate, mark, copied, src)


def test_cancelling_copy_async_raises_copy_interrupted(nbdkit: Factory, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", STALL_SIZE)
    source, gate = stalling_source(nbdkit, tmp_path, tmp_path / "src.img", STALL_AT)
    dst = logged(nbdkit, tmp_path, "memory", str(STALL_SIZE))
    seen: list[tuple[int, int | None]] = []

    async def main() -> tuple[pynbd.CopyInterrupted, int]:
        task = asyncio.create_task(
            pynbd.copy_async(
                source.uri,
                dst.uri,
                requests=STALL_REQUESTS,
                progress=lambda done, total: seen.append((done, total)),
            )
        )
        deadline = time.monotonic() + WAIT
        while not (gate.held() and written_prefix(dst) >= STALL_AT and seen):
            assert not task.done(), task
            assert time.monotonic() < deadline, (seen, gate.held(), source.server.log()[-4000:])
            await asyncio.sleep(0.02)
        mark = dst.log_path.stat().st_size
        task.cancel()
        # The task takes the cancellation (and stops the copy) in the loop's next round,
        # before this coroutine resumes: only then may the held reads come back.
        await asyncio.sleep(0)
        gate.open()
        with pytest.raises(pynbd.CopyInterrupted) as caught:
            await task
        return caught.value, mark

    stopped, mark = asyncio.run(main())
    assert isinstance(stopped, pynbd.CopyError)
    result = stopped.result
    assert result is not None
    # Stopped before the held reads came back: what they read was not written.
    assert stopped.offset == result.size == STALL_AT
    assert (result.read_bytes, result.written_bytes) == (STALL_AT, STALL_AT)
    assert (result.zeroed_bytes, result.skipped_bytes) == (0, 0)
    assert result.connections == dst.wait_closed()
    assert seen[0][1] == STALL_SIZE and all(done <= STALL_AT for done, _ in seen)
    assert interrupted(f"pynbd: copy {stopped}", dst.uri) == STALL_AT
    assert_drained(source, dst, gate, mark, STALL_AT, src)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_copy_to_a_stream(nbdkit: Factory, tmp_path: Path, signum: int) -> None:
    # A stream is written in order: whatever the reads held at the signal do, what
    # reaches standard output must be the source's first bytes, whole.
    src = make_image(tmp_path / "src.img", STALL_SIZE)
    source, gate = stalling_source(nbdkit, tmp_path, tmp_path / "src.img", STALL_AT)
    proc = spawn_copy("-R", str(STALL_REQUESTS), source.uri, "-", stdout=subprocess.PIPE)
    out = Drain(proc.stdout)
    out.start()
    try:
        wait_for(
            "reads held past the gate, and all before it written",
            lambda: bool(gate.held()) and len(out.data) >= STALL_AT,
            source.server,
        )
        proc.send_signal(signum)
        gate.open()
        assert proc.wait(WAIT) == 130
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
    finally:
        finish(proc)
    data = out.result()
    assert interrupted(err, "standard output") == len(data)
    assert STALL_AT <= len(data) < STALL_SIZE
    assert data == src[: len(data)]
    source.assert_clean_end()


def test_a_failure_mid_copy_to_a_stream(nbdkit: Factory, tmp_path: Path) -> None:
    src, source = bad_from_2m(nbdkit, tmp_path)
    proc = spawn_copy(source.uri, "-", stdout=subprocess.PIPE)
    out = Drain(proc.stdout)
    out.start()
    try:
        assert proc.wait(WAIT) == 1
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
    finally:
        finish(proc)
    data = out.result()
    lines = err.splitlines()
    assert len(lines) == 1, err
    found = re.fullmatch(
        rf"pynbd: reading {re.escape(source.uri)} at offset (\d+): .*Input/output error",
        lines[0],
    )
    assert found and 2 * MiB <= int(found.group(1)) < SIZE, err
    assert len(data) <= 2 * MiB and data == src[: len(data)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_connecting(tmp_path: Path, signum: int) -> None:
    # A "server" that takes the connection and never says a word: the copy is stuck in
    # the handshake, before any request.
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        listener.settimeout(WAIT)
        proc = spawn_copy(f"nbd+unix:///?socket={path}", "null:", stdout=subprocess.PIPE)
        try:
            conn, _ = listener.accept()  # the copy is connecting
            with conn:
                proc.send_signal(signum)
                out, err = proc.communicate(timeout=WAIT)
        finally:
            finish(proc)
    line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 130)
    assert line == "pynbd: copy interrupted", line


# --------------------------------------------------------------------------- zeroing


def test_fast_zero_refused_falls_back_to_zeroing(nbdkit: Factory, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", data=SPARSE)
    dst = logged(
        nbdkit,
        tmp_path,
        "memory",
        str(SIZE),
        "zeromode=plugin",
        "fastzeromode=slow",
        filters=["nozero"],
    )
    # The destination starts dirty, so that a zero range left out would show.
    copy_ok(str(make_dirty(tmp_path)), dst.uri)
    first = len(dst.requests())
    copy_ok(str(tmp_path / "src.img"), dst.uri)
    assert sha256(read_export(dst.uri, SIZE)) == sha256(src)
    zeroes = [q for q in dst.requests()[first:] if q.act == "Zero"]
    fast = [q for q in zeroes if q.fields["fast"] == "1"]
    slow = [q for q in zeroes if q.fields["fast"] == "0"]
    assert fast, zeroes  # FAST_ZERO was offered, so it was tried...
    assert all(q.reply == {"id": str(q.id), "return": "-1", "error": "ENOTSUP"} for q in fast)
    assert all(q.ok for q in slow)  # ...and, refused, the zeroes went out without it
    assert covered(slow) == list(SPARSE_ZERO)
    writes = [q for q in dst.requests()[first:] if q.act == "Write"]
    assert covered(writes) == list(SPARSE)  # no zero range was written as data


def test_without_write_zeroes_zero_ranges_are_written(nbdkit: Factory, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", data=SPARSE)
    dst = logged(nbdkit, tmp_path, "memory", str(SIZE), "zeromode=none", filters=["nozero"])
    copy_ok(str(make_dirty(tmp_path)), dst.uri)
    first = len(dst.requests())
    done = pynbd_copy("-v", str(tmp_path / "src.img"), dst.uri)
    assert summary(done)["zeroed"] == 2 * MiB
    sent = dst.requests()[first:]
    assert sha256(read_export(dst.uri, SIZE)) == sha256(src)
    assert " zero=0 " in dst.text()  # WRITE_ZEROES was not offered
    assert {q.act for q in sent} == {"Write"}
    assert covered(sent) == [(0, SIZE)]


def make_dirty(tmp_path: Path) -> Path:
    """A file of SIZE bytes of 0xff, to make a destination's zero ranges visible."""
    path = tmp_path / "dirty.img"
    path.write_bytes(b"\xff" * SIZE)
    return path


def test_fast_zero_accepted(nbdkit: Factory, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", data=SPARSE)
    dst = logged(nbdkit, tmp_path, "memory", str(SIZE))
    copy_ok(str(make_dirty(tmp_path)), dst.uri)
    first = len(dst.requests())
    copy_ok(str(tmp_path / "src.img"), dst.uri)
    sent = dst.requests()[first:]
    zeroes = [q for q in sent if q.act == "Zero"]
    assert all(q.fields["fast"] == "1" and q.ok for q in zeroes), zeroes
    assert covered(zeroes) == list(SPARSE_ZERO)
    assert covered(q for q in sent if q.act == "Write") == list(SPARSE)
    assert sha256(read_export(dst.uri, SIZE)) == sha256(src)


# --------------------------------------------------------------------------- options


def blocks(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_allocated_leaves_no_holes(tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", data=SPARSE)
    sparse, full = tmp_path / "sparse.img", tmp_path / "full.img"
    copy_ok(str(tmp_path / "src.img"), str(sparse))
    copy_ok("--allocated", str(tmp_path / "src.img"), str(full))
    assert sparse.read_bytes() == full.read_bytes() == src
    assert blocks(sparse) < SIZE  # the holes were kept without the option...
    assert blocks(full) >= SIZE  # ...and filled in with it


def test_allocated_asks_for_no_holes(nbdkit: Factory, tmp_path: Path) -> None:
    make_image(tmp_path / "src.img", data=SPARSE)
    dst = logged(nbdkit, tmp_path, "memory", str(SIZE))
    copy_ok("--allocated", str(tmp_path / "src.img"), dst.uri)
    zeroes = dst.requests("Zero")
    assert covered(zeroes) == list(SPARSE_ZERO)
    assert all(q.fields["trim"] == "0" for q in zeroes), zeroes  # NBD_CMD_FLAG_NO_HOLE


def test_no_extents_reads_everything(nbdkit: Factory, tmp_path: Path) -> None:
    make_image(tmp_path / "src.img", data=SPARSE)
    source = logged(nbdkit, tmp_path, "file", str(tmp_path / "src.img"), name="src")
    assert summary(pynbd_copy("-v", source.uri, "null:"))["read"] == 2 * MiB
    assert summary(pynbd_copy("-v", "--no-extents", source.uri, "null:"))["read"] == SIZE
    result = pynbd.copy(source.uri, "null:", extents=False)
    assert (result.size, result.read_bytes) == (SIZE, SIZE)
    source.wait_closed()
    reads = source.requests("Read")
    assert sum(q.count for q in reads) == 2 * MiB + 2 * SIZE


@pytest.mark.parametrize("option", ["--destination-is-zero", "--target-is-zero"])
def test_destination_is_zero_sends_no_zero_request(
    nbdkit: Factory, tmp_path: Path, option: str
) -> None:
    src = make_image(tmp_path / "src.img", data=SPARSE)
    dst = logged(nbdkit, tmp_path, "memory", str(SIZE))
    numbers = summary(pynbd_copy("-v", option, str(tmp_path / "src.img"), dst.uri))
    assert (numbers["zeroed"], numbers["skipped"]) == (0, 2 * MiB)
    dst.wait_closed()
    assert {q.act for q in dst.requests()} == {"Write"}
    assert covered(dst.requests()) == list(SPARSE)
    assert read_export(dst.uri, SIZE) == src


def test_without_destination_is_zero_zero_requests_go_out(nbdkit: Factory, tmp_path: Path) -> None:
    make_image(tmp_path / "src.img", data=SPARSE)
    dst = logged(nbdkit, tmp_path, "memory", str(SIZE))
    copy_ok(str(tmp_path / "src.img"), dst.uri)
    dst.wait_closed()
    assert covered(dst.requests("Zero")) == list(SPARSE_ZERO)


@pytest.mark.parametrize("flush", [True, False], ids=["flush", "no-flush"])
def test_flush_at_the_end(nbdkit: Factory, tmp_path: Path, flush: bool) -> None:
    make_image(tmp_path / "src.img")
    dst = logged(nbdkit, tmp_path, "memory", str(SIZE))
    args = ["--flush"] if flush else []
    copy_ok(*args, str(tmp_path / "src.img"), dst.uri)
    dst.assert_clean_end()
    requests = dst.requests()
    flushes = [q for q in requests if q.act == "Flush"]
    if flush:
        assert len(flushes) == 1 and flushes[0].ok
        assert requests[-1] is flushes[0]  # after every write was answered
        assert all(flushes[0].position > q.replied for q in requests if q.act == "Write")
    else:
        assert flushes == []


# --------------------------------------------------------------------------- SRC and DST


def test_each_form_of_src_and_dst(nbdkit: Factory, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", data=SPARSE)
    path = str(tmp_path / "src.img")
    unix = nbdkit("memory", str(SIZE))
    tcp = nbdkit("memory", str(SIZE), tcp=True)
    assert tcp.uri.startswith("nbd://127.0.0.1:")

    # file -> nbd+unix://, nbd+unix:// -> nbd://, nbd:// -> file
    copy_ok(path, unix.uri)
    copy_ok(unix.uri, tcp.uri)
    copy_ok(tcp.uri, str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == src
    # nbd:// -> null:
    assert summary(pynbd_copy("-v", tcp.uri, "null:"))["read"] == 2 * MiB
    # nbd -> - (a pipe): a stream, every byte written in order
    assert copy_ok(unix.uri, "-").stdout == src
    # - (a pipe) -> file: read to its end
    copy_ok("-", str(tmp_path / "piped.img"), input=src)
    assert (tmp_path / "piped.img").read_bytes() == src
    # - (a regular file: < src.img) -> nbd: seekable, so extents are used
    fresh = nbdkit("memory", str(SIZE))
    with open(path, "rb") as f:
        numbers = summary(pynbd_copy("-v", "-", fresh.uri, stdin=f.fileno()))
    assert numbers["read"] == 2 * MiB
    assert read_export(fresh.uri, SIZE) == src


def test_a_stream_to_a_stream(tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", 3 * MiB + 5)
    assert copy_ok("-", "-", input=src).stdout == src
