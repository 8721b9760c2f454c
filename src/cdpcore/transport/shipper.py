"""shipper: the sender's loop (`cdpctl ship`).

Theory of operation
-------------------
`Shipper.run()` connects, runs one *session* until it ends, and on any
network failure reconnects after a backoff delay (transport/rate.py) and
starts a new session from the position the receiver's WELCOME carries:
the receiver's durable position is the only truth about what it holds, so
resuming from it ships nothing twice that matters (a resend of bytes it
holds is recognised as such) and loses nothing (only ACKed bytes are
durable, and the feed re-plans from them).

A session has three tasks:

* the *writer* takes feed items in order, packs runs (record-aware chunks,
  packing.py), sends one OFFER per pack with the chunk ids it does not
  know the vault holds, and goes on packing the next items while the HAVE
  is on its way (up to the receiver's `offers` limit); each pack's DATA is
  sent, in order, once its HAVE is in. DATA bodies go through the
  connection's streamed compressor (codec.py) and the token bucket
  (``--rate``), and only while the unacknowledged DATA bytes stay within
  the receiver's `inflight` limit. That wait runs in a background task,
  one frame deep, so the writer packs and compresses the next frame
  meanwhile (otherwise the link idles for every frame's CPU work).
* the *reader* handles HAVE, ACK (the vault's durable acknowledgement:
  the acked position, lag and throughput follow from these), NEED (chunks
  the vault lost meanwhile: that frame is re-encoded with them as
  literals and resent), PING/PONG, ERROR and BYE.
* the *watchdog* sends PING when the link has been quiet and ends the
  session when nothing at all arrived for the idle limit (a dead peer
  behind a WAN cut sends no reset).

Without ``follow`` the session ends, once everything present at the start
(and since) is acknowledged, with BYE both ways; with ``follow`` the
writer polls the feed every 50 ms until `stop()` (SIGINT/SIGTERM), then
waits briefly for outstanding ACKs and says BYE.

Errors that retrying cannot fix end the run at once: a refused certificate
(AuthError), a journal UUID the vault binds to another source (VaultError),
a protocol error from either side (ProtocolError). Network failures are
retried; without ``follow`` `give_up` seconds without progress end the run
with LinkError.
"""
from __future__ import annotations

import fcntl
import os
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from cdpcore import packing
from cdpcore.codec import LADDER, AdaptiveLevel, BaseAt, Compressed, Compressor
from cdpcore.crypto import Keys, key_id
from cdpcore.errors import AuthError, CdpError, KeyFileError, LinkError, ProtocolError, ShipRunning, VaultError
from cdpcore.offers import OfferPolicy
from cdpcore.feed import BaseItem, EntryItem, Feed, FileItem, Item, Position, PruneItem, RunItem, SealItem, SegmentItem
from cdpcore.point import format_us
from cdpcore.protocol import ShipConnection
from cdpcore.protocol import frames as F
from cdpcore.replication import SENDER_STATE, now_us, read_state, write_state
from cdpcore.transport import tls
from cdpcore.transport.errors import first_cause
from cdpcore.transport.rate import Backoff, TokenBucket
from cdpcore.versions import Versions

DEFAULT_CPU_LIMIT = 0.25  # of one core: `cdpctl ship`'s default (the Python API's is none)
CPU_BURST = 2.0  # seconds of --cpu-limit a sender may use at once after idling
# The CPU bucket refills at this share of --cpu-limit. A piece of work's
# CPU is known only once it ran: the last piece before a pause or the end
# is charged late or never, and credit refills during network waits; at a
# 25 % limit the HIS catch-up measured 25.2 % over the 7.7 s the link was
# busy (benchmarks.md §9). The limit is a ceiling, so the pace aims under it.
CPU_HEADROOM = 0.95
SHIP_LOCK = "ship.lock"  # in the journal directory; never replicated (the feed names what it ships)
DEFAULT_GIVE_UP = 300.0  # seconds without progress before `ship` (without --follow) fails
DEFAULT_CONNECT_TIMEOUT = 15.0
DEFAULT_PING_AFTER = 10.0
DEFAULT_IDLE_LIMIT = 30.0
POLL_INTERVAL = 0.05  # --follow: how often the feed is asked for news
STATE_INTERVAL = 1.0
STOP_GRACE = 10.0  # seconds a stopping sender waits for outstanding ACKs
KNOWN_IDS_CAP = 1 << 20  # chunk ids remembered per connection (32 MiB of ids at most)
RECEIVE_SIZE = 256 * 1024
AGENT = "cdpcore ship"

StreamOpener = Callable[[], Awaitable[trio.abc.Stream]]


class _Fatal(Exception):
    """Wraps an error that reconnecting cannot fix."""

    def __init__(self, error: CdpError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class ShipResult:
    acked_seq: int
    wire_bytes: int
    raw_bytes: int
    connections: int
    state: str


@dataclass
class _Pending:
    """One item on its way: its frame(s) are sent in order."""

    item: Item
    pack: packing.Pack | None = None
    req: int | None = None
    offered: tuple[bytes, ...] = ()
    keys: dict[bytes, Any] = field(default_factory=dict)  # OfferPolicy.choose's file of each chunk
    have: trio.Event | None = None
    held: set[bytes] = field(default_factory=set)


@dataclass
class _Unacked:
    target: int | str
    off: int
    end: int
    wire: int
    last_seq: int | None
    last_ts: int | None
    pack: packing.Pack
    item: RunItem | FileItem
    refs: bool = True  # the frame references chunks: the receiver may answer it with NEED


class Shipper:
    def __init__(self, journal: str | os.PathLike[str], host: str, port: int,
                 ssl_context: ssl.SSLContext, *, rate: float | None = None, follow: bool = False,
                 keys: Keys | None = None, domain: str | None = None, give_up: float = DEFAULT_GIVE_UP,
                 open_stream: StreamOpener | None = None, backoff: Backoff | None = None,
                 ping_after: float = DEFAULT_PING_AFTER, idle_limit: float = DEFAULT_IDLE_LIMIT,
                 state_file: bool = True, log: Callable[[str], None] | None = None,
                 inline_io: bool = False, server_name: str | None = None,
                 cpu_limit: float | None = None) -> None:
        self.journal = os.path.abspath(os.fspath(journal))
        self.host, self.port = host, port
        # HOST:PORT as the operator writes it ([v6]:PORT)
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # the name the server's certificate must carry: --to's host unless
        # --server-name (a DR site reached by an address its certificate lacks)
        self.server_name = server_name or host
        self.ssl_context = ssl_context
        self.follow = follow
        self.keys = keys
        self.domain = domain
        self.give_up = give_up
        self.bucket = TokenBucket(rate)
        self.backoff = backoff or Backoff()
        self.ping_after, self.idle_limit = ping_after, idle_limit
        self._open_stream = open_stream
        # Tests under trio's MockClock run file work and compression inline:
        # a task waiting on a worker thread counts as idle there, and the
        # clock would jump to the next timeout meanwhile.
        self.inline_io = inline_io
        self._log = log
        self.state_file = state_file
        self.feed = Feed(self.journal)
        self.level = AdaptiveLevel()
        # cpu_limit (of one core, None: none): the sender's CPU is paced to
        # it like its bytes to --rate, and the level is chosen within it. On
        # a hospital's database server the sender must not take the CPU the
        # database needs, even while it catches up after an outage.
        if cpu_limit is not None:
            if not 0 < cpu_limit <= 64:
                raise ValueError(f"cpu limit {cpu_limit!r} outside (0, 64] cores")
            self.level.cpu_budget = cpu_limit
        # empty at the start: a catch-up from the start stays at the limit;
        # the burst is for work after idling (a --follow sender's next batch)
        self.cpu = TokenBucket(None if cpu_limit is None else cpu_limit * CPU_HEADROOM,
                               burst=None if cpu_limit is None else CPU_BURST * cpu_limit, full=False)
        self._cpu_mark: float | None = None
        # which files' chunks are worth an OFFER, learned from HAVEs (kept across connections)
        self.policy = OfferPolicy()
        self._stop = trio.Event()
        self.stats: dict[str, Any] = {
            "target": self.target, "source": None, "state": "starting", "acked_seq": 0,
            "acked_ts": None, "acked_time": None, "acked_segments": {}, "wire_bytes": 0, "raw_bytes": 0,
            "dedupe_hits": 0, "dedupe_bytes": 0, "base_hits": 0, "base_bytes": 0, "connections": 0,
            "last_error": None, "level": None,
            "codec": None, "throughput": None, "lag_bytes": None, "lag_seconds": None, "pid": os.getpid()}
        self._acked = Position()  # the receiver's durable position as we know it
        prev = read_state(os.path.join(self.journal, SENDER_STATE))
        if prev and prev.get("target") == self.stats["target"] and isinstance(prev.get("acked_seq"), int):
            # acks are durable: what the vault acknowledged before still holds
            for k in ("acked_seq", "acked_ts", "acked_time"):
                self.stats[k] = prev.get(k)
        self._state_written = -1e9
        self._progress = time.monotonic()

    # ---- public ------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish cleanly: no new items, wait for outstanding ACKs, BYE."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """stop() was called."""
        return self._stop.is_set()

    async def wait_stop(self) -> None:
        """Return once stop() is called."""
        await self._stop.wait()

    async def run(self) -> ShipResult:
        """Ship until caught up (or, with follow, until stop()); raises
        AuthError, VaultError, ProtocolError, KeyFileError, LinkError, or
        ShipRunning when another Shipper ships this journal."""
        lock = self._lock()
        try:
            while True:
                try:
                    done = await self._session()
                except _Fatal as e:
                    self._set(state="failed", last_error=str(e.error))
                    raise e.error from None
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                        LinkError) as e:
                    self._set(state="backoff", last_error=_describe(e))
                    self.log(f"connection lost: {_describe(e)}")
                except CdpError as e:  # the journal itself (damage found by the feed, ...)
                    self._set(state="failed", last_error=str(e))
                    raise
                else:
                    if done:
                        self._set(state="stopped" if self.follow or self.stopping else "caught-up")
                        return ShipResult(int(self.stats["acked_seq"]), self.stats["wire_bytes"],
                                          self.stats["raw_bytes"], self.stats["connections"], self.stats["state"])
                if self._stop.is_set():
                    self._set(state="stopped")
                    return ShipResult(int(self.stats["acked_seq"]), self.stats["wire_bytes"],
                                      self.stats["raw_bytes"], self.stats["connections"], "stopped")
                if not self.follow and time.monotonic() - self._progress > self.give_up:
                    err = LinkError(f"no progress for {self.give_up:g} s shipping to {self.target}: "
                                    f"{self.stats['last_error']}")
                    self._set(state="failed", last_error=str(err))
                    raise err
                delay = self.backoff.failed(trio.current_time())
                self.log(f"reconnecting in {delay:.1f} s")
                with trio.move_on_after(delay):
                    await self._stop.wait()
        finally:
            if lock is not None:
                self._write_state(force=True)  # the state file is the lock holder's
                os.close(lock)
            self.feed.close()

    def _lock(self) -> int | None:
        """Hold JOURNAL/ship.lock (flock) for the run, so that a second
        sender fails at once instead of fighting the first for the vault's
        one connection per source. None when the journal directory is
        read-only (nothing to lock, and no state file either)."""
        path = os.path.join(self.journal, SHIP_LOCK)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            self.state_file = False
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            finally:
                os.close(fd)
            raise ShipRunning(f"{self.journal}: another ship of this journal is running (pid {pid}, "
                              f"holding {SHIP_LOCK})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    # ---- helpers ----------------------------------------------------------------------

    async def sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work (file reads, packing, compression) off the trio
        thread, once the CPU spent since the last call is paid for."""
        await self.pace_cpu()
        if self.inline_io:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    async def pace_cpu(self) -> None:
        """Charge the process CPU used since the last call (every thread:
        packing and compression run in workers) to the CPU bucket, waiting
        first if it is in debt. Start-up (imports, certificates) is not
        charged: nothing can be saved there by waiting."""
        if self.cpu.rate is None:
            return
        now = time.process_time()
        used = 0.0 if self._cpu_mark is None else now - self._cpu_mark
        self._cpu_mark = now  # before the wait: tasks calling at once charge each second once
        await self.cpu.take(used)

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    def _set(self, **kw: Any) -> None:
        self.stats.update(kw)
        self._write_state(force=True)

    def _write_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.state_file or (not force and now - self._state_written < STATE_INTERVAL):
            return
        self._state_written = now
        try:
            nbytes, oldest = self.feed.backlog(self._acked)
        except (CdpError, OSError):
            nbytes, oldest = None, None
        wire, raw = self.stats["wire_bytes"], self.stats["raw_bytes"]
        self.stats.update(
            lag_bytes=nbytes,
            lag_seconds=None if nbytes is None else (0.0 if not nbytes or oldest is None
                                                     else round(max(0.0, (now_us() - oldest) / 1e6), 3)),
            compression_ratio=round(raw / wire, 3) if wire else None,
            acked_segments={str(k): v[1] for k, v in self._acked.segments.items()},
            updated=format_us(now_us()))
        try:
            write_state(os.path.join(self.journal, SENDER_STATE), self.stats)
        except OSError:
            pass  # statistics never stop replication (a read-only journal still ships)

    async def _connect(self) -> trio.SSLStream[trio.abc.Stream]:
        with trio.fail_after(DEFAULT_CONNECT_TIMEOUT):
            if self._open_stream is not None:
                raw = await self._open_stream()
            else:
                raw = await trio.open_tcp_stream(self.host, self.port)
        stream = trio.SSLStream(raw, self.ssl_context, server_hostname=self.server_name)
        try:
            await tls.handshake(stream, tls.DEFAULT_HANDSHAKE_TIMEOUT, "the server")
        except AuthError as e:
            await trio.aclose_forcefully(stream)
            raise _Fatal(e) from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _session(self) -> bool:
        self._set(state="connecting")
        stream = await self._connect()
        try:
            session = _Session(self, stream)
            return await session.run()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)


def _describe(e: BaseException) -> str:
    """One line for a failure: the first non-empty message along the chain;
    a task group (a nursery's, or the cause trio chains to a failed
    connect) is replaced by the leaf that explains it, never printed as
    "Exceptions from Trio nursery"."""
    seen: BaseException | None = e
    visited: set[int] = set()  # a leaf's context can be its own group: a cycle
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, BaseExceptionGroup):
            seen = first_cause(seen)
            visited.add(id(seen))
            if isinstance(e, BaseExceptionGroup):
                e = seen  # name the leaf, not the group, if nothing has a message
        text = str(seen)
        if text:
            return text.splitlines()[0]
        seen = seen.__cause__ or seen.__context__
    return type(e).__name__


def _codec(ladder_codec: str, encrypted: bool) -> str:
    """The DATA codec for a ladder rung: zstd rungs use zstd-ref (the vault's
    chunks as a dictionary); encrypted bodies are compressed per chunk
    before sealing, so the frame's codec is none."""
    if encrypted:
        return "none"
    return "zstd-ref" if ladder_codec == "zstd" else ladder_codec


def _timed_compress(compressor: Compressor, body: bytes, prefix: tuple[bytes, bytes] | None,
                    new_ids: list[bytes] | None, records: bool = False,
                    bases: list[tuple[bytes | BaseAt, bytes]] | None = None) -> tuple[Compressed, float]:
    """Compress one body and measure the CPU it cost, in the thread that
    does the work: the compression runs in a worker thread, and the trio
    thread's own CPU clock, read around the await, sees almost none of it.
    AdaptiveLevel fed that near-zero would take every rung for nearly free
    and climb to zstd-19 on a slow link (measured: 0.27 CPU-s per MB, 40 %
    of a core, for 6 % fewer wire bytes than zstd-3 on the PACS tree)."""
    t0 = time.thread_time()
    if compressor.codec == "zstd-ref":
        assert prefix is not None
        comp = compressor.compress(body, prefix=prefix, new_ids=new_ids, records=records, bases=bases)
    else:
        comp = compressor.compress(body)
    return comp, time.thread_time() - t0


def _crc(header: bytes) -> int:
    return int.from_bytes(header[60:64], "little")


class _Session:
    """One connection's work (module docstring)."""

    def __init__(self, shipper: Shipper, stream: trio.SSLStream[trio.abc.Stream]) -> None:
        self.s = shipper
        self.stream = stream
        # The protocol's books (state, targets, in-flight window, offers),
        # kept in step with the receiver's: every frame in and out goes through it.
        self.conn = ShipConnection()
        self.send_lock = trio.Lock()
        self.compressor: Compressor | None = None
        self.limits = F.Limits()
        self.key: bytes | None = None
        self.known: set[bytes] = set()
        self.versions: Versions | None = None  # zstd-ref's base chunks (unencrypted sources)
        self.complete_bases: set[str] = set()
        self.offers: dict[int, _Pending] = {}
        self.next_req = 1
        self.unacked: deque[_Unacked] = deque()
        self.acked_changed = trio.Event()
        self.bye = trio.Event()
        self.last_received = trio.current_time()
        self.last_sent = trio.current_time()
        self.ping_n = 0
        self.seg_crc: dict[int, int] = {}
        self.ack_clock: tuple[float, int, float] | None = None  # (time, wire bytes acked, blocked) at the last sample
        # Seconds the writer spent waiting for the link (socket send, in-flight
        # window, --rate): ACK throughput measures the link only when the
        # sender was link-bound. While CPU-bound (packing, compressing), the
        # ACK rate is the sender's own speed; fed to AdaptiveLevel it would
        # read as a slow link and pick stronger, slower levels, a spiral.
        self.blocked = 0.0
        self.wire_acked = 0
        # process CPU time at the end of the last frame's compression: what
        # the sender spends besides compressing, per byte, is part of the
        # CPU budget the level must respect (AdaptiveLevel.observe_overhead)
        self.cpu_mark: float | None = None
        # The DATA frame handed to the background sender (send_data) and not
        # yet on the wire: set once it is. Compressing the next frame
        # overlaps with this one's wait for the window, the token bucket
        # and the socket; every other send waits for it first (flush), so
        # frames still go out in the order they were made.
        self.on_wire: trio.Event | None = None
        self.nursery: trio.Nursery | None = None
        # OFFERs handed to background senders and not yet encoded (prepare)
        self.offers_queued = 0

    # ---- I/O ------------------------------------------------------------------------------

    async def send(self, frame: F.Frame, paced: bool = False,
                   booked: Callable[[int], None] | None = None) -> int:
        """Send one frame; booked(wire size) runs once it is encoded and
        before its bytes go out, so the reply (an ACK or NEED the reader may
        see before send_all returns) always finds the frame in our books."""
        if paced:
            await self.s.bucket.take(frame.wire_size() if isinstance(frame, F.Data) else 64)
        async with self.send_lock:
            # Booked in the order the bytes go out: the books must see what the peer sees.
            data = self.conn.send(frame)
            if booked is not None:
                booked(len(data))
            await self.stream.send_all(data)
        self.last_sent = trio.current_time()
        self.s.stats["wire_bytes"] += len(data)
        return len(data)

    async def receive(self) -> list[F.Frame]:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise trio.BrokenResourceError("the receiver closed the connection")
        self.last_received = trio.current_time()
        return self.conn.receive_data(data)

    def peer_error(self, frame: F.Error) -> CdpError:
        msg = f"the receiver refused: {frame.message}"
        if frame.code == "auth":
            return AuthError(msg)
        if frame.code in ("uuid", "storage"):
            return VaultError(msg)
        if frame.code == "key":
            return KeyFileError(msg)
        return ProtocolError(msg, frame.code)

    # ---- the session --------------------------------------------------------------------

    async def run(self) -> bool:
        s = self.s
        try:
            await self.send(F.Hello(versions=F.SUPPORTED_VERSIONS, uuid=s.feed.uuid,
                                    encrypted=s.keys is not None, domain=s.domain, agent=AGENT,
                                    key_id=None if s.keys is None else key_id(s.keys)))
            welcome = await self.welcome()
        except ProtocolError as e:
            raise _Fatal(e) from None
        except trio.BrokenResourceError as e:
            err = tls.auth_failure(e, "the server")
            if err is not None:
                raise _Fatal(err) from None
            raise
        s.backoff.connected(trio.current_time())
        s.stats["connections"] += 1
        self.limits = welcome.limits
        self.key = welcome.dedupe_key
        if s.keys is None and self.key is None:
            raise _Fatal(ProtocolError("the receiver sent no dedupe key for an unencrypted source"))
        rung = s.level.rung
        self.compressor = Compressor(_codec(rung.codec, s.keys is not None), max(rung.level, 1),
                                     window_log=min(self.limits.window_log, 31), chunk_key=self.key)
        if s.keys is None:
            self.versions = Versions(s.journal, self.newest_complete_base)
        pos = welcome.position
        self.complete_bases = set(pos.bases)
        s._acked = Position.parse(pos._wire())
        self.seg_crc = {p.seg: p.header_crc for p in pos.segments}
        s.stats["source"] = welcome.source
        s.log(f"connected to {s.target} as source {welcome.source}")
        s._set(state="connected", last_error=None)
        items = s.feed.plan(pos._wire())
        try:
            try:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self.reader)
                    nursery.start_soon(self.watchdog)
                    finished = await self.writer(items)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as eg:
                raise first_cause(eg) from None
        except ProtocolError as e:
            with trio.move_on_after(2):
                try:
                    await self.send(F.Error.about(e))
                except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
                    pass
            raise _Fatal(e) from None
        except (VaultError, AuthError, KeyFileError) as e:
            raise _Fatal(e) from None
        finally:
            if self.versions is not None:
                self.versions.close()
        return finished

    def newest_complete_base(self) -> str | None:
        """The journal's newest base if the vault holds it complete: listed
        in WELCOME, or its BASE frame sent (the vault applies frames in
        order)."""
        live = self.s.feed.live_bases()
        return live[-1] if live and live[-1] in self.complete_bases else None

    async def welcome(self) -> F.Welcome:
        with trio.fail_after(self.s.idle_limit):
            while True:
                frames = await self.receive()
                if not frames:
                    continue
                f = frames[0]
                if isinstance(f, F.Error):
                    raise _Fatal(self.peer_error(f))
                assert isinstance(f, F.Welcome)  # the books allow nothing else first
                return f

    async def watchdog(self) -> None:
        while True:
            now = trio.current_time()
            if now - self.last_received >= self.s.idle_limit:
                raise trio.TooSlowError(f"nothing from the receiver for {self.s.idle_limit:g} s")
            if now - max(self.last_received, self.last_sent) >= self.s.ping_after:
                self.ping_n += 1
                await self.send(F.Ping(n=self.ping_n))
            quiet = max(self.last_received, self.last_sent)
            await trio.sleep(max(0.01, min(quiet + self.s.ping_after, self.last_received + self.s.idle_limit)
                                 - trio.current_time()))
            self.s._write_state()

    async def reader(self) -> None:
        while True:
            for f in await self.receive():
                if isinstance(f, F.Ack):
                    self.on_ack(f)
                elif isinstance(f, F.Have):
                    p = self.offers.pop(f.req)  # the books checked that it is outstanding
                    assert p.have is not None
                    p.held = {cid for i, cid in enumerate(p.offered) if f.held(i)}
                    self.known.update(p.held)
                    assert p.pack is not None
                    sizes = {b.id: b.end - b.start for b in p.pack.pieces if b.id in p.held}
                    self.s.policy.learn(list(p.offered), p.held, p.keys, sizes)  # type: ignore[arg-type]
                    p.have.set()
                elif isinstance(f, F.Need):
                    await self.on_need(f)
                elif isinstance(f, F.Ping):
                    await self.send(F.Pong(n=f.n))
                elif isinstance(f, F.Pong):
                    pass
                elif isinstance(f, F.Bye):
                    self.bye.set()
                    return
                elif isinstance(f, F.Error):
                    err = self.peer_error(f)
                    if f.code in ("internal", "storage"):
                        # the vault's trouble may pass (a full disk freed): retry
                        raise LinkError(str(err))
                    raise err
                else:
                    raise ProtocolError(f"{f.T} frame is not expected from a receiver")

    def on_ack(self, f: F.Ack) -> None:
        s = self.s
        target: int | str = f.seg if f.seg is not None else f.file  # type: ignore[assignment]
        if f.seg is not None:
            crc = self.seg_crc.get(f.seg)
            if crc is None:
                raise ProtocolError(f"ack for segment {f.seg:016x}, which this connection never opened")
            old = s._acked.segments.get(f.seg)
            advanced = old is None or old[0] != crc or f.size > old[1]
            s._acked.segments[f.seg] = (crc, f.size, bool(old and old[0] == crc and old[2]))
            if f.last_seq is not None and f.last_seq > s.stats["acked_seq"]:
                s.stats["acked_seq"] = f.last_seq
        else:
            advanced = f.size != s._acked.files.get(str(f.file))
            s._acked.files[str(f.file)] = f.size
        freed = 0
        keep: deque[_Unacked] = deque()
        for u in self.unacked:
            if u.target == target and u.end <= f.size:
                freed += u.wire
                if u.last_seq is not None and u.last_seq > s.stats["acked_seq"]:
                    # our own record of what the frame held: an encrypted
                    # replica cannot tell seqs (its ACKs carry none)
                    s.stats["acked_seq"] = u.last_seq
                if u.last_ts is not None:
                    s.stats["acked_ts"] = u.last_ts
                    s.stats["acked_time"] = format_us(u.last_ts)
            else:
                keep.append(u)
        self.unacked = keep
        self.wire_acked += freed
        now = trio.current_time()
        if self.ack_clock is None:
            self.ack_clock = (now, self.wire_acked, self.blocked)
        elif now - self.ack_clock[0] >= 0.5:
            dt, db = now - self.ack_clock[0], self.wire_acked - self.ack_clock[1]
            if (self.blocked - self.ack_clock[2]) >= 0.5 * dt:
                s.level.observe_link(db, dt)
            s.stats["throughput"] = round(db / dt, 1)
            self.ack_clock = (now, self.wire_acked, self.blocked)
        if advanced:
            # Only new durable bytes are progress for --give-up: journal.json
            # is acknowledged again on every connection, and a vault whose
            # disk is full would otherwise keep a sender retrying forever.
            s._progress = time.monotonic()
        self.acked_changed.set()
        self.acked_changed = trio.Event()
        s._write_state()

    async def on_need(self, f: F.Need) -> None:
        target: int | str = f.seg if f.seg is not None else f.file  # type: ignore[assignment]
        for u in self.unacked:
            if u.target == target and u.off == f.off:
                self.known.difference_update(f.ids)
                ids = frozenset(f.ids)
                body = u.pack.encode(frozenset(), resend=ids)
                nids = u.pack.new_ids(frozenset(), ids) if u.pack.keys is None else None
                # the two sides' zstd-ref histories parted at the refused frame
                assert self.compressor is not None
                self.compressor.reset()
                await self.send_data(u.item, body, u.pack, resend=u, prefix=self.prefix(u.pack, frozenset(), ids),
                                     new_ids=nids)
                return
        raise ProtocolError(f"need for {target!r} at offset {f.off}, which is not an unacknowledged frame")

    # ---- the writer ------------------------------------------------------------------

    async def next_item(self, items: Iterator[Item]) -> Item | None:
        return await self.s.sync(next, items, None)

    async def writer(self, items: Iterator[Item]) -> bool:
        s = self.s
        queue: deque[_Pending] = deque()
        exhausted = False
        while True:
            # Fill the pipeline: pack ahead and offer while HAVEs are on their way.
            while not exhausted and len(queue) < 2 * self.limits.offers + 2 and \
                    self.can_offer() and not s.stopping:
                item = await self.next_item(items)
                if item is None:
                    exhausted = True
                    break
                queue.append(await self.prepare(item))
                if queue[-1].req is None and len(queue) == 1:
                    break  # nothing to wait for: send it now
            if queue:
                await self.emit(queue.popleft())
                continue
            # Nothing queued: caught up with what the feed had.
            if s.stopping:
                return await self.finish(grace=STOP_GRACE)
            if await s.sync(s.feed.poll):
                items, exhausted = s.feed.items(), False
                continue
            if not s.follow:
                return await self.finish(grace=None)
            s._write_state()
            with trio.move_on_after(POLL_INTERVAL):
                await s.wait_stop()

    async def finish(self, grace: float | None) -> bool:
        """Wait for every DATA frame's ACK, then BYE both ways."""
        await self.flush()
        with trio.move_on_after(grace if grace is not None else float("inf")):
            while self.unacked:
                # ACKs that stop coming while the link is alive (PONGs keep
                # the watchdog quiet) would hang here: reconnect instead
                with trio.fail_after(self.s.idle_limit):
                    await self.acked_changed.wait()
        if self.unacked:
            return True  # stopping: the rest is resent by the next run
        await self.send(F.Bye())
        with trio.fail_after(self.s.idle_limit):
            await self.bye.wait()
        self.caught_up()
        return True

    def caught_up(self) -> None:
        """Everything the feed has seen is acknowledged: the acked seq is the
        feed's last (a run that found nothing to send has no ACK to learn it
        from)."""
        s = self.s
        nbytes, _ = s.feed.backlog(s._acked)
        if nbytes == 0 and s.feed.last_seq > s.stats["acked_seq"]:
            s.stats["acked_seq"] = s.feed.last_seq

    async def prepare(self, item: Item) -> _Pending:
        """Pack a data item and send its OFFER; other items pass through."""
        if not isinstance(item, (RunItem, FileItem)):
            return _Pending(item)
        s = self.s
        records = isinstance(item, RunItem)
        key = self.key or b""
        known = self.known
        pk = await s.sync(lambda: packing.pack(item.buf, key, known.__contains__, s.keys, records=records,
                                               page=getattr(item, "page", 0)))
        p = _Pending(item, pk)
        # Packing runs ahead of sending, and the vault applies frames in
        # order: every chunk of this pack is in the vault by the time a later
        # frame is applied (sent as bytes or already held), so later packs
        # may refer to it. Learning it only once this frame is emitted made
        # the next packs, prepared meanwhile, send those chunks again, and
        # their OFFERs, answered before this frame was applied, taught the
        # offer policy that offering never pays (HIS: 45 dedupe hits instead
        # of ~1,700, 3x the wire bytes).
        if len(self.known) > KNOWN_IDS_CAP:
            self.known.clear()
        self.known.update(pk.all_ids)
        if s.keys is None:
            offer, p.keys = s.policy.choose(item.buf if records else b"", pk)
        else:
            offer = list(pk.ids)  # sealed: ids say nothing of the plaintext to the vault; always ask
        ids = tuple(offer[:self.limits.offer_ids])
        if ids:
            p.req, p.offered, p.have = self.next_req, ids, trio.Event()
            self.next_req += 1
            self.offers[p.req] = p
            offer = F.Offer(req=p.req, ids=ids)
            if self.nursery is None:
                await self.send(offer)
            else:
                # Not in line behind the DATA frame on the wire: a send waits
                # for the send lock, which a 3 MB DATA frame holds for the
                # 2.5 s a 10 Mbit/s link takes, and the writer then compressed
                # the next frame only once the link had gone idle (PACS: 78-88 %
                # link use; the HAVE it needs was asked for frames earlier).
                self.offers_queued += 1
                self.nursery.start_soon(self._send_offer, offer)
        return p

    async def _send_offer(self, offer: F.Offer) -> None:
        try:
            await self.send(offer)
        finally:
            self.offers_queued -= 1

    def can_offer(self) -> bool:
        """One more OFFER fits the receiver's limit, counting those queued."""
        return self.conn.can_offer() and self.conn.outstanding_offers + self.offers_queued < self.limits.offers

    async def flush(self) -> None:
        """Wait until the DATA frame handed to the background sender is on
        the wire (a failure there ends the session through the nursery)."""
        # (left in place once set: the reader's NEED resend flushes too, and
        # clearing here could drop an event the writer just made)
        if self.on_wire is not None:
            await self.on_wire.wait()

    async def drain(self) -> None:
        """Wait until every DATA frame sent is acknowledged (PRUNE, and
        reopening a segment to replace it, need an empty window)."""
        await self.flush()
        while self.unacked:
            await self.acked_changed.wait()

    async def settle(self, target: int | str) -> None:
        """Wait until no frame of `target` that references chunks is in
        flight. SEAL and FILE may not follow a NEED before its resend
        (protocol.md), and a NEED can cross them on the wire: the receiver
        sends it before it reads them, and would take the SEAL for a
        protocol error. Only frames with references can draw a NEED, so a
        run of literal frames (most small base files) costs no round trip."""
        while any(u.target == target and u.refs for u in self.unacked):
            await self.acked_changed.wait()

    async def emit(self, p: _Pending) -> None:
        item = p.item
        if p.have is not None:
            await p.have.wait()
        if isinstance(item, PruneItem) or (isinstance(item, SegmentItem) and item.replace):
            await self.drain()
        if not isinstance(item, (RunItem, FileItem)):
            await self.flush()  # a SEGMENT, SEAL, FILE ... goes after the DATA made before it
        if isinstance(item, SealItem):
            await self.settle(item.seg)
        elif isinstance(item, EntryItem):
            await self.settle(item.path)
        if isinstance(item, SegmentItem):
            self.seg_crc[item.seg] = _crc(item.header)
            await self.send(F.Segment(seg=item.seg, header=item.header, replace=item.replace))
        elif isinstance(item, SealItem):
            await self.send(F.Seal(seg=item.seg, size=item.size))
        elif isinstance(item, EntryItem):
            await self.send(F.File(file=item.path, size=item.size, mode=item.mode, mtime_us=item.mtime_us,
                                   kind=item.kind, target=item.target))
        elif isinstance(item, BaseItem):
            await self.send(F.Base(name=item.name))
            self.complete_bases.add(item.name)
        elif isinstance(item, PruneItem):
            for seg, crc, _size in item.segments:
                self.seg_crc[seg] = crc
            await self.send(F.Prune(segments=tuple(F.PruneSeg(*x) for x in item.segments),
                                    bases=tuple(item.bases)))
        else:
            assert p.pack is not None and isinstance(item, (RunItem, FileItem))
            pk = p.pack
            held = p.held
            body, nids = await self.s.sync(lambda: (pk.encode(held), pk.new_ids(held) if pk.keys is None else None))
            bases: list[tuple[bytes | BaseAt, bytes]] = []
            v = self.versions
            if v is not None and nids is not None and isinstance(item, RunItem):
                bases = await self.s.sync(v.bases, item.seg, item.off, item.buf, pk, set(nids),
                                          self.known.__contains__)
                self.s.stats["base_hits"] += len(bases)
                self.s.stats["base_bytes"] += sum(len(b) for _, b in bases)
            # dedupe: pieces sent as a reference (the vault holds them, or
            # this connection sent them before) instead of as bytes
            refs = [b for b in pk.pieces if b.id is not None and (b.id in p.held or b.id in pk.known)]
            self.s.stats["dedupe_hits"] += len(refs)
            self.s.stats["dedupe_bytes"] += sum(b.end - b.start for b in refs)
            await self.send_data(item, body, pk, prefix=self.prefix(pk, p.held), new_ids=nids, background=True,
                                 refs=bool(refs) or bool(bases), bases=bases)
            if len(self.known) > KNOWN_IDS_CAP:
                self.known.clear()
            self.known.update(pk.all_ids)  # the vault holds them once this frame is applied

    def prefix(self, pk: packing.Pack, held: frozenset[bytes] | set[bytes],
               resend: frozenset[bytes] = frozenset()) -> tuple[bytes, bytes] | None:
        """zstd-ref's dictionary plan: the referenced chunks the vault holds."""
        if pk.keys is not None:
            return None  # sealed packs: nothing the vault holds is readable
        return packing.prefix_plan(pk, held, resend)

    async def send_data(self, item: RunItem | FileItem, body: bytes, pk: packing.Pack,
                        resend: _Unacked | None = None, prefix: tuple[bytes, bytes] | None = None,
                        new_ids: list[bytes] | None = None, background: bool = False,
                        refs: bool = True, bases: list[tuple[bytes | BaseAt, bytes]] | None = None) -> None:
        """Compress a body and send its DATA frame. With background, return
        once it is compressed and the frame is queued behind the previous
        one: the caller goes on with the next frame's CPU work while this
        one waits for the link. refs: the frame references chunks (the
        receiver may answer it with NEED). bases: zstd-ref's base chunks
        (versions.Versions; a resend goes without)."""
        s = self.s
        assert self.compressor is not None
        rung = s.level.rung
        if s.keys is None:
            rung = s.level.choose()  # the current rung, or a neighbour to measure
            codec = _codec(rung.codec, False)
            self.compressor.set_level(codec, max(rung.level, 1))  # (a no-op when unchanged)
        comp, cpu = await s.sync(_timed_compress, self.compressor, body, prefix, new_ids, isinstance(item, RunItem),
                                 bases)
        s.level.observe_compression(LADDER.index(rung) if s.keys is None else 0, comp.raw,
                                    len(comp.body), cpu)
        now_cpu = time.process_time()
        if self.cpu_mark is not None:
            s.level.observe_overhead(comp.raw, max(0.0, now_cpu - self.cpu_mark - cpu))
        self.cpu_mark = now_cpu
        s.stats["codec"], s.stats["level"] = comp.codec, comp.level
        if isinstance(item, RunItem):
            frame = F.Data(seg=item.seg, off=item.off, end=item.end, first_seq=item.first_seq,
                           last_seq=item.last_seq, last_ts=item.last_ts, codec=comp.codec, level=comp.level,
                           reset=comp.reset, raw=comp.raw, body=comp.body)
        else:
            frame = F.Data(file=item.path, off=item.off, end=item.end, codec=comp.codec, level=comp.level,
                           reset=comp.reset, raw=comp.raw, body=comp.body)
        await self.flush()
        if background and self.nursery is not None:
            self.on_wire = trio.Event()
            self.nursery.start_soon(self._put_on_wire, item, frame, pk, resend, self.on_wire, refs)
        else:
            await self._put_on_wire(item, frame, pk, resend, None, refs)

    async def _put_on_wire(self, item: RunItem | FileItem, frame: F.Data, pk: packing.Pack,
                           resend: _Unacked | None, done: trio.Event | None, refs: bool = True) -> None:
        s = self.s
        target: int | str = item.seg if isinstance(item, RunItem) else item.path
        size = frame.wire_size()
        t0 = trio.current_time()
        while self.conn.inflight_bytes and not self.conn.can_send(size):
            await self.acked_changed.wait()

        def book(n: int) -> None:
            if resend is not None:
                resend.wire = n
            else:
                self.unacked.append(_Unacked(target, item.off, item.end, n,
                                             item.last_seq if isinstance(item, RunItem) else None,
                                             item.last_ts if isinstance(item, RunItem) else None, pk, item, refs))
                s.stats["raw_bytes"] += item.end - item.off

        await self.send(frame, paced=True, booked=book)
        self.blocked += trio.current_time() - t0
        if done is not None:
            done.set()
