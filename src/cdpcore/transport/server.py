"""server: the receiver's loop (`cdpctl serve`).

Theory of operation
-------------------
One trio task per connection. After the TLS handshake (bounded by a
timeout, so a peer that connects and says nothing costs one task for ten
seconds) the client certificate's CN names the source; the first frame
must be HELLO, and the vault opens that source's replica (binding it to
the journal's UUID on first use). From then on the connection is a
reader task applying frames in order, and a *committer* task:

* DATA is unpacked and applied to the replica at once (written, not yet
  fsynced); the ack is owed.
* The committer runs `replica.sync()` (fdatasync of what was written, the
  chunk index committed) at most every `commit_interval` (50 ms) or once
  `commit_bytes` are owed, whichever first, then sends one ACK per target.
  An ACK is the durable acknowledgement the sender may forget data on:
  grouping the fsyncs keeps a slow disk from capping a fast link while
  the sender's in-flight window keeps the pipe full meanwhile.
* Replica calls are synchronous file I/O; they run in the trio thread
  (short pwrites, an fdatasync per group) except `sync()`, which runs in a
  worker thread so that other sources' connections keep going during an
  fsync. A per-connection lock keeps the replica single-threaded.

One live connection per source: a new connection from a source replaces
the old one (the old is cancelled and its replica closed before the new
one opens it). The alternative, refusing the newcomer, would lock a source
out for the idle limit after every WAN cut the server did not notice (a
half-open TCP connection looks alive until keepalive gives up), and the
newcomer is what the source is really running. Nothing acknowledged is
lost by the replacement; what the old connection wrote but did not ack is
resent by the sender and recognised as a resend.

Keepalive: a PING when nothing was received for `ping_after` seconds, the
connection closed after `idle_limit` seconds of silence.

Any ProtocolError (malformed, oversized, out of order, a pack that does not
verify) is answered with an ERROR frame and the connection is closed; the
replica is written only by frames that verified completely (vault/replica
checks before it writes). SIGINT/SIGTERM: `serve()` is cancelled by the
CLI, every connection syncs what it holds (no ack needed: the sender will
resend) and the replicas are closed.
"""
from __future__ import annotations

import os
import ssl
import sys
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, TextIO

import trio

from cdpcore.codec import Decompressor, MissingRefs
from cdpcore.errors import AuthError, CdpError, KeyFileError, ProtocolError, VaultError
from cdpcore.point import format_us
from cdpcore.protocol import ServeConnection, State
from cdpcore.protocol import frames as F
from cdpcore.format import META_NAME
from cdpcore.replication import RECEIVER_STATE, now_us, read_state, write_state
from cdpcore.transport import tls
from cdpcore.transport.errors import first_cause
from cdpcore.vault import Vault

DEFAULT_COMMIT_INTERVAL = 0.05  # seconds between group commits (fsync + ACK) at most
DEFAULT_COMMIT_BYTES = 8 << 20  # ... or sooner once this much is written and not yet fsynced
DEFAULT_PING_AFTER = 10.0
DEFAULT_IDLE_LIMIT = 30.0
STATE_INTERVAL = 1.0  # seconds between writes of VAULT/NAME/state.json
RECEIVE_SIZE = 256 * 1024


@dataclass
class ServerConfig:
    """What `serve` needs besides the vault and the listening socket."""

    ssl_context: ssl.SSLContext
    revoked: frozenset[int] = frozenset()
    limits: F.Limits = field(default_factory=F.Limits)
    handshake_timeout: float = tls.DEFAULT_HANDSHAKE_TIMEOUT
    commit_interval: float = DEFAULT_COMMIT_INTERVAL
    commit_bytes: int = DEFAULT_COMMIT_BYTES
    ping_after: float = DEFAULT_PING_AFTER
    idle_limit: float = DEFAULT_IDLE_LIMIT
    log: TextIO | None = None  # one line per connection event; stderr by default
    inline_io: bool = False  # fsyncs in the trio thread (tests under MockClock; see shipper.py)


class _Stats:
    """What state.json reports for one source."""

    def __init__(self, source: str, peer: str, directory: str, last_seq: int) -> None:
        self.doc: dict[str, Any] = {
            "source": source, "peer": peer, "state": "connected", "connected_since": format_us(now_us()),
            "wire_bytes": 0, "raw_bytes": 0, "acks": 0, "dedupe_hits": 0, "last_seq": last_seq or None,
            "last_ts": None, "last_time": None, "last_error": None, "throughput": None}
        prev = read_state(os.path.join(directory, RECEIVER_STATE)) or {}
        if prev.get("last_seq") == self.doc["last_seq"]:  # the newest record's time, if still true
            self.doc.update(last_ts=prev.get("last_ts"), last_time=prev.get("last_time"))
        for k in ("wire_bytes", "raw_bytes", "acks", "dedupe_hits"):  # totals over connections
            if isinstance(prev.get(k), int):
                self.doc[k] = prev[k]
        self._wire0 = self.doc["wire_bytes"]
        self._t0 = time.monotonic()
        self._written = 0.0

    def due(self) -> bool:
        return time.monotonic() - self._written >= STATE_INTERVAL

    def write(self, directory: str) -> None:
        self._written = time.monotonic()
        elapsed = max(1e-3, time.monotonic() - self._t0)
        self.doc["throughput"] = round((self.doc["wire_bytes"] - self._wire0) / elapsed, 1)
        self.doc["updated"] = format_us(now_us())
        try:
            write_state(os.path.join(directory, RECEIVER_STATE), self.doc)
        except OSError:
            pass  # statistics must never stop replication


class Server:
    """The receiver: `await server.serve(listeners)` until cancelled."""

    def __init__(self, vault: Vault, config: ServerConfig) -> None:
        self.vault = vault
        self.config = config
        # source name -> (cancel scope, event set when that connection is fully closed)
        self._live: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self.connections = 0  # accepted so far (tests read it)

    def log(self, message: str) -> None:
        out = self.config.log if self.config.log is not None else sys.stderr
        print(f"serve: {format_us(now_us())} {message}", file=out, flush=True)

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on host:port (0: any free port, reported to nursery.start)."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        self.log(f"listening on {host}:{bound}")
        task_status.started(bound)
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, tcp: trio.abc.Stream) -> None:
        """One connection, start to end; never raises (a peer's fault must
        not end the server)."""
        self.connections += 1
        peer = _peer_name(tcp)
        stream = trio.SSLStream(tcp, self.config.ssl_context, server_side=True)
        try:
            try:
                await tls.handshake(stream, self.config.handshake_timeout, "the client")
            except AuthError as e:
                self.log(f"{peer}: refused: {e}")
                return
            except (trio.BrokenResourceError, trio.TooSlowError, OSError) as e:
                self.log(f"{peer}: TLS handshake failed: {_short(e)}")
                return
            await _Connection(self, stream, peer).run()
        except Exception as e:  # a bug here must not take down the other sources' connections
            self.log(f"{peer}: internal error: {type(e).__name__}: {e}")
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def claim(self, source: str) -> tuple[trio.CancelScope, trio.Event]:
        """Become the source's one live connection, replacing an older one
        (cancelled, and waited for until its replica is closed)."""
        while source in self._live:
            scope, done = self._live[source]
            self.log(f"{source}: a new connection replaces the previous one")
            scope.cancel()
            await done.wait()
        mine = (trio.CancelScope(), trio.Event())
        self._live[source] = mine
        return mine

    def release(self, source: str, mine: tuple[trio.CancelScope, trio.Event]) -> None:
        if self._live.get(source) is mine:
            del self._live[source]
        mine[1].set()


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2]  # type: ignore[union-attr]
        return f"{host}:{port}"
    except (AttributeError, OSError):
        return "peer"


def _short(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    text = str(e) or (str(cause) if cause else "") or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__


class _Connection:
    """One source's connection (module docstring)."""

    def __init__(self, server: Server, stream: trio.SSLStream[trio.abc.Stream], peer: str) -> None:
        self.server = server
        self.cfg = server.config
        self.stream = stream
        self.peer = peer
        # The protocol's books (state, targets, in-flight window, offers),
        # kept in step with the sender's: every frame in and out goes through it.
        self.conn = ServeConnection()
        self.send_lock = trio.Lock()
        self.replica_lock = trio.Lock()
        self.last_received = trio.current_time()
        self.owed = 0  # bytes applied and not yet fsynced
        self.owed_since: float | None = None
        self.wake_committer = trio.Event()
        self.ping_n = 0
        self.source = "?"
        self.replica: Any = None
        self.stats: _Stats | None = None
        self.decompressor: Decompressor | None = None  # made with the replica's dedupe key
        self.opened: set[int] = set()  # segments opened by SEGMENT or present in the position
        # Files with DATA not yet acknowledged in full: the only files an ACK
        # may name (the books forget a complete, acknowledged base file, and
        # a sync may still report it after its FILE frame set its mtime).
        self.file_high: dict[str, int] = {}
        self.bye = False

    async def sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.cfg.inline_io:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    async def send(self, frame: F.Frame) -> None:
        async with self.send_lock:
            # Booked in the order the bytes go out: the books must see what the peer sees.
            data = self.conn.send(frame)
            await self.stream.send_all(data)

    async def receive(self) -> list[F.Frame]:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise trio.BrokenResourceError("the peer closed the connection")
        self.last_received = trio.current_time()
        if self.stats is not None:
            self.stats.doc["wire_bytes"] += len(data)
        return self.conn.receive_data(data)

    async def refuse(self, e: CdpError, code: str) -> None:
        """Tell the peer why (an ERROR frame) before closing; best effort."""
        self.server.log(f"{self.source}@{self.peer}: closing: {code}: {e}")
        if self.stats is not None:
            self.stats.doc["last_error"] = f"{code}: {e}"
        with trio.move_on_after(2):
            try:
                await self.send(F.Error.about(e, code))
            except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
                pass

    async def hello(self) -> F.Hello | None:
        with trio.move_on_after(self.cfg.idle_limit):
            while True:
                frames = await self.receive()
                if frames:
                    if isinstance(frames[0], F.Error):
                        raise trio.BrokenResourceError(f"the sender reported {frames[0].code}: {frames[0].message}")
                    assert isinstance(frames[0], F.Hello)  # the books allow nothing else first
                    return frames[0]
        return None

    async def run(self) -> None:
        try:
            self.source = tls.peer_source(self.stream, self.cfg.revoked)
        except AuthError as e:
            # Read HELLO first so that the sender is waiting for a reply
            # and reads our ERROR (in TLS 1.3 it cannot have noticed yet).
            with trio.move_on_after(self.cfg.handshake_timeout):
                try:
                    await self.receive()
                except (trio.BrokenResourceError, ProtocolError):
                    return
            await self.refuse(e, "auth")
            return
        try:
            hello = await self.hello()
        except (ProtocolError) as e:
            await self.refuse(e, e.code)
            return
        except trio.BrokenResourceError as e:
            self.server.log(f"{self.source}@{self.peer}: lost before hello: {_short(e)}")
            return
        if hello is None:
            self.server.log(f"{self.source}@{self.peer}: no hello within {self.cfg.idle_limit:g} s")
            return
        mine = await self.server.claim(self.source)
        try:
            with mine[0]:
                await self.serve_source(hello)
        finally:
            self.server.release(self.source, mine)

    async def serve_source(self, hello: F.Hello) -> None:
        try:
            self.replica = self.server.vault.open_source(self.source, hello.uuid, hello.encrypted, hello.domain,
                                                         hello.key_id)
        except KeyFileError as e:
            await self.refuse(e, "key")
            return
        except VaultError as e:
            await self.refuse(e, "uuid" if "bound to journal" in str(e) else "storage")
            return
        except (CdpError, OSError) as e:
            await self.refuse(VaultError(f"cannot open the replica: {e}"), "storage")
            return
        self.stats = _Stats(self.source, self.peer, self.replica.dir, self.replica.last_seq())
        self.decompressor = Decompressor(self.cfg.limits.window_log, self.cfg.limits.body,
                                         chunk_key=self.replica.dedupe_key)
        self.server.log(f"{self.source}@{self.peer}: connected (agent {hello.agent!r}"
                        f"{', encrypted' if hello.encrypted else ''}"
                        f"{', domain ' + hello.domain if hello.domain else ''})")
        reason = "closed"
        try:
            position = F.Position._from_wire(self.replica.position())
            self.opened = {s.seg for s in position.segments}
            assert self.conn.version is not None
            await self.send(F.Welcome(version=self.conn.version, source=self.source,
                                      dedupe_key=self.replica.dedupe_key, position=position,
                                      limits=self.cfg.limits))
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.committer)
                    nursery.start_soon(self.keepalive)
                    await self.reader()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as eg:
                raise first_cause(eg) from None
            reason = "caught up (bye)"
        except ProtocolError as e:
            reason = f"protocol error: {e}"
            await self.refuse(e, e.code)
        except VaultError as e:
            reason = f"storage error: {e}"
            await self.refuse(e, "storage")
        except OSError as e:
            reason = f"storage error: {e}"
            await self.refuse(VaultError(f"replica write failed: {e.strerror or e}"), "storage")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            reason = f"connection lost: {_short(e)}"
        except trio.TooSlowError:
            reason = f"idle for {self.cfg.idle_limit:g} s"
        finally:
            with trio.CancelScope(shield=True):
                await self.close_replica(reason)

    async def close_replica(self, reason: str) -> None:
        async with self.replica_lock:
            try:
                await self.sync(self.replica.sync)
            except (CdpError, OSError) as e:
                reason += f"; final sync failed: {e}"
            try:
                self.replica.close()
            except (CdpError, OSError):
                pass
        if self.stats is not None:
            self.stats.doc["state"] = "disconnected"
            self.stats.doc["disconnected"] = format_us(now_us())
            if reason.startswith(("protocol", "storage", "connection", "idle")):
                self.stats.doc["last_error"] = reason
            self.stats.write(self.replica.dir)
        self.server.log(f"{self.source}@{self.peer}: disconnected: {reason}")

    # ---- the three tasks ------------------------------------------------------------

    async def reader(self) -> None:
        while not self.bye:
            for frame in await self.receive():
                await self.apply(frame)
                if self.bye:
                    break

    async def keepalive(self) -> None:
        while True:
            idle = trio.current_time() - self.last_received
            if idle >= self.cfg.idle_limit:
                raise trio.TooSlowError
            if idle >= self.cfg.ping_after:
                self.ping_n += 1
                await self.send(F.Ping(n=self.ping_n))
                await trio.sleep(min(self.cfg.ping_after, self.cfg.idle_limit - idle))
            else:
                await trio.sleep(min(self.cfg.ping_after, self.cfg.idle_limit) - idle)

    async def committer(self) -> None:
        while True:
            await self.wake_committer.wait()
            self.wake_committer = trio.Event()
            if self.owed_since is not None and self.owed < self.cfg.commit_bytes:
                wait = self.owed_since + self.cfg.commit_interval - trio.current_time()
                if wait > 0:
                    with trio.move_on_after(wait):
                        while self.owed < self.cfg.commit_bytes:
                            await self.wake_committer.wait()
                            self.wake_committer = trio.Event()
            await self.commit()

    async def commit(self) -> None:
        async with self.replica_lock:
            self.owed, self.owed_since = 0, None
            acks = await self.sync(self.replica.sync)
        await self.send_acks(acks)

    async def send_acks(self, acks: list[tuple[int | str, int, int | None]]) -> None:
        if self.conn.state is not State.OPEN:
            return  # after the sender's BYE nothing is in flight: nothing to acknowledge
        for target, size, last_seq in acks:
            if isinstance(target, int):
                if target in self.opened:
                    await self.send(F.Ack(seg=target, size=size, last_seq=last_seq))
            elif target in self.file_high:
                await self.send(F.Ack(file=target, size=size))
                if size >= self.file_high[target]:
                    del self.file_high[target]
        assert self.stats is not None
        self.stats.doc["acks"] += len(acks)
        if self.stats.due():
            self.stats.write(self.replica.dir)

    def owe(self, n: int) -> None:
        if self.owed_since is None:
            self.owed_since = trio.current_time()
        self.owed += n
        self.wake_committer.set()

    # ---- frames -----------------------------------------------------------------------

    async def apply(self, frame: F.Frame) -> None:
        r = self.replica
        assert self.stats is not None
        if isinstance(frame, F.Data):
            target = frame.seg if frame.seg is not None else frame.file
            assert self.decompressor is not None
            try:
                # zstd-ref reads the referenced chunks from the store (the
                # replica's resolver checks each against its id), and bases
                # named by place from the replica's complete bases
                body = self.decompressor.decompress(frame.codec, frame.body, frame.raw, frame.reset,
                                                    resolve=r.resolve, read_base=r.read_base)
            except MissingRefs as e:
                missing = e.ids
            else:
                async with self.replica_lock:
                    missing = r.apply_data(target, frame.off, frame.end, body, frame.first_seq, frame.last_seq,
                                           crcs=self.decompressor.crcs)
            if missing:
                for i in range(0, len(missing), self.cfg.limits.offer_ids):
                    await self.send(F.Need(seg=frame.seg, file=frame.file, off=frame.off,
                                           ids=tuple(missing[i:i + self.cfg.limits.offer_ids])))
                return
            self.stats.doc["raw_bytes"] += frame.end - frame.off
            if frame.file == META_NAME:
                # journal.json is replaced durably (write, fsync, rename) when
                # applied: acknowledged at once, no sync owed
                await self.send(F.Ack(file=META_NAME, size=frame.end))
                return
            if frame.file is not None:
                self.file_high[frame.file] = max(self.file_high.get(frame.file, 0), frame.end)
            if frame.last_seq is not None:
                self.stats.doc["last_seq"] = frame.last_seq
                self.stats.doc["last_ts"] = frame.last_ts
                self.stats.doc["last_time"] = format_us(frame.last_ts) if frame.last_ts else None
            self.owe(frame.end - frame.off)
        elif isinstance(frame, F.Offer):
            held = [r.index.has(cid) for cid in frame.ids]
            self.stats.doc["dedupe_hits"] += sum(held)
            await self.send(F.Have.of(frame.req, held))
        elif isinstance(frame, F.Segment):
            async with self.replica_lock:
                r.begin_segment(frame.seg, frame.header, frame.replace)
            self.opened.add(frame.seg)
            self.owe(0)
        elif isinstance(frame, F.Seal):
            # seal() syncs on its own; sync first so that what it makes
            # durable is acknowledged (a sync after it would find nothing).
            async with self.replica_lock:
                self.owed, self.owed_since = 0, None
                acks = await self.sync(r.sync)
                await self.sync(r.seal, frame.seg, frame.size)
            await self.send_acks(acks)
        elif isinstance(frame, F.File):
            async with self.replica_lock:
                r.file_entry(frame.file, frame.size, frame.mode, frame.mtime_us, frame.kind, frame.target)
            self.owe(0)
        elif isinstance(frame, F.Base):
            # base_complete() fsyncs and renames the tree: sync first, as for
            # SEAL, so that the base files' bytes are acknowledged
            async with self.replica_lock:
                self.owed, self.owed_since = 0, None
                acks = await self.sync(r.sync)
                await self.sync(r.base_complete, frame.name)
            await self.send_acks(acks)
        elif isinstance(frame, F.Prune):
            async with self.replica_lock:
                await self.sync(r.prune, [list(s) for s in frame.segments], list(frame.bases))
            self.opened = {s.seg for s in frame.segments}
            self.owe(0)
        elif isinstance(frame, F.Ping):
            await self.send(F.Pong(n=frame.n))
        elif isinstance(frame, F.Pong):
            pass
        elif isinstance(frame, F.Bye):
            await self.commit()  # durable before we say so (nothing left to ack: the books checked)
            await self.send(F.Bye())
            self.bye = True
        elif isinstance(frame, F.Error):
            raise trio.BrokenResourceError(f"the sender reported {frame.code}: {frame.message}")
        else:
            raise ProtocolError(f"{frame.T} frame is not expected from a sender")


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT ([v6]:PORT too) -> (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid address {text!r}: expected HOST:PORT (e.g. 0.0.0.0:7443)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)
