"""One test body for both clients: the blocking Client and the asyncio AsyncClient.

The ``api`` fixtures of tests/interop and tests/hostile are a :class:`Driver`,
parametrized ``"sync"`` (:class:`pynbd.Client`) and ``"async"``
(:class:`pynbd.AsyncClient` on an event loop that keeps running in a thread, as an
application's would). A test is written once, in blocking style::

    c = api.connect(uri)           # a Handle
    assert c.pread(512, 0) == data  # blocks for either client, raises what it raised

Every call is guarded: a call still running after :data:`HANG_LIMIT` seconds fails the
test instead of blocking the run (the blocking client's calls run in a thread of their
own for this). The limit only catches a client that hangs; whatever a test expects of
the time a call takes, it states with the call's own ``timeout``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import pytest

from pynbd import AsyncClient, Client, connect_multi, connect_multi_async
from pynbd.proto.handshake import Negotiated

__all__ = ["HANG_LIMIT", "KINDS", "AsyncDriver", "Driver", "Handle", "SyncDriver", "driving"]

T = TypeVar("T")

#: A call still running after this many seconds has hung. Far above any client timeout
#: the tests use, so that a loaded host never reaches it; below pytest's timeout.
HANG_LIMIT = 90.0

#: The ``api`` fixtures' parameters.
KINDS = ["sync", "async"]


class Handle:
    """A connected client of either kind, used in blocking style.

    Attributes come from the client; its methods are run by the driver (a coroutine
    method on the driver's loop), which returns their result or raises their exception.
    """

    def __init__(self, driver: Driver, client: Any) -> None:
        self.driver = driver
        self.client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not inspect.ismethod(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.driver.call(attr, *args, **kwargs)

        return call

    def many(self, method: str, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Call ``method(*args)`` for each tuple: concurrently on one connection for
        the asyncio client (so the requests pipeline), one after another for the
        blocking one. Returns the results in order."""
        fn = getattr(self.client, method)
        if inspect.iscoroutinefunction(fn):

            async def gather() -> list[Any]:
                return list(await asyncio.gather(*(fn(*args) for args in calls)))

            result: list[Any] = self.driver.run(gather())
            return result
        return [self.driver.call(fn, *args) for args in calls]


class Driver:
    """Connects clients of one kind, runs their calls, closes them at :meth:`shutdown`.

    Keyword arguments given to the constructor are defaults for every connect (for
    example ``timeout``).
    """

    kind = ""

    def __init__(self, **defaults: Any) -> None:
        self.defaults = defaults
        self.handles: list[Handle] = []

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, guarded; a coroutine it returns is run to its end."""
        raise NotImplementedError

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of the asyncio client (the async driver only)."""
        coro.close()
        raise TypeError(f"the {self.kind} driver runs no coroutines")

    def connect(self, uri: str, **kwargs: Any) -> Handle:
        """A connected client (arguments as for :class:`pynbd.Client`)."""
        raise NotImplementedError

    def connect_multi(self, uri: str, connections: int, **kwargs: Any) -> list[Handle]:
        """``connect_multi`` or ``connect_multi_async``."""
        raise NotImplementedError

    def negotiate(self, uri: str, **kwargs: Any) -> Negotiated:
        """``Client.negotiate`` or ``AsyncClient.negotiate``."""
        raise NotImplementedError

    def _keep(self, clients: Sequence[Any]) -> list[Handle]:
        handles = [Handle(self, c) for c in clients]
        self.handles += handles
        return handles

    def shutdown(self) -> None:
        for handle in self.handles:
            # A client that fails to close is its test's business, not teardown's.
            with contextlib.suppress(Exception):
                handle.close()


class SyncDriver(Driver):
    """Each call runs in a thread of its own, joined with :data:`HANG_LIMIT`."""

    kind = "sync"

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:
                box["error"] = exc

        worker = threading.Thread(target=target, name="client-call", daemon=True)
        worker.start()
        worker.join(HANG_LIMIT)
        if worker.is_alive():
            pytest.fail(f"{getattr(fn, '__name__', fn)} hung for {HANG_LIMIT} s")
        if "error" in box:
            raise box["error"]
        result: T = box["value"]
        return result

    def connect(self, uri: str, **kwargs: Any) -> Handle:
        return self._keep([self.call(Client, uri, **{**self.defaults, **kwargs})])[0]

    def connect_multi(self, uri: str, connections: int, **kwargs: Any) -> list[Handle]:
        clients = self.call(connect_multi, uri, connections, **{**self.defaults, **kwargs})
        return self._keep(clients)

    def negotiate(self, uri: str, **kwargs: Any) -> Negotiated:
        negotiated: Negotiated = self.call(Client.negotiate, uri, **{**self.defaults, **kwargs})
        return negotiated


class AsyncDriver(Driver):
    """An event loop running in a thread; calls are submitted to it.

    (A loop that ran only inside each call would leave a transport's close half done
    between calls, and a server could not see the client close its socket.)
    """

    kind = "async"

    def __init__(self, **defaults: Any) -> None:
        super().__init__(**defaults)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="loop", daemon=True)
        self.thread.start()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        return self.run(result) if inspect.iscoroutine(result) else result

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        # Not future.result(timeout): its TimeoutError would also catch NBDTimeout.
        done, _ = concurrent.futures.wait([future], HANG_LIMIT)
        if not done:
            future.cancel()
            pytest.fail(f"{coro.__qualname__} hung for {HANG_LIMIT} s")
        return future.result()

    def connect(self, uri: str, **kwargs: Any) -> Handle:
        client = self.run(AsyncClient.connect(uri, **{**self.defaults, **kwargs}))
        return self._keep([client])[0]

    def connect_multi(self, uri: str, connections: int, **kwargs: Any) -> list[Handle]:
        coro = connect_multi_async(uri, connections, **{**self.defaults, **kwargs})
        return self._keep(self.run(coro))

    def negotiate(self, uri: str, **kwargs: Any) -> Negotiated:
        return self.run(AsyncClient.negotiate(uri, **{**self.defaults, **kwargs}))

    async def _until_closed(self, limit: float = 5.0) -> None:
        # AsyncClient.close() returns before a TLS transport has finished closing (its
        # close_notify exchange needs the loop): wait for connection_lost, which the
        # protocol records in hs_eof, so that stopping the loop leaks no socket.
        protos = [getattr(h.client, "_proto", None) for h in self.handles]
        deadline = self.loop.time() + limit
        while self.loop.time() < deadline:
            if all(p is None or getattr(p, "hs_eof", True) for p in protos):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)

    def shutdown(self) -> None:
        try:
            super().shutdown()
            self.run(self._until_closed())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5.0)
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


@contextlib.contextmanager
def driving(kind: str, **defaults: Any) -> Iterator[Driver]:
    """A driver of ``kind`` (one of :data:`KINDS`), shut down on exit: its clients are
    closed and its loop stopped. ``defaults`` are connect arguments for every client."""
    driver: Driver = SyncDriver(**defaults) if kind == "sync" else AsyncDriver(**defaults)
    try:
        yield driver
    finally:
        driver.shutdown()
