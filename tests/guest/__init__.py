"""The kernel test guest: run a command in qemu booting Debian's own kernel.

The machines pynbd is developed and tested on run a kernel without the nbd driver (and
without module support), so ``/dev/nbdX`` cannot exist on the host. This package boots
the kernel of Debian's ``linux-image-amd64`` in qemu and runs a command in it:

- the kernel package is fetched with ``apt-get download`` and unpacked with ``dpkg -x``
  into a cache (``$PYNBD_VM_CACHE``, else ``$XDG_CACHE_HOME/pynbd/kernel``, else
  ``~/.cache/pynbd/kernel``), one folder per kernel version; nothing is installed;
- a small initramfs (static busybox, the two scripts ``init`` and ``stage2`` next to
  this file, and the virtio, 9p and overlay modules with their dependencies) is built
  next to it;
- qemu runs with TCG (``-machine q35,accel=tcg -cpu max``). Never KVM: /dev/kvm on
  these machines is PVM, under which a stock kernel hangs rather than failing;
- the guest mounts the host's ``/`` read-only over 9p under a tmpfs overlay, so the
  host's Python, the checkout and every installed program work at the same paths, and
  the guest may write anywhere without touching the host;
- the command runs as root in the given directory, with ``NBDVM=1`` set, its output on
  the virtio console (our stdout), under a timeout; then the guest powers off. A second,
  outer timeout on the host kills qemu if the guest does not boot or power off in time.

The guest has its own network stack: servers a kernel test needs run inside the guest on
127.0.0.1. Guest CPU work is many times slower than the host's (TCG emulates every
instruction): keep it small. qemu boots the ELF kernel, extracted once from the
package's bzImage, by its PVH entry (the bzImage's own decompressor would take seconds
more under TCG); each Python start in the guest takes a few seconds, a pytest start
more.

Debian packages needed on the host: ``qemu-system-x86 busybox-static kmod`` (and
``apt`` and ``dpkg`` to fetch the kernel the first time); the kernel tests also use
``nbdkit nbd-client e2fsprogs util-linux fio`` inside the guest. ``.ci/run`` installs
them all; a missing one is reported by name.

It is test infrastructure, not part of the pynbd package: it imports nothing of pynbd
and runs from the checkout. By hand, from the checkout's root (``.venv/bin/python`` is
the interpreter ``.ci/run`` builds; any Python 3.11+ will do)::

    sudo apt-get update                  # once, so that apt knows linux-image-amd64
    .venv/bin/python -m tests.guest --prepare   # fetch the kernel, build the initramfs
    .venv/bin/python -m tests.guest -v -- sh -c 'modprobe nbd && ls -l /dev/nbd0'
    .venv/bin/python -m tests.guest -v --timeout 300 -- \\
        .venv/bin/python -m pytest -p no:cacheprovider tests/kernel   # tests, by hand
    scripts/test tests/kernel            # the usual way: one guest, results reported here

``python -m tests.guest [OPTIONS] -- CMD...`` exits with CMD's exit status, or 125 when
the guest could not be prepared, booted, or did not report a status (the reason, with
the guest's console log, goes to stderr); ``--help`` lists the options. Give the
interpreter by its path: a pyenv shim works in the guest, but slowly.

The soak of the kernel path (not part of CI) boots a guest the same way and runs
:mod:`tests.kernel.soak` in it: attach/IO/detach cycles, netlink and ioctl in turn, then
server SIGKILLs in the middle of writes under ``pynbd attach --persist``, each restart
followed by a checksum of every acknowledged write, ``e2fsck -fn`` at the end and the
kernel log read throughout. It prints its figures and exits 0 only when every check
passed (125: the guest could not run it). The full soak takes tens of minutes under TCG;
run it in the background, niced::

    nice -n 10 .venv/bin/python -m tests.kernel.soak > soak.log 2>&1 &   # 200 cycles, 50 kills
    .venv/bin/python -m tests.kernel.soak --cycles 20 --kills 5 --seed 2   # a shorter one

The modules, in the order a run uses them:

- :mod:`~tests.guest.host`: the error every step raises; the host programs, found by
  name with their Debian package;
- :mod:`~tests.guest.fetch`: the kernel package, fetched and unpacked in the cache;
- :mod:`~tests.guest.kernel`: the PVH-bootable ELF kernel extracted from the bzImage;
- :mod:`~tests.guest.cpio` and :mod:`~tests.guest.initrd`: the initramfs;
- :mod:`~tests.guest.boot`: :func:`~tests.guest.boot.prepare`, all of the above, giving
  a :class:`~tests.guest.boot.Guest`;
- :mod:`~tests.guest.qemu`: :func:`~tests.guest.qemu.run` boots a guest and runs one
  command in it;
- :mod:`~tests.guest.junit` and :mod:`~tests.guest.bridge`: pytest in the guest, its
  junit xml read back, and the proxies that make the host's pytest report each kernel
  test (``tests/kernel/conftest.py`` uses them);
- :mod:`~tests.guest.cli`: ``python -m tests.guest``.
"""
