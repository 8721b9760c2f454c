"""The two ends of a replication connection as state machines, free of I/O:
`ShipConnection` (the sender, `cdpctl ship`) and `ServeConnection` (the
receiver, `cdpctl serve`).

Theory of operation
-------------------
In the style of h11 and wsproto: the transport feeds the bytes it reads to
`receive_data()` and gets validated frames back; it passes each frame it
wants to send to `send()` and writes the bytes that come back. Neither
method blocks or does I/O, so every rule below is tested byte by byte
without sockets (tests/test_protocol_connection.py).

Both ends keep the same books, so each checks the other and itself:

* the state (HANDSHAKE -> OPEN -> CLOSING -> CLOSED) and which frames each
  side may send in it (docs/protocol.md has the table);
* per target (a segment or a file) the high-water mark of bytes the
  receiver holds or has been sent, so that DATA that would leave a hole,
  an ACK beyond what was sent, a SEAL at another size are caught;
* the DATA frames in flight (sent, not yet covered by an ACK of their
  target at or beyond their end, nor answered by a NEED), in encoded bytes:
  the sender may not exceed `limits.inflight`;
* after a NEED, the resend it asks for: the sender must resend the target
  from the refused frame on before anything else of it, and the receiver
  drops (never returns) the frames of the target the sender had sent
  before it read the NEED, so the transport never sees a hole;
* the OFFERs not yet answered by a HAVE (at most `limits.offers`).

Why both ends can check the same rule although frames cross on the wire:
TCP keeps order, so when the receiver reads frame F it has sent every ACK
and HAVE that the sender had read when it sent F, and maybe more. Its count
of frames in flight or offers outstanding is therefore never above the
sender's, and a limit the sender obeys is never seen broken by the
receiver. The same argument makes "nothing in flight" rules (BYE, PRUNE,
reopening a segment) checkable at the receiver.

`send()` books a frame when it is called, so the transport must write the
returned bytes in the order of the calls (one lock held across `send()`
and the write, when several tasks send).

Any ProtocolError, raised by `receive_data()` (the peer broke a rule) or by
`send()` (our own caller did), closes the connection: the state becomes
CLOSED, and the only frame `send()` still accepts is one ERROR, so that the
transport can tell the peer why (`Error.about(exc)`) before it closes. An
ERROR frame from the peer is returned like any frame and also closes it.
"""
from __future__ import annotations

import enum
import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import NoReturn

from .errors import ProtocolError, fail
from .frames import (
    DEFAULT_FRAME, SUPPORTED_VERSIONS, Ack, Base, Bye, Data, Error, File, Frame, FrameDecoder, Have, Hello,
    Limits, Need, Offer, Ping, Pong, Position, Prune, Seal, Segment, Welcome, encode,
)

__all__ = ["State", "ShipConnection", "ServeConnection", "HELLO_FRAME_CAP", "MAX_PINGS"]

# The receiver reads HELLO before it has announced any limit: HELLO is small
# (bounded strings), so the cap before WELCOME is small too.
HELLO_FRAME_CAP = 64 << 10
# PINGs one side may have unanswered: keepalive needs one or two.
MAX_PINGS = 16
# Every frame the receiver sends must fit the smallest cap a sender may
# choose (a sender's `max_frame` is at least this).
RECEIVER_FRAME_CAP = DEFAULT_FRAME

Target = tuple[str, "int | str"]  # ("seg", N) or ("file", PATH)


class State(enum.Enum):
    HANDSHAKE = "handshake"  # before WELCOME
    OPEN = "open"
    CLOSING = "closing"  # the sender has sent BYE
    CLOSED = "closed"  # both BYEs, an ERROR either way, or a ProtocolError


@dataclass(eq=False)  # identity: two resends of the same bytes are two frames
class _Sent:
    """One DATA frame in flight."""

    end: int
    off: int
    size: int  # encoded bytes
    alive: bool = True


@dataclass
class _TargetBook:
    """What both ends know of one segment or file in this connection."""

    high: int = 0  # bytes the receiver holds (position) or has been sent, whichever is more
    acked: int = 0  # largest ACK size
    sealed: int | None = None  # segments: the SEAL size
    replace: bool = False  # segments: opened with replace=True (bytes go to .incoming)
    complete: bool = False  # base files: their FILE frame was sent
    need_off: int | None = None  # a NEED refused the frame at this offset; its resend is awaited
    heap: list[tuple[int, int, _Sent]] = field(default_factory=list)  # (end, tiebreak, frame)
    by_off: dict[int, list[_Sent]] = field(default_factory=dict)
    inflight: int = 0  # encoded bytes of live frames in `heap`


class _Books:
    """The bookkeeping both ends share (module docstring)."""

    def __init__(self, position: Position, limits: Limits):
        self.limits = limits
        self.targets: dict[Target, _TargetBook] = {}
        for s in position.segments:
            self.targets[("seg", s.seg)] = _TargetBook(high=s.size, acked=s.size,
                                                       sealed=s.size if s.sealed else None)
        for path, size in position.files.items():
            self.targets[("file", path)] = _TargetBook(high=size, acked=size)
        self.inflight = 0
        self.offers: dict[int, int] = {}  # req -> number of ids
        self._tiebreak = itertools.count()

    # -- targets

    def _book(self, where: str, target: Target, create_file: bool) -> _TargetBook:
        book = self.targets.get(target)
        if book is None:
            if target[0] == "seg":
                fail(where, f"segment {target[1]} is neither in the position nor opened by a segment frame")
            if not create_file:
                fail(where, f"no data was sent for file {target[1]!r}")
            book = self.targets[target] = _TargetBook()
        return book

    def _no_resend_due(self, where: str, target: Target, book: _TargetBook | None) -> None:
        if book is not None and book.need_off is not None:
            fail(where, f"{_name(target)} still owes the resend at offset {book.need_off} a need asked for")

    def open_segment(self, f: Segment) -> None:
        where = "segment frame"
        target = ("seg", f.seg)
        book = self.targets.get(target)
        self._no_resend_due(where, target, book)
        if book is not None and book.inflight:
            # An ACK already on its way would be read as one of the new
            # segment: reopen only when everything sent is acknowledged.
            fail(where, f"segment {f.seg} reopened with {book.inflight} bytes of data in flight")
        if book is not None and book.replace and not f.replace:
            fail(where, f"segment {f.seg} is being replaced until the prune")
        if f.replace or book is None:
            # The header comes with this frame: the segment holds 64 bytes.
            self.targets[target] = _TargetBook(high=64, replace=f.replace)

    def data(self, f: Data, size: int, receiving: bool) -> bool:
        """Book a DATA frame; False for a stale one (the receiver drops it)."""
        where = "data frame"
        if f.raw > self.limits.body or len(f.body) > self.limits.body:
            fail(where, f"body of {max(f.raw, len(f.body))} bytes, more than the limit {self.limits.body}",
                 "limit")
        book = self._book(where, f.target, create_file=True)
        if f.off > book.high:
            fail(where, f"{_name(f.target)} bytes [{f.off}, {f.end}) would leave a hole after byte {book.high}")
        if book.sealed is not None and f.end > book.sealed:
            fail(where, f"{_name(f.target)} bytes [{f.off}, {f.end}) beyond its seal at {book.sealed}")
        if book.need_off is not None:
            if f.off != book.need_off:
                if not receiving:
                    fail(where, f"{_name(f.target)}: the resend at offset {book.need_off} a need asked for "
                         f"must come first, not [{f.off}, {f.end})")
                # Sent before the sender read our NEED (after it, its first
                # DATA of the target is the resend): already out of flight
                # at the sender, so neither counted nor applied here; but
                # sent, so later stale frames follow it without a hole.
                book.high = max(book.high, f.end)
                return False
            book.need_off = None
        if self.inflight + size > self.limits.inflight:
            fail(where, f"{self.inflight + size} bytes in flight, more than the limit {self.limits.inflight}",
                 "limit")
        book.high = max(book.high, f.end)
        sent = _Sent(f.end, f.off, size)
        heapq.heappush(book.heap, (f.end, next(self._tiebreak), sent))
        book.by_off.setdefault(f.off, []).append(sent)
        book.inflight += size
        self.inflight += size
        return True

    def _release(self, book: _TargetBook, sent: _Sent) -> None:
        sent.alive = False
        book.inflight -= sent.size
        self.inflight -= sent.size
        same = book.by_off.get(sent.off)
        if same is not None:
            if sent in same:
                same.remove(sent)
            if not same:
                del book.by_off[sent.off]

    def ack(self, f: Ack) -> None:
        where = "ack frame"
        book = self._book(where, f.target, create_file=False)
        if f.size > book.high:
            fail(where, f"{_name(f.target)} acknowledged up to {f.size}, beyond the {book.high} bytes sent")
        if f.seg is not None and f.size < book.acked:
            # A file (journal.json) may be rewritten shorter; a segment only grows.
            fail(where, f"segment {f.seg} acknowledged up to {f.size} after {book.acked}: acks go forward")
        book.acked = max(book.acked, f.size) if f.seg is not None else f.size
        while book.heap and book.heap[0][0] <= f.size:
            _, _, sent = heapq.heappop(book.heap)
            if sent.alive:
                self._release(book, sent)
        self._forget_if_done(f.target, book)

    def _forget_if_done(self, target: Target, book: _TargetBook) -> None:
        # A base can hold tens of millions of files: keep books only for
        # files still in flight, or the connection's memory would grow with
        # the tree. A later ACK of a forgotten file is out of order.
        if book.complete and not book.inflight:
            del self.targets[target]

    def need(self, f: Need) -> None:
        where = "need frame"
        if len(f.ids) > self.limits.offer_ids:
            fail(where, f"{len(f.ids)} ids, more than the limit {self.limits.offer_ids}", "limit")
        book = self._book(where, f.target, create_file=False)
        if book.need_off is not None:
            if f.off != book.need_off:
                fail(where, f"{_name(f.target)} at offset {f.off} while the resend at {book.need_off} is awaited")
            return  # one more NEED for the same frame: more ids than one holds
        if f.off not in book.by_off:
            fail(where, f"no data frame of {_name(f.target)} at offset {f.off} is in flight")
        # The receiver applies nothing of the target from this frame on until
        # its resend, and the sender resends it and everything after it: so
        # all of those leave flight now (else a full window could never make
        # room for the resends).
        for off in [o for o in book.by_off if o >= f.off]:
            for sent in list(book.by_off.get(off, ())):
                self._release(book, sent)
        book.need_off = f.off

    def seal(self, f: Seal) -> None:
        where = "seal frame"
        book = self._book(where, ("seg", f.seg), create_file=False)
        self._no_resend_due(where, ("seg", f.seg), book)
        if f.size != book.high:
            fail(where, f"segment {f.seg} sealed at {f.size} but {book.high} bytes were sent")
        if book.sealed is not None and book.sealed != f.size:
            fail(where, f"segment {f.seg} sealed again at {f.size}, was {book.sealed}")
        book.sealed = f.size

    def file(self, f: File) -> None:
        target = ("file", f.file)
        book = self.targets.get(target)
        self._no_resend_due("file frame", target, book)
        high = book.high if book is not None else 0
        if f.kind == "file" and f.size != high:
            fail("file frame", f"file {f.file!r} complete at {f.size} bytes but {high} were sent")
        if f.kind != "file" and high:
            fail("file frame", f"{f.file!r} is a {f.kind} but data was sent for it")
        if book is not None:
            book.complete = True
            self._forget_if_done(target, book)

    def prune(self, f: Prune) -> None:
        if self.inflight:
            fail("prune frame", f"sent with {self.inflight} bytes of data in flight")
        for target, book in self.targets.items():
            self._no_resend_due("prune frame", target, book)
        live = {s.seg for s in f.segments}
        for target in list(self.targets):
            if target[0] == "seg":
                if target[1] not in live:
                    del self.targets[target]
                else:
                    self.targets[target].replace = False  # the .incoming segment is now the live one

    def offer(self, f: Offer) -> None:
        where = "offer frame"
        if len(f.ids) > self.limits.offer_ids:
            fail(where, f"{len(f.ids)} ids, more than the limit {self.limits.offer_ids}", "limit")
        if f.req in self.offers:
            fail(where, f"req {f.req} is already outstanding")
        if len(self.offers) >= self.limits.offers:
            fail(where, f"more than {self.limits.offers} offers outstanding", "limit")
        self.offers[f.req] = len(f.ids)

    def have(self, f: Have) -> None:
        where = "have frame"
        n = self.offers.get(f.req)
        if n is None:
            fail(where, f"req {f.req} is not an outstanding offer")
        if len(f.bits) != math.ceil(n / 8):
            fail(where, f"{len(f.bits)} bytes of bits for an offer of {n} ids (need {math.ceil(n / 8)})")
        if n % 8 and f.bits[-1] >> (n % 8):
            fail(where, f"bits set beyond the offer's {n} ids")
        del self.offers[f.req]

    def quiet(self, where: str) -> None:
        """BYE: everything acknowledged and answered."""
        if self.inflight:
            fail(where, f"sent with {self.inflight} bytes of data in flight")
        if self.offers:
            fail(where, f"sent with {len(self.offers)} offers unanswered")
        for target, book in self.targets.items():
            self._no_resend_due(where, target, book)

    def inflight_of(self, target: Target) -> int:
        book = self.targets.get(target)
        return book.inflight if book is not None else 0


def _name(target: Target) -> str:
    return f"segment {target[1]}" if target[0] == "seg" else f"file {target[1]!r}"


# Which frame types each side may send in each state (docs/protocol.md).
_SENDER_FRAMES = frozenset({Segment, Offer, Data, Seal, File, Base, Prune, Ping, Pong, Bye})
_RECEIVER_FRAMES = frozenset({Have, Need, Ack, Ping, Pong})


class _Connection:
    """What both ends share: the decoder, the state, errors, pings."""

    _role = ""  # "sender" / "receiver"
    _peer_role = ""

    def __init__(self, versions: tuple[int, int], max_frame: int):
        lo, hi = versions
        if not 1 <= lo <= hi:
            raise ValueError(f"versions must be a range [min, max] of positive integers, got {versions}")
        self.versions = (lo, hi)
        self.version: int | None = None
        self.limits: Limits | None = None
        self.position: Position | None = None
        self.error: ProtocolError | None = None  # the error that closed the connection on our side
        self.peer_error: Error | None = None  # the ERROR frame the peer closed it with
        self._state = State.HANDSHAKE
        self._decoder = FrameDecoder(max_frame)
        self._books: _Books | None = None
        self._sent_error = False
        self._our_pings: set[int] = set()
        self._their_pings: set[int] = set()

    # -- public

    @property
    def state(self) -> State:
        return self._state

    @property
    def inflight_bytes(self) -> int:
        """Encoded bytes of DATA frames sent and not yet acknowledged."""
        return self._books.inflight if self._books else 0

    @property
    def outstanding_offers(self) -> int:
        return len(self._books.offers) if self._books else 0

    def inflight_of(self, seg: int | None = None, file: str | None = None) -> int:
        """Encoded bytes of DATA in flight for one segment or file: a
        SEGMENT reopening it, or a PRUNE, must wait until this is 0."""
        target: Target = ("seg", seg) if seg is not None else ("file", file)  # type: ignore[assignment]
        return self._books.inflight_of(target) if self._books else 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """The frames in `data` (any split of the stream), each checked
        against the state machine. Raises ProtocolError (and the connection
        is CLOSED) at the first frame that breaks a rule; frames before it
        in the same call are not returned (nothing of a broken stream is
        applied). DATA made stale by a NEED is dropped, not returned; an
        ERROR frame is the last frame returned (bytes after it are ignored)."""
        if not data:
            return []
        if self._state is State.CLOSED:
            fail("", f"{len(data)} bytes received after the connection closed")
        try:
            out = []
            for frame, size in self._decoder.frames(data):
                if self._receive(frame, size):
                    out.append(frame)
                if isinstance(frame, Error):
                    break  # the peer is closing: whatever follows its reason is not read
            return out
        except ProtocolError as e:
            self._close(e)
            raise

    def send(self, frame: Frame) -> bytes:
        """The bytes of `frame`, after checking that sending it now obeys the
        protocol and the peer's limits. A misuse raises ProtocolError and
        closes the connection (send an ERROR then)."""
        if isinstance(frame, Error):
            if self._sent_error:
                fail("error frame", "an error frame was already sent")
            self._sent_error = True
            self._state = State.CLOSED
            return encode(frame)
        if self._state is State.CLOSED:
            fail(f"{frame.T} frame", "cannot send: the connection is closed")
        try:
            return self._check_send(frame)
        except ProtocolError as e:
            self._close(e)
            raise

    # -- shared rules

    def _close(self, e: ProtocolError) -> None:
        if self.error is None:
            self.error = e
        self._state = State.CLOSED

    def _out_of_order(self, frame: Frame, who: str, why: str = "") -> NoReturn:
        state = self._state.value
        fail(f"{frame.T} frame", f"out of order from the {who} in state {state}" + (f": {why}" if why else ""))

    def _ping_pong_received(self, frame: Ping | Pong) -> None:
        if self._state is State.HANDSHAKE:
            self._out_of_order(frame, self._peer_role, "before the handshake completed")
        if isinstance(frame, Ping):
            if len(self._their_pings) >= MAX_PINGS and frame.n not in self._their_pings:
                fail("ping frame", f"more than {MAX_PINGS} pings unanswered", "limit")
            self._their_pings.add(frame.n)
        else:
            if frame.n not in self._our_pings:
                self._out_of_order(frame, self._peer_role, f"no ping {frame.n} was sent")
            self._our_pings.discard(frame.n)

    def _ping_pong_sent(self, frame: Ping | Pong) -> None:
        if self._state is State.HANDSHAKE:
            self._out_of_order(frame, "caller", "before the handshake completed")
        if isinstance(frame, Ping):
            if len(self._our_pings) >= MAX_PINGS and frame.n not in self._our_pings:
                fail("ping frame", f"more than {MAX_PINGS} pings unanswered", "limit")
            self._our_pings.add(frame.n)
        else:
            if frame.n not in self._their_pings:
                self._out_of_order(frame, "caller", f"no ping {frame.n} was received")
            self._their_pings.discard(frame.n)

    def _peer_error(self, frame: Error) -> None:
        self.peer_error = frame
        self._state = State.CLOSED

    def _receive(self, frame: Frame, size: int) -> bool:
        """Check and book a frame from the peer; False: drop it silently."""
        raise NotImplementedError

    def _check_send(self, frame: Frame) -> bytes:
        raise NotImplementedError


class ShipConnection(_Connection):
    """The sender's end. Send HELLO, read WELCOME (then `version`, `limits`,
    `position`, `source` and `dedupe_key` are set), then ship; obey
    `can_send()` and `can_offer()`; BYE once everything is acknowledged."""

    _role = "sender"
    _peer_role = "receiver"

    def __init__(self, versions: tuple[int, int] = SUPPORTED_VERSIONS, max_frame: int = DEFAULT_FRAME):
        if max_frame < RECEIVER_FRAME_CAP:
            raise ValueError(f"max_frame must be at least {RECEIVER_FRAME_CAP} (what a receiver may send)")
        super().__init__(versions, max_frame)
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None

    @property
    def source(self) -> str | None:
        return self.welcome.source if self.welcome else None

    @property
    def dedupe_key(self) -> bytes | None:
        return self.welcome.dedupe_key if self.welcome else None

    def can_send(self, n: int) -> bool:
        """Whether a DATA frame of `n` encoded bytes fits in the in-flight
        window now (False before WELCOME and once closing)."""
        if self._state is not State.OPEN or self._books is None or self.limits is None:
            return False
        return self._books.inflight + n <= self.limits.inflight

    def can_offer(self) -> bool:
        """Whether one more OFFER may be sent now."""
        if self._state is not State.OPEN or self._books is None or self.limits is None:
            return False
        return len(self._books.offers) < self.limits.offers

    def _receive(self, frame: Frame, size: int) -> bool:
        if isinstance(frame, Error):
            self._peer_error(frame)
            return True
        state = self._state
        if state is State.HANDSHAKE:
            if self.hello is None:
                self._out_of_order(frame, "receiver", "it speaks after our hello")
            if not isinstance(frame, Welcome):
                self._out_of_order(frame, "receiver", "expected welcome or error")
            self._welcome(frame)
            return True
        if type(frame) not in _RECEIVER_FRAMES and not isinstance(frame, Bye):
            self._out_of_order(frame, "receiver", "a receiver never sends it" if not isinstance(frame, Welcome)
                               else "welcome comes once")
        if state is State.CLOSED:
            self._out_of_order(frame, "receiver")
        books = self._books
        assert books is not None
        if isinstance(frame, (Ping, Pong)):
            self._ping_pong_received(frame)
        elif isinstance(frame, Bye):
            if state is not State.CLOSING:
                self._out_of_order(frame, "receiver", "the receiver says bye only after the sender")
            self._state = State.CLOSED
        elif state is State.CLOSING and not isinstance(frame, Ack):
            # An ACK may still come: the receiver's sync of a SEGMENT or SEAL
            # sent just before our BYE (nothing was in flight, but the ack of
            # the header or the seal is on its way).
            self._out_of_order(frame, "receiver", "after our bye only ack, ping, pong, bye or error")
        elif isinstance(frame, Have):
            books.have(frame)
        elif isinstance(frame, Need):
            books.need(frame)
        elif isinstance(frame, Ack):
            books.ack(frame)
        return True

    def _welcome(self, w: Welcome) -> None:
        hello = self.hello
        assert hello is not None
        lo, hi = hello.versions
        if not lo <= w.version <= hi:
            fail("welcome frame", f"version {w.version} is not in our range [{lo}, {hi}]", "version")
        if (w.dedupe_key is None) != hello.encrypted:
            fail("welcome frame", "an encrypted source gets no dedupe key, a plain one must"
                 if hello.encrypted else "a dedupe key is required for a source that is not encrypted")
        self.welcome = w
        self.version = w.version
        self.limits = w.limits
        self.position = w.position
        self._books = _Books(w.position, w.limits)
        self._state = State.OPEN

    def _check_send(self, frame: Frame) -> bytes:
        state = self._state
        if isinstance(frame, Hello):
            if state is not State.HANDSHAKE or self.hello is not None:
                self._out_of_order(frame, "caller", "hello is sent once, first")
            lo, hi = frame.versions
            if lo < self.versions[0] or hi > self.versions[1]:
                fail("hello frame", f"versions [{lo}, {hi}] outside what this code speaks {list(self.versions)}")
            self.hello = frame
            return encode(frame, HELLO_FRAME_CAP)
        if state is State.HANDSHAKE:
            self._out_of_order(frame, "caller", "nothing but hello or error before the welcome")
        if type(frame) not in _SENDER_FRAMES:
            self._out_of_order(frame, "caller", "the receiver sends it, not the sender")
        if isinstance(frame, (Ping, Pong)):
            self._ping_pong_sent(frame)
            return encode(frame, self._frame_cap())
        if state is State.CLOSING:
            self._out_of_order(frame, "caller", "after bye only ping, pong or error")
        b = encode(frame, self._frame_cap())
        self._book(frame, len(b))
        if isinstance(frame, Bye):
            self._state = State.CLOSING
        return b

    def _frame_cap(self) -> int:
        assert self.limits is not None
        return self.limits.frame

    def _book(self, frame: Frame, size: int) -> None:
        books = self._books
        assert books is not None
        if isinstance(frame, Data):
            books.data(frame, size, receiving=False)
        elif isinstance(frame, Segment):
            books.open_segment(frame)
        elif isinstance(frame, Offer):
            books.offer(frame)
        elif isinstance(frame, Seal):
            books.seal(frame)
        elif isinstance(frame, File):
            books.file(frame)
        elif isinstance(frame, Prune):
            books.prune(frame)
        elif isinstance(frame, Bye):
            books.quiet("bye frame")
        # Base: no books (the receiver checks that the base's files are complete)


class ServeConnection(_Connection):
    """The receiver's end. Read HELLO (then `hello` and `version` are set),
    send WELCOME with the position and the limits it will enforce, then
    answer: HAVE for each OFFER, ACK as data becomes durable, NEED for
    chunks it can no longer resolve; BYE after the sender's."""

    _role = "receiver"
    _peer_role = "sender"

    def __init__(self, versions: tuple[int, int] = SUPPORTED_VERSIONS):
        super().__init__(versions, HELLO_FRAME_CAP)
        self.hello: Hello | None = None
        self._welcomed = False

    def _receive(self, frame: Frame, size: int) -> bool:
        if isinstance(frame, Error):
            self._peer_error(frame)
            return True
        state = self._state
        if state is State.HANDSHAKE:
            if self.hello is not None:
                self._out_of_order(frame, "sender", "nothing but error before our welcome")
            if not isinstance(frame, Hello):
                self._out_of_order(frame, "sender", "the first frame must be hello")
            self._hello(frame)
            return True
        if type(frame) not in _SENDER_FRAMES:
            self._out_of_order(frame, "sender", "a sender never sends it" if not isinstance(frame, Hello)
                               else "hello comes once")
        if state is State.CLOSED:
            self._out_of_order(frame, "sender")
        if isinstance(frame, (Ping, Pong)):
            self._ping_pong_received(frame)
            return True
        if state is State.CLOSING:
            self._out_of_order(frame, "sender", "after its bye only ping, pong or error")
        books = self._books
        assert books is not None
        if isinstance(frame, Data):
            return books.data(frame, size, receiving=True)
        elif isinstance(frame, Segment):
            books.open_segment(frame)
        elif isinstance(frame, Offer):
            books.offer(frame)
        elif isinstance(frame, Seal):
            books.seal(frame)
        elif isinstance(frame, File):
            books.file(frame)
        elif isinstance(frame, Prune):
            books.prune(frame)
        elif isinstance(frame, Bye):
            books.quiet("bye frame")
            self._state = State.CLOSING
        return True

    def _hello(self, h: Hello) -> None:
        lo = max(h.versions[0], self.versions[0])
        hi = min(h.versions[1], self.versions[1])
        self.hello = h
        if lo > hi:
            fail("hello frame", f"no common protocol version: the sender speaks {list(h.versions)}, "
                 f"this receiver {list(self.versions)}", "version")
        self.version = hi

    def _check_send(self, frame: Frame) -> bytes:
        state = self._state
        if isinstance(frame, Welcome):
            if state is not State.HANDSHAKE or self.hello is None or self._welcomed:
                self._out_of_order(frame, "caller", "welcome answers the hello, once")
            if frame.version != self.version:
                fail("welcome frame", f"version {frame.version}, but {self.version} was negotiated", "version")
            if (frame.dedupe_key is None) != self.hello.encrypted:
                fail("welcome frame", "an encrypted source gets no dedupe key" if self.hello.encrypted
                     else "a source that is not encrypted needs a dedupe key")
            b = encode(frame, RECEIVER_FRAME_CAP)
            self._welcomed = True
            self.limits = frame.limits
            self.position = frame.position
            self._books = _Books(frame.position, frame.limits)
            self._decoder.max_frame = frame.limits.frame
            self._state = State.OPEN
            return b
        if state is State.HANDSHAKE:
            self._out_of_order(frame, "caller", "nothing but welcome or error before the welcome")
        if type(frame) not in _RECEIVER_FRAMES | {Bye}:
            self._out_of_order(frame, "caller", "the sender sends it, not the receiver")
        if isinstance(frame, (Ping, Pong)):
            self._ping_pong_sent(frame)
            return encode(frame, RECEIVER_FRAME_CAP)
        books = self._books
        assert books is not None
        if isinstance(frame, Bye):
            if state is not State.CLOSING:
                self._out_of_order(frame, "caller", "the receiver says bye only after the sender")
            b = encode(frame, RECEIVER_FRAME_CAP)
            self._state = State.CLOSED
            return b
        if state is State.CLOSING and not isinstance(frame, Ack):
            self._out_of_order(frame, "caller", "after the sender's bye only ack, ping, pong, bye or error")
        b = encode(frame, RECEIVER_FRAME_CAP)
        if isinstance(frame, Have):
            books.have(frame)
        elif isinstance(frame, Need):
            books.need(frame)
        elif isinstance(frame, Ack):
            books.ack(frame)
        return b
