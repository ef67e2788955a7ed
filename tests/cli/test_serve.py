"""``pynbd serve`` as a subprocess (``python -m pynbd serve``), with our clients, libnbd
(nbdinfo, and its Python module for connect_command), and raw sockets.

Every server is started by tests/serve_launcher.py, which stops it by pid when its
``with`` block ends, also when the test failed. Readiness comes from ``--ready-fd`` (a
pipe the server writes its URIs to, then closes), so no test polls or guesses. The
signal tests wait for what they need before each signal (the server has read the bytes
sent, the backend call has begun, the server has logged the first signal) instead of
sleeping. The tests that run libnbd are marked interop.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.cli import build_parser
from pynbd.cli.serve import limits_from
from pynbd.client import Client
from pynbd.errors import NBDError, OptionError
from pynbd.proto.constants import Rep
from pynbd.server import Limits
from pynbd.transport.tls import TLSConfig
from tests.peers import make_x509_dir, peer_env
from tests.serve_launcher import STOP_GRACE, child_env, run_serve, start_pynbd
from tests.server.helpers import is_closed, raw_go, raw_request, read_simple_reply, recv_exactly

MiB = 1 << 20

DEVICE = textwrap.dedent(
    """
    import time
    from pynbd.server import Backend, Capabilities, MemoryBackend

    class Slow(Backend):
        # Reads take a while: long enough to signal the server in the middle of one.
        # The file ``started`` is made when a read begins, ``ended`` when it ends.
        capabilities = Capabilities(can_write=False)

        def __init__(self, delay="1.0", started="", ended=""):
            self.delay = float(delay)
            self.started, self.ended = started, ended

        @property
        def size(self):
            return 1 << 20

        def pread_into(self, buf, offset):
            if self.started:
                open(self.started, "w").close()
            time.sleep(self.delay)
            buf[:] = b"s" * len(buf)
            if self.ended:
                open(self.ended, "w").close()

    def memory(size="65536"):
        return MemoryBackend(int(size))
    """
)


def wait_until(what: str, done: Callable[[], bool], limit: float = 30) -> None:
    """Poll ``done`` until it is true; fail after ``limit`` seconds (a stuck server)."""
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {limit} s"
        time.sleep(0.01)


def all_read(sock: socket.socket) -> bool:
    """The peer has read every byte sent on unix socket ``sock`` (SIOCOUTQ is 0)."""
    return fcntl.ioctl(sock, termios.TIOCOUTQ, bytes(4)) == bytes(4)


def nbdinfo(*args: str, env: dict[str, str] | None = None) -> str:
    """Run nbdinfo (in *env*, default :func:`tests.peers.peer_env`); return its output."""
    env = peer_env() if env is None else env
    done = subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, f"nbdinfo {' '.join(args)}: {done.stderr}"
    return done.stdout


# --------------------------------------------------------------------------- serving


@pytest.mark.interop
def test_memory_on_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    with start_pynbd(tmp_path, "--memory", "64M", "--unix", str(sock)) as srv:
        assert srv.uris == [f"nbd+unix:///?socket={sock}"]
        with Client(srv.uris[0]) as c:
            assert c.size == 64 * MiB
            data = os.urandom(MiB + 7)
            c.pwrite(data, 3 * MiB + 1)
            assert c.pread(len(data), 3 * MiB + 1) == data
        info = json.loads(nbdinfo("--json", srv.uris[0]))
        (export,) = info["exports"]
        assert export["export-size"] == 64 * MiB
        assert export["can_trim"] is True and export["is_read_only"] is False
        assert srv.stop() == 0
        log = srv.log()
    assert not sock.exists()
    assert f"serving '' on nbd+unix:///?socket={sock}" in log
    # One line per connection: the peer, the export, what was negotiated, the traffic.
    ours = [line for line in log.splitlines() if f"unix pid {os.getpid()} " in line]
    assert len(ours) == 1, log
    assert "export ''" in ours[0] and "extended headers" in ours[0], ours[0]
    assert "2 requests, 1.0 MiB read, 1.0 MiB written" in ours[0], ours[0]
    assert "SIGTERM" in log


@pytest.mark.interop
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_port_zero_prints_the_port(tmp_path: Path, host: str) -> None:
    shown = f"[{host}]" if ":" in host else host
    where = ("--tcp", f"{shown}:0")
    with start_pynbd(tmp_path, "--memory", "1M", *where, stdout=subprocess.PIPE) as srv:
        assert srv.proc.stdout is not None
        port = int(srv.proc.stdout.readline())
        assert srv.uris == [f"nbd://{shown}:{port}/"]
        assert (srv.host, srv.port) == (host, port)
        with Client(host=host, port=port) as c:
            assert c.size == MiB
        assert json.loads(nbdinfo("--json", srv.uris[0]))["exports"][0]["export-size"] == MiB
        assert srv.stop(signal.SIGINT) == 0


@pytest.mark.interop
def test_file_read_write_and_read_only(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    sock = tmp_path / "s"
    with start_pynbd(tmp_path, str(image), "--unix", str(sock), "--threads", "2") as srv:
        with Client(srv.uris[0]) as c:
            c.pwrite(b"\xab" * 65536, 65536, fua=True)
            c.trim(65536, 4 * MiB)
            c.flush()
        assert srv.stop() == 0
    assert image.read_bytes()[65536:131072] == b"\xab" * 65536
    with start_pynbd(tmp_path, str(image), "--unix", str(sock), "--read-only") as srv:
        with Client(srv.uris[0]) as c:
            assert c.is_read_only()
            assert c.pread(4, 65536) == b"\xab" * 4
            with pytest.raises(NBDError):
                c.pwrite(b"x", 0)
        assert json.loads(nbdinfo("--json", srv.uris[0]))["exports"][0]["is_read_only"] is True
        assert srv.stop() == 0


@pytest.mark.interop
def test_named_exports_of_every_kind(tmp_path: Path) -> None:
    golden = tmp_path / "golden.img"
    golden.write_bytes(b"G" * MiB)
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(MiB))
    device = tmp_path / "dev.py"
    device.write_text(DEVICE)
    sock = tmp_path / "s"
    args = [
        *("--export", "mem=memory:2M"),
        *("--export", f"file={'file:' + str(plain)}"),
        *("--export", f"cow=overlay:{golden}"),
        *("--export", f"cow2=overlay:file:{golden}"),
        *("--export", f"py=python:{device}:memory,size=131072"),
        *("--description", "mem=scratch space"),
        *("--description", "cow=golden image, copy on write"),
        *("--default-export", "cow"),
        *("--overlay-dir", str(tmp_path)),
        *("--unix", str(sock)),
    ]
    with start_pynbd(tmp_path, *args) as srv:
        listing = json.loads(nbdinfo("--list", "--json", srv.uris[0]))
        by_name = {e["export-name"]: e for e in listing["exports"]}
        assert set(by_name) == {"mem", "file", "cow", "cow2", "py"}
        assert by_name["mem"]["description"] == "scratch space"
        assert by_name["cow"]["description"] == "golden image, copy on write"
        assert by_name["py"]["export-size"] == 131072
        with Client(srv.uris[0]) as c:  # the default export: cow
            assert c.size == MiB
            c.pwrite(b"new", 10)
            assert c.pread(16, 0) == b"G" * 10 + b"new" + b"G" * 3
        with Client(srv.uris[0], export_name="cow2") as c:
            assert c.pread(16, 0) == b"G" * 16  # its own overlay
        with Client(srv.uris[0], export_name="file") as c:
            c.pwrite(b"written", 0)
        assert srv.stop() == 0
    assert golden.read_bytes() == b"G" * MiB  # overlays never write to their base
    assert plain.read_bytes()[:7] == b"written"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pynbd-overlay")) == []


def test_python_backend_with_arguments(tmp_path: Path) -> None:
    device = tmp_path / "dev.py"
    device.write_text(DEVICE)
    sock = tmp_path / "s"
    with start_pynbd(
        tmp_path, "--python", f"{device}:memory", "size=1048576", "--unix", str(sock)
    ) as s:
        with Client(s.uris[0]) as c:
            assert c.size == MiB
            c.pwrite(b"py", 100)
            assert c.pread(2, 100) == b"py"
        assert s.stop() == 0


@pytest.mark.interop
def test_block_sizes_and_protocol_switches(tmp_path: Path) -> None:
    sock = tmp_path / "s"
    args = ["--memory", "4M", "--unix", str(sock), "--block-size", "4096,65536,1M"]
    with start_pynbd(tmp_path, *args) as srv:
        with Client(srv.uris[0]) as c:
            sizes = [c.get_block_size(k) for k in ("minimum", "preferred", "maximum")]
            assert sizes == [4096, 65536, MiB]
            assert c.extended_headers
        export = json.loads(nbdinfo("--json", srv.uris[0]))["exports"][0]
        assert export["block_size_minimum"] == 4096
        assert export["block_size_maximum"] == MiB
        assert srv.stop() == 0
    with start_pynbd(
        tmp_path, "--memory", "4M", "--unix", str(sock), "--no-extended-headers"
    ) as srv:
        with Client(srv.uris[0]) as c:
            assert c.structured_replies and not c.extended_headers
        assert srv.stop() == 0
    with start_pynbd(
        tmp_path, "--memory", "4M", "--unix", str(sock), "--no-structured-replies"
    ) as srv:
        with Client(srv.uris[0]) as c:
            assert not c.structured_replies and not c.extended_headers
            c.pwrite(b"simple", 0)
            assert c.pread(6, 0) == b"simple"
        assert srv.stop() == 0


@pytest.mark.interop
def test_tls_certificates(tmp_path: Path) -> None:
    certs = make_x509_dir(tmp_path)
    sock = tmp_path / "s"
    base = ["--memory", "4M", "--unix", str(sock), "--tls-certificates", str(certs)]
    with start_pynbd(tmp_path, *base) as srv:
        assert srv.uris == [f"nbds+unix:///?socket={sock}"]
        with Client(path=str(sock), tls=TLSConfig(certificates=str(certs))) as c:
            assert c.negotiated.tls
            c.pwrite(b"secret", 0)
        with pytest.raises(OptionError) as refused:
            Client(path=str(sock))
        assert refused.value.reply == Rep.ERR_TLS_REQD
        uri = f"nbds+unix:///?socket={sock}&tls-certificates={certs}"
        assert json.loads(nbdinfo("--json", uri))["TLS"] is True
        assert srv.stop() == 0
        assert "TLSv1.3" in srv.log()
    with start_pynbd(tmp_path, *base, "--tls", "optional", "--tls-verify-peer") as srv:
        with Client(path=str(sock)) as c:  # optional: plaintext is allowed
            assert not c.negotiated.tls
        with Client(path=str(sock), tls=TLSConfig(certificates=str(certs))) as c:
            assert c.negotiated.tls  # with the client certificate of the directory
        assert srv.stop() == 0


def test_pid_file(tmp_path: Path) -> None:
    pid_file = tmp_path / "serve.pid"
    args = ["--memory", "1M", "--unix", str(tmp_path / "s"), "--pid-file", str(pid_file)]
    with start_pynbd(tmp_path, *args) as srv:
        assert pid_file.read_text() == f"{srv.proc.pid}\n"
        assert srv.stop() == 0
    assert not pid_file.exists()


def test_max_connections_and_handshake_timeout(tmp_path: Path) -> None:
    sock = tmp_path / "s"
    args = ["--memory", "1M", "--unix", str(sock), "--max-connections", "1"]
    with start_pynbd(tmp_path, *args, "--handshake-timeout", "0.5") as srv:
        with Client(srv.uris[0]) as first:
            with pytest.raises(OptionError) as refused:
                Client(srv.uris[0], timeout=10)
            assert refused.value.reply == Rep.ERR_SHUTDOWN
            assert refused.value.message == "too many connections (limit 1)"
            assert first.pread(1, 0) == b"\0"
        # A client that never finishes its handshake is dropped.
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(sock))
            assert is_closed(raw, timeout=10)
        assert srv.stop() == 0
        assert "too many connections" in srv.log()
        assert "handshake took too long" in srv.log()


def test_limit_options() -> None:
    parser = build_parser()
    defaults = limits_from(parser.parse_args(["serve", "--memory", "1M"]))
    assert defaults == Limits()
    args = parser.parse_args(
        [
            *("serve", "--memory", "1M", "--max-connections", "7", "--idle-timeout", "90"),
            *("--max-in-flight", "3", "--max-in-flight-bytes", "4M", "--handshake-timeout", "0"),
            *("--max-options", "5", "--max-option-length", "1k"),
        ]
    )
    assert limits_from(args) == Limits(
        max_connections=7,
        idle_timeout=90.0,
        max_in_flight=3,
        max_in_flight_bytes=4 * MiB,
        handshake_timeout=None,
        max_options=5,
        max_option_length=1024,
    )


def test_idle_timeout(tmp_path: Path) -> None:
    sock = tmp_path / "s"
    args = ["--memory", "1M", "--unix", str(sock), "--idle-timeout", "0.5"]
    with start_pynbd(tmp_path, *args) as srv:
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(30)
            raw.connect(str(sock))
            raw_go(raw)
            raw.sendall(raw_request(0, 0, 512))
            assert read_simple_reply(raw)[0] == 0
            recv_exactly(raw, 512)
            assert is_closed(raw, timeout=30)  # (a hang guard: it closes in half a second)
        assert srv.stop() == 0
    assert "(idle for 0.5 s)" in srv.log()


#: Runs the rest of its arguments with a descriptor limit of 64 (soft and hard).
LOW_NOFILE = [
    sys.executable,
    "-c",
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def test_a_low_descriptor_limit(tmp_path: Path) -> None:
    """With 64 descriptors: as many clients as that allows are served, the next ones
    are refused with the reason, nobody hangs, the log stays short, and once the
    clients leave a new one is served."""
    started = time.monotonic()
    served: list[Client] = []
    refused = 0
    with start_pynbd(tmp_path, "--memory", "1M", listen="unix", wrapper=LOW_NOFILE) as srv:
        try:
            for _ in range(40):
                try:
                    c = Client(srv.uri, timeout=30)
                except OptionError as exc:
                    assert exc.reply == Rep.ERR_SHUTDOWN
                    assert exc.message.startswith("too many connections (limit ")
                    refused += 1
                    continue
                served.append(c)
                assert c.pread(512, 0) == bytes(512)  # (its thread, and its descriptor)
        finally:
            for c in served:
                c.close()
        assert served
        assert refused
        with Client(srv.uri, timeout=30) as c:
            assert c.pread(512, 0) == bytes(512)
        assert srv.stop() == 0
    log = srv.log()
    assert "Traceback" not in log
    # One line per connection served, one per kind of refusal and 10 s (the rate
    # limit), a few at the start and the end: not one per failed accept.
    intervals = 1 + (time.monotonic() - started) // 10
    assert log.count("connection refused") <= intervals
    assert len(log.splitlines()) <= len(served) + 1 + 2 * intervals + 5, log


# --------------------------------------------------------------------------- signals


def test_sigterm_during_a_write_completes_it(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    sock = tmp_path / "s"
    data = os.urandom(8 * MiB)
    with start_pynbd(tmp_path, str(image), "--unix", str(sock)) as srv:
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(20)
            raw.connect(str(sock))
            raw_go(raw)  # simple replies
            raw.sendall(raw_request(1, MiB, len(data), cookie=42) + data[: 3 * MiB])
            wait_until("the server reads the first 3 MiB", lambda: all_read(raw))
            srv.proc.send_signal(signal.SIGTERM)
            wait_until("the server logs SIGTERM", lambda: "SIGTERM: finishing" in srv.log())
            assert srv.proc.poll() is None  # waiting for the rest of the payload
            raw.sendall(data[3 * MiB :])
            assert read_simple_reply(raw) == (0, 42)
            assert is_closed(raw, timeout=20)  # then it closes the connection
        assert srv.proc.wait(20) == 0
    assert image.read_bytes()[MiB : 9 * MiB] == data


def test_sigterm_during_a_slow_read_answers_it(tmp_path: Path) -> None:
    device = tmp_path / "dev.py"
    device.write_text(DEVICE)
    sock, started = tmp_path / "s", tmp_path / "started"
    slow = ["--python", f"{device}:Slow", "delay=1.5", f"started={started}"]
    with start_pynbd(tmp_path, *slow, "--unix", str(sock)) as srv:
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(20)
            raw.connect(str(sock))
            raw_go(raw)
            raw.sendall(raw_request(0, 4096, 512, cookie=7))
            wait_until("the read reaches the backend", started.exists)
            srv.proc.send_signal(signal.SIGTERM)
            assert read_simple_reply(raw) == (0, 7)
            assert recv_exactly(raw, 512) == b"s" * 512
            assert is_closed(raw, timeout=20)
        assert srv.proc.wait(20) == 0


def test_a_second_signal_aborts_requests_under_way(tmp_path: Path) -> None:
    device = tmp_path / "dev.py"
    device.write_text(DEVICE)
    sock, started, ended = tmp_path / "s", tmp_path / "started", tmp_path / "ended"
    slow = ["--python", f"{device}:Slow", "delay=5", f"started={started}", f"ended={ended}"]
    with start_pynbd(tmp_path, *slow, "--unix", str(sock)) as srv:
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(20)
            raw.connect(str(sock))
            raw_go(raw)
            raw.sendall(raw_request(0, 0, 512, cookie=9))
            wait_until("the read reaches the backend", started.exists)
            srv.proc.send_signal(signal.SIGTERM)
            # The second signal only once the first was handled (two pending SIGTERMs
            # would be delivered as one).
            wait_until("the server logs SIGTERM", lambda: "SIGTERM: finishing" in srv.log())
            srv.proc.send_signal(signal.SIGTERM)
            assert raw.recv(16) == b""  # closed without the reply,
            assert not ended.exists()  # and without waiting for the backend
        # The backend call itself cannot be interrupted: the exit waits for it.
        assert srv.proc.wait(20) == 0
        assert "SIGTERM again" in srv.log()


# --------------------------------------------------------------------------- inetd


def test_inetd_with_our_client(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fd = theirs.fileno()
        with start_pynbd(tmp_path, "--inetd", "--memory", "8M", stdin=fd, stdout=fd) as srv:
            assert srv.uris == []  # nothing listens
            theirs.close()
            with Client(sock=ours) as c:
                assert c.size == 8 * MiB
                c.pwrite(b"inetd", 0)
                assert c.pread(5, 0) == b"inetd"
            assert srv.proc.wait(STOP_GRACE) == 0, srv.log()
            log = srv.log()
    assert "export ''" in log


LIBNBD_COMMAND = """
import json, sys, nbd
h = nbd.NBD()
h.connect_command(sys.argv[1:])
h.pwrite(b"via connect_command", 4096)
print(json.dumps({"size": h.get_size(), "data": h.pread(19, 4096).decode(),
                  "structured": h.get_structured_replies_negotiated()}))
h.shutdown()
"""


@pytest.mark.interop
def test_inetd_started_by_libnbd_connect_command() -> None:
    done = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            LIBNBD_COMMAND,
            sys.executable,
            "-m",
            "pynbd",
            "serve",
            "--inetd",
            "--memory",
            "16M",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(peer_env()),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"size": 16 * MiB, "data": "via connect_command", "structured": True}


def test_inetd_needs_a_socket() -> None:
    done = run_serve("--inetd", "--memory", "1M", input="")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "pynbd: --inetd: standard input is not a socket (--inetd serves a socket on fd 0)"
    )


# --------------------------------------------------------------------------- socket activation


@pytest.mark.interop
def test_socket_activation_by_nbdinfo() -> None:
    """nbdinfo -- [ CMD ] (libnbd 1.14's only subprocess form) uses socket activation."""
    cmd = ["[", sys.executable, "-m", "pynbd", "serve", "--memory", "64M", "]"]
    env = child_env(peer_env())
    info = json.loads(nbdinfo("--json", "--", *cmd, env=env))
    assert info["exports"][0]["export-size"] == 64 * MiB
    extents = json.loads(nbdinfo("--map", "--json", "--", *cmd, env=env))
    assert [(e["offset"], e["length"], e["type"]) for e in extents] == [(0, 64 * MiB, 3)]


def test_hand_made_socket_activation(tmp_path: Path) -> None:
    """Two sockets (unix on fd 3, TCP on fd 4) and LISTEN_PID set after the fork, as
    systemd does: a small launcher that execs the server keeps its pid."""
    path = tmp_path / "activated.sock"
    unix = socket.socket(socket.AF_UNIX)
    tcp = socket.socket(socket.AF_INET)
    with unix, tcp:
        unix.bind(str(path))
        unix.listen()
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        port = tcp.getsockname()[1]
        with start_pynbd(
            tmp_path,
            *("--memory", "2M", "--socket-activation"),
            stdin=unix.fileno(),
            pass_fds=(tcp.fileno(),),
            env={**child_env(), "TCP_FD": str(tcp.fileno())},
            wrapper=(sys.executable, "-c", LAUNCHER),
        ) as srv:
            assert srv.uris == [f"nbd+unix:///?socket={path}", f"nbd://127.0.0.1:{port}/"]
            with Client(path=str(path)) as c:
                c.pwrite(b"shared", 0)
            with Client(host="127.0.0.1", port=port) as c:
                assert c.pread(6, 0) == b"shared"
            assert srv.stop() == 0
    assert path.exists()  # the socket file belongs to whoever made it


# What systemd does between fork and exec: the sockets to fds 3 and 4, LISTEN_PID = the
# pid that exec keeps.
LAUNCHER = """
import os, sys
os.dup2(0, 3)
os.dup2(int(os.environ.pop("TCP_FD")), 4)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2")
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_socket_activation_for_another_process_is_ignored() -> None:
    env = {**child_env(), "LISTEN_PID": "1", "LISTEN_FDS": "1"}
    done = run_serve("--memory", "1M", "--socket-activation", env=env)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "pynbd: --socket-activation: LISTEN_PID/LISTEN_FDS do not name this process"
    )


# --------------------------------------------------------------------------- bad arguments

BAD: list[tuple[list[str], int, str]] = [
    ([], 2, "nothing to serve"),
    (["--memory", "1M"], 2, "nowhere to listen"),
    (["--memory", "12Q", "--unix", "S"], 2, "not a byte count: '12Q'"),
    (["--memory"], 2, "expected one argument"),
    (["--memory", "1M", "--unix", "S", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["--memory", "1M", "IMG", "--unix", "S"], 2, "FILE and --memory both make the default"),
    (["A", "B", "--unix", "S"], 2, "one FILE at most"),
    (["/nonexistent/disk.img", "--unix", "S"], 1, "cannot open /nonexistent/disk.img: No such"),
    (["--export", "x", "--unix", "S"], 2, "--export 'x' is not NAME=SPEC"),
    (["--export", "x=tape:1", "--unix", "S"], 2, "'tape:1' is not memory:SIZE"),
    (["--export", "x=memory:", "--unix", "S"], 2, "says nothing after memory:"),
    (["--export", "x=memory:1M", "--export", "x=memory:2M", "--unix", "S"], 2, "given twice"),
    (["--export", "x=overlay:/nonexistent", "--unix", "S"], 1, "cannot open /nonexistent"),
    (["--export", "x=memory:1M", "--default-export", "y", "--unix", "S"], 2, "'y' is not an"),
    (
        [
            "--export",
            "a=memory:1M",
            "--export",
            "b=memory:1M",
            "--description",
            "z=t",
            "--unix",
            "S",
        ],
        2,
        "--description 'z=t' is not NAME=TEXT",
    ),
    (["--memory", "1M", "--tcp", "localhost"], 2, "not HOST:PORT"),
    (["--memory", "1M", "--tcp", "[::1]:99999"], 2, "port out of range"),
    (["--memory", "1M", "--unix", "/nonexistent/dir/s"], 1, "cannot listen on unix socket"),
    (["--memory", "1M", "--unix", "S", "--tls", "require"], 2, "needs --tls-certificates"),
    (["--memory", "1M", "--unix", "S", "--tls", "maybe"], 2, "invalid choice: 'maybe'"),
    (["--memory", "1M", "--unix", "S", "--tls-verify-peer"], 2, "needs --tls-certificates"),
    (
        ["--memory", "1M", "--unix", "S", "--tls", "off", "--tls-certificates", "/"],
        2,
        "--tls off contradicts",
    ),
    (
        ["--memory", "1M", "--unix", "S", "--tls-certificates", "/", "--tls-psk-file", "/x"],
        2,
        "not both",
    ),
    (["--memory", "1M", "--unix", "S", "--tls-certificates", "/nonexistent"], 1, "does not exist"),
    (["--memory", "1M", "--inetd", "--tcp", ":0"], 2, "--inetd serves standard input"),
    (["--memory", "1M", "--socket-activation"], 1, "LISTEN_PID/LISTEN_FDS do not name"),
    (["--memory", "1M", "--unix", "S", "--threads", "0"], 2, "must be at least 1"),
    (["--memory", "1M", "--unix", "S", "--max-connections", "x"], 2, "not a number: 'x'"),
    (["--memory", "1M", "--unix", "S", "--handshake-timeout", "-1"], 2, "not a valid number"),
    (["--memory", "1M", "--unix", "S", "--idle-timeout", "soon"], 2, "not a number of seconds"),
    (["--memory", "1M", "--unix", "S", "--max-in-flight", "0"], 2, "must be at least 1"),
    (["--memory", "1M", "--unix", "S", "--max-in-flight-bytes", "0"], 2, "at least 1 byte"),
    (["--memory", "1M", "--unix", "S", "--max-in-flight-bytes", "lots"], 2, "not a byte count"),
    (["--memory", "1M", "--unix", "S", "--block-size", "512,4096"], 2, "not MIN,PREF,MAX"),
    (["--memory", "1M", "--unix", "S", "--block-size", "3,4096,1M"], 2, "not a power of 2"),
    (["--memory", "1M", "--unix", "S", "--block-size", "512,4096,64M"], 2, "above the backend"),
    (["--memory", "1M", "--unix", "S", "--ready-fd", "999"], 2, "descriptor 999 is not open"),
    (["--memory", "1M", "--unix", "S", "--pid-file", "/nonexistent/p"], 1, "no such directory"),
    (["--python", "no_such_mod_x:Dev", "--unix", "S"], 1, "no module named 'no_such_mod_x'"),
    (["--python", "os:path", "bad", "--unix", "S"], 2, "'bad' is not KEY=VALUE"),
    (
        ["--export", "x=overlay:memory:1M", "--overlay-dir", "/nonexistent", "--unix", "S"],
        1,
        "overlay in",
    ),
]
if sys.version_info < (3, 13):
    BAD.append((["--memory", "1M", "--unix", "S", "--tls-psk-file", "F"], 1, "needs Python 3.13"))


@pytest.mark.parametrize(("args", "status", "fragment"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_arguments_give_one_line(
    tmp_path: Path, args: list[str], status: int, fragment: str
) -> None:
    image = tmp_path / "IMG"
    image.write_bytes(bytes(4096))
    (tmp_path / "F").write_text("alice:00ff\n")
    args = [str(tmp_path / a) if a in ("S", "IMG", "F") else a for a in args]
    done = run_serve(*args, cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode == status, done.stderr
    assert len(lines) == 1, done.stderr
    assert fragment in lines[0], lines[0]
    assert lines[0].startswith("pynbd serve: error: " if status == 2 else "pynbd: "), lines[0]
    assert done.stdout == ""


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_serve("--memory", "1M", "--tcp", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr == f"pynbd: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_help() -> None:
    done = run_serve("--help")
    assert done.returncode == 0
    for word in ("memory:SIZE", "overlay:PATH", "python:MODULE:NAME", "--tls-psk-file", "--inetd"):
        assert word in done.stdout
    assert "``" not in done.stdout
