"""Audit trail: who did what to a journal, in a hash-chained log beside it.

Theory of operation
-------------------
JOURNAL/audit.log holds one JSON object a line, oldest first. Entry n
records who (OS user and uid, host, pid, the process's command line), when
(UTC epoch microseconds), the action, its arguments, its result and whether
it succeeded, plus `prev`, the hash of entry n-1, and `hash` =
SHA-256(prev's 32 bytes + the canonical JSON of the entry without `hash`).
Entry 1's `prev` is SHA-256 of a tag and the journal's UUID, so a log cannot
be moved under another journal. Editing, inserting, deleting or reordering
entries breaks the chain at the first entry touched, and verify() names it.

A chain alone cannot show that its newest entries were cut off, nor that
someone rewrote the whole log and recomputed every hash (SHA-256 is not
keyed). So an action that changes or reads out patient data (restore,
rollback, prune, a restore check) also *anchors* its entry: it appends an
AUDIT record carrying the entry's number and hash to the journal itself.
An anchor for entry n vouches for entries 1..n through the chain. Editing
the log alone can then no longer hide anything up to the newest anchor;
forging both the log and the journal's segments (CRC32C, not keyed either)
can, which is why anchors matter most once the journal is replicated to a
site this host cannot write (docs/journal-format.md, AUDIT).

Appends are serialised across processes by flock(2) on the log and are
fsync'd before append() returns, so an action is on record before it is
reported done. Anchoring happens after the log line is durable: a crash in
between leaves an entry that is merely not anchored yet (a warning), never
an anchor without its entry.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R")

from cdpcore.errors import CdpError
from cdpcore.format import Kind
from cdpcore.journal import Journal
from cdpcore.point import format_us

AUDIT_NAME = "audit.log"
AUDIT_VERSION = 1
GENESIS_TAG = b"cdpcore-audit-v1\0"
# Reading back from the end to find the newest entry: entries are small
# (a command line and a few arguments), so one block nearly always holds it.
_TAIL_BLOCK = 65536
_FIELDS = ("v", "n", "ts", "user", "uid", "host", "pid", "argv", "action", "arguments",
           "result", "ok", "prev")


class AuditError(CdpError):
    """The audit log cannot be read as a log at all (not JSON lines)."""


def log_path(journal_path: str | os.PathLike[str]) -> str:
    return os.path.join(os.path.abspath(os.fspath(journal_path)), AUDIT_NAME)


def canonical(obj: Any) -> bytes:
    """The bytes that are hashed: sorted keys, no spaces, ASCII only (so that
    paths that are not UTF-8 hash the same however the file is re-encoded)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def genesis(uuid: bytes) -> str:
    return hashlib.sha256(GENESIS_TAG + uuid).hexdigest()


def entry_hash(prev: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(bytes.fromhex(prev) + canonical(body)).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    """One audit-log entry. anchor_seq / anchor_error are not part of the
    entry: they say what append() managed when it anchored it."""

    n: int
    ts: int
    user: str
    uid: int
    host: str
    pid: int
    argv: list[str]
    action: str
    arguments: dict[str, Any]
    result: dict[str, Any]
    ok: bool
    prev: str
    hash: str
    extra: dict[str, Any] = field(default_factory=dict)  # sudo_user, note
    anchor_seq: int | None = None
    anchor_error: str | None = None

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Entry:
        known = {k: doc[k] for k in _FIELDS if k != "v"}
        extra = {k: v for k, v in doc.items() if k not in _FIELDS and k != "hash"}
        return cls(**known, hash=doc["hash"], extra=extra)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "ts": self.ts, "time": format_us(self.ts),
                               "user": self.user, "uid": self.uid, "host": self.host,
                               "pid": self.pid, "argv": self.argv, "action": self.action,
                               "arguments": self.arguments, "result": self.result, "ok": self.ok}
        out.update(self.extra)
        out.update(prev=self.prev, hash=self.hash)
        if self.anchor_seq is not None or self.anchor_error is not None:
            out.update(anchor_seq=self.anchor_seq, anchor_error=self.anchor_error)
        return out


def _who() -> dict[str, Any]:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    who: dict[str, Any] = {"user": user, "uid": uid, "host": socket.gethostname(),
                           "pid": os.getpid(), "argv": [os.fsdecode(a) for a in sys.orig_argv]}
    # Claimed by the environment, not proven, but it names the person behind
    # a `sudo cdpctl ...`, which is what a hospital's audit asks for.
    if os.environ.get("SUDO_USER"):
        who["sudo_user"] = os.environ["SUDO_USER"]
    return who


def _journal_identity(journal: Journal | str | os.PathLike[str]) -> tuple[str, bytes]:
    if isinstance(journal, Journal):
        return journal.path, journal.meta.uuid
    with Journal.open(journal, readonly=True) as j:
        return j.path, j.meta.uuid


def _read_tail(fd: int, size: int) -> tuple[bytes | None, int]:
    """(the newest complete line, or None; bytes of a torn last line)."""
    data, start = b"", size
    while True:
        if start > 0:
            lo = max(0, start - _TAIL_BLOCK)
            data = os.pread(fd, start - lo, lo) + data
            start = lo
        end = data.rfind(b"\n")
        if end < 0:
            if start == 0:
                return None, len(data)
            continue
        begin = data.rfind(b"\n", 0, end)
        if begin >= 0 or start == 0:
            return data[begin + 1 : end], len(data) - end - 1


def _chain_after(last: bytes | None, uuid: bytes, fd: int, size: int) -> tuple[str, int]:
    """(prev hash, number) for the entry that follows the line `last`."""
    if last is None:
        return genesis(uuid), 1
    try:
        doc = json.loads(last)
        return str(doc["hash"]), int(doc["n"]) + 1
    except (ValueError, KeyError, TypeError):
        # A damaged last line must not stop the action being recorded: chain
        # onto the line's bytes and number by position; verify reports it.
        lines = os.pread(fd, size, 0).count(b"\n")
        return hashlib.sha256(last).hexdigest(), lines + 1


def append(journal: Journal | str | os.PathLike[str], action: str, arguments: dict[str, Any],
           result: dict[str, Any], ok: bool = True, anchor: bool = True, anchor_ts: int | None = None) -> Entry:
    """Enter an action in the journal's audit log, durably, and (with
    anchor=True) anchor the entry in the journal as an AUDIT record.

    `arguments` and `result` must be JSON-serialisable (non-JSON values are
    written as their str()). Failing to write the log raises OSError: the
    caller's action must then not be reported as done. Failing to anchor
    (a read-only or damaged journal) does not raise; the entry says why in
    anchor_error and stays unanchored until a later anchor covers it."""
    jpath, uuid = _journal_identity(journal)
    path = log_path(jpath)
    # Normalise through JSON once, so that the hash covers exactly what is
    # stored and verify() recomputes it from the parsed line.
    args_doc = json.loads(json.dumps(arguments, default=str))
    result_doc = json.loads(json.dumps(result, default=str))
    existed = os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        last, torn = _read_tail(fd, size)
        body: dict[str, Any] = {"v": AUDIT_VERSION, "ts": time.time_ns() // 1000, **_who(),
                                "action": action, "arguments": args_doc, "result": result_doc,
                                "ok": bool(ok)}
        if torn:
            rest = os.pread(fd, torn, size - torn)
            if _looks_torn(rest):
                # a crash while appending left part of a line: cut it, and
                # say so in the entry that replaces it
                os.ftruncate(fd, size - torn)
                size -= torn
                body["note"] = f"cut a torn entry of {torn} bytes left by an interrupted append"
            else:
                # not what a crash leaves (an edit): keep it as evidence, as
                # a line of its own that verify will report
                os.write(fd, b"\n")
                size += 1
                last = rest
                body["note"] = f"the log ended in {torn} bytes that are not an entry; kept"
        body["prev"], body["n"] = _chain_after(last, uuid, fd, size)
        digest = entry_hash(body["prev"], body)
        line = canonical({**body, "hash": digest}) + b"\n"
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the flock
    if not existed:
        dfd = os.open(jpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    entry = Entry.from_doc({**body, "hash": digest})
    if not anchor:
        return entry
    try:
        seq = _anchor(journal, entry.n, digest, anchor_ts)
    except (OSError, CdpError) as e:
        return _replace(entry, anchor_error=str(e))
    return _replace(entry, anchor_seq=seq)


def _replace(entry: Entry, **kw: Any) -> Entry:
    from dataclasses import replace

    return replace(entry, **kw)


def _anchor(journal: Journal | str | os.PathLike[str], n: int, digest: str, ts: int | None = None) -> int:
    """Append (and sync) an AUDIT record for entry n, stamped ts (default:
    now); returns its seq."""
    if isinstance(journal, Journal) and not journal.readonly:
        return _append_anchor(journal, n, digest, ts)
    jpath = journal.path if isinstance(journal, Journal) else journal
    with Journal.open(jpath) as j:
        return _append_anchor(j, n, digest, ts)


def _append_anchor(j: Journal, n: int, digest: str, ts: int | None = None) -> int:
    b = j.batch()
    b.append_audit(n, bytes.fromhex(digest), ts=ts)
    seq = b.commit()[1]
    j.sync()
    return seq


def anchor(journal: Journal | str | os.PathLike[str]) -> tuple[int, int] | None:
    """Anchor the log's newest entry (and so every entry before it): returns
    (entry number, seq of the AUDIT record), or None if the log is empty."""
    log = AuditLog(journal)
    newest = None
    for newest in log.entries():
        pass
    if newest is None:
        return None
    return newest.n, _anchor(journal, newest.n, newest.hash)


# ---- reading and verifying --------------------------------------------------------


@dataclass(slots=True)
class AuditProblem:
    severity: str  # "broken" (the trail cannot be trusted from here) or "warning"
    message: str
    entry: int | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = f"entry {self.entry}: " if self.entry is not None else (
            f"line {self.line}: " if self.line is not None else "")
        return f"{self.severity}: {where}{self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "message": self.message, "entry": self.entry,
                "line": self.line}


@dataclass(slots=True)
class AuditReport:
    path: str
    entries: int = 0
    anchors: int = 0
    anchored_through: int = 0  # newest entry an anchor vouches for (0: none)
    problems: list[AuditProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.severity == "broken" for p in self.problems)

    @property
    def first_broken(self) -> AuditProblem | None:
        return next((p for p in self.problems if p.severity == "broken"), None)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "entries": self.entries, "anchors": self.anchors,
                "anchored_through": self.anchored_through,
                "first_broken": self.first_broken.to_json() if self.first_broken else None,
                "problems": [p.to_json() for p in self.problems]}


class AuditLog:
    """The audit log of one journal (it need not exist yet)."""

    def __init__(self, journal: Journal | str | os.PathLike[str]):
        self.journal = journal
        self.journal_path, self.uuid = _journal_identity(journal)
        self.path = log_path(self.journal_path)

    def _lines(self) -> tuple[list[bytes], bytes]:
        """Complete lines and the torn rest (b"" when the file ends cleanly)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return [], b""
        *lines, rest = data.split(b"\n")
        return lines, rest

    def entries(self) -> Iterator[Entry]:
        """The entries, oldest first; AuditError at a line that is not one
        (verify() says more)."""
        lines, _ = self._lines()
        for i, raw in enumerate(lines, 1):
            try:
                yield Entry.from_doc(json.loads(raw))
            except (ValueError, KeyError, TypeError) as e:
                raise AuditError(f"{self.path} line {i}: not an audit entry ({e}); "
                                 "run cdpctl audit --verify") from None

    def verify(self, cross_check: bool = True) -> AuditReport:
        """Check the chain and (cross_check) compare it with the journal's
        AUDIT records, which takes a pass over the whole journal."""
        rep = AuditReport(self.path)
        lines, rest = self._lines()
        hashes: dict[int, str] = {}
        expect_n, expect_prev = 1, genesis(self.uuid)
        for lineno, raw in enumerate(lines, 1):
            doc, problem = _check_line(raw, lineno, expect_n, expect_prev)
            if problem is not None:
                rep.problems.append(problem)
            if doc is None:
                # unreadable: resynchronise on the next line, so that each
                # break is told once
                expect_n, expect_prev = expect_n + 1, hashlib.sha256(raw).hexdigest()
                continue
            hashes[doc["n"]] = doc["hash"]
            rep.entries += 1
            expect_n, expect_prev = doc["n"] + 1, doc["hash"]
        if rest and _looks_torn(rest):
            rep.problems.append(AuditProblem(
                "warning", f"the last line is incomplete ({len(rest)} bytes): an append was "
                "interrupted; it is cut by the next append", line=len(lines) + 1))
        elif rest:
            rep.problems.append(AuditProblem(
                "broken", "the log does not end with a newline, and what follows the last one "
                "is not the start of an entry: edited or damaged", line=len(lines) + 1))
        if cross_check:
            self._cross_check(rep, hashes, expect_n - 1)
        return rep

    def _cross_check(self, rep: AuditReport, hashes: dict[int, str], last_n: int) -> None:
        own = isinstance(self.journal, Journal)
        j = self.journal if own else Journal.open(self.journal_path, readonly=True)
        assert isinstance(j, Journal)
        try:
            try:
                for rec in j.records(kinds=(Kind.AUDIT,)):
                    rep.anchors += 1
                    n, h = rec.offset, rec.data.hex()
                    if n > last_n:
                        rep.problems.append(AuditProblem(
                            "broken", f"the journal anchors entry {n} (seq {rec.seq}) but the log "
                            f"ends at entry {last_n}: entries were deleted from the end", entry=n))
                        rep.anchored_through = last_n
                    elif hashes.get(n) != h:
                        rep.problems.append(AuditProblem(
                            "broken", f"does not match its anchor in the journal (seq {rec.seq}): "
                            "the log was rewritten", entry=n))
                    else:
                        rep.anchored_through = max(rep.anchored_through, n)
            except CdpError as e:
                rep.problems.append(AuditProblem(
                    "warning", f"journal damaged ({e}); anchors after the damage were not checked"))
        finally:
            if not own:
                j.close()
        if last_n > rep.anchored_through:
            first = rep.anchored_through + 1
            span = f"entry {first}" if first == last_n else f"entries {first}..{last_n}"
            rep.problems.append(AuditProblem(
                "warning", f"{span} not anchored in the journal yet: deleting "
                f"{'it' if first == last_n else 'them'} would go unnoticed "
                "(cdpctl audit --anchor anchors them)"))


def _looks_torn(rest: bytes) -> bool:
    """Whether bytes after the last newline can be what an interrupted append
    leaves: a prefix of one entry, which is printable ASCII (entries are
    canonical JSON) and holds no complete object with something after it."""
    if not all(0x20 <= c < 0x7F for c in rest):
        return False
    try:
        _, end = json.JSONDecoder().raw_decode(rest.decode("ascii"))
    except ValueError:
        return True  # unfinished JSON, as a cut-off line is
    return end == len(rest)


def _check_line(raw: bytes, lineno: int, expect_n: int, expect_prev: str
                ) -> tuple[dict[str, Any] | None, AuditProblem | None]:
    """(the parsed entry or None if unreadable, what is wrong or None)."""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not an object")  # noqa: TRY004 (one error path for every way a line is not an entry)
        missing = [k for k in (*_FIELDS, "hash") if k not in doc]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if not isinstance(doc["n"], int) or not isinstance(doc["hash"], str):
            raise ValueError("n or hash of the wrong type")  # noqa: TRY004 (as above)
    except ValueError as e:
        return None, AuditProblem("broken", f"not a valid audit entry ({e}): edited or damaged",
                                  line=lineno)
    n = doc["n"]
    if not isinstance(doc["v"], int) or doc["v"] > AUDIT_VERSION:
        return doc, AuditProblem("broken", f"entry version {doc['v']!r}; this cdpcore reads up "
                                 f"to {AUDIT_VERSION}", entry=n, line=lineno)
    body = {k: v for k, v in doc.items() if k != "hash"}
    try:
        ok_hash = entry_hash(str(doc["prev"]), body) == doc["hash"]
    except ValueError:  # prev is not hex
        ok_hash = False
    if not ok_hash:
        return doc, AuditProblem("broken", "its content does not match its hash: the entry was "
                                 "edited", entry=n, line=lineno)
    if canonical(doc) != raw:
        # same content, other bytes (a \u escape in upper case, a space, a
        # repeated key): still an edit, and entries are written canonical
        return doc, AuditProblem("broken", "its bytes are not the canonical form of its content: "
                                 "the line was edited", entry=n, line=lineno)
    if n != expect_n:
        return doc, AuditProblem("broken", f"found on line {lineno} where entry {expect_n} "
                                 "belongs: entries were deleted, inserted or reordered",
                                 entry=n, line=lineno)
    if doc["prev"] != expect_prev:
        what = "does not belong to this journal" if n == 1 else "does not follow the entry before it"
        return doc, AuditProblem("broken", f"{what} (chain broken)", entry=n, line=lineno)
    return doc, None


def audited(journal: Journal | str | os.PathLike[str], action: str, arguments: dict[str, Any],
            run: Callable[[], R], anchor: bool = True, required: bool = True, anchor_ts: int | None = None) -> R:
    """Run an action and enter it in the audit log, whether it succeeded
    (its result's to_json()) or failed (the error, then re-raised).

    required=False is for read-only actions such as a restore, which must
    still work from a journal on read-only media (a DR copy, a mounted
    snapshot): failing to write the log then only warns on stderr.
    anchor_ts stamps the AUDIT record (default: now), for an action whose
    records run on the caller's clock."""
    try:
        result = run()
    except BaseException as e:
        _enter(journal, action, arguments, {"error": f"{type(e).__name__}: {e}"}, False, anchor, required,
               anchor_ts)
        raise
    doc = result.to_json() if hasattr(result, "to_json") else {"result": result}
    _enter(journal, action, arguments, doc, True, anchor, required, anchor_ts)
    return result


def _enter(journal: Journal | str | os.PathLike[str], action: str, arguments: dict[str, Any],
           result: dict[str, Any], ok: bool, anchor: bool, required: bool, anchor_ts: int | None = None) -> None:
    from cdpcore.vault.replica import access_log, replica_dir_of

    rdir = replica_dir_of(journal.path if isinstance(journal, Journal) else os.fspath(journal))
    if rdir is not None:
        # A vault replica's audit.log is the source's, replicated byte for byte:
        # an entry here would make it diverge. The vault keeps its own log.
        try:
            access_log(rdir, {"v": AUDIT_VERSION, "ts": time.time_ns() // 1000, **_who(), "action": action,
                              "arguments": arguments, "result": result, "ok": bool(ok)})
        except OSError as e:
            if required:
                raise
            print(f"cdpcore: warning: {action} not entered in the vault's access log: {e.strerror}",
                  file=sys.stderr)
        return
    try:
        append(journal, action, arguments, result, ok=ok, anchor=anchor, anchor_ts=anchor_ts)
    except OSError as e:
        if required:
            raise
        print(f"cdpcore: warning: {action} not entered in the audit log: {e.strerror}",
              file=sys.stderr)
