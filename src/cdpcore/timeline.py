"""Timeline: what a journal says happened, interval by interval, and which
intervals look like ransomware.

Theory of operation
-------------------
One pass over the records, in sequence order, counts per interval (bucket,
aligned to multiples of its width since the epoch, by each record's own
timestamp) the bytes written, the records, the files touched and the
creates, renames, unlinks and truncates.

Ransomware destroys *existing* data with *incompressible* bytes across
*many files*, and each of those three words rules out a common honest
workload: a compressed backup (or a database's encrypted pages) writes
incompressible data to one file; a PACS archive writes many compressed
images, but to new files; a user reorganising folders renames many old
files, but writes nothing incompressible. So an interval is flagged when
both

- at least DefaultMinFiles distinct files received incompressible writes,
  and
- at least DefaultMinFiles distinct *old* files were damaged in it: got an
  incompressible write, or were renamed or unlinked.

A file is *old* when its data is older than DefaultFreshUs at the moment of
the damage: it was in the journal's base snapshot, or it was created (or
first written, when nothing was at its path) more than DefaultFreshUs
earlier. Writing a new file and renaming it into place (temp + rename) is
therefore not damage, but the same rename an hour later is.

Incompressible means: zstd level 1 shrinks the first DefaultSampleSize bytes
of the payload to no less than DefaultIncompressibleRatio of their size.
zstd rather than lz4 because lz4 cannot compress 16-bit medical pixel data
at all (ratio 1.004, like random bytes) while zstd-1 gets it to ~0.75; and
rather than a byte-histogram Shannon entropy because that costs ~600 us per
4 KiB in Python against zstd's 5-17 us (measured on these machines).
Judging every write would cost that much per record, so the first write to
each file in each interval is judged (which keeps the per-file counts
exact for ransomware, whose first write to a file is ciphertext) plus every
DefaultSampleEvery-th write; writes under DefaultMinSampleSize bytes are not
judged (a frame's overhead dominates them).

The suggested restore point is the state just before the first flagged
interval (the longest prefix of records stamped before its start), or,
preferably, the last FLUSH of all files at or before that state (a
crash-consistent point). `latest_before` always gives the former.

This is a heuristic: docs/api.md lists what it does not see.
"""
from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass, field
from typing import Any

import zstandard

from cdpcore.errors import CdpError, PointError
from cdpcore.format import BASE_DIR, Kind, decode_path, split_pair
from cdpcore.journal import Journal
from cdpcore.point import PointLike, format_us

DefaultBucket = "1m"
DefaultSampleSize = 4096
DefaultMinSampleSize = 512
DefaultIncompressibleRatio = 0.95
DefaultSampleEvery = 16
DefaultMinFiles = 8
DefaultFreshUs = 300_000_000  # 5 minutes

_UNITS = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_BUCKET_RE = re.compile(r"([1-9][0-9]{0,5})([smhd])")
_OLD = -(2**63)  # born before anything the journal saw


class PlotUnavailable(CdpError):
    """--png without matplotlib installed."""

    exit_code = 12


def parse_bucket(s: str) -> int:
    """'1s', '10s', '1m', '1h', '1d' (any N of s, m, h, d): width in microseconds."""
    m = _BUCKET_RE.fullmatch(s.strip())
    if m is None:
        raise ValueError(f"invalid bucket {s!r}: expected a whole number and a unit, "
                         "e.g. 1s, 10s, 1m, 1h or 1d")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(slots=True)
class Bucket:
    start: int  # epoch microseconds
    width: int
    first_seq: int
    last_seq: int = 0
    records: int = 0
    bytes_written: int = 0
    writes: int = 0
    creates: int = 0
    renames: int = 0
    unlinks: int = 0
    truncates: int = 0
    sampled: int = 0  # writes judged
    incompressible: int = 0  # of those, incompressible
    files: set[int] = field(default_factory=set)
    judged: set[int] = field(default_factory=set)  # files with a write judged
    entropy_files: set[int] = field(default_factory=set)
    damaged_files: set[int] = field(default_factory=set)
    flagged: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start, "time": format_us(self.start),
            "end_time": format_us(self.start + self.width), "first_seq": self.first_seq,
            "last_seq": self.last_seq, "records": self.records,
            "bytes_written": self.bytes_written, "writes": self.writes,
            "files": len(self.files), "creates": self.creates, "renames": self.renames,
            "unlinks": self.unlinks, "truncates": self.truncates, "sampled": self.sampled,
            "incompressible": self.incompressible,
            "incompressible_files": len(self.entropy_files),
            "damaged_files": len(self.damaged_files), "flagged": self.flagged,
        }


@dataclass(slots=True)
class SuggestedPoint:
    seq: int
    ts: int
    kind: str  # "FLUSH" (a crash-consistent point) or "record"

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "ts": self.ts, "time": format_us(self.ts), "kind": self.kind,
                "point": f"seq:{self.seq}"}


@dataclass(slots=True)
class Timeline:
    journal: str
    bucket: str
    width: int
    since_seq: int  # records with seq in (since_seq, until_seq]
    until_seq: int
    buckets: list[Bucket]
    suggestion: SuggestedPoint | None = None
    latest_before: SuggestedPoint | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged(self) -> list[Bucket]:
        return [b for b in self.buckets if b.flagged]

    def to_json(self) -> dict[str, Any]:
        return {
            "journal": self.journal, "bucket": self.bucket, "bucket_us": self.width,
            "since_seq": self.since_seq, "until_seq": self.until_seq,
            "records": sum(b.records for b in self.buckets),
            "bytes_written": sum(b.bytes_written for b in self.buckets),
            "buckets": [b.to_json() for b in self.buckets],
            "flagged": [format_us(b.start) for b in self.flagged],
            "suggestion": self.suggestion.to_json() if self.suggestion else None,
            "latest_before": self.latest_before.to_json() if self.latest_before else None,
            "thresholds": self.thresholds,
        }


class _Files:
    """Which file (an inode key) each path and file id names, and how old
    its data is. Keys are file ids' own numbers where a FILEMAP or CREATE
    binds them, and negative numbers for files the journal meets only by
    name (a base file renamed or unlinked without ever being written)."""

    def __init__(self, journal_path: str):
        self.journal_path = journal_path
        self.at: dict[str, int] = {}  # path -> key
        self.of_fid: dict[int, int] = {}  # file id -> key
        self.born: dict[int, int] = {}  # key -> ts its data was created (_OLD: base)
        self.gone: set[str] = set()  # paths emptied since the base: nothing old there
        self.base: str | None = None
        self._next = 0

    def _new(self, born: int) -> int:
        self._next -= 1
        self.born[self._next] = born
        return self._next

    def _born_at(self, path: str, ts: int) -> int:
        """Age of data found at a path the journal has not bound yet: old when
        it is in the base snapshot (and nothing removed it since)."""
        if self.base is not None and path not in self.gone:
            try:
                if os.path.isfile(os.path.join(self.base, *path.split("/"))):
                    return _OLD
            except OSError:
                pass
        return ts

    def key_at(self, path: str, ts: int) -> int:
        key = self.at.get(path)
        if key is None:
            key = self.at[path] = self._new(self._born_at(path, ts))
        return key

    def apply(self, kind: int, fid: int, payload: memoryview, ts: int) -> int | None:
        """Update the model; returns the key of a file that a RENAME or UNLINK
        took from its old name (for damage counting)."""
        if kind == Kind.FILEMAP:
            path = decode_path(bytes(payload))
            self.of_fid[fid] = self.key_at(path, ts)
        elif kind == Kind.CREATE:
            path = decode_path(bytes(payload))
            self.at[path] = self.of_fid[fid] = self._new(ts)
            self.gone.discard(path)
        elif kind == Kind.UNLINK:
            path = decode_path(bytes(payload))
            key = self.at.pop(path, None)
            if key is None:
                key = self._new(self._born_at(path, ts))
            self.gone.add(path)
            return key
        elif kind == Kind.RENAME:
            a, b = split_pair(bytes(payload))
            old, new = decode_path(a), decode_path(b)
            if old == new:
                return None
            prefix = old + "/"
            inside = [p for p in self.at if p.startswith(prefix)] if old not in self.at else []
            self.gone.add(old)
            self.gone.discard(new)
            if inside:  # a directory: its files move, none is destroyed
                for p in inside:
                    self.at[new + p[len(old):]] = self.at.pop(p)
                return None
            key = self.at.pop(old, None)
            if key is None:
                key = self._new(self._born_at(old, ts))
            self.at[new] = key
            return key
        elif kind == Kind.LINK:
            a, b = split_pair(bytes(payload))
            src = self.at.get(decode_path(a))
            if src is not None:
                self.at[decode_path(b)] = src
        elif kind == Kind.RMDIR:
            top = decode_path(bytes(payload))
            for p in [p for p in self.at if p == top or p.startswith(top + "/")]:
                del self.at[p]
            self.gone.add(top)
        elif kind == Kind.BASE:
            ref = bytes(payload).decode("utf-8", "replace")
            self.base = os.path.join(self.journal_path, *ref.split("/")) if ref.startswith(
                BASE_DIR + "/") else None
            self.at.clear()
            self.of_fid.clear()
            self.gone.clear()
        return None


_TRACKED = frozenset({Kind.FILEMAP, Kind.CREATE, Kind.UNLINK, Kind.RENAME, Kind.LINK, Kind.RMDIR,
                      Kind.BASE})


def timeline(journal: Journal | str | os.PathLike[str], bucket: str = DefaultBucket,
             since: PointLike | None = None, until: PointLike | None = None) -> Timeline:
    """Activity per `bucket` interval of the records in (since, until], the
    intervals that look like ransomware and the suggested restore point."""
    width = parse_bucket(bucket)
    if isinstance(journal, Journal):
        return _timeline(journal, bucket, width, since, until)
    with Journal.open(journal, readonly=True) as j:
        return _timeline(j, bucket, width, since, until)


def _timeline(j: Journal, bucket: str, width: int, since: PointLike | None,
              until: PointLike | None) -> Timeline:
    lo = j.resolve(since) if since is not None else j.first_seq - 1
    hi = j.resolve(until) if until is not None else j.resolve("latest")
    files = _Files(j.path)
    buckets: dict[int, Bucket] = {}
    flushes: list[tuple[int, int]] = []  # (seq, ts) of FLUSH records of all files
    judge = zstandard.ZstdCompressor(level=1).compress
    limit = DefaultIncompressibleRatio
    fresh = DefaultFreshUs
    # _iter_raw, not records(): payloads stay views into the mapped segment
    # (only sampled ones are copied) and no path is resolved per record.
    for seq, ts, kind, _fl, fid, offset, payload in j._iter_raw(j.first_seq, hi):
        taken = files.apply(kind, fid, payload, ts) if kind in _TRACKED else None
        if kind == Kind.FLUSH and fid == 0:
            flushes.append((seq, ts))
        if seq <= lo:
            continue  # before `since`: only the model of the files counts
        index = ts // width
        b = buckets.get(index)
        if b is None:
            b = buckets[index] = Bucket(index * width, width, seq)
        b.records += 1
        b.last_seq = seq
        if kind == Kind.WRITE:
            key = files.of_fid.get(fid, fid)
            n = len(payload)
            b.writes += 1
            b.bytes_written += n
            b.files.add(key)
            if n >= DefaultMinSampleSize and (key not in b.judged
                                              or b.writes % DefaultSampleEvery == 0):
                sample = payload[:DefaultSampleSize]
                b.judged.add(key)
                b.sampled += 1
                if len(judge(sample)) >= limit * len(sample):
                    b.incompressible += 1
                    b.entropy_files.add(key)
                    if files.born.get(key, _OLD) < ts - fresh:
                        b.damaged_files.add(key)
        elif kind == Kind.RENAME or kind == Kind.UNLINK:
            if kind == Kind.RENAME:
                b.renames += 1
            else:
                b.unlinks += 1
            if taken is not None:  # None: a directory was renamed
                b.files.add(taken)
                if files.born.get(taken, _OLD) < ts - fresh:
                    b.damaged_files.add(taken)
        elif kind == Kind.TRUNCATE or kind == Kind.CREATE:
            b.files.add(files.of_fid.get(fid, fid))
            b.truncates += kind == Kind.TRUNCATE
            b.creates += kind == Kind.CREATE
    out = [buckets[k] for k in sorted(buckets)]
    for b in out:
        b.flagged = len(b.entropy_files) >= DefaultMinFiles and len(b.damaged_files) >= DefaultMinFiles
    t = Timeline(j.path, bucket, width, lo, hi, out, thresholds={
        "sample_size": DefaultSampleSize, "min_sample_size": DefaultMinSampleSize,
        "incompressible_ratio": DefaultIncompressibleRatio, "sample_every": DefaultSampleEvery,
        "min_files": DefaultMinFiles, "fresh_us": DefaultFreshUs})
    flagged = t.flagged
    if flagged:
        t.latest_before, t.suggestion = _suggest(j, flagged[0].start, flushes)
    return t


def _suggest(j: Journal, start: int, flushes: list[tuple[int, int]]
             ) -> tuple[SuggestedPoint | None, SuggestedPoint | None]:
    """(the state just before `start`, the last FLUSH of all files at or
    before it, else that same state)."""
    try:
        seq = j.resolve(start - 1)
    except PointError:  # the attack began with the journal's first record
        return None, None
    if seq < j.first_seq:
        return None, None
    ts = next(j._iter_raw(seq, seq))[1]
    before = SuggestedPoint(seq, ts, "record")
    i = bisect.bisect_right(flushes, (seq, 2**63)) - 1
    if i >= 0:
        return before, SuggestedPoint(flushes[i][0], flushes[i][1], "FLUSH")
    return before, before


# ---- picture -------------------------------------------------------------------------

def plot(t: Timeline, path: str) -> None:
    """Write a PNG: bytes written per interval (flagged intervals in red),
    files touched, and the suggested restore point."""
    try:
        # Figure, not pyplot: no global backend switch or figure registry in
        # the caller's process; savefig renders with Agg.
        import matplotlib.dates as mdates
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("--png needs matplotlib: pip install 'cdpcore[plot]'") from None
    from cdpcore.point import us_to_datetime

    def x(us: int) -> float:  # matplotlib's date axis unit
        return float(mdates.date2num(us_to_datetime(us)))

    fig = Figure(figsize=(11, 4.5), dpi=100)
    ax = fig.subplots()
    ax.xaxis_date()
    ax.bar([x(b.start) for b in t.buckets], [b.bytes_written / 1e6 for b in t.buckets],
           width=t.width / 86_400_000_000, align="edge",
           color=["#d62728" if b.flagged else "#1f77b4" for b in t.buckets])
    ax.set_ylabel("MB written")
    ax.set_xlabel("time (UTC)")
    ax2 = ax.twinx()
    ax2.plot([x(b.start + t.width // 2) for b in t.buckets],
             [len(b.files) for b in t.buckets], color="#2ca02c", marker="o", linestyle="none")
    ax2.set_ylabel("files touched", color="#2ca02c")
    if t.suggestion is not None:
        ax.axvline(x(t.suggestion.ts), color="black", linestyle="--",
                   label=f"suggested restore point (seq {t.suggestion.seq})")
        ax.legend(loc="upper left")
    flagged = len(t.flagged)
    ax.set_title(f"{os.path.basename(t.journal)}: {t.bucket} intervals"
                 + (f", {flagged} flagged as ransomware-like" if flagged else ""))
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, format="png")
