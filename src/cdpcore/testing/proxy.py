"""LinkProxy: a TCP proxy that sends every connection through an emulated link.

For end-to-end tests and demos that run real programs (``cdpctl ship`` to
``cdpctl serve``): point the client at the proxy's port instead of the
server's. Each accepted connection gets its own connection to the target
and its own emulated link (`memory_link_pair`), with four relay tasks:
client -> link -> target and target -> link -> client. Drops follow the
links' schedule per connection (byte counts and times start afresh;
connection ``i``, counted from 0, uses ``seed + i`` so that random drops
differ between connections yet repeat between runs). A cut resets both
sockets (RST), so client and target see ECONNRESET as they would on a
real reset.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import TracebackType

import trio

from cdpcore.testing.link import Link
from cdpcore.testing.stream import _relay_in, _relay_out, memory_link_pair, reset_stream


@dataclass
class ProxiedConnection:
    """Counters of one proxied connection (bytes delivered each way)."""

    index: int
    bytes_up: int = 0  # delivered to the target
    bytes_down: int = 0  # delivered to the client
    closed: bool = False


class LinkProxy:
    """Listen on ``host:port`` (0 = any free port) and forward to
    ``target_host:target_port`` through `up` (client -> target) and `down`
    (target -> client; default: the same parameters as `up`).

    Use it as ``async with LinkProxy(...) as port:`` or run
    ``port = await nursery.start(proxy.run)``.
    """

    def __init__(self, target_host: str, target_port: int, up: Link, down: Link | None = None, *,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.up = up
        self.down = down if down is not None else up
        self.host = host
        self.port = port
        self.connections: list[ProxiedConnection] = []
        self._nursery: trio.Nursery | None = None
        self._nursery_manager: object = None

    @property
    def bytes_up(self) -> int:
        return sum(c.bytes_up for c in self.connections)

    @property
    def bytes_down(self) -> int:
        return sum(c.bytes_down for c in self.connections)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the bound port to `nursery.start`."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def __aenter__(self) -> int:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()  # type: ignore[attr-defined]
        try:
            return await self._nursery.start(self.run)
        except BaseException as e:
            await self._nursery_manager.__aexit__(type(e), e, e.__traceback__)  # type: ignore[attr-defined]
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return await self._nursery_manager.__aexit__(exc_type, exc, tb)  # type: ignore[attr-defined]

    async def _handle(self, client: trio.SocketStream) -> None:
        stats = ProxiedConnection(len(self.connections))
        self.connections.append(stats)
        try:
            target = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            await reset_stream(client)  # as a refused connection looks through a real router
            stats.closed = True
            return
        up = dataclasses.replace(self.up, seed=self.up.seed + stats.index)
        down = dataclasses.replace(self.down, seed=self.down.seed + stats.index)
        client_end, target_end = memory_link_pair(up, down)

        def count_up(n: int) -> None:
            stats.bytes_up += n

        def count_down(n: int) -> None:
            stats.bytes_down += n

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_relay_in, client, client_end)
                nursery.start_soon(_relay_out, target_end, target, count_up)
                nursery.start_soon(_relay_in, target, target_end)
                nursery.start_soon(_relay_out, client_end, client, count_down)
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
                await target.aclose()
            stats.closed = True
