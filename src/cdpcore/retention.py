"""Retention: prune(journal, policy) folds old records into kept points.

What a prune does (docs/journal-format.md, "Prune"):

- The boundary B is the state at now - keep_all, rounded DOWN to the last
  record of a sealed segment, so that a prune only ever replaces whole sealed
  segments (the keep-all window keeps a little more than asked).
- The kept points at or before B are: per policy tier (hourly, daily,
  monthly, counted back from now), the last FLUSH of all files in each
  bucket, else the last record of the bucket; every BOOKMARK (unless
  drop_bookmarks); and B itself. All of them are kept.
- Segments 1..s (up to B) are replaced by COMPACTED segments holding one
  *group* per kept point k: the net change from the previous kept point.
  Namespace records verbatim (file ids keep their bindings, also for the
  records after B); per inode the data records collapse to a TRUNCATE to
  the smallest size a truncate left, WRITEs of the union of the ranges the
  interval wrote, read at k from a Plan, and the final size; the kept
  FLUSH/BOOKMARK/AUDIT record last. Seqs in a group lie in (previous kept
  point, k] and may skip (the C scan allows gaps in COMPACTED segments);
  the last record carries k and the KEPT flag. The base the journal
  started from stays (the first group is the net change from it), unless
  a new base at the first kept point is clearly smaller.
- Timestamps: records keep theirs (they set mtimes); the group reaches
  the running maximum of the original journal at k, and a reader rounds a
  time that ends inside a group down to the kept point before it.
- Crash safety: new segments (NAME.seg.prune) and bases (base/NAME.prune)
  are written and fsync'd, then the manifest prune.json names them and the
  segments and bases they replace; then they are renamed into place and the
  old ones deleted; the manifest goes last. A writable Journal.open finishes
  a prune whose manifest exists and discards the leftovers of one that had
  not written it (recover_prune).
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cdpcore._native import INT64_MIN, ffi, now_us
from cdpcore.errors import CdpError, PointError
from cdpcore.format import (
    BASE_DIR,
    MAX_PAYLOAD,
    NO_MODE,
    REC_KEPT,
    SEG_COMPACTED,
    SEGMENT_DIR,
    Kind,
    encode_path,
    encode_record,
    encode_segment_header,
    index_name,
    segment_name,
    setattr_payload,
)
from cdpcore.journal import Journal, fsync_dir, write_durable
from cdpcore.plan import Inode, Tree, merge_ranges
from cdpcore.point import datetime_to_us, format_us

MANIFEST = "prune.json"
PRUNE_SUFFIX = ".prune"
BASE_PREFIX = "pruned-"
KILL_ENV = "CDPCORE_PRUNE_KILL_AFTER"  # tests: SIGKILL this process after step N
# tests: write every group as the interval's own records (the fallback when
# a net change would need more seqs than its interval had), so that the
# fallback is exercised on real journals
VERBATIM_ENV = "CDPCORE_PRUNE_VERBATIM"

_FREE = frozenset({Kind.FLUSH, Kind.BOOKMARK, Kind.AUDIT})  # kinds that change no tree
_US = {"s": 10**6, "m": 60 * 10**6, "h": 3600 * 10**6, "d": 86400 * 10**6,
       "w": 7 * 86400 * 10**6, "y": 365 * 86400 * 10**6}
_HOUR, _DAY = _US["h"], _US["d"]


class PruneError(CdpError):
    exit_code = 1


def parse_duration(text: str) -> int:
    """'24h', '7d', '30y', '90m', '3600s', '2w' -> microseconds (y = 365 days)."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdwy])\s*", str(text))
    if not m:
        raise ValueError(f"invalid duration {text!r}: a number and one of s, m, h, d, w, y (e.g. 24h, 30d)")
    return int(m.group(1)) * _US[m.group(2)]


def format_duration(us: int) -> str:
    for unit in ("y", "d", "h", "m"):
        if us and us % _US[unit] == 0:
            return f"{us // _US[unit]}{unit}"
    return f"{us // 10**6}s"


@dataclass(frozen=True)
class Policy:
    """How much history a prune keeps; durations in microseconds (0 = no tier)."""

    keep_all: int
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_monthly: int = 0
    drop_bookmarks: bool = False

    @classmethod
    def parse(cls, keep_all: str, keep_hourly: str | None = None, keep_daily: str | None = None,
              keep_monthly: str | None = None, drop_bookmarks: bool = False) -> Policy:
        def opt(x: str | None) -> int:
            return parse_duration(x) if x else 0

        return cls(parse_duration(keep_all), opt(keep_hourly), opt(keep_daily), opt(keep_monthly),
                   drop_bookmarks)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"keep_all": format_duration(self.keep_all)}
        for name in ("keep_hourly", "keep_daily", "keep_monthly"):
            if getattr(self, name):
                doc[name] = format_duration(getattr(self, name))
        doc["drop_bookmarks"] = self.drop_bookmarks
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Policy:
        return cls.parse(doc["keep_all"], doc.get("keep_hourly"), doc.get("keep_daily"),
                         doc.get("keep_monthly"), bool(doc.get("drop_bookmarks", False)))


@dataclass
class PruneResult:
    dry_run: bool
    boundary: int | None = None  # B: the last seq folded (None: nothing to prune)
    kept: list[int] = field(default_factory=list)  # kept points <= B
    # always empty: every point the policy asks for is kept (the field stays
    # for callers of the first prune design, which dropped points that did not fit)
    dropped: list[int] = field(default_factory=list)
    pruned_records: int = 0  # records <= B that are no longer points
    segments_replaced: list[int] = field(default_factory=list)
    segments_written: list[int] = field(default_factory=list)
    bases_written: list[str] = field(default_factory=list)
    bases_removed: list[str] = field(default_factory=list)
    bytes_before: int = 0  # segments + bases
    bytes_after: int = 0
    segment_bytes_before: int = 0  # segments/*.seg only
    segment_bytes_after: int = 0
    message: str = ""

    @property
    def reclaimed_segments(self) -> int:
        return self.segment_bytes_before - self.segment_bytes_after

    @property
    def reclaimed(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "boundary": self.boundary, "kept": self.kept, "dropped": self.dropped,
                "pruned_records": self.pruned_records, "segments_replaced": self.segments_replaced,
                "segments_written": self.segments_written, "bases_written": self.bases_written,
                "bases_removed": self.bases_removed, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "reclaimed": self.reclaimed,
                "segment_bytes_before": self.segment_bytes_before,
                "segment_bytes_after": self.segment_bytes_after, "message": self.message}


# ---- crash steps ----------------------------------------------------------------

_steps = 0


def _step() -> None:
    """A point where a crash must leave a journal that verifies and restores."""
    global _steps
    _steps += 1
    limit = os.environ.get(KILL_ENV)
    if limit and _steps == int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


# ---- policy -> kept points ---------------------------------------------------------


@dataclass
class _Cand:
    seq: int
    ts: int  # the record's own timestamp
    cum: int  # running maximum of timestamps through this record
    kind: int
    fid: int
    offset: int
    payload: bytes


def _bucket_month(ts: int) -> tuple[int, int]:
    d = datetime.fromtimestamp(ts / 1e6, tz=UTC)
    return d.year, d.month


def _kept_points(cands: list[_Cand], policy: Policy, now: int, boundary: int) -> set[int]:
    kept = {boundary}
    tiers = ((policy.keep_hourly, lambda t: t // _HOUR), (policy.keep_daily, lambda t: t // _DAY),
             (policy.keep_monthly, _bucket_month))
    for span, bucket in tiers:
        if not span:
            continue
        lo = now - span
        last: dict[Any, int] = {}
        flush: dict[Any, int] = {}
        for c in cands:
            if c.ts < lo:
                continue
            key = bucket(c.ts)
            last[key] = c.seq
            if c.kind == Kind.FLUSH and c.fid == 0:
                flush[key] = c.seq
        kept.update(flush.get(k, s) for k, s in last.items())
    if not policy.drop_bookmarks:
        kept.update(c.seq for c in cands if c.kind == Kind.BOOKMARK)
    return kept


# ---- the prune -------------------------------------------------------------------


@dataclass
class _Rec:
    """One record of a compacted group (its seq is given when the group is laid out)."""

    kind: int
    fid: int
    offset: int
    payload: bytes
    ts: int
    free_ts: bool  # its timestamp changes no state (may carry the group's running maximum)
    seq: int = 0
    flags: int = 0

    def size(self) -> int:
        return (48 + len(self.payload) + 7) & ~7


@dataclass
class _Group:
    """The records that take the tree from the previous kept point to `point`."""

    point: int
    cum: int  # running maximum of the original timestamps through `point`
    records: list[_Rec]
    base: str | None = None  # name under base/ of a new base this group's BASE names
    how: str = "net"  # "net", "verbatim" (the interval's own records) or "base"
    share_with: str | None = None  # a base whose unchanged files the new base hard-links

    def size(self) -> int:
        return sum(r.size() for r in self.records)


@dataclass
class _Out:
    """One compacted segment to write: whole groups, in order."""

    seg_no: int
    groups: list[_Group]


def _dir_bytes(path: str) -> int:
    total = 0
    seen = set()
    for top, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _seg_bytes(j: Journal) -> int:
    d = os.path.join(j.path, SEGMENT_DIR)
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".seg"))


def _space(j: Journal) -> int:
    return _dir_bytes(os.path.join(j.path, SEGMENT_DIR)) + _dir_bytes(os.path.join(j.path, BASE_DIR))


def prune(journal: Journal | str | os.PathLike[str], policy: Policy | dict[str, Any] | None = None,
          now: int | datetime | None = None, dry_run: bool = False) -> PruneResult:
    """Fold the records older than policy.keep_all into kept points (see the
    module doc). `policy` defaults to the one stored in journal.json.
    `now` (epoch microseconds or a datetime) defaults to the clock. The
    prune is entered in the audit log (and anchored) after it completes."""
    if not isinstance(journal, Journal):
        with Journal.open(journal) as j:
            return prune(j, policy, now, dry_run)
    j = journal
    if j.readonly:
        raise PermissionError("prune needs the journal opened for writing")
    if policy is None:
        if j.meta.retention is None:
            raise PruneError("no policy given and none stored in journal.json (--save-policy)")
        policy = Policy.from_json(j.meta.retention)
    elif isinstance(policy, dict):
        policy = Policy.from_json(policy)
    t_now = now_us() if now is None else (now if isinstance(now, int) else datetime_to_us(now))
    pol = policy
    from cdpcore import audit

    args = {"policy": pol.to_json(), "now": format_us(t_now), "dry_run": dry_run}
    return audit.audited(j, "prune", args, lambda: _prune(j, pol, t_now, dry_run), anchor=not dry_run)


def save_policy(j: Journal, policy: Policy) -> None:
    """Store the policy in journal.json (the "retention" field)."""
    from dataclasses import replace

    meta = replace(j.meta, retention=policy.to_json())
    write_durable(os.path.join(j.path, "journal.json"), meta.to_json().encode())
    j.meta = meta


def _prune(j: Journal, policy: Policy, now: int, dry_run: bool) -> PruneResult:
    res = PruneResult(dry_run)
    j.refresh()
    segs = list(j._segs)
    res.bytes_before = res.bytes_after = _space(j)
    res.segment_bytes_before = res.segment_bytes_after = _seg_bytes(j)
    try:
        r = j._resolve_time(now - policy.keep_all)
    except PointError:
        res.message = "no record is older than the keep-all window: nothing to prune"
        return res
    sealed = [i for i in range(len(segs) - 1) if segs[i].count and segs[i].last_seq <= r]
    if not sealed:
        res.message = "no sealed segment lies before the keep-all boundary: nothing to prune"
        return res
    s_idx = sealed[-1]
    boundary = segs[s_idx].last_seq
    old_kept, old_kept_set = j._kept_points()

    # One pass over the records up to the boundary: the candidates for kept
    # points (inside earlier pruned history only its kept points are) and
    # every record's header, for the groups.
    cands: list[_Cand] = []
    cum = INT64_MIN
    for seq, ts, kind, _fl, fid, offset, payload in j._iter_raw(j.first_seq, boundary):
        cum = max(cum, ts)
        if old_kept and seq < old_kept[-1] and seq not in old_kept_set:
            continue
        cands.append(_Cand(seq, ts, cum, kind, fid, offset, bytes(payload) if kind in _FREE else b""))
    kept = sorted(_kept_points(cands, policy, now, boundary))
    res.boundary = boundary
    res.kept = kept
    res.pruned_records = len(cands) - len(kept)
    if all(s.compacted for s in segs[: s_idx + 1]) and kept == [k for k in old_kept if k <= boundary]:
        res.message = "already pruned to this policy: nothing to do"
        res.pruned_records = 0
        return res
    res.segments_replaced = [s.seg_no for s in segs[: s_idx + 1]]
    first_seq = j.first_seq
    if dry_run:
        res.message = (f"would fold seq {first_seq}..{boundary} into {len(kept)} kept points "
                       f"({res.pruned_records} points pruned)")
        return res
    cums = {c.seq: c.cum for c in cands}
    groups = _groups(j, kept, cums)
    outs = _pack(groups, segs[s_idx].seg_no, s_idx + 1, j.meta.segment_size)
    res.segments_written = [o.seg_no for o in outs]
    _execute(j, segs[: s_idx + 1], outs, groups, res)
    res.bytes_after = _space(j)
    res.segment_bytes_after = _seg_bytes(j)
    hows = collections.Counter(g.how for g in groups)
    res.message = (f"folded seq {first_seq}..{boundary} into {len(kept)} kept points ("
                   + ", ".join(f"{n} {how}" for how, n in sorted(hows.items())) + ")")
    return res


# ---- groups: the net change between kept points ------------------------------------

# Kinds kept verbatim in a group: the namespace (few records, and file ids
# that records bind in between must still resolve) and DIRTY notes.
_NS = frozenset({Kind.FILEMAP, Kind.CREATE, Kind.RENAME, Kind.UNLINK, Kind.MKDIR, Kind.RMDIR,
                 Kind.SETATTR, Kind.SYMLINK, Kind.LINK})
_DATA = frozenset({Kind.WRITE, Kind.TRUNCATE})


@dataclass
class _Raw:
    seq: int
    ts: int
    kind: int
    fid: int
    offset: int
    payload: bytes  # empty for WRITE (its length is in `length`)
    length: int


class _Sim(Tree):
    """The namespace of the original records, to tell which inode each data
    record wrote (file ids are rebound, files renamed and replaced between
    kept points)."""

    def load_base(self, base: str) -> None:
        self.reset()
        linked: dict[tuple[int, int], Inode] = {}  # hard links inside a base are one inode
        for rel, _full, st in self.walk_base(base):
            same = linked.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
            if same is not None:
                self.nodes[rel] = same
                continue
            ino = self.new_inode(st.st_mode & 0o7777)
            if st.st_nlink > 1:
                linked[(st.st_dev, st.st_ino)] = ino
            self.nodes[rel] = ino


@dataclass
class _Touch:
    """What the data records of one interval did to one inode."""

    ranges: list[tuple[int, int]] = field(default_factory=list)
    min_trunc: int | None = None
    last: int = -1  # index, in the interval, of its last data record


def _groups(j: Journal, kept: list[int], cums: dict[int, int]) -> list[_Group]:
    from cdpcore.plan import base_path

    sim = _Sim()
    groups: list[_Group] = []
    prev = j.first_seq - 1
    for k in kept:
        # one interval at a time, read to the end before the plan at k is
        # built (a reader left open across it could lose its segment's
        # mapping to the journal's cache of open segments)
        raw = [_Raw(seq, ts, kind, fid, offset, b"" if kind == Kind.WRITE else bytes(payload), len(payload))
               for seq, ts, kind, _fl, fid, offset, payload in j._iter_raw(prev + 1, k)]
        g = _net_group(j, sim, raw, prev, k, cums[k], cums.get(prev, INT64_MIN), base_path)
        groups.append(g)
        prev = k
    if len(groups) > 0:
        _maybe_new_base(j, groups, kept, cums)
    return groups


def _net_group(j: Journal, sim: _Sim, raw: list[_Raw], prev: int, k: int, cum: int, cum_prev: int,
               base_path: Any) -> _Group:
    """The group for kept point k: the namespace records of (prev, k]
    verbatim, each inode's net data change at the place of its last data
    record, the kept record last. Falls back to the interval's own records
    when the net change needs more seqs than the interval had."""
    start = 0
    for i, r in enumerate(raw):
        if r.kind == Kind.BASE:
            start = i  # the tree before it does not matter
    touched: dict[int, tuple[Inode, _Touch]] = {}
    for i in range(start, len(raw)):
        r = raw[i]
        if r.kind == Kind.BASE:
            sim.load_base(base_path(j, r.seq, r.payload))
        elif r.kind in _NS:
            sim.apply_ns(r.kind, r.fid, r.offset, r.payload, r.seq, r.ts)
        elif r.kind in _DATA:
            ino = sim.inode(r.fid, "write" if r.kind == Kind.WRITE else "truncate")
            t = touched.setdefault(ino.key, (ino, _Touch()))[1]
            if r.kind == Kind.WRITE:
                if r.length:
                    t.ranges.append((r.offset, r.offset + r.length))
            else:
                t.min_trunc = r.offset if t.min_trunc is None else min(t.min_trunc, r.offset)
            t.last = i
    try:
        recs = _emit(j, sim, raw, start, k, cum, cum_prev, touched)
    except _NoFit:
        recs = None
    if recs is None or len(recs) > k - prev or os.environ.get(VERBATIM_ENV):
        return _verbatim(j, prev, k, cum, cum_prev)
    for i, r in enumerate(recs):
        r.seq = k - len(recs) + 1 + i
    recs[-1].flags = REC_KEPT
    return _Group(k, cum, recs)


class _NoFit(Exception):
    pass


def _emit(j: Journal, sim: _Sim, raw: list[_Raw], start: int, k: int, cum: int, cum_prev: int,
          touched: dict[int, tuple[Inode, _Touch]]) -> list[_Rec]:
    from cdpcore.plan import build_plan

    # inodes whose content still matters at k: reachable, or bound by a
    # file id that later records may write through
    live: dict[int, str | int] = {}
    for path, node in sim.nodes.items():
        if isinstance(node, Inode) and node.key in touched and node.key not in live:
            live[node.key] = path
    for fid, ino in sim.ids.items():
        if ino.key in touched and ino.key not in live:
            live[ino.key] = fid
    at_last = {t.last: key for key, (_ino, t) in touched.items() if key in live}
    out: list[_Rec] = []
    plan = build_plan(j, k) if at_last else None
    try:
        for i in range(start, len(raw)):
            r = raw[i]
            if r.kind == Kind.BASE or r.kind in _NS or r.kind == Kind.DIRTY:
                out.append(_Rec(r.kind, r.fid, r.offset, r.payload, r.ts, r.kind != Kind.CREATE))
            elif i in at_last:
                assert plan is not None
                key = at_last[i]
                where = live[key]
                node = plan.tree.nodes.get(where) if isinstance(where, str) else plan.tree.ids.get(where)
                if not isinstance(node, Inode):
                    raise _NoFit  # the plan disagrees with the namespace replay: keep the records
                out.extend(_net_data(plan, node, touched[key][1], r.fid, r.ts))
        last = raw[-1]
        if last.seq == k and last.kind in _FREE:
            out.append(_Rec(last.kind, last.fid, last.offset, last.payload, cum, True))
        if not out:
            raise _NoFit
        # the group's records must reach its running maximum, so that a
        # time before it resolves to the kept point before the group
        if max(r.ts for r in out) < cum and cum > cum_prev:
            free = [r for r in out if r.free_ts]
            if free:
                free[-1].ts = cum
            else:
                out.append(_Rec(Kind.SETATTR, 0, NO_MODE, setattr_payload(_NOOP_PATH, None), cum, True))
    finally:
        if plan is not None:
            plan.close()
    return out


def _net_data(plan: Any, node: Inode, t: _Touch, fid: int, ts: int) -> list[_Rec]:
    """One inode's change over an interval: a TRUNCATE to the smallest size
    a truncate left (what it cut reads as zeros unless written again), the
    data the interval wrote as it reads at the kept point (overlapping
    rewrites collapse), the final size when that differs. All with the
    timestamp of the inode's last data record: the last one sets its mtime."""
    size = plan.size_of(node)
    recs: list[_Rec] = []
    if t.min_trunc is not None:
        recs.append(_Rec(Kind.TRUNCATE, fid, t.min_trunc, b"", ts, True))
    end = t.min_trunc or 0
    # data extents of the file, neighbours joined (pieces from different
    # records that touch are one run of bytes: one WRITE)
    extents: list[tuple[int, int]] = []
    for off, length, _f, _src in plan.extents(node):
        if extents and extents[-1][0] + extents[-1][1] == off:
            extents[-1] = (extents[-1][0], extents[-1][1] + length)
        else:
            extents.append((off, length))
    for a, b in merge_ranges(t.ranges):
        b = min(b, size)
        for off, length in extents:  # data only: holes stay holes
            lo, hi = max(a, off), min(b, off + length)
            while lo < hi:
                n = min(hi - lo, MAX_PAYLOAD)
                recs.append(_Rec(Kind.WRITE, fid, lo, plan.read(node, lo, n), ts, True))
                lo += n
                end = max(end, lo)
    if t.min_trunc is not None and end != size:
        recs.append(_Rec(Kind.TRUNCATE, fid, size, b"", ts, True))
    if not recs:
        # only empty writes: one keeps the mtime they set
        recs.append(_Rec(Kind.WRITE, fid, 0, b"", ts, True))
    recs[-1].free_ts = False
    return recs


def _verbatim(j: Journal, prev: int, k: int, cum: int, cum_prev: int) -> _Group:
    """The interval's own records (seqs, timestamps and all) from its last
    BASE on, but for FLUSH, BOOKMARK and AUDIT records that are not the kept
    point (a FLUSH left inside would be a consistent point that is not
    kept): always fits, saves little."""
    recs: list[_Rec] = []
    for seq, ts, kind, _fl, fid, offset, payload in j._iter_raw(prev + 1, k):
        if kind in _FREE and seq != k:
            continue
        if kind == Kind.BASE:
            recs.clear()  # the tree before a base does not matter
        ts_free = kind in _FREE or kind == Kind.BASE or (kind in _NS and kind != Kind.CREATE)
        recs.append(_Rec(kind, fid, offset, bytes(payload), ts, ts_free, seq))
    last = recs[-1]
    if last.kind in _FREE:
        last.ts = cum
    if max(r.ts for r in recs) < cum and cum > cum_prev:  # the latest timestamp was on a record dropped
        free = [r for r in recs if r.free_ts]
        if free:
            free[-1].ts = cum
        else:  # a no-op SETATTR takes the seq of a dropped record
            gap = next(s for s in range(k - 1, prev, -1) if s not in {r.seq for r in recs})
            recs.insert(0, _Rec(Kind.SETATTR, 0, NO_MODE, setattr_payload(_NOOP_PATH, None), cum, True, gap))
            recs.sort(key=lambda r: r.seq)
    recs[-1].flags = REC_KEPT
    return _Group(k, cum, recs, how="verbatim")


# SETATTR that changes nothing (mode and mtime "unchanged") of a path that
# need not exist: it only carries a group's running maximum timestamp.
_NOOP_PATH = ".cdpcore-prune-time"


_BLOCK = 4096  # allocation unit assumed when a base copy's size is estimated


def _maybe_new_base(j: Journal, groups: list[_Group], kept: list[int], cums: dict[int, int]) -> None:
    """Replace the first group by a new base at k0 when that is smaller:
    the first group keeps the base the journal started from (or the last
    before k0) plus the net change since; when most of that base is dead
    at k0 (files deleted or rewritten whole, say after ransomware), one
    copy of the tree at k0 costs less. The copy is estimated at whole
    blocks per file, which is what makes copies of small files dear."""
    from cdpcore.plan import Dir, build_plan

    g0 = groups[0]
    k0 = g0.point
    first = g0.records[0]
    old_base = None
    if first.kind == Kind.BASE:
        ref = first.payload.decode("utf-8", "replace")
        old_base = os.path.join(j.path, *ref.split("/"))
        if any(r.kind == Kind.BASE and r.payload == first.payload for g in groups[1:] for r in g.records):
            return  # the base stays anyway
    cost_now = g0.size() + (_dir_bytes(old_base) if old_base is not None else 0)
    if cost_now < 64 * _BLOCK:
        return
    with build_plan(j, k0) as plan:
        per_key: dict[int, int] = {}
        copy = 0
        for node in plan.tree.nodes.values():
            if isinstance(node, Inode):
                if node.key not in per_key:
                    lo, hi = plan.piece_range(node)
                    per_key[node.key] = sum(-(-n // _BLOCK) * _BLOCK for n in plan.pieces[2][lo:hi])
            elif isinstance(node, Dir):
                copy += _BLOCK
        copy += sum(per_key.values())
    if copy >= cost_now * 0.8:
        return
    name = f"{BASE_PREFIX}{k0:016x}"
    recs = [_Rec(Kind.BASE, 0, 0, f"{BASE_DIR}/{name}".encode(), cums[k0], True)]
    recs += [_Rec(kind, fid, off, payload, cums[k0], True) for kind, fid, off, payload in _bindings(j, k0)]
    kept_rec = g0.records[-1]
    if kept_rec.kind in _FREE:
        recs.append(_Rec(kept_rec.kind, kept_rec.fid, kept_rec.offset, kept_rec.payload, cums[k0], True))
    if len(recs) > k0 - j.first_seq + 1:
        return  # (too many file ids bound for the seqs: keep the net change)
    for i, r in enumerate(recs):
        r.seq = k0 - len(recs) + 1 + i
    recs[-1].flags = REC_KEPT
    groups[0] = _Group(k0, cums[k0], recs, base=name, how="base",
                       share_with=old_base if old_base is not None and os.path.isdir(old_base) else None)


def _pack(groups: list[_Group], top_no: int, max_segs: int, seg_size: int) -> list[_Out]:
    """Whole groups into at most max_segs segments of about seg_size bytes
    (a group is never split: each segment ends with a kept point), numbered
    so that the last is top_no."""
    cap = seg_size
    while True:
        outs: list[list[_Group]] = [[]]
        used = 0
        for g in groups:
            if outs[-1] and used + g.size() > cap:
                outs.append([])
                used = 0
            outs[-1].append(g)
            used += g.size()
        if len(outs) <= max_segs:
            break
        cap *= 2
    first_no = top_no - len(outs) + 1
    return [_Out(first_no + i, gs) for i, gs in enumerate(outs)]


def _bindings(j: Journal, seq: int, only: set[int] | None = None) -> list[tuple[int, int, int, bytes]]:
    """FILEMAP (and UNLINK) records that bind every file id bound at seq
    (or those in `only`), to the same file, on top of the tree at seq
    without changing it."""
    from cdpcore.filemap import FileMap
    from cdpcore.format import Kind as K
    from cdpcore.journal import _NS_KINDS
    from cdpcore.plan import Inode, build_plan

    fmap = FileMap()
    for _s, _ts, kind, _fl, fid, _off, payload in j._iter_raw(j.first_seq, seq):
        if kind in _NS_KINDS:
            fmap.apply(kind, fid, bytes(payload))
    with build_plan(j, seq) as plan:
        paths: dict[int, list[str]] = {}
        for p, node in plan.tree.nodes.items():
            if isinstance(node, Inode):
                paths.setdefault(node.key, []).append(p)
        out: list[tuple[int, int, int, bytes]] = []
        orphans: dict[int, list[int]] = {}
        for fid, ino in sorted(plan.tree.ids.items()):
            if only is not None and fid not in only:
                continue
            names = paths.get(ino.key)
            if names:
                want = fmap.path_of(fid)
                out.append((K.FILEMAP, fid, 0, encode_path(want if want in names else min(names))))
            else:
                orphans.setdefault(ino.key, []).append(fid)
        for key, fids in orphans.items():
            scratch = f".cdpcore-prune-orphan-{key}"
            while scratch in plan.tree.nodes:
                scratch += "_"
            out.extend((K.FILEMAP, fid, 0, encode_path(scratch)) for fid in fids)
            out.append((K.UNLINK, 0, 0, encode_path(scratch)))
    return out


def _fsync_tree(top: str) -> None:
    for d, _dirs, files in os.walk(top):
        for name in files:
            p = os.path.join(d, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(d)


def _single_paths(top: str) -> dict[str, os.stat_result]:
    """Regular files of a base that are the only name of their inode in it."""
    seen: dict[tuple[int, int], list[str]] = {}
    stats: dict[str, os.stat_result] = {}
    for d, _dirs, files in os.walk(top):
        for name in files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            if os.path.islink(p):
                continue
            rel = os.path.relpath(p, top)
            seen.setdefault((st.st_dev, st.st_ino), []).append(rel)
            stats[rel] = st
    return {names[0]: stats[names[0]] for names in seen.values() if len(names) == 1}


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _share(plan: Any, new: str, old: str) -> None:
    """Replace files of the new base that equal the same path's file in the
    previous base (bytes and mode; mtime too where the journal knows it) by
    hard links to it: unchanged files cost nothing. Only files that are the
    single name of their inode in both bases, so that loading a base, which
    keeps hard links inside it as one inode, sees no link that is not in the
    tree."""
    from cdpcore.plan import Inode

    olds = _single_paths(old)
    for rel, st in _single_paths(new).items():
        ost = olds.get(rel)
        if ost is None or ost.st_size != st.st_size or (ost.st_mode & 0o7777) != (st.st_mode & 0o7777):
            continue
        node = plan.tree.nodes.get(rel.replace(os.sep, "/"))
        if not isinstance(node, Inode):
            continue
        if node.mtime_us is not None and ost.st_mtime_ns != st.st_mtime_ns:
            continue
        a, b = os.path.join(new, rel), os.path.join(old, rel)
        if not _same_bytes(a, b):
            continue
        tmp = a + ".link"
        os.link(b, tmp)
        os.replace(tmp, a)


def _base_refs(j: Journal, lo: int, hi: int) -> set[str]:
    refs = set()
    for _s, _ts, kind, _fl, _fid, _off, payload in j._iter_raw(lo, hi):
        if kind == Kind.BASE:
            ref = bytes(payload).decode("utf-8", "replace")
            if ref.startswith(BASE_DIR + "/") and "/" not in ref[len(BASE_DIR) + 1:]:
                refs.add(ref[len(BASE_DIR) + 1:])
    return refs


def _execute(j: Journal, old: list[Any], outs: list[_Out], groups: list[_Group], res: PruneResult) -> None:
    from cdpcore.plan import build_plan
    from cdpcore.restore import write_plan

    segdir = os.path.join(j.path, SEGMENT_DIR)
    basedir = os.path.join(j.path, BASE_DIR)
    os.makedirs(basedir, exist_ok=True)
    boundary = old[-1].last_seq
    old_refs = _base_refs(j, j.first_seq, boundary)
    new_bases: list[str] = []
    # 1. the new base (at most one: at the first kept point), under a temporary name
    for g in groups:
        if g.base is None or os.path.isdir(os.path.join(basedir, g.base)):
            continue  # (the same name is the same tree: the state at that seq)
        tmp = os.path.join(basedir, g.base + PRUNE_SUFFIX)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.mkdir(tmp)
        with build_plan(j, g.point) as plan:
            write_plan(plan, tmp)
            if g.share_with is not None:
                _share(plan, tmp, g.share_with)
        _fsync_tree(tmp)
        fsync_dir(basedir)
        new_bases.append(g.base)
        _step()
    # 2. the compacted segments, under temporary names
    for o in outs:
        first = o.groups[0].records[0].seq
        data = bytearray(encode_segment_header(j.meta.uuid, o.seg_no, first, now_us(), SEG_COMPACTED))
        for g in o.groups:
            for r in g.records:
                data += encode_record(r.kind, r.seq, r.ts, r.fid, r.offset, r.payload, r.flags)
        path = os.path.join(segdir, segment_name(o.seg_no) + PRUNE_SUFFIX)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _step()
    fsync_dir(segdir)
    keep_refs = {r.payload.decode("utf-8", "replace")[len(BASE_DIR) + 1:]
                 for g in groups for r in g.records if r.kind == Kind.BASE}
    # 3. the manifest: from here on the prune is decided
    manifest = {"version": 1, "new_segments": [o.seg_no for o in outs],
                "old_segments": [s.seg_no for s in old], "new_bases": new_bases,
                "old_bases": sorted(old_refs - keep_refs)}
    writer = j._need_writer()
    writer.lock()
    try:
        write_durable(os.path.join(j.path, MANIFEST), json.dumps(manifest, sort_keys=True).encode())
        _step()
        for seg in list(j._open_segs.values()):
            seg.close()
        j._open_segs.clear()
        _finish(j.path, manifest)
        j._segs = []
        j._load(recover=True)
    finally:
        writer.unlock()
    res.bases_written = new_bases
    res.bases_removed = sorted(old_refs - keep_refs)


def _finish(path: str, manifest: dict[str, Any]) -> None:
    """Complete a decided prune (idempotent: also what recovery runs)."""
    from cdpcore import checkpoint

    checkpoint.discard(path)  # saved plans name the segments and records about to change
    segdir = os.path.join(path, SEGMENT_DIR)
    basedir = os.path.join(path, BASE_DIR)
    new = set(manifest["new_segments"])
    for name in manifest["new_bases"]:
        tmp = os.path.join(basedir, name + PRUNE_SUFFIX)
        if os.path.isdir(tmp):
            os.rename(tmp, os.path.join(basedir, name))
            _step()
    if os.path.isdir(basedir):
        fsync_dir(basedir)
    for no in sorted(set(manifest["old_segments"]) | new):
        idx = os.path.join(segdir, index_name(no))
        if os.path.exists(idx):
            os.unlink(idx)
        seg = os.path.join(segdir, segment_name(no))
        if no in new:
            if os.path.exists(seg + PRUNE_SUFFIX):
                os.replace(seg + PRUNE_SUFFIX, seg)
                _step()
        elif os.path.exists(seg):
            os.unlink(seg)
            _step()
    fsync_dir(segdir)
    for name in manifest["old_bases"]:
        p = os.path.join(basedir, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
            _step()
    if os.path.isdir(basedir):
        fsync_dir(basedir)
    os.unlink(os.path.join(path, MANIFEST))
    fsync_dir(path)
    _step()


def recover_prune(path: str) -> str | None:
    """Finish a prune whose manifest was written, or discard the leftovers
    of one that had not got that far. Called by a writable Journal.open
    under the journal lock. Returns what it did, or None."""
    man = os.path.join(path, MANIFEST)
    segdir = os.path.join(path, SEGMENT_DIR)
    basedir = os.path.join(path, BASE_DIR)
    if os.path.exists(man):
        with open(man, "rb") as f:
            manifest = json.loads(f.read())
        _finish(path, manifest)
        return "finished an interrupted prune (prune.json)"
    gone = 0
    for name in os.listdir(segdir) if os.path.isdir(segdir) else ():
        if name.endswith(".seg" + PRUNE_SUFFIX):
            os.unlink(os.path.join(segdir, name))
            gone += 1
    for name in os.listdir(basedir) if os.path.isdir(basedir) else ():
        if name.endswith(PRUNE_SUFFIX):
            shutil.rmtree(os.path.join(basedir, name))
            gone += 1
    if os.path.exists(man + ".tmp"):
        os.unlink(man + ".tmp")
    return f"discarded the leftovers of an interrupted prune ({gone} files)" if gone else None
