"""The kernel test guest harness (tests/guest and tests/kernel/conftest.py), on the host.

Nothing here boots a guest (tests/kernel does, once per session): a fake qemu, a small
Python script, plays the guest's part on the host. It reads the options qemu would get,
writes /xfer/started, runs /xfer/command with NBDVM=1 and writes /xfer/exit, or
misbehaves on request (never boots, panics, hangs, dies without an exit status).
"""

from __future__ import annotations

import io
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.guest import boot, cli, cpio, fetch, host, initrd, junit, kernel, qemu

ROOT = Path(__file__).resolve().parents[2]

FAKE_QEMU = """\
import os, subprocess, sys, time
from pathlib import Path

args = sys.argv[1:]


def values(flag, key):
    for i, arg in enumerate(args[:-1]):
        if arg == flag:
            for part in args[i + 1].replace(",,", "\\0").split(","):
                name, _, value = part.partition("=")
                if name == key:
                    yield value.replace("\\0", ",")


assert "accel=tcg" in args[args.index("-machine") + 1], "never KVM"
share = Path(next(p for p in values("-fsdev", "path") if p != "/"))
serial = Path(next(values("-chardev", "path")))
mode = os.environ.get("FAKE_QEMU_MODE", "ok")
if "FAKE_QEMU_PIDFILE" in os.environ:
    Path(os.environ["FAKE_QEMU_PIDFILE"]).write_text(str(os.getpid()))
serial.write_text("fake kernel booting\\n")
if mode == "noboot":
    time.sleep(600)
if mode == "panic":
    serial.write_text("fake kernel: Kernel panic - not syncing\\n")
    sys.exit(0)
assert "MODDIR=" in (share / "settings").read_text()
(share / "started").write_text(f"{time.monotonic():.2f}\\n")
if mode == "hang":
    time.sleep(600)
if mode == "noexit":
    sys.exit(0)
# The guest sees the share at /xfer.
script = (share / "command").read_text().replace("/xfer/", f"{share}/")
env = {"PATH": "/usr/bin:/bin", "NBDVM": "1", "HOME": "/root", "LANG": "C.UTF-8"}
rc = subprocess.run(["/bin/sh", "-c", script], env=env, stdin=subprocess.DEVNULL).returncode
(share / "exit").write_text(f"{rc} {time.monotonic():.2f}\\n")
"""


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    path = tmp_path / "fake-qemu"
    path.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    path.chmod(0o755)
    return path


@pytest.fixture
def guest(tmp_path: Path) -> boot.Guest:
    return boot.Guest(
        kver="0.0.0-test",
        root=tmp_path,
        kernel=tmp_path / "vmlinux",
        moddir=tmp_path / "modules",
        initrd=tmp_path / "initrd",
    )


# --------------------------------------------------------------------------- programs


def test_missing_programs_name_their_debian_packages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", os.fspath(tmp_path))
    monkeypatch.setattr(host, "SYSTEM_DIRS", ())
    with pytest.raises(host.VMError) as excinfo:
        host.require_programs(host.HOST_PROGRAMS)
    message = str(excinfo.value)
    for program, package in host.HOST_PROGRAMS.items():
        assert f"{program} (Debian package {package})" in message
    assert "apt-get install busybox-static kmod qemu-system-x86" in message


def test_present_programs_are_found() -> None:
    found = host.require_programs({"sh": "dash"})
    assert Path(found["sh"]).is_file()


def test_busybox_must_be_static(tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    assert busybox is not None, "the Debian package busybox-static is not installed"
    assert host.static_busybox(busybox) == busybox
    real = os.path.realpath(sys.executable)
    assert not host.is_static_elf(real)
    with pytest.raises(host.VMError, match="busybox-static"):
        host.static_busybox(real)
    (tmp_path / "text").write_text("#!/bin/sh\n")
    assert not host.is_static_elf(tmp_path / "text")


# --------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize(
    ("output", "package"),
    [
        (
            "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n",
            "linux-image-6.1.0-56-amd64",
        ),
        (
            "linux-image-amd64\n  Depends: linux-image-6.12.48+deb13-amd64\n",
            "linux-image-6.12.48+deb13-amd64",
        ),
        (
            "linux-image-amd64\n |Depends: linux-image-6.1.0-9-amd64-unsigned\n"
            "  Depends: linux-image-6.1.0-9-amd64\n",
            "linux-image-6.1.0-9-amd64",
        ),
        ("linux-image-amd64\n  Depends: linux-image-amd64-signed-template\n", None),
        ("", None),
    ],
)
def test_kernel_package_from_apt_cache_depends(output: str, package: str | None) -> None:
    assert fetch.kernel_package(output) == package


def test_cached_kernels_newest_first(tmp_path: Path) -> None:
    for kver in ("6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-10-amd64", "6.2.0-1-amd64"):
        (tmp_path / kver / "root").mkdir(parents=True)
        if kver != "6.2.0-1-amd64":  # half unpacked: not complete
            (tmp_path / kver / "root" / ".complete").touch()
    assert fetch.complete_kernels(tmp_path) == ["6.1.0-56-amd64", "6.1.0-10-amd64", "6.1.0-9-amd64"]


def test_fetch_kernel_uses_the_cache_when_apt_knows_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An apt that knows no packages, as before the first apt-get update.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-cache").write_text("#!/bin/sh\necho 'E: No packages found' >&2\n")
    (bin_dir / "apt-cache").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cache = tmp_path / "cache"
    (cache / "6.1.0-1-amd64" / "root").mkdir(parents=True)
    (cache / "6.1.0-1-amd64" / "root" / ".complete").touch()
    messages: list[str] = []
    kver, root = fetch.fetch_kernel(cache, log=messages.append)
    assert (kver, root) == ("6.1.0-1-amd64", cache / "6.1.0-1-amd64" / "root")
    assert messages and "apt-get update" in messages[0]
    (cache / "6.1.0-1-amd64" / "root" / ".complete").unlink()
    with pytest.raises(host.VMError, match="apt-get update"):
        fetch.fetch_kernel(cache)


def test_parse_show_depends() -> None:
    text = textwrap.dedent("""\
        insmod /k/lib/modules/6.1/kernel/drivers/virtio/virtio_ring.ko
        insmod /k/lib/modules/6.1/kernel/drivers/virtio/virtio.ko
        builtin virtio_pci_modern_dev
        insmod /k/lib/modules/6.1/kernel/drivers/virtio/virtio_pci.ko
        insmod /k/lib/modules/6.1/kernel/drivers/virtio/virtio.ko
        insmod /k/lib/modules/6.1/kernel/fs/9p/9p.ko.xz  option=1
        """)
    files = initrd.parse_show_depends(text)
    assert [initrd.module_name(f) for f in files] == ["virtio_ring", "virtio", "virtio_pci", "9p"]


def test_compressed_modules_are_decompressed(tmp_path: Path) -> None:
    (tmp_path / "a.ko.xz").write_bytes(lzma.compress(b"\x7fELF module"))
    (tmp_path / "b.ko").write_bytes(b"\x7fELF plain")
    assert initrd.module_bytes(tmp_path / "a.ko.xz") == b"\x7fELF module"
    assert initrd.module_bytes(tmp_path / "b.ko") == b"\x7fELF plain"
    (tmp_path / "c.ko.weird").write_bytes(b"")
    with pytest.raises(host.VMError):
        initrd.module_bytes(tmp_path / "c.ko.weird")


def _elf_with_note(name: bytes, note_type: int) -> bytes:
    """A minimal 64-bit little-endian ELF: header, one PT_NOTE program header, a note."""
    desc = b"\0" * 4
    note = struct.pack("<III", len(name) + 1, len(desc), note_type)
    note += name + b"\0" * (4 - len(name) % 4) + desc
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 64 + 56, 0, 0, len(note), len(note), 4)
    return header + phdr + note


def _bzimage(payload: bytes) -> bytes:
    setup_sects = 4
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, 0x10, len(payload))
    return bytes(image) + b"\0" * 0x10 + payload + b"\0" * 64


def test_pvh_kernel_is_extracted_from_the_bzimage(tmp_path: Path) -> None:
    elf = _elf_with_note(b"Xen", 18)
    assert kernel.elf_has_pvh_note(elf)
    assert not kernel.elf_has_pvh_note(_elf_with_note(b"Xen", 17))
    assert not kernel.elf_has_pvh_note(_elf_with_note(b"GNU", 18))
    kver_dir = tmp_path / "6.1.0-1-amd64"
    (kver_dir / "root" / "boot").mkdir(parents=True)
    vmlinuz = kver_dir / "root" / "boot" / "vmlinuz-6.1.0-1-amd64"
    vmlinuz.write_bytes(_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ)))
    assert kernel.extract_vmlinux(vmlinuz) == elf
    booted = kernel.boot_kernel(vmlinuz)
    assert booted == kver_dir / "vmlinux-6.1.0-1-amd64"
    assert booted.read_bytes() == elf


def test_a_kernel_without_pvh_boots_as_bzimage(tmp_path: Path) -> None:
    (tmp_path / "k" / "root" / "boot").mkdir(parents=True)
    vmlinuz = tmp_path / "k" / "root" / "boot" / "vmlinuz-k"
    vmlinuz.write_bytes(_bzimage(lzma.compress(_elf_with_note(b"GNU", 3))))
    assert kernel.boot_kernel(vmlinuz) == vmlinuz
    assert (tmp_path / "k" / "vmlinux-k.unusable").exists()
    vmlinuz.write_bytes(_bzimage(b"(\xb5/\xfd zstd, not ours to read"))
    assert kernel.extract_vmlinux(vmlinuz) is None


# --------------------------------------------------------------------------- initramfs


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes, int]]:
    """Parse a newc archive: {name: (mode, data, rdev)}."""
    entries: dict[str, tuple[int, bytes, int]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmajor, rminor, namesize = (
            fields[1], fields[6], fields[9], fields[10], fields[11],
        )  # fmt: skip
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[pos : pos + filesize], os.makedev(rmajor, rminor))
        pos += filesize
        pos += -pos % 4


def test_cpio_archive_reads_back(tmp_path: Path) -> None:
    contents = [
        ("bin", stat.S_IFDIR | 0o755, b"", 0),
        ("dev", stat.S_IFDIR | 0o755, b"", 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)),
        ("init", stat.S_IFREG | 0o755, b"#!/bin/busybox sh\necho hi\n", 0),
        ("bin/odd size", stat.S_IFREG | 0o644, b"x" * 4097, 0),
    ]
    out = io.BytesIO()
    cpio.write_cpio(contents, out)
    data = out.getvalue()
    assert len(data) % 4 == 0
    assert _read_cpio(data) == {name: (mode, body, rdev) for name, mode, body, rdev in contents}
    # And a real cpio reads it too.
    (tmp_path / "a.cpio").write_bytes(data)
    listing = subprocess.run(
        ["busybox", "cpio", "-t", "-F", os.fspath(tmp_path / "a.cpio")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert [n for n in listing if n] == [name for name, *_ in contents]


def test_guest_scripts_live_with_the_harness() -> None:
    assert initrd.SCRIPTS == ROOT / "tests" / "guest"
    assert initrd.guest_script("init").startswith(b"#!/bin/busybox sh\n")
    assert b"/xfer/exit" in initrd.guest_script("stage2")


# --------------------------------------------------------------------------- junit


def test_junit_key() -> None:
    assert junit.junit_key("tests/kernel/test_x.py::test_y") == ("tests.kernel.test_x", "test_y")
    assert junit.junit_key("tests/kernel/test_x.py::TestA::test_b[1-a::b/c.py]") == (
        "tests.kernel.test_x.TestA",
        "test_b[1-a::b/c.py]",
    )


def test_parse_junit_matches_pytest_node_ids(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "test_sample.py").write_text(
        textwrap.dedent("""\
            import pytest

            def test_pass():
                pass

            def test_fail():
                print("printed by test_fail")
                assert 1 == 2, "one is not two"

            def test_skip():
                pytest.skip("not today")

            @pytest.fixture
            def broken():
                raise RuntimeError("fixture broke")

            def test_error(broken):
                pass

            class TestGroup:
                @pytest.mark.parametrize("x", ["a::b", "c/d"])
                def test_param(self, x):
                    pass
            """)
    )
    report = tmp_path / "junit.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tmp_path,
         f"--junitxml={report}", "-o", "junit_logging=all", "-o", "junit_family=xunit2", "pkg"],
        cwd=tmp_path, capture_output=True, check=False, timeout=120,
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )  # fmt: skip
    nodeids = [
        "pkg/test_sample.py::test_pass",
        "pkg/test_sample.py::test_fail",
        "pkg/test_sample.py::test_skip",
        "pkg/test_sample.py::test_error",
        "pkg/test_sample.py::TestGroup::test_param[a::b]",
        "pkg/test_sample.py::TestGroup::test_param[c/d]",
    ]
    cases = {case.key: case for case in junit.parse_junit(report)}
    assert set(cases) == {junit.junit_key(n) for n in nodeids}
    outcome = {n.split("::", 1)[1]: cases[junit.junit_key(n)].outcome for n in nodeids}
    assert outcome == {
        "test_pass": "passed",
        "test_fail": "failed",
        "test_skip": "skipped",
        "test_error": "error",
        "TestGroup::test_param[a::b]": "passed",
        "TestGroup::test_param[c/d]": "passed",
    }
    failed = cases[junit.junit_key(nodeids[1])]
    assert "one is not two" in failed.message
    assert "assert 1 == 2" in failed.details
    assert "printed by test_fail" in failed.output
    # Empty "Captured ..." sections are no output.
    assert cases[junit.junit_key(nodeids[0])].output == ""
    assert "not today" in cases[junit.junit_key(nodeids[2])].message
    assert "fixture broke" in cases[junit.junit_key(nodeids[3])].details


def test_parse_junit_errors(tmp_path: Path) -> None:
    with pytest.raises(host.VMError):
        junit.parse_junit(tmp_path / "missing.xml")
    (tmp_path / "bad.xml").write_text("<testsuites><testcase")
    with pytest.raises(host.VMError):
        junit.parse_junit(tmp_path / "bad.xml")


# --------------------------------------------------------------------------- run()


def test_command_script_keeps_arguments_and_environment(tmp_path: Path) -> None:
    argv = ["sh", "-c", 'printf "%s|" "$@"; printf "%s" "$WEIRD"', "zero", "a b", "$x", "'q'"]
    script = qemu.command_script(argv, tmp_path, {"WEIRD": "it's $HOME \\ `x`"})
    done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout == "a b|$x|'q'|it's $HOME \\ `x`"
    with pytest.raises(ValueError):
        qemu.command_script(["true"], tmp_path, {"BAD NAME": "x"})


def test_guest_path_keeps_the_hosts_and_adds_sbin() -> None:
    path = qemu.guest_path("/opt/py/bin:/usr/bin").split(":")
    assert path[:2] == ["/opt/py/bin", "/usr/bin"]
    assert "/usr/sbin" in path
    assert path.count("/usr/bin") == 1


def test_run_returns_the_commands_status_and_output(
    fake_qemu: Path, guest: boot.Guest, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with open(out, "wb") as f:
        result = qemu.run(
            guest,
            ["sh", "-c", 'echo "in $(pwd) NBDVM=$NBDVM X=$X"; echo result > /xfer/mine; exit 3'],
            cwd=tmp_path,
            env={"X": "y z"},
            output=f,
            keep=True,
            qemu=os.fspath(fake_qemu),
        )
    try:
        assert result.returncode == 3
        assert not result.timed_out
        assert out.read_text() == f"in {tmp_path} NBDVM=1 X=y z\n"
        assert result.xfer is not None and (result.xfer / "mine").read_text() == "result\n"
        assert "fake kernel booting" in result.console
        assert 0 <= result.boot_seconds <= result.total_seconds
    finally:
        if result.xfer is not None:
            shutil.rmtree(result.xfer)


def test_run_removes_its_xfer_folder(fake_qemu: Path, guest: boot.Guest) -> None:
    result = qemu.run(guest, ["true"], qemu=os.fspath(fake_qemu))
    assert result.returncode == 0
    assert result.xfer is None


def _pid_gone(pidfile: Path) -> bool:
    if not pidfile.exists():
        # Stopped before it wrote its pid: run() reaped it, it writes nothing more.
        return True
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone for our purpose, but run() reaps qemu: it must not be one.
    return False


@pytest.mark.parametrize(
    ("mode", "boot_timeout", "message"),
    [
        # The fake never boots: the boot timeout (1 s) is what this case waits for.
        ("noboot", 1, "did not start the command within 1 s"),
        # These boot (or panic) by themselves: the boot timeout only guards a hang,
        # and is long enough for the fake's Python to start on a loaded host.
        ("panic", 120, "Kernel panic"),
        ("noexit", 120, "without an exit status"),
        ("hang", 120, "did not power off"),
    ],
)
def test_run_failures_raise_and_leave_nothing_running(
    fake_qemu: Path,
    guest: boot.Guest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    boot_timeout: float,
    message: str,
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", mode)
    monkeypatch.setenv("FAKE_QEMU_PIDFILE", os.fspath(tmp_path / "pid"))
    monkeypatch.setattr(qemu, "KILL_AFTER", 0.0)
    monkeypatch.setattr(qemu, "POWEROFF_GRACE", 0.5)
    # The fake sleeps 600 s in noboot and hang: run() returning at all (within
    # pytest's timeout) shows that it stopped qemu rather than waiting for it.
    with pytest.raises(host.VMError, match=message) as excinfo:
        qemu.run(guest, ["true"], timeout=1, boot_timeout=boot_timeout, qemu=os.fspath(fake_qemu))
    assert _pid_gone(tmp_path / "pid")
    if mode == "panic":
        assert "guest console" in str(excinfo.value)


def test_run_without_qemu_names_the_package(guest: boot.Guest, tmp_path: Path) -> None:
    with pytest.raises(host.VMError, match="qemu-system-x86"):
        qemu.run(guest, ["true"], qemu=os.fspath(tmp_path / "no-such-qemu"))


def test_main_exits_with_the_commands_status(
    fake_qemu: Path, guest: boot.Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boot, "prepare", lambda *args, **kwargs: guest)
    monkeypatch.setenv("PYNBD_VM_QEMU", os.fspath(fake_qemu))
    assert cli.main(["--", "sh", "-c", "exit 5"]) == 5
    monkeypatch.setenv("FAKE_QEMU_MODE", "panic")
    assert cli.main(["-v", "--", "true"]) == 125


def test_main_usage() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.guest", "--help"],
        capture_output=True, text=True, check=False, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.fspath(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "-- CMD" in done.stdout
    assert done.stderr == ""
    done = subprocess.run(
        [sys.executable, "-m", "tests.guest"],
        capture_output=True, text=True, check=False, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.fspath(ROOT)},
    )  # fmt: skip
    assert done.returncode == 2
    assert "no command" in done.stderr


# --------------------------------------------------------------------------- the pytest plugin

GUEST_TESTS = """\
import pytest

def test_ok():
    pass

def test_broken():
    print("output of test_broken")
    assert "guest" == "host", "the guest disagrees"

def test_skipped():
    pytest.skip("no reason")

@pytest.mark.parametrize("n", ["1", "a::b"])
def test_param(n):
    pass
"""

FAKE_PREPARE = """\
from pathlib import Path
from tests.guest import boot, bridge

_root = Path(__file__).parent
bridge.GUEST_TEST_PROGRAMS = {}
boot.prepare = lambda *a, **k: boot.Guest("0.0.0-fake", _root, _root / "k", _root, _root / "i")
"""


def _plugin_run(
    tmp_path: Path, fake_qemu: Path, guest_tests: str = GUEST_TESTS, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run pytest on a project with our tests/kernel/conftest.py, *guest_tests* as a
    kernel test module and one host test (our tests.guest and tests.kernel.helpers,
    which the conftest imports, come from our checkout)."""
    project = tmp_path / "project"
    (project / "tests" / "kernel").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "kernel" / "conftest.py", project / "tests" / "kernel")
    (project / "tests" / "kernel" / "test_fake.py").write_text(guest_tests)
    (project / "tests" / "test_host.py").write_text("def test_on_host():\n    pass\n")
    (project / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\naddopts = -p fakeprep\n")
    (tmp_path / "fakeprep.py").write_text(FAKE_PREPARE)
    full_env = {k: v for k, v in os.environ.items() if k not in ("NBDVM", "PYTEST_ADDOPTS")}
    full_env.update(
        PYTHONPATH=os.pathsep.join(os.fspath(p) for p in (ROOT, ROOT / "src", tmp_path)),
        PYTHONDONTWRITEBYTECODE="1",
        PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
        PYNBD_VM_QEMU=os.fspath(fake_qemu),
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "pytest_timeout",
         "-rA", "tests"],
        cwd=project, capture_output=True, text=True, check=False, timeout=120, env=full_env,
    )  # fmt: skip


def test_plugin_reports_guest_results_as_host_results(tmp_path: Path, fake_qemu: Path) -> None:
    done = _plugin_run(tmp_path, fake_qemu)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "1 failed, 4 passed, 1 skipped" in out
    assert "PASSED tests/kernel/test_fake.py::test_ok" in out
    assert "PASSED tests/kernel/test_fake.py::test_param[a::b]" in out
    assert "PASSED tests/test_host.py::test_on_host" in out
    assert "SKIPPED [1] tests/kernel/test_fake.py:10: in the guest: no reason" in out
    assert "FAILED tests/kernel/test_fake.py::test_broken" in out
    # The guest's report and captured output, under the test's name.
    assert "test_broken failed in the guest (kernel 0.0.0-fake): AssertionError: the guest" in out
    assert "output of test_broken" in out
    assert "kernel guest" in out and "boot to stage 2" in out


def test_plugin_runs_only_selected_tests_in_one_guest(tmp_path: Path, fake_qemu: Path) -> None:
    done = _plugin_run(tmp_path, fake_qemu, PYTEST_ADDOPTS="-k 'ok and not broken'")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 5 deselected" in done.stdout
    # test_broken did not run in the guest either: its pytest passed.
    assert "(exit status 0)" in done.stdout


def test_plugin_fails_every_kernel_test_when_the_guest_cannot_boot(
    tmp_path: Path, fake_qemu: Path
) -> None:
    done = _plugin_run(tmp_path, fake_qemu, FAKE_QEMU_MODE="noboot", PYNBD_VM_BOOT_TIMEOUT="1")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "5 failed, 1 passed" in out
    assert "skipped" not in out.splitlines()[-1]
    assert out.count("did not start the command within 1 s") >= 5


def test_plugin_fails_tests_the_guest_never_reported(tmp_path: Path, fake_qemu: Path) -> None:
    # The guest's pytest dies while collecting, before it writes any junit xml.
    crashing = "import os\nif os.environ.get('NBDVM'):\n    os._exit(3)\n" + GUEST_TESTS
    done = _plugin_run(tmp_path, fake_qemu, guest_tests=crashing)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "5 failed, 1 passed" in out
    assert "the guest reported no result for tests/kernel/test_fake.py::test_ok" in out
    assert "guest pytest exit status 3" in out
    assert "cannot read the guest's junit xml" in out
