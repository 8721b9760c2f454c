"""Retention: prune(journal, policy) folds old records into kept points.

What a prune does (docs/journal-format.md, "Prune"):

- The boundary B is the state at now - keep_all, rounded DOWN to the last
  record of a sealed segment, so that a prune only ever replaces whole sealed
  segments (the keep-all window keeps a little more than asked).
- The kept points at or before B are: per policy tier (hourly, daily,
  monthly, counted back from now), the last FLUSH of all files in each
  bucket, else the last record of the bucket; every BOOKMARK (unless
  drop_bookmarks); and B itself.
- Segments 1..s (up to B) are replaced by one COMPACTED segment per kept
  point k, whose last record carries seq k. When the tree changed since the
  previous kept point, the segment starts with a BASE record naming a copy
  of the tree at k (base/pruned-<16 hex of k>/, materialised from a Plan); a
  kept FLUSH, BOOKMARK or AUDIT record ends it verbatim. The segment for B
  also re-binds every file id bound at B (FILEMAP records; ids of unlinked
  but open files through a FILEMAP + UNLINK of a scratch name), so that the
  records after B read exactly as before.
- Crash safety: new segments (NAME.seg.prune) and bases (base/NAME.prune)
  are written and fsync'd, then the manifest prune.json names them and the
  segments and bases they replace; then they are renamed into place and the
  old ones deleted; the manifest goes last. A writable Journal.open finishes
  a prune whose manifest exists and discards the leftovers of one that had
  not written it (recover_prune).
"""
from __future__ import annotations

import bisect
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
    SEG_COMPACTED,
    SEGMENT_DIR,
    Kind,
    encode_path,
    encode_record,
    encode_segment_header,
    index_name,
    segment_name,
)
from cdpcore.journal import Journal, _fsync_dir, write_durable
from cdpcore.point import datetime_to_us, format_us

MANIFEST = "prune.json"
PRUNE_SUFFIX = ".prune"
BASE_PREFIX = "pruned-"
KILL_ENV = "CDPCORE_PRUNE_KILL_AFTER"  # tests: SIGKILL this process after step N

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
    # points the policy asked for that did not fit (segment numbers or seq
    # room, see docs/journal-format.md "Prune"): pruned too
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
class _Out:
    """One compacted segment to write."""

    seg_no: int
    point: int
    ts: int
    base: str | None  # name under base/ of the tree at `point`, when it changed
    records: list[tuple[int, int, int, bytes]]  # (kind, file id, offset, payload) after the BASE


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

    # One pass over the records up to the last candidate boundary.
    s_max = sealed[-1]
    compact_ranges = [(s.first_seq, s.last_seq) for s in segs[: s_max + 1] if s.compacted]
    cstarts = [a for a, _ in compact_ranges]

    def folded(seq: int) -> bool:  # inside a compacted segment but not its last record
        k = bisect.bisect_right(cstarts, seq) - 1
        return k >= 0 and seq < compact_ranges[k][1]

    cands: list[_Cand] = []
    changers: list[int] = []
    cum = INT64_MIN
    for seq, ts, kind, _fl, fid, offset, payload in j._iter_raw(j.first_seq, segs[s_max].last_seq):
        cum = max(cum, ts)
        if kind not in _FREE:
            changers.append(seq)
        if not folded(seq):
            cands.append(_Cand(seq, ts, cum, kind, fid, offset, bytes(payload) if kind in _FREE else b""))
    by_seq = {c.seq: c for c in cands}
    needed = True if dry_run else _bump_namespace(j)
    bind_cache: dict[int, list[tuple[int, int, int, bytes]]] = {}

    # Prefer a boundary a segment or more earlier (the keep-all window keeps
    # more) to dropping points the policy asked for; drop only if no
    # boundary works otherwise.
    dropped: list[int] = []
    outs = None
    for allow_drop in (False, True):
        for s_idx in reversed(sealed):
            dropped = []
            outs = _layout(j, segs, s_idx, cands, by_seq, changers, policy, now, dropped, allow_drop,
                           needed, bind_cache)
            if outs is not None:
                break
        if outs is not None:
            break
    if outs is None:
        res.message = "the kept points do not fit in the sealed segments before the boundary: nothing pruned"
        return res
    if all(s.compacted for s in segs[: s_idx + 1]) and [o.point for o in outs] == [
            s.last_seq for s in segs[: s_idx + 1]]:
        res.message = "already pruned to this policy: nothing to do"
        res.boundary = segs[s_idx].last_seq
        res.kept = [o.point for o in outs]
        return res
    boundary = segs[s_idx].last_seq
    res.boundary = boundary
    res.kept = [o.point for o in outs]
    res.dropped = sorted(dropped)
    first_seq = j.first_seq
    res.pruned_records = sum(1 for c in cands if c.seq <= boundary) - len(outs)
    res.segments_replaced = [s.seg_no for s in segs[: s_idx + 1]]
    res.segments_written = [o.seg_no for o in outs]
    if dry_run:
        res.message = (f"would fold seq {first_seq}..{boundary} into {len(outs)} kept points "
                       f"({res.pruned_records} points pruned)")
        return res
    _execute(j, segs[: s_idx + 1], outs, res)
    res.bytes_after = _space(j)
    res.segment_bytes_after = _seg_bytes(j)
    res.message = f"folded seq {first_seq}..{boundary} into {len(outs)} kept points"
    return res


def _layout(j: Journal, segs: list[Any], s_idx: int, cands: list[_Cand], by_seq: dict[int, _Cand],
            changers: list[int], policy: Policy, now: int, dropped: list[int],
            allow_drop: bool = True, needed: Any = None,
            bind_cache: dict[int, Any] | None = None) -> list[_Out] | None:
    """The compacted segments replacing segs[0..s_idx], or None if they do
    not fit (seq numbers or segment numbers)."""
    boundary = segs[s_idx].last_seq
    mine = [c for c in cands if c.seq <= boundary]
    kept = sorted(_kept_points(mine, policy, now, boundary))
    bookmarks = {c.seq for c in mine if c.kind == Kind.BOOKMARK} if not policy.drop_bookmarks else set()
    top_no = segs[s_idx].seg_no
    # too many kept points for the segment numbers: drop the oldest thinned ones
    while len(kept) > top_no:
        drop = next((k for k in kept[:-1] if k not in bookmarks), None)
        if drop is None or not allow_drop:
            return None
        kept.remove(drop)
        dropped.append(drop)
    bindings = None
    while True:
        outs: list[_Out] = []
        prev = j.first_seq - 1
        ok = True
        for i, k in enumerate(kept):
            lo = bisect.bisect_right(changers, prev)
            changed = lo < len(changers) and changers[lo] <= k
            recs: list[tuple[int, int, int, bytes]] = []
            if k == boundary:
                if bindings is None:
                    cache = bind_cache if bind_cache is not None else {}
                    if boundary not in cache:
                        cache[boundary] = _bindings(j, boundary, _needed_ids(j, boundary) if needed else None)
                    bindings = cache[boundary]
                recs.extend(bindings)
            c = by_seq[k]
            if c.kind in _FREE:
                recs.append((c.kind, c.fid, c.offset, c.payload))
            n = len(recs) + (1 if changed else 0)
            # n >= 1: a point record that changes nothing is in recs, any other
            # is itself a change (so a BASE comes)
            if (i > 0 and n > k - prev) or k - n + 1 < 1:
                ok = False
                # widen the interval: drop the previous kept point if it may go
                if allow_drop and i > 0 and kept[i - 1] not in bookmarks:
                    dropped.append(kept.pop(i - 1))
                    break
                return None
            outs.append(_Out(0, k, c.cum, f"{BASE_PREFIX}{k:016x}" if changed else None, recs))
            prev = k
        if ok:
            break
    for i, o in enumerate(outs):
        o.seg_no = top_no - len(outs) + 1 + i
    return outs


def _bump_namespace(j: Journal) -> bool:
    """Bump the head's namespace generation: every writer's cached path ->
    file id bindings are then stale, so that each record appended from now
    on follows a FILEMAP (or CREATE) of its id; only ids used by records
    already in the journal need re-binding at the boundary."""
    writer = j._need_writer()
    writer.lock()
    try:
        st = writer.get_state()
        if st is None:
            return False
        writer.set_state(next_seq=st.next_seq, seg_no=st.seg_no, seg_off=st.seg_off,
                         next_file_id=st.next_file_id, ns_gen=st.ns_gen + 1,
                         synced_seq=st.synced_seq, last_ts=st.last_ts, seg_size=st.seg_size,
                         uuid=bytes(ffi.buffer(st.uuid, 16)))
    finally:
        writer.unlock()
    from cdpcore._native import UINT64_MAX

    j._ns_gen = UINT64_MAX
    j._paths.clear()
    j.refresh()
    return True


def _needed_ids(j: Journal, boundary: int) -> set[int]:
    """File ids that records after the boundary use before (re)binding them."""
    from cdpcore.format import FILE_KINDS

    bound: set[int] = set()
    need: set[int] = set()
    for _s, _ts, kind, _fl, fid, _off, _p in j._iter_raw(boundary + 1, j.last_seq):
        if kind == Kind.BASE:
            break
        if kind in (Kind.FILEMAP, Kind.CREATE):
            bound.add(fid)
        elif fid and (kind in FILE_KINDS or kind == Kind.FLUSH) and fid not in bound:
            need.add(fid)
    return need


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
        _fsync_dir(d)


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


def _execute(j: Journal, old: list[Any], outs: list[_Out], res: PruneResult) -> None:
    from cdpcore.plan import build_plan
    from cdpcore.restore import write_plan

    segdir = os.path.join(j.path, SEGMENT_DIR)
    basedir = os.path.join(j.path, BASE_DIR)
    os.makedirs(basedir, exist_ok=True)
    boundary = old[-1].last_seq
    old_refs = _base_refs(j, j.first_seq, boundary)
    new_bases: list[str] = []
    prev_base: str | None = None
    # 1. the bases, under temporary names
    for o in outs:
        if o.base is None:
            continue
        if os.path.isdir(os.path.join(basedir, o.base)):
            prev_base = os.path.join(basedir, o.base)
            continue
        tmp = os.path.join(basedir, o.base + PRUNE_SUFFIX)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.mkdir(tmp)
        with build_plan(j, o.point) as plan:
            write_plan(plan, tmp)
            if prev_base is not None:
                _share(plan, tmp, prev_base)
        _fsync_tree(tmp)
        prev_base = tmp
        _fsync_dir(basedir)
        new_bases.append(o.base)
        _step()
    # 2. the compacted segments, under temporary names
    for o in outs:
        recs = ([(Kind.BASE, 0, 0, f"{BASE_DIR}/{o.base}".encode())] if o.base else []) + o.records
        first = o.point - len(recs) + 1
        data = bytearray(encode_segment_header(j.meta.uuid, o.seg_no, first, now_us(), SEG_COMPACTED))
        for i, (kind, fid, offset, payload) in enumerate(recs):
            data += encode_record(kind, first + i, o.ts, fid, offset, payload)
        path = os.path.join(segdir, segment_name(o.seg_no) + PRUNE_SUFFIX)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _step()
    _fsync_dir(segdir)
    # 3. the manifest: from here on the prune is decided
    keep_refs = {o.base for o in outs if o.base}
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
    segdir = os.path.join(path, SEGMENT_DIR)
    basedir = os.path.join(path, BASE_DIR)
    new = set(manifest["new_segments"])
    for name in manifest["new_bases"]:
        tmp = os.path.join(basedir, name + PRUNE_SUFFIX)
        if os.path.isdir(tmp):
            os.rename(tmp, os.path.join(basedir, name))
            _step()
    if os.path.isdir(basedir):
        _fsync_dir(basedir)
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
    _fsync_dir(segdir)
    for name in manifest["old_bases"]:
        p = os.path.join(basedir, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
            _step()
    if os.path.isdir(basedir):
        _fsync_dir(basedir)
    os.unlink(os.path.join(path, MANIFEST))
    _fsync_dir(path)
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
