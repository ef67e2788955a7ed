"""Kernel-interface tests that run on the host: the netlink codec, netlink sockets, ioctl errors."""
