"""The sans-IO core of NBD: wire records, the handshake and transmission state machines.

Nothing in this package does I/O: no sockets, ssl, asyncio, selectors or fcntl. Drivers
(:mod:`pynbd.client`, the server, the kernel handshake) feed it bytes and send what it
produces, so every protocol decision is made here, once.
"""
